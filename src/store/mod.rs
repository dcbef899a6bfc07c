//! The content-addressed image store.
//!
//! ```text
//! <root>/blobs/sha256/<hex>     manifests, indexes and configs (verified before they are written)
//! <root>/layers/<diffid-hex>/   one unpacked layer per diff id, shared by every image that has it
//! <root>/layers/<diffid-hex>.json  its record (size, compressed digests)
//! <root>/images/<hex>.json      one image per manifest digest: config, layers, names, last use
//! <root>/refs.json              name:tag → manifest digest
//! <root>/inuse/<run>.json       layers a live rootfs is built from (GC keeps them)
//! <root>/locks/  <root>/tmp/
//! ```
//! Everything is written into `tmp/` and renamed into place after verification, so a reader never
//! sees half a layer. `flock`s make two `cw` processes safe: one per layer while it is unpacked,
//! one for the store's indexes while they change.

mod gc;
pub mod ingest;
pub mod unpack;

use crate::image::digest::Digest;
use crate::image::manifest::{Platform, RunConfig};
use nix::fcntl::{Flock, FlockArg};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("store record {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("no image {0:?} in the store (cw images lists them; cw pull fetches)")]
    NoImage(String),
    #[error("image {name} is in use by {users} running container(s)")]
    InUse { name: String, users: usize },
}

type Result<T> = std::result::Result<T, StoreError>;

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { path, op, source }
}

/// Now, in nanoseconds since the epoch (an image's [`ImageRecord::used_ns`]).
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct LayerRecord {
    pub diff_id: Digest,
    /// Bytes of file content (the disk use GC accounts).
    pub size: u64,
    pub entries: u64,
    /// Compressed blobs known to unpack to this layer.
    pub compressed: Vec<Digest>,
    pub unpacked_at: u64,
    /// The boot (the kernel's `boot_id`) this layer was unpacked in. Its files are written
    /// without fsync; once [`Store::settle_layers`] has synced the filesystem, `synced`. A
    /// record of an earlier boot that is not synced may name a torn tree ([`Self::maybe_torn`]).
    /// Records of cw before this have neither, and are taken as synced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<String>,
    #[serde(default)]
    pub synced: bool,
}

impl LayerRecord {
    /// Unpacked in an earlier boot and never synced to disk after: a power cut or a crash
    /// before the kernel wrote its pages back leaves files without their data (ext4 and XFS
    /// allocate at writeback) under a record that says the layer is whole. Such a layer is
    /// pulled again rather than used.
    pub fn maybe_torn(&self) -> bool {
        match (&self.boot, boot_id()) {
            (Some(then), Some(now)) => !self.synced && then != now,
            _ => false,
        }
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`, new at every boot), read once; None where
/// it cannot be read.
pub fn boot_id() -> Option<&'static str> {
    static ID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    })
    .as_deref()
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ImageRecord {
    /// Digest of the platform manifest (the image id shown by `cw images`).
    pub manifest: Digest,
    /// The index it was chosen from, if any (what a by-digest pull of a multi-arch name pins).
    #[serde(default)]
    pub index: Option<Digest>,
    pub config: Digest,
    /// Diff ids, base layer first.
    pub layers: Vec<Digest>,
    pub platform: String,
    pub run: RunConfig,
    pub names: Vec<String>,
    pub size: u64,
    pub pulled_at: u64,
    pub last_used: u64,
    /// The last use to the nanosecond, as the record file's mtime keeps it (see
    /// [`Store::touch`]): what the LRU orders by. Whole seconds tie for images used one after
    /// the other (a warm pull takes milliseconds), and the prune then dropped the one just used.
    #[serde(skip)]
    pub used_ns: u128,
}

/// Make a directory cw owns reachable by its owner alone (mode 0700), also one an older cw or an
/// admin left open. Layers keep the image's setuid files, capabilities and owners, and a run's
/// upper dir holds whatever its root wrote: another local user who could reach them could run a
/// setuid-root file or change a file the next container executes (docker's CVE-2021-41091).
pub fn close_to_others(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let m = fs::symlink_metadata(dir)?;
    if !m.is_dir() {
        return Err(io::Error::other("not a directory"));
    }
    if m.permissions().mode() & 0o7077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// A held `flock`; released on drop.
pub struct Lock(#[allow(dead_code)] Flock<File>);

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

pub fn default_root() -> PathBuf {
    if cw_runtime::userns::host_root() {
        PathBuf::from("/var/lib/cw")
    } else if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        PathBuf::from(x).join("cw")
    } else {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".local/share/cw")
    }
}

pub use cw_runtime::rundir::{replace_file, write_atomic};

/// An image record, with `last_used` the later of what it says and its file's mtime (what
/// [`Store::touch`] sets).
fn read_image_record(path: &Path) -> Option<ImageRecord> {
    let f = fs::File::open(path).ok()?;
    let mtime = f
        .metadata()
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut rec: ImageRecord = serde_json::from_reader(std::io::BufReader::new(f)).ok()?;
    rec.used_ns = rec.last_use_ns().max(mtime);
    rec.last_used = (rec.used_ns / NS) as u64;
    Some(rec)
}

const NS: u128 = 1_000_000_000;

impl ImageRecord {
    /// The last use to the nanosecond: `used_ns`, or `last_used` where that is later (a record
    /// built with whole seconds only).
    fn last_use_ns(&self) -> u128 {
        self.used_ns.max(u128::from(self.last_used) * NS)
    }
}

impl Store {
    /// Open (creating the layout if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        // another user's store (root's, 0700): say whose, not which subdirectory failed
        use nix::unistd::{access, AccessFlags};
        if let Ok(m) = fs::metadata(&root) {
            if access(
                &root,
                AccessFlags::R_OK | AccessFlags::W_OK | AccessFlags::X_OK,
            )
            .is_err()
            {
                use std::os::unix::fs::MetadataExt;
                return Err(StoreError::Io {
                    path: root.clone(),
                    op: "opening",
                    source: io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "Permission denied: it belongs to uid {} (mode {:o}), a store is its owner's alone; use your own (--store, CW_STORE; by default {})",
                            m.uid(),
                            m.mode() & 0o7777,
                            default_root().display()
                        ),
                    ),
                });
            }
        }
        for d in ["blobs/sha256", "layers", "images", "locks", "tmp", "inuse"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err(&p, "creating directory"))?;
        }
        close_to_others(&root).map_err(io_err(&root, "closing to other users"))?;
        Ok(Store { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self, name: &str, arg: FlockArg) -> Result<Lock> {
        let p = self.root.join("locks").join(name);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io_err(&p, "opening lock"))?;
        Flock::lock(f, arg)
            .map(Lock)
            .map_err(|(_, e)| StoreError::Io {
                path: p,
                op: "locking",
                source: e.into(),
            })
    }

    /// Exclusive lock over the store's indexes (refs, image records, GC).
    pub fn lock_index(&self) -> Result<Lock> {
        self.lock("index.lock", FlockArg::LockExclusive)
    }

    /// Exclusive lock for unpacking one layer (a second puller of the same layer waits here).
    pub fn lock_layer(&self, diff_id: &Digest) -> Result<Lock> {
        self.lock(
            &format!("layer-{}.lock", diff_id.hex()),
            FlockArg::LockExclusive,
        )
    }

    pub fn try_lock_layer(&self, diff_id: &Digest) -> Result<Option<Lock>> {
        match self.lock(
            &format!("layer-{}.lock", diff_id.hex()),
            FlockArg::LockExclusiveNonblock,
        ) {
            Ok(l) => Ok(Some(l)),
            Err(StoreError::Io { source, .. })
                if source.raw_os_error() == Some(libc::EWOULDBLOCK) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// A fresh private directory under tmp/.
    pub fn tmp_dir(&self, what: &str) -> Result<PathBuf> {
        let p = self.root.join("tmp").join(format!(
            "{what}-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::create_dir(&p).map_err(io_err(&p, "creating temp directory"))?;
        Ok(p)
    }

    /// A fresh private directory under tmp/ for a layer to be unpacked into, placed by the
    /// filesystem as the top of a tree of its own (see [`spread_trees`]).
    pub fn staging_dir(&self) -> Result<PathBuf> {
        let tmp = self.root.join("tmp");
        if let Err(e) = spread_trees(&tmp) {
            tracing::debug!("{}: not marked as a top of trees: {e}", tmp.display());
        }
        self.tmp_dir("layer")
    }

    /// Remove leftovers of killed processes from tmp/ (entries whose creator pid is gone).
    pub fn clean_tmp(&self) {
        let Ok(rd) = fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid: Option<i32> = name.split('-').nth(1).and_then(|p| p.parse().ok());
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if !alive {
                discard(&e.path());
            }
        }
    }

    // ---- blobs

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    pub fn read_blob(&self, d: &Digest) -> Option<Vec<u8>> {
        let b = fs::read(self.blob_path(d)).ok()?;
        (Digest::of(&b) == *d).then_some(b)
    }

    /// Store verified bytes under their digest.
    pub fn put_blob(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        assert_eq!(
            &Digest::of(bytes),
            d,
            "put_blob called with unverified bytes"
        );
        let p = self.blob_path(d);
        if p.exists() {
            return Ok(());
        }
        write_atomic(&p, bytes).map_err(io_err(&p, "writing blob"))
    }

    // ---- layers

    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers").join(diff_id.hex())
    }

    fn layer_record_path(&self, diff_id: &Digest) -> PathBuf {
        self.root
            .join("layers")
            .join(format!("{}.json", diff_id.hex()))
    }

    /// A layer that is whole in the store: its record, and its tree, not possibly torn by a
    /// restart before it was synced ([`LayerRecord::maybe_torn`]: such a layer is pulled again).
    pub fn layer(&self, diff_id: &Digest) -> Option<LayerRecord> {
        self.layer_record(diff_id).filter(|r| !r.maybe_torn())
    }

    /// A layer's record and tree as they are, possibly torn.
    pub fn layer_record(&self, diff_id: &Digest) -> Option<LayerRecord> {
        let p = self.layer_record_path(diff_id);
        let rec: LayerRecord = serde_json::from_slice(&fs::read(&p).ok()?).ok()?;
        self.layer_dir(diff_id).is_dir().then_some(rec)
    }

    /// Make the layers this boot unpacked durable: one `syncfs` of the store's filesystem, then
    /// their records marked synced. Each pull or load that unpacked a layer starts it in the
    /// background when it is done ([`Store::settle_in_background`]), so that no pull waits for
    /// the disk; a restart before it ends leaves records that a later boot does not trust.
    /// Only the records listed before the sync are marked. Returns how many were.
    pub fn settle_layers(&self) -> Result<usize> {
        let Some(now) = boot_id() else {
            return Ok(0);
        };
        let listed: Vec<Digest> = self
            .layers()
            .into_iter()
            .filter(|r| r.boot.as_deref() == Some(now) && !r.synced)
            .map(|r| r.diff_id)
            .collect();
        if listed.is_empty() {
            return Ok(0);
        }
        let root = File::open(&self.root).map_err(io_err(&self.root, "opening"))?;
        if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&root)) } != 0 {
            return Err(io_err(&self.root, "syncing")(io::Error::last_os_error()));
        }
        // the index lock: an rmi or prune removing one of them (they skip a layer whose own
        // lock is held) waits for this instead, and nothing removed is written again
        let _g = self.lock_index()?;
        let mut marked = 0;
        for d in listed {
            let Some(mut r) = self.layer_record(&d) else {
                continue;
            };
            if r.boot.as_deref() != Some(now) || r.synced {
                continue;
            }
            r.synced = true;
            let rp = self.layer_record_path(&d);
            write_atomic(&rp, &serde_json::to_vec_pretty(&r).unwrap())
                .map_err(io_err(&rp, "writing layer record"))?;
            marked += 1;
        }
        Ok(marked)
    }

    /// Start [`Store::settle_layers`] in a process of its own (`cw __settle-store`), in its own
    /// process group, with no stdio, and let it go: the caller does not wait for the disk. A
    /// thread reaps it where the caller lives on (the worker).
    pub fn settle_in_background(&self) {
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let child = Command::new(exe)
            .arg("--store")
            .arg(&self.root)
            .arg("__settle-store")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn();
        match child {
            Ok(mut c) => {
                std::thread::spawn(move || c.wait());
            }
            Err(e) => tracing::debug!("syncing the store's new layers: {e}"),
        }
    }

    /// Move a verified unpacked tree into place and record it.
    pub fn publish_layer(&self, tmp: &Path, rec: &LayerRecord) -> Result<()> {
        let dst = self.layer_dir(&rec.diff_id);
        if dst.exists() {
            // an older copy without a record (killed between rename and record): replace it
            if self.layer(&rec.diff_id).is_some() {
                remove_tree(tmp).map_err(io_err(tmp, "removing duplicate"))?;
                return Ok(());
            }
            remove_tree(&dst).map_err(io_err(&dst, "removing stale layer"))?;
        }
        fs::rename(tmp, &dst).map_err(io_err(&dst, "publishing layer"))?;
        let rp = self.layer_record_path(&rec.diff_id);
        write_atomic(&rp, &serde_json::to_vec_pretty(rec).unwrap())
            .map_err(io_err(&rp, "writing layer record"))
    }

    /// Add a compressed digest to a layer's record (another image's blob of the same content).
    pub fn note_compressed(&self, diff_id: &Digest, compressed: &Digest) -> Result<()> {
        if let Some(mut rec) = self.layer(diff_id) {
            if !rec.compressed.contains(compressed) {
                rec.compressed.push(compressed.clone());
                let rp = self.layer_record_path(diff_id);
                write_atomic(&rp, &serde_json::to_vec_pretty(&rec).unwrap())
                    .map_err(io_err(&rp, "writing layer record"))?;
            }
        }
        Ok(())
    }

    pub fn layers(&self) -> Vec<LayerRecord> {
        let mut out = Vec::new();
        if let Ok(rd) = fs::read_dir(self.root.join("layers")) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if let Some(hex) = n.strip_suffix(".json") {
                    if let Ok(d) = Digest::parse(&format!("sha256:{hex}")) {
                        // possibly torn ones too: they take disk space, and GC removes them
                        if let Some(r) = self.layer_record(&d) {
                            out.push(r);
                        }
                    }
                }
            }
        }
        out
    }

    // ---- images and refs

    fn image_path(&self, manifest: &Digest) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.json", manifest.hex()))
    }

    pub fn image(&self, manifest: &Digest) -> Option<ImageRecord> {
        read_image_record(&self.image_path(manifest))
    }

    /// The image is usable: record present and every layer unpacked.
    pub fn image_complete(&self, manifest: &Digest) -> Option<ImageRecord> {
        let img = self.image(manifest)?;
        img.layers
            .iter()
            .all(|l| self.layer(l).is_some())
            .then_some(img)
    }

    pub fn images(&self) -> Vec<ImageRecord> {
        let mut out = Vec::new();
        if let Ok(rd) = fs::read_dir(self.root.join("images")) {
            for e in rd.flatten() {
                if let Some(r) = read_image_record(&e.path()) {
                    out.push(r);
                }
            }
        }
        out.sort_by_key(|b| std::cmp::Reverse(b.pulled_at));
        out
    }

    pub fn put_image(&self, rec: &ImageRecord) -> Result<()> {
        let p = self.image_path(&rec.manifest);
        write_atomic(&p, &serde_json::to_vec_pretty(rec).unwrap())
            .map_err(io_err(&p, "writing image record"))?;
        // the file's mtime is its last use (see touch), not when a name was added or removed
        if let Ok(f) = fs::File::open(&p) {
            let ns = rec.last_use_ns();
            let t = UNIX_EPOCH + std::time::Duration::new((ns / NS) as u64, (ns % NS) as u32);
            let _ = f.set_modified(t);
        }
        Ok(())
    }

    pub fn refs(&self) -> Result<BTreeMap<String, Digest>> {
        let p = self.root.join("refs.json");
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt {
                path: p,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(StoreError::Io {
                path: p,
                op: "reading",
                source: e,
            }),
        }
    }

    fn write_refs(&self, refs: &BTreeMap<String, Digest>) -> Result<()> {
        let p = self.root.join("refs.json");
        write_atomic(&p, &serde_json::to_vec_pretty(refs).unwrap())
            .map_err(io_err(&p, "writing refs"))
    }

    /// Point `name` at an image and record the name on it (no write where both already say
    /// so: a pull of a cached tag writes nothing). Caller holds the index lock.
    pub fn tag(&self, name: &str, manifest: &Digest) -> Result<()> {
        let mut refs = self.refs()?;
        let old = refs.insert(name.to_string(), manifest.clone());
        if old.as_ref() != Some(manifest) {
            self.write_refs(&refs)?;
        }
        if let Some(old) = old.filter(|o| o != manifest) {
            if let Some(mut img) = self.image(&old) {
                img.names.retain(|n| n != name);
                self.put_image(&img)?;
            }
        }
        if let Some(mut img) = self.image(manifest) {
            if !img.names.iter().any(|n| n == name) {
                img.names.push(name.to_string());
                self.put_image(&img)?;
            }
        }
        Ok(())
    }

    /// Mark an image used now (for LRU): the record file's mtime, which [`Store::image`] reads
    /// as `last_used` when it is later. No write and no fsync: an LRU time needs no durability,
    /// and a cached pull or a run start must not wait on the disk.
    pub fn touch(&self, manifest: &Digest) {
        if let Ok(f) = fs::File::open(self.image_path(manifest)) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// Find an image by name (`tiny`, `docker.io/library/tiny:latest`), id prefix or digest.
    pub fn lookup(&self, what: &str) -> Result<ImageRecord> {
        let refs = self.refs()?;
        if let Ok(r) = crate::image::reference::Reference::parse(what) {
            if let Some(d) = &r.digest {
                if let Some(img) = self.image(d).or_else(|| {
                    self.images()
                        .into_iter()
                        .find(|i| i.index.as_ref() == Some(d))
                }) {
                    return Ok(img);
                }
            }
            if let Some(d) = refs.get(&r.to_string()) {
                if let Some(img) = self.image(d) {
                    return Ok(img);
                }
            }
        }
        let hex = what.strip_prefix("sha256:").unwrap_or(what);
        if hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let matches: Vec<ImageRecord> = self
                .images()
                .into_iter()
                .filter(|i| i.manifest.hex().starts_with(hex))
                .collect();
            if matches.len() == 1 {
                return Ok(matches.into_iter().next().unwrap());
            }
        }
        Err(StoreError::NoImage(what.to_string()))
    }
}

/// `rm -rf` that never follows symlinks, works at any depth with bounded fds and stack, and
/// never enters another mount ([`cw_runtime::fsx::remove_tree`]).
pub use cw_runtime::fsx::remove_tree;

/// Remove a tree cw made or was handed (a temp dir, a finished run's files) where the caller has
/// nothing better to do on failure than to say so: the failure is logged with the path, and the
/// next sweep of tmp/ or of the run dirs tries again.
/// ext4's FS_TOPDIR_FL (`chattr +T`), not in libc.
const FS_TOPDIR_FL: libc::c_int = 0x0002_0000;

/// Mark `dir` as the top of directory hierarchies (`chattr +T`), so that ext4's Orlov allocator
/// places each directory made in it, a layer being unpacked, in a block group of its own (the
/// one with the fewest directories, from a hash of its name) instead of beside its parent. Each
/// layer's files then take their inodes from a group of their own: three layers unpacked at
/// once do not contend for one group, and above all a new layer does not land where a tree was
/// just deleted. On ext4 without a journal, every inode allocation in such a group scans past
/// each inode freed in the last minute (five while its inode table block is unwritten,
/// `recently_deleted()` in fs/ext4/ialloc.c): after deleting a 1 GB tree, a pull of ~1 GB spent
/// 6-9 s of kernel CPU there (BENCHMARKS.md). Other filesystems refuse or ignore the flag; the
/// caller only logs that. Idempotent: the flag is set once.
pub fn spread_trees(dir: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let d = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(dir)?;
    let mut flags: libc::c_int = 0;
    // the kernel reads and writes an int, whatever the ioctl's name says
    if unsafe { libc::ioctl(d.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & FS_TOPDIR_FL != 0 {
        return Ok(());
    }
    flags |= FS_TOPDIR_FL;
    if unsafe { libc::ioctl(d.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn discard(p: &Path) {
    if let Err(e) = remove_tree(p) {
        tracing::warn!("removing {}: {e}", p.display());
    }
}

/// Platform string as recorded.
pub fn platform_string(p: &Platform) -> String {
    p.to_string()
}
