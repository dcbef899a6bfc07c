//! What the store keeps and what it may drop: the in-use records of live rootfs mounts, image
//! removal, and the LRU prune down to a size, which never removes a layer a live run is built
//! from.

use super::*;

impl Store {
    // ---- in-use records (written by rootfs setup, removed at teardown)

    pub fn mark_in_use(&self, run: &str, layers: &[Digest], mountpoint: &Path) -> Result<()> {
        let p = self.root.join("inuse").join(format!("{run}.json"));
        let v = serde_json::json!({ "layers": layers, "mountpoint": mountpoint, "pid": std::process::id() });
        replace_file(&p, v.to_string().as_bytes()).map_err(io_err(&p, "writing in-use record"))
    }

    pub fn clear_in_use(&self, run: &str) {
        let _ = fs::remove_file(self.root.join("inuse").join(format!("{run}.json")));
    }

    /// Layers used by live rootfs mounts. Records whose mountpoint no longer exists are dropped.
    pub fn layers_in_use(&self) -> HashSet<Digest> {
        let mut out = HashSet::new();
        let Ok(rd) = fs::read_dir(self.root.join("inuse")) else {
            return out;
        };
        for e in rd.flatten() {
            let Ok(b) = fs::read(e.path()) else { continue };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) else {
                continue;
            };
            let mp = v["mountpoint"].as_str().map(PathBuf::from);
            if mp.as_ref().is_some_and(|m| m.exists()) {
                if let Ok(ls) = serde_json::from_value::<Vec<Digest>>(v["layers"].clone()) {
                    out.extend(ls);
                }
            } else {
                let _ = fs::remove_file(e.path());
            }
        }
        out
    }

    // ---- removal and garbage collection

    /// Remove an image (by any name). Its layers go when no other image uses them.
    pub fn remove_image(&self, what: &str, force: bool) -> Result<Vec<String>> {
        let _g = self.lock_index()?;
        let img = self.lookup(what)?;
        let in_use = self.layers_in_use();
        let users = img.layers.iter().filter(|l| in_use.contains(l)).count();
        if users > 0 && !force {
            return Err(StoreError::InUse {
                name: what.to_string(),
                users,
            });
        }
        let mut refs = self.refs()?;
        // A plain name removes just that tag when the image has others (like docker rmi).
        let by_name = crate::image::reference::Reference::parse(what)
            .ok()
            .map(|r| r.to_string())
            .filter(|n| refs.get(n) == Some(&img.manifest));
        let mut removed = Vec::new();
        if let Some(n) = &by_name {
            if img.names.len() > 1 {
                refs.remove(n);
                self.write_refs(&refs)?;
                let mut i = img.clone();
                i.names.retain(|x| x != n);
                self.put_image(&i)?;
                return Ok(vec![format!("Untagged: {n}")]);
            }
        }
        refs.retain(|n, d| {
            if *d == img.manifest {
                removed.push(format!("Untagged: {n}"));
                false
            } else {
                true
            }
        });
        self.write_refs(&refs)?;
        let p = self.image_path(&img.manifest);
        fs::remove_file(&p).map_err(io_err(&p, "removing image record"))?;
        removed.push(format!("Deleted: {}", img.manifest));
        removed.extend(
            self.gc_unreferenced(&in_use)?
                .into_iter()
                .map(|d| format!("Deleted layer: {d}")),
        );
        Ok(removed)
    }

    /// Remove layers and blobs no image refers to. Caller holds the index lock.
    fn gc_unreferenced(&self, in_use: &HashSet<Digest>) -> Result<Vec<Digest>> {
        let images = self.images();
        let mut keep: HashSet<Digest> = in_use.clone();
        let mut keep_blobs: HashSet<Digest> = HashSet::new();
        for i in &images {
            keep.extend(i.layers.iter().cloned());
            keep_blobs.insert(i.manifest.clone());
            keep_blobs.insert(i.config.clone());
            if let Some(x) = &i.index {
                keep_blobs.insert(x.clone());
            }
        }
        let mut removed = Vec::new();
        for l in self.layers() {
            if keep.contains(&l.diff_id) {
                continue;
            }
            // skip a layer someone is unpacking right now
            let Some(_lk) = self.try_lock_layer(&l.diff_id)? else {
                continue;
            };
            let _ = fs::remove_file(self.layer_record_path(&l.diff_id));
            let d = self.layer_dir(&l.diff_id);
            remove_tree(&d).map_err(io_err(&d, "removing layer"))?;
            removed.push(l.diff_id);
        }
        if let Ok(rd) = fs::read_dir(self.root.join("blobs/sha256")) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if let Ok(d) = Digest::parse(&format!("sha256:{n}")) {
                    if !keep_blobs.contains(&d) {
                        let _ = fs::remove_file(e.path());
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Disk use of layers (content bytes).
    pub fn size(&self) -> u64 {
        self.layers().iter().map(|l| l.size).sum()
    }

    /// Garbage-collect: drop unreferenced layers, then least-recently-used images (not in use)
    /// until the layers fit in `target` bytes. Returns the removed image names/ids and bytes freed.
    pub fn prune(&self, target: Option<u64>) -> Result<(Vec<String>, u64)> {
        let _g = self.lock_index()?;
        let before = self.size();
        let in_use = self.layers_in_use();
        let mut removed: Vec<String> = self
            .gc_unreferenced(&in_use)?
            .into_iter()
            .map(|d| format!("layer {d}"))
            .collect();
        if let Some(target) = target {
            let mut images = self.images();
            images.sort_by_key(|i| i.used_ns);
            let sizes: HashMap<Digest, u64> = self
                .layers()
                .into_iter()
                .map(|l| (l.diff_id.clone(), l.size))
                .collect();
            let mut total: u64 = sizes.values().sum();
            let mut refs = self.refs()?;
            for img in images {
                if total <= target {
                    break;
                }
                if img.layers.iter().any(|l| in_use.contains(l)) {
                    continue;
                }
                refs.retain(|_, d| *d != img.manifest);
                self.write_refs(&refs)?;
                let _ = fs::remove_file(self.image_path(&img.manifest));
                removed.push(format!(
                    "image {} ({})",
                    img.names.first().cloned().unwrap_or_default(),
                    img.manifest.short()
                ));
                for l in self.gc_unreferenced(&in_use)? {
                    total = total.saturating_sub(sizes.get(&l).copied().unwrap_or(0));
                    removed.push(format!("layer {l}"));
                }
            }
        }
        let after = self.size();
        Ok((removed, before.saturating_sub(after)))
    }
}
