//! The dependency cache (spec §9.1): one downloaded copy per `(parent_uuid, parent_path)`,
//! shared by the runs that need it, evicted least-recently-used (only entries no run holds)
//! when the cache outgrows `--max-work-dir-size`. Directories arrive as tar.gz and go through the
//! store's extractor (nothing can land outside the entry, no device nodes); files are gunzipped.
//! State lives in `<work-dir>/dependencies-state.json`; downloads interrupted by a restart
//! start again.

use super::client::Server;
use super::record::now;
use crate::store::unpack::{self, Whiteouts};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DepStage {
    Downloading,
    Ready,
    Failed,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub parent_uuid: String,
    pub parent_path: String,
    /// Directory entry name under `<work-dir>/dependencies/`.
    pub name: String,
    pub stage: DepStage,
    /// Bytes over the wire (archived size), as the official worker counts.
    pub size_bytes: u64,
    pub dependents: BTreeSet<String>,
    pub last_used: f64,
    pub message: String,
    #[serde(skip)]
    pub progress: Arc<AtomicU64>,
    #[serde(skip)]
    pub active: bool,
}

pub type Key = (String, String);

pub struct Cache {
    pub dir: PathBuf,
    state_file: PathBuf,
    entries: Mutex<BTreeMap<Key, Entry>>,
    max_bytes: u64,
    attempts: u32,
    server: Arc<Server>,
}

/// A bundle uuid as the server makes them (`0x` + 32 hex); anything else is refused before it
/// becomes part of a path or URL.
pub fn valid_uuid(u: &str) -> bool {
    u.len() == 34 && u.starts_with("0x") && u[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cache entry name: `parent_uuid`, or `parent_uuid_path_with_underscores` (spec §9.1).
fn base_name(uuid: &str, path: &str) -> String {
    if path.is_empty() {
        return uuid.to_string();
    }
    let n = format!("{uuid}_{}", path.replace('/', "_"));
    if n.len() > 200 {
        use sha2::Digest;
        let h = sha2::Sha256::digest(path.as_bytes());
        format!("{uuid}_{}", hex::encode(&h[..12]))
    } else {
        n
    }
}

impl Cache {
    pub fn open(
        work_dir: &Path,
        max_bytes: u64,
        attempts: u32,
        server: Arc<Server>,
    ) -> std::io::Result<Cache> {
        let dir = work_dir.join("dependencies");
        std::fs::create_dir_all(&dir)?;
        let state_file = work_dir.join("dependencies-state.json");
        let mut entries = BTreeMap::new();
        if let Ok(b) = std::fs::read(&state_file) {
            match serde_json::from_slice::<Vec<Entry>>(&b) {
                Ok(list) => {
                    for mut e in list {
                        if !valid_uuid(&e.parent_uuid)
                            || e.name.contains('/')
                            || e.name.starts_with('.')
                        {
                            continue;
                        }
                        // a download cut off by a restart starts again; its runs re-register
                        if e.stage != DepStage::Ready || !dir.join(&e.name).exists() {
                            continue;
                        }
                        e.dependents.clear();
                        entries.insert((e.parent_uuid.clone(), e.parent_path.clone()), e);
                    }
                }
                Err(e) => {
                    tracing::warn!("{}: unreadable, starting empty: {e}", state_file.display())
                }
            }
        }
        // orphans: anything on disk no entry names (half-done downloads, evicted leftovers)
        let known: BTreeSet<String> = entries.values().map(|e: &Entry| e.name.clone()).collect();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for f in rd.flatten() {
                let n = f.file_name().to_string_lossy().into_owned();
                if !known.contains(&n) {
                    crate::store::discard(&f.path());
                }
            }
        }
        let c = Cache {
            dir,
            state_file,
            entries: Mutex::new(entries),
            max_bytes,
            attempts: attempts.max(1),
            server,
        };
        c.save();
        Ok(c)
    }

    pub fn save(&self) {
        let list: Vec<Entry> = self.entries.lock().unwrap().values().cloned().collect();
        let _ =
            cw_runtime::rundir::write_atomic(&self.state_file, &serde_json::to_vec(&list).unwrap());
    }

    /// Every key in the cache, for the checkin's `dependencies`.
    pub fn keys(&self) -> Vec<Key> {
        self.entries.lock().unwrap().keys().cloned().collect()
    }

    pub fn path_of(&self, e: &Entry) -> PathBuf {
        self.dir.join(&e.name)
    }

    /// The entry for `key`, registering `run` as a dependent; a missing entry starts a download.
    pub fn get(self: &Arc<Self>, run: &str, key: &Key) -> Entry {
        let mut m = self.entries.lock().unwrap();
        if !m.contains_key(key) {
            let taken: BTreeSet<String> = m.values().map(|e| e.name.clone()).collect();
            let mut name = base_name(&key.0, &key.1);
            while taken.contains(&name) {
                name.push('_');
            }
            m.insert(
                key.clone(),
                Entry {
                    parent_uuid: key.0.clone(),
                    parent_path: key.1.clone(),
                    name,
                    stage: DepStage::Downloading,
                    size_bytes: 0,
                    dependents: BTreeSet::new(),
                    last_used: now(),
                    message: "Starting download".into(),
                    progress: Arc::new(AtomicU64::new(0)),
                    active: false,
                },
            );
        }
        let e = m.get_mut(key).unwrap();
        if e.stage != DepStage::Failed {
            e.dependents.insert(run.to_string());
            e.last_used = now();
        }
        if e.stage == DepStage::Downloading && !e.active {
            e.active = true;
            let (me, key, name, progress) = (
                self.clone(),
                key.clone(),
                e.name.clone(),
                e.progress.clone(),
            );
            tokio::spawn(async move { me.download(key, name, progress).await });
        }
        e.size_bytes = e.size_bytes.max(e.progress.load(Ordering::Relaxed));
        e.clone()
    }

    pub fn release(&self, run: &str, key: &Key) {
        if let Some(e) = self.entries.lock().unwrap().get_mut(key) {
            e.dependents.remove(run);
        }
    }

    async fn download(self: Arc<Self>, key: Key, name: String, progress: Arc<AtomicU64>) {
        let mut last = String::new();
        for attempt in 0..self.attempts {
            if attempt > 0 {
                // a back-off the official worker lacks: a flapping server gets a breather
                tokio::time::sleep(Duration::from_secs(1 << attempt.min(5))).await;
            }
            progress.store(0, Ordering::Relaxed);
            match self.fetch(&key, &name, &progress).await {
                Ok(()) => {
                    let mut m = self.entries.lock().unwrap();
                    if let Some(e) = m.get_mut(&key) {
                        e.stage = DepStage::Ready;
                        e.size_bytes = progress.load(Ordering::Relaxed);
                        e.message = "Download complete".into();
                        e.active = false;
                    }
                    drop(m);
                    self.save();
                    return;
                }
                Err(e) => {
                    tracing::warn!(
                        "dependency {}/{} attempt {}/{}: {e}",
                        key.0,
                        key.1,
                        attempt + 1,
                        self.attempts
                    );
                    last = e;
                }
            }
        }
        let mut m = self.entries.lock().unwrap();
        if let Some(e) = m.get_mut(&key) {
            e.stage = DepStage::Failed;
            e.message = format!("Dependency download failed: {last} ");
            e.active = false;
            e.last_used = now();
        }
    }

    async fn fetch(&self, key: &Key, name: &str, progress: &Arc<AtomicU64>) -> Result<(), String> {
        let (uuid, path) = key;
        let info = self
            .server
            .contents_info(uuid, path)
            .await
            .map_err(|e| e.to_string())?;
        let kind = info["type"].as_str().unwrap_or("").to_string();
        if kind != "file" && kind != "directory" {
            return Err(format!(
                "{uuid}/{path} is a {kind:?}, not a file or directory"
            ));
        }
        let resp = self
            .server
            .contents_blob(uuid, path)
            .await
            .map_err(|e| e.to_string())?;
        let gz_encoded = resp
            .headers()
            .get(reqwest::header::CONTENT_ENCODING)
            .map(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"))
            .unwrap_or(false);
        let tmp = self
            .dir
            .join(format!(".tmp-{name}-{:08x}", rand::random::<u32>()));
        let dest = self.dir.join(name);
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
        let tmp2 = tmp.clone();
        let writer = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let raw = crate::bridge::ChannelReader::new(rx);
            let mut r: Box<dyn Read> = if gz_encoded {
                Box::new(flate2::read::MultiGzDecoder::new(raw))
            } else {
                Box::new(raw)
            };
            if kind == "directory" {
                let mut br = std::io::BufReader::new(r);
                let d = unpack::decompressor(&mut br)
                    .map_err(|e| format!("reading the archive: {e}"))?;
                std::fs::create_dir_all(&tmp2).map_err(|e| e.to_string())?;
                unpack::unpack(
                    d,
                    &tmp2,
                    unpack::Options {
                        whiteouts: Whiteouts::Keep,
                        chown: false,
                        // a dependency that expands without bound must not fill the work dir
                        budget: Some(unpack::Budget::for_dir(&tmp2, None, "the dependency")),
                    },
                )
                .map_err(|e| e.to_string())?;
            } else {
                let mut f = std::fs::File::create(&tmp2).map_err(|e| e.to_string())?;
                std::io::copy(&mut r, &mut f).map_err(|e| format!("decoding: {e}"))?;
                f.flush().map_err(|e| e.to_string())?;
            }
            Ok(())
        });
        let mut resp = resp;
        let mut failed = None;
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    progress.fetch_add(c.len() as u64, Ordering::Relaxed);
                    if tx.send(c).await.is_err() {
                        break; // the writer failed; its error is the one to report
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    failed = Some(format!("download of {uuid}/{path} cut off: {e}"));
                    break;
                }
            }
        }
        drop(tx);
        let res = writer.await.map_err(|e| e.to_string()).and_then(|r| r);
        let res = match failed {
            Some(f) => Err(f),
            None => res,
        };
        if let Err(e) = res {
            crate::store::discard(&tmp);
            return Err(e);
        }
        if dest.symlink_metadata().is_ok() {
            crate::store::discard(&dest);
        }
        std::fs::rename(&tmp, &dest).map_err(|e| format!("publishing {}: {e}", dest.display()))
    }

    /// Drop failed entries after 10 s (so later runs retry), then evict least-recently-used
    /// entries no run holds while the cache is over its cap.
    pub fn evict(&self) {
        let mut removed = vec![];
        {
            let mut m = self.entries.lock().unwrap();
            let t = now();
            m.retain(|_, e| !(e.stage == DepStage::Failed && t - e.last_used > 10.0));
            loop {
                let total: u64 = m.values().map(|e| e.size_bytes).sum();
                if total <= self.max_bytes {
                    break;
                }
                let victim = m
                    .iter()
                    .filter(|(_, e)| e.stage == DepStage::Ready && e.dependents.is_empty())
                    .min_by(|a, b| a.1.last_used.total_cmp(&b.1.last_used))
                    .map(|(k, _)| k.clone());
                match victim {
                    Some(k) => {
                        let e = m.remove(&k).unwrap();
                        removed.push(self.dir.join(&e.name));
                    }
                    None => break,
                }
            }
        }
        if !removed.is_empty() {
            for p in removed {
                tracing::info!("dependency cache over its cap: removing {}", p.display());
                crate::store::discard(&p);
            }
            self.save();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let u = "0x0123456789abcdef0123456789abcdef";
        assert!(valid_uuid(u));
        assert!(!valid_uuid("0x../../etc"));
        assert!(!valid_uuid("../0123456789abcdef0123456789abcde"));
        assert_eq!(base_name(u, ""), u);
        assert_eq!(base_name(u, "a/b"), format!("{u}_a_b"));
        assert!(base_name(u, &"x/".repeat(200)).len() < 100);
    }
}
