//! Layer extraction that cannot leave its root.
//!
//! Every path in a layer is untrusted. Each entry's parent directory is resolved component by
//! component from a directory fd of the root with `O_NOFOLLOW`, symlinks inside the tree are
//! followed by hand with `..` clamped at the root (like `openat2(RESOLVE_IN_ROOT)`, but on any
//! kernel), and the final component is only ever touched with `*at` calls that do not follow it.
//! Device nodes from layers are skipped; `trusted.overlay.*` xattrs from layers are dropped.
//! Whiteouts become overlayfs whiteouts (char 0/0) and opaque markers `trusted.overlay.opaque=y`
//! ([`Whiteouts::Overlay`]), or are applied by deletion to a flattened tree ([`Whiteouts::Apply`]).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const WH_PREFIX: &[u8] = b".wh.";
const WH_OPAQUE: &[u8] = b".wh..wh..opq";
const MAX_SYMLINKS: usize = 40;
/// The deepest directory a layer or an archive may make or reach (components below its root,
/// symlinks followed). Real images stay far below (a deep `node_modules` is ~60); a deeper layer
/// is refused with this number in the error rather than held open one fd per level.
pub const MAX_DEPTH: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// Keep the layer as an overlayfs lower dir: whiteouts as char 0/0, opaque dirs as xattrs.
    Overlay,
    /// Apply the layer onto an existing flattened tree: whiteouts delete.
    Apply,
    /// A plain archive, not an image layer (CodaLab bundles): `.wh.` names are ordinary files.
    Keep,
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("reading the layer: {0}")]
    Read(#[source] io::Error),
    #[error("layer entry {path:?}: {op}: {source}")]
    Entry {
        path: String,
        op: &'static str,
        source: io::Error,
    },
    #[error("layer entry {path:?}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("{0}")]
    Limit(String),
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UnpackStats {
    pub entries: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
    pub skipped_devices: u64,
    pub skipped_xattrs: u64,
}

/// Bytes that a set of unpacks may write together (one image's layers, unpacked in parallel;
/// one archive): a layer that claims a few bytes can expand without bound (a sparse entry, a
/// bomb), and must fail with this error long before the store's filesystem is full.
#[derive(Debug)]
pub struct Budget {
    left: AtomicU64,
    /// What running out means, for the error ("image X unpacks to more than …").
    pub exceeded: String,
}

impl Budget {
    pub fn new(bytes: u64, exceeded: impl Into<String>) -> Arc<Budget> {
        Arc::new(Budget {
            left: AtomicU64::new(bytes),
            exceeded: exceeded.into(),
        })
    }

    /// A budget of at most `max` bytes (if any) and of the free space of the filesystem at
    /// `dir` less a reserve (2 % of the filesystem, at most 1 GiB), naming `what` when spent.
    // fsblkcnt_t is u64 here but not on every target
    #[allow(clippy::useless_conversion)]
    pub fn for_dir(dir: &Path, max: Option<u64>, what: &str) -> Arc<Budget> {
        let free = nix::sys::statvfs::statvfs(dir).ok().map(|v| {
            let frs = u64::from(v.fragment_size());
            let total = u64::from(v.blocks()) * frs;
            let reserve = (1u64 << 30).min(total / 50);
            (u64::from(v.blocks_available()) * frs).saturating_sub(reserve)
        });
        match (max, free) {
            (Some(m), Some(f)) if m <= f => {
                Budget::new(m, format!("{what} unpacks to more than {m} bytes, the limit"))
            }
            (_, Some(f)) => Budget::new(
                f,
                format!(
                    "{what} unpacks to more than the {f} bytes its filesystem can spare ({} has no more free, less a reserve of 2 %)",
                    dir.display()
                ),
            ),
            (Some(m), None) => {
                Budget::new(m, format!("{what} unpacks to more than {m} bytes, the limit"))
            }
            (None, None) => Budget::new(u64::MAX, what.to_string()),
        }
    }

    fn take(&self, n: u64) -> Result<(), UnpackError> {
        self.left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(n))
            .map(|_| ())
            .map_err(|_| UnpackError::Limit(self.exceeded.clone()))
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub whiteouts: Whiteouts,
    /// chown entries to their uid/gid (needs root; off for an unprivileged store).
    pub chown: bool,
    /// Bytes of file content this unpack may write (shared with others); none: no bound.
    pub budget: Option<Arc<Budget>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            whiteouts: Whiteouts::Overlay,
            chown: nix::unistd::geteuid().is_root(),
            budget: None,
        }
    }
}

/// Compression detected from the first bytes of a layer.
pub fn sniff<R: BufRead>(r: &mut R) -> io::Result<crate::image::manifest::Compression> {
    use crate::image::manifest::Compression;
    let b = r.fill_buf()?;
    Ok(if b.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if b.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    })
}

/// Decompress (by content, whatever the media type claims) and hand back a reader of the tar.
pub fn decompressor<'a, R: Read + 'a>(r: R) -> io::Result<Box<dyn Read + 'a>> {
    use crate::image::manifest::Compression;
    let mut br = BufReader::with_capacity(256 << 10, r);
    Ok(match sniff(&mut br)? {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(br)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(br)?),
        Compression::None => Box::new(br),
    })
}

/// Lexically clean a tar path into components: `/`, `.` and empty parts dropped, `..` clamped at
/// the root (as docker and containerd treat them).
pub fn clean_components(p: &[u8]) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = Vec::new();
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

pub use cw_runtime::fsx::{check, cstr, fstat, is_type, list_dir, lstatat, openat, remove_all_at};

fn is_whiteout(st: &libc::stat) -> bool {
    is_type(st, libc::S_IFCHR) && st.st_rdev == 0
}

/// A directory tree being written, addressed only through fds.
pub struct Tree {
    root: OwnedFd,
    /// Last resolved parent dir, reused while entries stay in one directory.
    cache: Option<(Vec<u8>, OwnedFd)>,
}

impl Tree {
    pub fn open(root: &Path) -> io::Result<Tree> {
        let c = cstr(root.as_os_str().as_bytes())?;
        let fd = check(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        Ok(Tree {
            root: unsafe { OwnedFd::from_raw_fd(fd) },
            cache: None,
        })
    }

    fn dup_root(&self) -> io::Result<OwnedFd> {
        self.root.try_clone()
    }

    /// Resolve a directory inside the tree, following symlinks inside it with `..` clamped at
    /// the root; with `create`, missing components are made (0755, root-owned).
    pub fn resolve_dir(&mut self, comps: &[&[u8]], create: bool) -> io::Result<OwnedFd> {
        let key = comps.join(&b'/');
        if let Some((k, fd)) = &self.cache {
            if *k == key {
                return fd.try_clone();
            }
        }
        let mut stack: Vec<OwnedFd> = vec![self.dup_root()?];
        let mut queue: std::collections::VecDeque<Vec<u8>> =
            comps.iter().map(|c| c.to_vec()).collect();
        let mut links = 0;
        while let Some(c) = queue.pop_front() {
            match &c[..] {
                b"" | b"." => continue,
                b".." => {
                    if stack.len() > 1 {
                        stack.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let cur = stack.last().unwrap().as_raw_fd();
            let fd = match openat(cur, &c, libc::O_PATH | libc::O_NOFOLLOW, 0) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                    let cs = cstr(&c)?;
                    match check(unsafe { libc::mkdirat(cur, cs.as_ptr(), 0o755) }) {
                        Ok(_) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                        Err(e) => return Err(e),
                    }
                    openat(cur, &c, libc::O_PATH | libc::O_NOFOLLOW, 0)?
                }
                Err(e) => return Err(e),
            };
            let st = fstat(fd.as_raw_fd())?;
            if is_type(&st, libc::S_IFDIR) {
                if stack.len() > MAX_DEPTH {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("deeper than {MAX_DEPTH} directories (cw's limit for layers and archives)"),
                    ));
                }
                stack.push(fd);
            } else if is_type(&st, libc::S_IFLNK) {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = nix::fcntl::readlinkat(Some(cur), OsStr::from_bytes(&c))
                    .map_err(io::Error::from)?;
                let t = target.as_bytes();
                if t.first() == Some(&b'/') {
                    stack.truncate(1);
                }
                for part in t.split(|&b| b == b'/').rev() {
                    queue.push_front(part.to_vec());
                }
            } else if create && is_whiteout(&st) {
                // a whiteout of ours in the way of a directory this layer needs
                let cs = cstr(&c)?;
                check(unsafe { libc::unlinkat(cur, cs.as_ptr(), 0) })?;
                check(unsafe { libc::mkdirat(cur, cs.as_ptr(), 0o755) })?;
                queue.push_front(c);
            } else {
                return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
            }
        }
        let fd = stack.pop().unwrap();
        self.cache = Some((key, fd.try_clone()?));
        Ok(fd)
    }

    fn invalidate(&mut self) {
        self.cache = None;
    }
}

struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: libc::timespec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn xattr_allowed(name: &[u8]) -> bool {
    if name.starts_with(b"trusted.overlay.") || name.starts_with(b"security.selinux") {
        return false;
    }
    name.starts_with(b"user.")
        || name.starts_with(b"security.")
        || name.starts_with(b"trusted.")
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

fn parse_mtime(v: &[u8]) -> Option<libc::timespec> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut ns: i64 = 0;
    if !frac.is_empty() {
        let f: String = frac.chars().take(9).collect();
        ns = f.parse::<i64>().ok()? * 10i64.pow(9 - f.len() as u32);
        if secs < 0 && ns > 0 {
            return Some(libc::timespec {
                tv_sec: secs - 1,
                tv_nsec: 1_000_000_000 - ns,
            });
        }
    }
    Some(libc::timespec {
        tv_sec: secs,
        tv_nsec: ns,
    })
}

/// A layer's path for an error message: whole when short, else its ends and its length (a hostile
/// layer's names can be tens of kilobytes).
pub fn show_path(raw: &[u8]) -> String {
    const MAX: usize = 160;
    if raw.len() <= MAX {
        return String::from_utf8_lossy(raw).into_owned();
    }
    format!(
        "{}…{} ({} bytes)",
        String::from_utf8_lossy(&raw[..100]),
        String::from_utf8_lossy(&raw[raw.len() - 40..]),
        raw.len()
    )
}

/// A PAX uid/gid: a decimal below 2^32-1 ((uid_t)-1 is "unchanged" to chown; larger ones
/// would be truncated into another owner).
fn pax_id(v: &[u8], what: &str) -> io::Result<u64> {
    match std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(n) if n < u32::MAX as u64 => Ok(n),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "PAX {what} {:?} is not a number below 4294967295",
                String::from_utf8_lossy(v)
            ),
        )),
    }
}

fn entry_meta<R: Read>(e: &mut tar::Entry<'_, R>, stats: &mut UnpackStats) -> io::Result<Meta> {
    let h = e.header();
    let mut m = Meta {
        mode: h.mode().unwrap_or(0o644) & 0o7777,
        uid: h.uid().unwrap_or(0),
        gid: h.gid().unwrap_or(0),
        mtime: libc::timespec {
            tv_sec: h.mtime().unwrap_or(0) as i64,
            tv_nsec: 0,
        },
        xattrs: Vec::new(),
    };
    if let Some(pax) = e.pax_extensions()? {
        for ext in pax {
            let ext = ext?;
            let k = ext.key_bytes();
            let v = ext.value_bytes();
            match k {
                b"uid" => m.uid = pax_id(v, "uid")?,
                b"gid" => m.gid = pax_id(v, "gid")?,
                b"mtime" => m.mtime = parse_mtime(v).unwrap_or(m.mtime),
                _ => {
                    if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                        if xattr_allowed(name) {
                            m.xattrs.push((name.to_vec(), v.to_vec()));
                        } else {
                            stats.skipped_xattrs += 1;
                        }
                    }
                }
            }
        }
    }
    Ok(m)
}

fn set_xattrs(fd: RawFd, xattrs: &[(Vec<u8>, Vec<u8>)], stats: &mut UnpackStats) -> io::Result<()> {
    for (k, v) in xattrs {
        let kc = cstr(k)?;
        let r = unsafe {
            libc::fsetxattr(
                fd,
                kc.as_ptr(),
                v.as_ptr() as *const libc::c_void,
                v.len(),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            // filesystems without user xattrs, or unprivileged stores: keep going, count it
            if matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::EPERM)) {
                stats.skipped_xattrs += 1;
                continue;
            }
            return Err(e);
        }
    }
    Ok(())
}

fn set_opaque(parent: RawFd) -> io::Result<()> {
    // O_PATH fds do not take xattrs: reopen the directory for reading
    let d = openat(parent, b".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let k = cstr(b"trusted.overlay.opaque")?;
    check(unsafe {
        libc::fsetxattr(
            d.as_raw_fd(),
            k.as_ptr(),
            b"y".as_ptr() as *const libc::c_void,
            1,
            0,
        )
    })?;
    Ok(())
}

struct Unpacker {
    tree: Tree,
    opts: Options,
    stats: UnpackStats,
    /// Directory mtimes, set last (writing children changes them).
    dir_times: Vec<(Vec<Vec<u8>>, libc::timespec)>,
    /// Apply mode: paths this layer created (whiteouts and opaque markers spare them).
    created: HashSet<Vec<u8>>,
    buf: Vec<u8>,
}

impl Unpacker {
    fn chown_at(&self, dir: RawFd, name: &[u8], m: &Meta) -> io::Result<()> {
        if !self.opts.chown {
            return Ok(());
        }
        let c = cstr(name)?;
        check(unsafe {
            libc::fchownat(
                dir,
                c.as_ptr(),
                m.uid as libc::uid_t,
                m.gid as libc::gid_t,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(())
    }

    /// Make room for a new entry `name`: returns true when an existing directory is kept.
    fn clear_for(&mut self, dir: RawFd, name: &[u8], new_is_dir: bool) -> io::Result<(bool, bool)> {
        let Some(st) = lstatat(dir, name)? else {
            return Ok((false, false));
        };
        let had_whiteout = is_whiteout(&st);
        if new_is_dir && is_type(&st, libc::S_IFDIR) {
            return Ok((true, false));
        }
        if is_type(&st, libc::S_IFDIR) || is_type(&st, libc::S_IFLNK) {
            self.tree.invalidate();
        }
        remove_all_at(dir, name)?;
        Ok((false, had_whiteout))
    }

    fn entry<R: Read>(&mut self, mut e: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw_path = e.path_bytes().into_owned();
        let shown = show_path(&raw_path);
        let err = |op: &'static str| {
            let p = shown.clone();
            move |source: io::Error| UnpackError::Entry {
                path: p,
                op,
                source,
            }
        };
        let comps = clean_components(&raw_path);
        let kind = e.header().entry_type();
        let Some((&name, parent)) = comps.split_last() else {
            return Ok(()); // the root itself ("./"): keep the store's own root
        };
        let full: Vec<u8> = comps.join(&b'/');
        self.stats.entries += 1;

        // whiteouts
        let layer = self.opts.whiteouts != Whiteouts::Keep;
        if layer && name == WH_OPAQUE {
            let pfd = self
                .tree
                .resolve_dir(parent, true)
                .map_err(err("resolving parent"))?;
            match self.opts.whiteouts {
                Whiteouts::Overlay => set_opaque(pfd.as_raw_fd()).map_err(err("marking opaque"))?,
                Whiteouts::Keep => unreachable!(),
                Whiteouts::Apply => {
                    let prefix = parent.join(&b'/');
                    for child in list_dir(pfd.as_raw_fd()).map_err(err("listing"))? {
                        let p = if prefix.is_empty() {
                            child.clone()
                        } else {
                            [&prefix[..], b"/", &child].concat()
                        };
                        if !self.created.contains(&p) {
                            remove_all_at(pfd.as_raw_fd(), &child)
                                .map_err(err("removing for opaque dir"))?;
                        }
                    }
                    self.tree.invalidate();
                }
            }
            return Ok(());
        }
        if let Some(target) = name.strip_prefix(WH_PREFIX).filter(|_| layer) {
            if target.starts_with(WH_PREFIX) {
                return Ok(()); // other AUFS metadata (.wh..wh.plnk etc.): not content
            }
            if target.is_empty() || target == b"." || target == b".." {
                return Err(UnpackError::Invalid {
                    path: shown,
                    reason: "whiteout names no file (empty, '.' or '..')".into(),
                });
            }
            let pfd = self
                .tree
                .resolve_dir(parent, true)
                .map_err(err("resolving parent"))?;
            let p = pfd.as_raw_fd();
            let tpath = [&full[..full.len() - name.len()], target].concat();
            match self.opts.whiteouts {
                Whiteouts::Overlay => match lstatat(p, target).map_err(err("stat"))? {
                    // already in this layer: it hides the lower one anyway; a dir must not merge
                    Some(st) if is_type(&st, libc::S_IFDIR) => {
                        set_opaque_dir(p, target).map_err(err("marking opaque"))?
                    }
                    Some(_) => {}
                    None => {
                        let c = cstr(target).map_err(err("whiteout"))?;
                        check(unsafe { libc::mknodat(p, c.as_ptr(), libc::S_IFCHR, 0) })
                            .map_err(err("creating whiteout"))?;
                    }
                },
                Whiteouts::Keep => unreachable!(),
                Whiteouts::Apply => {
                    if !self.created.contains(&tpath) {
                        self.tree.invalidate();
                        remove_all_at(p, target).map_err(err("applying whiteout"))?;
                    }
                }
            }
            return Ok(());
        }

        let meta = entry_meta(&mut e, &mut self.stats).map_err(err("reading PAX headers"))?;
        if meta.uid >= u32::MAX as u64 || meta.gid >= u32::MAX as u64 {
            return Err(UnpackError::Invalid {
                path: shown,
                reason: format!("owner {}:{} is out of range", meta.uid, meta.gid),
            });
        }
        if self.opts.whiteouts == Whiteouts::Apply {
            self.created.insert(full.clone());
        }
        use tar::EntryType as T;
        match kind {
            T::Regular | T::Continuous | T::GNUSparse => {
                let pfd = self
                    .tree
                    .resolve_dir(parent, true)
                    .map_err(err("resolving parent"))?;
                let p = pfd.as_raw_fd();
                self.clear_for(p, name, false).map_err(err("replacing"))?;
                let fd = openat(
                    p,
                    name,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                    0o600,
                )
                .map_err(err("creating file"))?;
                let mut f = File::from(fd);
                let mut n = 0u64;
                loop {
                    let k = e.read(&mut self.buf).map_err(UnpackError::Read)?;
                    if k == 0 {
                        break;
                    }
                    if let Some(b) = &self.opts.budget {
                        b.take(k as u64)?;
                    }
                    f.write_all(&self.buf[..k]).map_err(err("writing"))?;
                    n += k as u64;
                }
                self.stats.bytes += n;
                let fdr = f.as_raw_fd();
                if self.opts.chown {
                    check(unsafe {
                        libc::fchown(fdr, meta.uid as libc::uid_t, meta.gid as libc::gid_t)
                    })
                    .map_err(err("chown"))?;
                }
                check(unsafe { libc::fchmod(fdr, meta.mode) }).map_err(err("chmod"))?;
                set_xattrs(fdr, &meta.xattrs, &mut self.stats).map_err(err("setting xattrs"))?;
                let ts = [meta.mtime, meta.mtime];
                check(unsafe { libc::futimens(fdr, ts.as_ptr()) }).map_err(err("setting times"))?;
            }
            T::Directory => {
                let pfd = self
                    .tree
                    .resolve_dir(parent, true)
                    .map_err(err("resolving parent"))?;
                let p = pfd.as_raw_fd();
                let (kept, had_whiteout) =
                    self.clear_for(p, name, true).map_err(err("replacing"))?;
                let c = cstr(name).map_err(err("mkdir"))?;
                if !kept {
                    check(unsafe { libc::mkdirat(p, c.as_ptr(), 0o700) })
                        .map_err(err("creating directory"))?;
                }
                self.chown_at(p, name, &meta).map_err(err("chown"))?;
                check(unsafe { libc::fchmodat(p, c.as_ptr(), meta.mode, 0) })
                    .map_err(err("chmod"))?;
                if !meta.xattrs.is_empty()
                    || (had_whiteout && self.opts.whiteouts == Whiteouts::Overlay)
                {
                    let d = openat(
                        p,
                        name,
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                        0,
                    )
                    .map_err(err("opening directory"))?;
                    set_xattrs(d.as_raw_fd(), &meta.xattrs, &mut self.stats)
                        .map_err(err("setting xattrs"))?;
                    if had_whiteout && self.opts.whiteouts == Whiteouts::Overlay {
                        // whiteout + new directory in one layer: the lower directory must not show through
                        set_opaque(d.as_raw_fd()).map_err(err("marking opaque"))?;
                    }
                }
                self.dir_times
                    .push((comps.iter().map(|c| c.to_vec()).collect(), meta.mtime));
            }
            T::Symlink => {
                let target = e.link_name_bytes().ok_or_else(|| UnpackError::Invalid {
                    path: shown.clone(),
                    reason: "symlink without a target".into(),
                })?;
                let target = cstr(&target).map_err(err("symlink"))?;
                let pfd = self
                    .tree
                    .resolve_dir(parent, true)
                    .map_err(err("resolving parent"))?;
                let p = pfd.as_raw_fd();
                self.clear_for(p, name, false).map_err(err("replacing"))?;
                let c = cstr(name).map_err(err("symlink"))?;
                check(unsafe { libc::symlinkat(target.as_ptr(), p, c.as_ptr()) })
                    .map_err(err("creating symlink"))?;
                self.chown_at(p, name, &meta).map_err(err("chown"))?;
                let ts = [meta.mtime, meta.mtime];
                check(unsafe {
                    libc::utimensat(p, c.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
                })
                .map_err(err("setting times"))?;
                self.tree.invalidate();
            }
            T::Link => {
                let target = e.link_name_bytes().ok_or_else(|| UnpackError::Invalid {
                    path: shown.clone(),
                    reason: "hard link without a target".into(),
                })?;
                let tcomps = clean_components(&target);
                let Some((&tname, tparent)) = tcomps.split_last() else {
                    return Err(UnpackError::Invalid {
                        path: shown,
                        reason: "hard link to the root".into(),
                    });
                };
                if tcomps == comps {
                    return Ok(());
                }
                let tfd = self
                    .tree
                    .resolve_dir(tparent, false)
                    .map_err(err("resolving link target"))?;
                let pfd = self
                    .tree
                    .resolve_dir(parent, true)
                    .map_err(err("resolving parent"))?;
                match lstatat(tfd.as_raw_fd(), tname).map_err(err("stat link target"))? {
                    Some(st) if !is_type(&st, libc::S_IFDIR) && !is_whiteout(&st) => {}
                    _ => {
                        return Err(UnpackError::Invalid {
                            path: shown,
                            reason: format!(
                                "hard link target {:?} is not a file in this layer",
                                String::from_utf8_lossy(&target)
                            ),
                        })
                    }
                }
                self.clear_for(pfd.as_raw_fd(), name, false)
                    .map_err(err("replacing"))?;
                let tc = cstr(tname).map_err(err("link"))?;
                let c = cstr(name).map_err(err("link"))?;
                check(unsafe {
                    libc::linkat(tfd.as_raw_fd(), tc.as_ptr(), pfd.as_raw_fd(), c.as_ptr(), 0)
                })
                .map_err(err("creating hard link"))?;
            }
            T::Fifo => {
                let pfd = self
                    .tree
                    .resolve_dir(parent, true)
                    .map_err(err("resolving parent"))?;
                let p = pfd.as_raw_fd();
                self.clear_for(p, name, false).map_err(err("replacing"))?;
                let c = cstr(name).map_err(err("fifo"))?;
                check(unsafe { libc::mknodat(p, c.as_ptr(), libc::S_IFIFO | 0o600, 0) })
                    .map_err(err("creating fifo"))?;
                self.chown_at(p, name, &meta).map_err(err("chown"))?;
                check(unsafe { libc::fchmodat(p, c.as_ptr(), meta.mode, 0) })
                    .map_err(err("chmod"))?;
                let ts = [meta.mtime, meta.mtime];
                check(unsafe {
                    libc::utimensat(p, c.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
                })
                .map_err(err("setting times"))?;
            }
            T::Char | T::Block => {
                self.stats.skipped_devices += 1;
                tracing::debug!("skipping device node {shown:?} from a layer");
            }
            other => {
                tracing::debug!("skipping tar entry {shown:?} of type {other:?}");
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), UnpackError> {
        let times = std::mem::take(&mut self.dir_times);
        for (comps, ts) in times.iter().rev() {
            let refs: Vec<&[u8]> = comps.iter().map(|c| &c[..]).collect();
            let Some((name, parent)) = refs.split_last() else {
                continue;
            };
            let shown = show_path(&comps.join(&b'/'));
            let Ok(p) = self.tree.resolve_dir(parent, false) else {
                continue;
            }; // removed later in the layer
            match lstatat(p.as_raw_fd(), name) {
                Ok(Some(st)) if is_type(&st, libc::S_IFDIR) => {}
                _ => continue,
            }
            let c = cstr(name).map_err(|source| UnpackError::Entry {
                path: shown.clone(),
                op: "times",
                source,
            })?;
            let t = [*ts, *ts];
            check(unsafe {
                libc::utimensat(
                    p.as_raw_fd(),
                    c.as_ptr(),
                    t.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })
            .map_err(|source| UnpackError::Entry {
                path: shown,
                op: "setting directory times",
                source,
            })?;
        }
        Ok(())
    }
}

fn set_opaque_dir(parent: RawFd, name: &[u8]) -> io::Result<()> {
    let d = openat(
        parent,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )?;
    set_opaque(d.as_raw_fd())
}

/// Extract an uncompressed tar stream into `dest` (an existing directory). The reader is drained
/// to its end so that a hash over it covers every byte.
pub fn unpack<R: Read>(reader: R, dest: &Path, opts: Options) -> Result<UnpackStats, UnpackError> {
    let tree = Tree::open(dest).map_err(|source| UnpackError::Entry {
        path: dest.display().to_string(),
        op: "opening destination",
        source,
    })?;
    let mut u = Unpacker {
        tree,
        opts,
        stats: UnpackStats::default(),
        dir_times: Vec::new(),
        created: HashSet::new(),
        buf: vec![0; 1 << 20],
    };
    let mut ar = tar::Archive::new(reader);
    for entry in ar.entries().map_err(UnpackError::Read)? {
        let entry = entry.map_err(UnpackError::Read)?;
        u.entry(entry)?;
    }
    u.finish()?;
    let mut rest = ar.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(UnpackError::Read)?;
    Ok(u.stats)
}

impl Tree {
    /// Open a regular file inside the tree for reading, resolving like [`Tree::resolve_dir`]
    /// (symlinks stay inside the root; the final component is not followed).
    pub fn open_file(&mut self, rel: &[u8]) -> io::Result<File> {
        let comps = clean_components(rel);
        let Some((name, parent)) = comps.split_last() else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty path"));
        };
        let p = self.resolve_dir(parent, false)?;
        // a FIFO or a device planted at that path must not block the host's cw
        cw_runtime::fsx::open_regular_at(p.as_raw_fd(), name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_paths() {
        let j = |p: &[u8]| clean_components(p).join(&b'/');
        assert_eq!(j(b"./a/b/"), b"a/b");
        assert_eq!(j(b"/etc/passwd"), b"etc/passwd");
        assert_eq!(j(b"../../etc/passwd"), b"etc/passwd");
        assert_eq!(j(b"a/../../b"), b"b");
        assert_eq!(j(b"a//./b/.."), b"a");
        assert!(clean_components(b"./").is_empty());
    }

    #[test]
    fn pax_mtimes() {
        let t = parse_mtime(b"1700000000.5").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (1700000000, 500_000_000));
        let t = parse_mtime(b"16725225600").unwrap();
        assert_eq!(t.tv_sec, 16725225600);
        assert!(parse_mtime(b"x").is_none());
    }

    #[test]
    fn xattr_filter() {
        assert!(xattr_allowed(b"user.foo"));
        assert!(xattr_allowed(b"security.capability"));
        assert!(!xattr_allowed(b"trusted.overlay.redirect"));
        assert!(!xattr_allowed(b"trusted.overlay.opaque"));
        assert!(!xattr_allowed(b"system.nfs4_acl"));
    }
}
