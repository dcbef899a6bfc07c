//! `cw load`: images from `docker save` archives and OCI layouts (directories or tars), for nodes
//! without registry access. Every blob is verified like a pulled one; names inside the archive are
//! resolved inside it and never followed out.

use crate::image::digest::Digest;
use crate::image::manifest::{self, Parsed, Platform};
use crate::image::reference::Reference;
use crate::pull::PullError;
use crate::store::ingest::{HashingReader, IngestError, NewImage};
use crate::store::unpack::{self, Options, Tree, Whiteouts};
use crate::store::{ImageRecord, Store};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {reason}")]
    Bad { path: String, reason: String },
    #[error(transparent)]
    Pull(#[from] PullError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

fn bad(path: &Path, reason: impl Into<String>) -> LoadError {
    LoadError::Bad {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

struct Source {
    root: PathBuf,
    tree: Tree,
    /// Temp dir to remove at the end (archive input).
    tmp: Option<PathBuf>,
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Some(t) = &self.tmp {
            crate::store::discard(t);
        }
    }
}

impl Source {
    /// Whether the top-level entry `name` exists (of whatever type: reading it says more): in
    /// the directory given, or where an archive was unpacked.
    fn present(&self, name: &str) -> bool {
        let dir = self.tmp.as_ref().unwrap_or(&self.root);
        std::fs::symlink_metadata(dir.join(name)).is_ok()
    }

    fn read(&mut self, rel: &str, limit: usize) -> Result<Vec<u8>, LoadError> {
        let mut f = self
            .tree
            .open_file(rel.as_bytes())
            .map_err(|e| bad(&self.root.join(rel), format!("cannot open: {e}")))?;
        let mut v = Vec::new();
        (&mut f)
            .take(limit as u64 + 1)
            .read_to_end(&mut v)
            .map_err(|e| bad(&self.root.join(rel), e.to_string()))?;
        if v.len() > limit {
            return Err(bad(
                &self.root.join(rel),
                format!("larger than the {limit}-byte limit"),
            ));
        }
        Ok(v)
    }

    fn read_blob(&mut self, d: &Digest, limit: usize) -> Result<Vec<u8>, LoadError> {
        let rel = format!("blobs/sha256/{}", d.hex());
        let v = self.read(&rel, limit)?;
        let actual = Digest::of(&v);
        if &actual != d {
            return Err(bad(
                &self.root.join(rel),
                format!("digest mismatch: expected {d}, got {actual}"),
            ));
        }
        Ok(v)
    }
}

fn open_source(store: &Store, input: &Path) -> Result<Source, LoadError> {
    let meta = std::fs::metadata(input).map_err(|e| bad(input, e.to_string()))?;
    if meta.is_dir() {
        let tree = Tree::open(input).map_err(|e| bad(input, e.to_string()))?;
        return Ok(Source {
            root: input.into(),
            tree,
            tmp: None,
        });
    }
    let f = std::fs::File::open(input).map_err(|e| bad(input, e.to_string()))?;
    let tmp = store.tmp_dir("load")?;
    let dec = unpack::decompressor(f).map_err(|e| bad(input, e.to_string()))?;
    if let Err(e) = unpack::unpack(
        dec,
        &tmp,
        Options {
            whiteouts: Whiteouts::Apply,
            chown: false,
            budget: Some(unpack::Budget::for_dir(
                &tmp,
                None,
                &format!("archive {}", input.display()),
            )),
        },
    ) {
        crate::store::discard(&tmp);
        return Err(bad(input, format!("not a readable tar archive: {e}")));
    }
    let tree = Tree::open(&tmp).map_err(|e| bad(input, e.to_string()))?;
    Ok(Source {
        root: input.into(),
        tree,
        tmp: Some(tmp),
    })
}

/// Unpack one layer file, checking the compressed digest (when known) and the diff id; counted
/// in `unpacked` once committed.
fn load_layer(
    store: &Store,
    src: &mut Source,
    rel: &str,
    compressed: Option<&Digest>,
    diff_id: &Digest,
    budget: &std::sync::Arc<unpack::Budget>,
    unpacked: &std::cell::Cell<usize>,
) -> Result<bool, LoadError> {
    if store.layer(diff_id).is_some() {
        return Ok(false);
    }
    let _lock = store.lock_layer(diff_id)?;
    if store.layer(diff_id).is_some() {
        return Ok(false);
    }
    let f = src
        .tree
        .open_file(rel.as_bytes())
        .map_err(|e| bad(&src.root.join(rel), format!("cannot open layer: {e}")))?;
    let mut hr = HashingReader::new(f);
    let staged = store.stage_layer(&mut hr, budget, diff_id)?;
    io::copy(&mut hr, &mut io::sink()).map_err(|e| bad(&src.root.join(rel), e.to_string()))?;
    let blob_digest = hr.digest();
    if let Some(c) = compressed {
        if &blob_digest != c {
            return Err(bad(
                &src.root.join(rel),
                format!("digest mismatch: expected {c}, got {blob_digest}"),
            ));
        }
    }
    staged.commit(store, diff_id, &blob_digest)?;
    unpacked.set(unpacked.get() + 1);
    Ok(true)
}

/// Commit an image whose layers are in: its manifest, config and `names`.
fn record(
    store: &Store,
    manifest_bytes: &[u8],
    config: &Digest,
    config_bytes: &[u8],
    cfg: &manifest::ImageConfig,
    names: &[String],
) -> Result<ImageRecord, LoadError> {
    Ok(store.commit_image(&NewImage {
        manifest_digest: Digest::of(manifest_bytes),
        manifest_bytes,
        index: None,
        config_digest: config.clone(),
        config_bytes,
        config: cfg,
        names,
    })?)
}

fn normalise_names(raw: &[String], path: &Path) -> Result<Vec<String>, LoadError> {
    raw.iter()
        .map(|n| {
            Reference::parse(n)
                .map(|r| r.to_string())
                .map_err(|e| bad(path, e.to_string()))
        })
        .collect()
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Load every image in `input`. `platform` picks from multi-platform OCI indexes.
/// `max_unpacked` bounds what its layers may unpack to together (the store's free space does
/// anyway).
pub fn load(
    store: &Store,
    input: &Path,
    platform: &Platform,
    max_unpacked: Option<u64>,
) -> Result<Vec<ImageRecord>, LoadError> {
    let unpacked = std::cell::Cell::new(0);
    let res = load_all(store, input, platform, max_unpacked, &unpacked);
    // what it unpacked, also before an error, reaches the disk in the background
    // (Store::settle_layers); a load of layers the store had already needs no sync
    if unpacked.get() > 0 {
        store.settle_in_background();
    }
    res
}

fn load_all(
    store: &Store,
    input: &Path,
    platform: &Platform,
    max_unpacked: Option<u64>,
    unpacked: &std::cell::Cell<usize>,
) -> Result<Vec<ImageRecord>, LoadError> {
    let mut src = open_source(store, input)?;
    store.clean_tmp();
    let budget = unpack::Budget::for_dir(
        &store.root().join("tmp"),
        max_unpacked,
        &format!("the images in {}", input.display()),
    );
    // which kind is told by which file is there; one that is there but cannot be read is an
    // error of its own (e.g. umoci's index.json is 0600: another user cannot load the layout)
    if src.present("manifest.json") {
        let m = src.read("manifest.json", manifest::MAX_MANIFEST_BYTES)?;
        let entries: Vec<DockerSaveEntry> = serde_json::from_slice(&m)
            .map_err(|e| bad(&input.join("manifest.json"), e.to_string()))?;
        let mut out = Vec::new();
        for e in entries {
            let config_bytes = src.read(&e.config, manifest::MAX_CONFIG_BYTES)?;
            let config = Digest::of(&config_bytes);
            let cfg = manifest::parse_config_for(&config_bytes, e.layers.len())
                .map_err(PullError::from)?;
            let mut layers = Vec::new();
            for (rel, diff) in e.layers.iter().zip(&cfg.diff_ids) {
                // newer docker saves name layers blobs/sha256/<digest>: that is their digest too
                let compressed = rel
                    .strip_prefix("blobs/sha256/")
                    .and_then(|h| Digest::parse(&format!("sha256:{h}")).ok());
                load_layer(
                    store,
                    &mut src,
                    rel,
                    compressed.as_ref(),
                    diff,
                    &budget,
                    unpacked,
                )?;
                let size = store.layer(diff).map(|l| l.size).unwrap_or(0);
                layers.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": diff, "size": size}));
            }
            // docker save archives carry no manifest: write the OCI manifest they imply
            let man = serde_json::json!({
                "schemaVersion": 2, "mediaType": manifest::OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_bytes.len()},
                "layers": layers,
            });
            let names = normalise_names(&e.repo_tags.unwrap_or_default(), input)?;
            out.push(record(
                store,
                man.to_string().as_bytes(),
                &config,
                &config_bytes,
                &cfg,
                &names,
            )?);
        }
        return Ok(out);
    }
    if !src.present("index.json") {
        return Err(bad(
            input,
            "neither a docker save archive (manifest.json) nor an OCI layout (index.json)",
        ));
    }
    let idx_bytes = src.read("index.json", manifest::MAX_MANIFEST_BYTES)?;
    let Parsed::Index(entries) =
        manifest::parse(&idx_bytes, Some(manifest::OCI_INDEX)).map_err(PullError::from)?
    else {
        return Err(bad(&input.join("index.json"), "is not an image index"));
    };
    let raw: serde_json::Value =
        serde_json::from_slice(&idx_bytes).map_err(|e| bad(input, e.to_string()))?;
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let tag = raw["manifests"][i]["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .map(str::to_string);
        let mut bytes = src.read_blob(&e.digest, manifest::MAX_MANIFEST_BYTES)?;
        let mut parsed = manifest::parse(&bytes, Some(&e.media_type)).map_err(PullError::from)?;
        if let Parsed::Index(children) = &parsed {
            let c = manifest::select_platform(children, platform).map_err(PullError::from)?;
            let d = c.digest.clone();
            bytes = src.read_blob(&d, manifest::MAX_MANIFEST_BYTES)?;
            parsed = manifest::parse(&bytes, Some(&c.media_type)).map_err(PullError::from)?;
        }
        let Parsed::Image(m) = parsed else {
            return Err(bad(input, "nested index"));
        };
        let config_bytes = src.read_blob(&m.config, manifest::MAX_CONFIG_BYTES)?;
        let cfg =
            manifest::parse_config_for(&config_bytes, m.layers.len()).map_err(PullError::from)?;
        for (l, diff) in m.layers.iter().zip(&cfg.diff_ids) {
            load_layer(
                store,
                &mut src,
                &format!("blobs/sha256/{}", l.digest.hex()),
                Some(&l.digest),
                diff,
                &budget,
                unpacked,
            )?;
        }
        // a bare tag like "latest" names nothing on its own: only full references become names
        let names = match tag.filter(|t| t.contains('/') || t.contains(':')) {
            Some(t) => normalise_names(&[t], input)?,
            None => vec![],
        };
        out.push(record(
            store,
            &bytes,
            &m.config,
            &config_bytes,
            &cfg,
            &names,
        )?);
    }
    Ok(out)
}
