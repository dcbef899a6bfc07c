//! A directory tree addressed only through fds: resolution that cannot leave its root.

use super::{MAX_DEPTH, MAX_SYMLINKS};
use cw_runtime::fsx::{check, cstr, fstat, is_type, openat};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

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

/// An overlayfs whiteout: a character device 0/0.
pub fn is_whiteout(st: &libc::stat) -> bool {
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

    pub(super) fn invalidate(&mut self) {
        self.cache = None;
    }
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
