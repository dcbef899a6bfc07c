//! Filesystem primitives for trees that someone else made: a layer, a bundle, a container's
//! writable layer.
//!
//! Everything here works through directory fds and `*at` calls that never follow the last
//! component, and the walks hold their state on the heap: a tree of any depth is walked with at
//! most [`KEEP_FDS`] + 2 fds open and constant stack. Deeper than that, a directory's fd is closed
//! while its subtree is walked and reopened afterwards through `..` of its child, checked to be
//! the same directory (device and inode) — a tree that changed under the walk is an error, never
//! a silent skip. Opens use `O_NONBLOCK`, so a FIFO or a device node planted in the tree cannot
//! block them, and a walk never enters another mount (a bind mount left behind is not removed).

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

/// Directory fds a walk keeps open at most (the innermost ones).
pub const KEEP_FDS: usize = 16;

pub fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))
}

pub fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn openat(
    dir: RawFd,
    name: &[u8],
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    let fd = check(unsafe {
        libc::openat(
            dir,
            c.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open a directory below `dir` for reading, not following `name` and not blocking on it.
pub fn open_dir_at(dir: RawFd, name: &[u8]) -> io::Result<OwnedFd> {
    openat(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
        0,
    )
}

pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    open_dir_at(libc::AT_FDCWD, path.as_os_str().as_bytes())
}

pub fn lstatat(dir: RawFd, name: &[u8]) -> io::Result<Option<libc::stat>> {
    let c = cstr(name)?;
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    match check(unsafe { libc::fstatat(dir, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) }) {
        Ok(_) => Ok(Some(st)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

pub fn is_type(st: &libc::stat, t: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == t
}

pub fn is_dir(st: &libc::stat) -> bool {
    is_type(st, libc::S_IFDIR)
}

pub fn readlinkat(dir: RawFd, name: &[u8]) -> io::Result<Vec<u8>> {
    let t = nix::fcntl::readlinkat(Some(dir), OsStr::from_bytes(name)).map_err(io::Error::from)?;
    Ok(t.into_vec())
}

/// Names in the directory `fd` refers to (not `.`/`..`). Works on O_PATH fds too: the directory
/// is opened afresh for reading (an O_PATH fd would silently list nothing).
pub fn list_dir(fd: RawFd) -> io::Result<Vec<Vec<u8>>> {
    let d = openat(fd, b".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let mut d =
        nix::dir::Dir::from_fd(std::os::fd::IntoRawFd::into_raw_fd(d)).map_err(io::Error::from)?;
    let mut out = Vec::new();
    for e in d.iter() {
        let e = e.map_err(io::Error::from)?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(n.to_vec());
        }
    }
    Ok(out)
}

/// Open `name` in `dir` as a regular file for reading: not following it, not blocking on a FIFO
/// or a device planted there (`O_NONBLOCK`, then refused unless it is a regular file).
pub fn open_regular_at(dir: RawFd, name: &[u8]) -> io::Result<File> {
    let fd = openat(
        dir,
        name,
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
        0,
    )?;
    let st = fstat(fd.as_raw_fd())?;
    if !is_type(&st, libc::S_IFREG) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    // reads of a regular file never block; clear the flag for the caller's sake
    let fl = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) })?;
    Ok(File::from(fd))
}

/// Read a regular file of at most `limit` bytes (see [`open_regular_at`]); a longer one is an
/// error, not a truncated read.
pub fn read_small_at(dir: RawFd, name: &[u8], limit: u64) -> io::Result<Vec<u8>> {
    let f = open_regular_at(dir, name)?;
    let mut out = Vec::new();
    f.take(limit + 1).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(out)
}

/// What a walk does with a directory it met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Descend,
    Skip,
}

/// One entry met by [`walk`].
pub struct Entry<'a> {
    /// The directory holding it (an fd open for reading).
    pub dir: RawFd,
    pub name: &'a [u8],
    pub st: &'a libc::stat,
    /// Its path relative to the walk's root, `/`-separated.
    pub path: &'a [u8],
    /// 1 for the root's own entries.
    pub depth: usize,
}

pub trait Visit {
    /// Every entry, parents before children. For a directory, `Step::Descend` walks into it.
    fn entry(&mut self, e: &Entry) -> io::Result<Step>;
    /// After a directory's entries: `parent` is the fd of the directory holding it.
    fn leave(&mut self, _parent: RawFd, _name: &[u8], _path: &[u8]) -> io::Result<()> {
        Ok(())
    }
}

struct Frame {
    fd: Option<OwnedFd>,
    dev: u64,
    ino: u64,
    name: Vec<u8>,
    /// Entries still to visit, in reverse order (popped from the end).
    pending: Vec<Vec<u8>>,
    /// Length of the walk's path before this directory's name was added.
    path_len: usize,
}

impl Frame {
    fn new(fd: OwnedFd, st: &libc::stat, name: Vec<u8>, path_len: usize) -> io::Result<Frame> {
        let mut pending = list_dir(fd.as_raw_fd())?;
        pending.sort_unstable_by(|a, b| b.cmp(a));
        Ok(Frame {
            fd: Some(fd),
            dev: st.st_dev,
            ino: st.st_ino,
            name,
            pending,
            path_len,
        })
    }
}

fn changed(what: &str) -> io::Error {
    io::Error::other(format!("the tree changed during the walk ({what})"))
}

/// Walk the tree below the directory `root` (any fd of it, O_PATH too), depth first, entries of
/// a directory in byte order. Entries that vanish between the listing and their visit are
/// passed over (the tree may be in use); every other error ends the walk and is returned.
/// Directories on another device than `root` are passed to the visitor but never entered.
pub fn walk(root: RawFd, v: &mut impl Visit) -> io::Result<()> {
    let fd = openat(root, b".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let st = fstat(fd.as_raw_fd())?;
    let root_dev = st.st_dev;
    let mut stack = vec![Frame::new(fd, &st, Vec::new(), 0)?];
    let mut path: Vec<u8> = Vec::new();
    loop {
        let depth = stack.len();
        let top = stack
            .last_mut()
            .expect("the walk's stack is never empty here");
        if let Some(name) = top.pending.pop() {
            let dir = top
                .fd
                .as_ref()
                .expect("the innermost fd is open")
                .as_raw_fd();
            let Some(st) = lstatat(dir, &name)? else {
                continue;
            };
            let plen = path.len();
            if plen > 0 {
                path.push(b'/');
            }
            path.extend_from_slice(&name);
            let step = v.entry(&Entry {
                dir,
                name: &name,
                st: &st,
                path: &path,
                depth,
            })?;
            if !(is_dir(&st) && step == Step::Descend && st.st_dev == root_dev) {
                path.truncate(plen);
                continue;
            }
            let child = match open_dir_at(dir, &name) {
                Ok(c) => c,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    path.truncate(plen);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let cst = fstat(child.as_raw_fd())?;
            if (cst.st_dev, cst.st_ino) != (st.st_dev, st.st_ino) {
                return Err(changed("a directory was replaced"));
            }
            stack.push(Frame::new(child, &cst, name, plen)?);
            if stack.len() > KEEP_FDS {
                let i = stack.len() - 1 - KEEP_FDS;
                stack[i].fd = None;
            }
        } else {
            let done = stack.pop().expect("checked above");
            let Some(parent) = stack.last_mut() else {
                return Ok(());
            };
            let done_fd = done.fd.expect("the innermost fd is open");
            if parent.fd.is_none() {
                let up = openat(
                    done_fd.as_raw_fd(),
                    b"..",
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )?;
                let ust = fstat(up.as_raw_fd())?;
                if (ust.st_dev, ust.st_ino) != (parent.dev, parent.ino) {
                    return Err(changed("a directory was moved"));
                }
                parent.fd = Some(up);
            }
            drop(done_fd);
            let pfd = parent.fd.as_ref().expect("just ensured").as_raw_fd();
            v.leave(pfd, &done.name, &path)?;
            path.truncate(done.path_len);
        }
    }
}

struct Remover;

impl Visit for Remover {
    fn entry(&mut self, e: &Entry) -> io::Result<Step> {
        if is_dir(e.st) {
            // a directory its owner made unreadable or unsearchable (root is not stopped by that)
            if e.st.st_mode & 0o700 != 0o700 && !nix::unistd::geteuid().is_root() {
                let c = cstr(e.name)?;
                check(unsafe { libc::fchmodat(e.dir, c.as_ptr(), 0o700, 0) })?;
            }
            return Ok(Step::Descend);
        }
        unlink(e.dir, e.name, 0)?;
        Ok(Step::Skip)
    }
    fn leave(&mut self, parent: RawFd, name: &[u8], path: &[u8]) -> io::Result<()> {
        unlink(parent, name, libc::AT_REMOVEDIR).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("removing directory {}: {e}", String::from_utf8_lossy(path)),
            )
        })
    }
}

fn unlink(dir: RawFd, name: &[u8], flags: libc::c_int) -> io::Result<()> {
    let c = cstr(name)?;
    match check(unsafe { libc::unlinkat(dir, c.as_ptr(), flags) }) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r.map(|_| ()),
    }
}

/// Remove `name` in `dir`, with everything below it if it is a directory: never following a
/// symlink, at any depth with bounded fds and stack, and never into another mount (a directory
/// with a mount below it stays, and the error says so).
pub fn remove_all_at(dir: RawFd, name: &[u8]) -> io::Result<()> {
    let Some(st) = lstatat(dir, name)? else {
        return Ok(());
    };
    if !is_dir(&st) {
        return unlink(dir, name, 0);
    }
    let d = match open_dir_at(dir, name) {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    walk(d.as_raw_fd(), &mut Remover)?;
    drop(d);
    unlink(dir, name, libc::AT_REMOVEDIR).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOTEMPTY) || e.raw_os_error() == Some(libc::EBUSY) {
            io::Error::new(
                e.kind(),
                format!("{e} (a mount point below it, or something was added meanwhile)"),
            )
        } else {
            e
        }
    })
}

/// `rm -rf PATH` through [`remove_all_at`]; a missing path is not an error.
pub fn remove_tree(p: &Path) -> io::Result<()> {
    let parent = match p.parent() {
        Some(q) if !q.as_os_str().is_empty() => q,
        Some(_) => Path::new("."),
        None => return Err(io::Error::new(io::ErrorKind::InvalidInput, "the root")),
    };
    let name = p
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let pf = match openat(
        libc::AT_FDCWD,
        parent.as_os_str().as_bytes(),
        libc::O_PATH | libc::O_DIRECTORY,
        0,
    ) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    remove_all_at(pf.as_raw_fd(), name.as_bytes())
}

/// Bytes a tree uses as the official CodaLab worker counts them: the lstat size of every entry,
/// directories included, symlinks not followed; each inode once when it has several links.
pub fn disk_usage(path: &Path) -> io::Result<u64> {
    struct Du {
        total: u64,
        seen: std::collections::HashSet<(u64, u64)>,
    }
    impl Visit for Du {
        fn entry(&mut self, e: &Entry) -> io::Result<Step> {
            if is_dir(e.st) || e.st.st_nlink <= 1 || self.seen.insert((e.st.st_dev, e.st.st_ino)) {
                self.total += e.st.st_size as u64;
            }
            Ok(Step::Descend)
        }
    }
    let d = open_dir(path)?;
    let mut v = Du {
        total: 0,
        seen: Default::default(),
    };
    walk(d.as_raw_fd(), &mut v)?;
    Ok(v.total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain `root/d/d/d/…` of `depth` directories with a file at the bottom, made through fds
    /// (a path that long could not be named).
    fn chain(root: &Path, depth: usize) {
        let mut cur = open_dir(root).unwrap();
        for _ in 0..depth {
            let c = cstr(b"d").unwrap();
            check(unsafe { libc::mkdirat(cur.as_raw_fd(), c.as_ptr(), 0o755) }).unwrap();
            cur = open_dir_at(cur.as_raw_fd(), b"d").unwrap();
        }
        let f = openat(
            cur.as_raw_fd(),
            b"bottom",
            libc::O_WRONLY | libc::O_CREAT,
            0o644,
        )
        .unwrap();
        drop(f);
        let c = cstr(b"fifo").unwrap();
        check(unsafe { libc::mkfifoat(cur.as_raw_fd(), c.as_ptr(), 0o644) }).unwrap();
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    /// In a thread with a small stack (a recursive walk of this depth overflows it), with the
    /// fds the walk holds counted from another thread's view of /proc/self/fd afterwards.
    fn small_stack<F: FnOnce() + Send + 'static>(f: F) {
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn deep_trees_are_walked_and_removed_with_bounded_fds_and_stack() {
        // the fds counted are the whole process's: the test runs alone in a run of its own, as
        // the other tests beside it open theirs (34 held once, 12 before, in a clean-clone run)
        let Some(done) = crate::alone::run_alone!(
            deep_trees_are_walked_and_removed_with_bounded_fds_and_stack,
            false
        ) else {
            return;
        };
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("tree");
        std::fs::create_dir(&root).unwrap();
        chain(&root, 5000);
        let r2 = root.clone();
        small_stack(move || {
            // count the peak of open fds through a visitor that looks at /proc/self/fd
            struct Peak(usize, usize);
            impl Visit for Peak {
                fn entry(&mut self, e: &Entry) -> io::Result<Step> {
                    if e.depth.is_multiple_of(97) {
                        self.0 = self.0.max(open_fds());
                    }
                    self.1 = self.1.max(e.depth);
                    Ok(Step::Descend)
                }
            }
            let before = open_fds();
            let d = open_dir(&r2).unwrap();
            let mut p = Peak(0, 0);
            walk(d.as_raw_fd(), &mut p).unwrap();
            assert_eq!(p.1, 5001, "the walk reached the bottom's entries");
            assert!(
                p.0 <= before + KEEP_FDS + 4,
                "the walk held {} fds (before: {before})",
                p.0
            );
            let du = disk_usage(&r2).unwrap();
            assert!(du >= 5000, "{du}");
            remove_tree(&r2).unwrap();
        });
        assert!(!root.exists(), "the tree is gone");
        done.mark();
    }

    #[test]
    fn removal_never_follows_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "x").unwrap();
        let root = t.path().join("tree");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a/b/link")).unwrap();
        std::os::unix::fs::symlink(outside.join("keep"), root.join("a/flink")).unwrap();
        remove_tree(&root).unwrap();
        assert!(!root.exists());
        assert_eq!(std::fs::read_to_string(outside.join("keep")).unwrap(), "x");
        // missing paths are fine
        remove_tree(&root).unwrap();
    }

    #[test]
    fn small_reads_refuse_fifos_devices_and_big_files_without_blocking() {
        let t = tempfile::tempdir().unwrap();
        let d = open_dir(t.path()).unwrap();
        let c = cstr(b"fifo").unwrap();
        check(unsafe { libc::mkfifoat(d.as_raw_fd(), c.as_ptr(), 0o644) }).unwrap();
        let e = read_small_at(d.as_raw_fd(), b"fifo", 100).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        std::fs::write(t.path().join("big"), vec![b'x'; 101]).unwrap();
        let e = read_small_at(d.as_raw_fd(), b"big", 100).unwrap_err();
        assert!(e.to_string().contains("larger than 100"), "{e}");
        std::fs::write(t.path().join("ok"), b"hello").unwrap();
        assert_eq!(read_small_at(d.as_raw_fd(), b"ok", 100).unwrap(), b"hello");
        std::os::unix::fs::symlink(t.path().join("ok"), t.path().join("link")).unwrap();
        assert!(read_small_at(d.as_raw_fd(), b"link", 100).is_err());
    }
}
