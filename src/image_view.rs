//! The image as a run's preparation reads it (its `/etc/passwd`, working directory, command):
//! either a directory (a mounted overlay, or a copy), or — for a run without root, whose overlay
//! the monitor mounts later inside the run's user namespace — the layer directories themselves,
//! merged here the way overlayfs will merge them.
//!
//! The merge, for a path whose every prefix is a directory of the merged tree: layers are asked
//! top first; the first that has the path gives it; a whiteout (char 0/0) at the path or at any
//! of its prefixes hides it and everything below; a prefix that is a non-directory in a layer
//! ends the merge there; an opaque directory at a prefix hides the layers under it. Symlinks are
//! followed by hand inside the image, `..` clamped at its root, at most 40 of them.

use crate::store::unpack::{clean_components, is_type as is, is_whiteout, Tree};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// How the image is read.
#[derive(Debug, Clone)]
pub enum View {
    /// A ready root (mounted or copied).
    Dir(PathBuf),
    /// Overlay lower dirs, top first, as overlayfs will merge them.
    Layers(Vec<PathBuf>),
}

fn lstat(p: &Path) -> io::Result<Option<libc::stat>> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::lstat(c.as_ptr(), &mut st) } == 0 {
        Ok(Some(st))
    } else {
        match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            e => Err(e),
        }
    }
}

/// A directory overlayfs does not merge with the layers under it: marked for a root mount
/// (`trusted.`) or a user's (`user.`, `userxattr`).
fn is_opaque(p: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|x| crate::rootfs::xattr_get(p, x).is_some_and(|v| v == b"y"))
}

fn enotdir() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOTDIR)
}

impl View {
    /// The merged entry at `comps` (not followed if a symlink), where every prefix is a
    /// directory of the merged tree: the real path in the layer that gives it, and its lstat.
    fn entry(layers: &[PathBuf], comps: &[Vec<u8>]) -> io::Result<Option<(PathBuf, libc::stat)>> {
        'layers: for layer in layers {
            let mut p = layer.clone();
            let mut hides_below = false;
            for (i, c) in comps.iter().enumerate() {
                p.push(OsStr::from_bytes(c));
                let Some(st) = lstat(&p)? else {
                    if hides_below {
                        return Ok(None);
                    }
                    continue 'layers;
                };
                if is_whiteout(&st) {
                    return Ok(None);
                }
                if i + 1 == comps.len() {
                    return Ok(Some((p, st)));
                }
                if !is(&st, libc::S_IFDIR) {
                    // the merge stops at a non-directory: the path is not there
                    return Ok(None);
                }
                if is_opaque(&p) {
                    hides_below = true;
                }
            }
        }
        Ok(None)
    }

    /// Resolve `path` (absolute in the image) through the layers: the real path of what it
    /// names and its lstat (`follow`: a final symlink is followed too). None: not there.
    fn resolve_layers(
        layers: &[PathBuf],
        path: &str,
        follow: bool,
    ) -> io::Result<Option<(PathBuf, libc::stat)>> {
        let mut todo: Vec<Vec<u8>> = path
            .as_bytes()
            .split(|b| *b == b'/')
            .rev()
            .map(<[u8]>::to_vec)
            .collect();
        let mut done: Vec<Vec<u8>> = vec![];
        let mut links = 0;
        let mut last = None;
        while let Some(c) = todo.pop() {
            match c.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    done.pop();
                    last = None;
                    continue;
                }
                _ => {}
            }
            done.push(c);
            let Some((real, st)) = View::entry(layers, &done)? else {
                return Ok(None);
            };
            let final_ = todo.iter().all(|c| c.is_empty() || c == b".");
            if is(&st, libc::S_IFLNK) && (!final_ || follow) {
                links += 1;
                if links > 40 {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = std::fs::read_link(&real)?;
                let t = target.as_os_str().as_bytes();
                done.pop();
                if t.starts_with(b"/") {
                    done.clear();
                }
                todo.extend(t.split(|b| *b == b'/').rev().map(<[u8]>::to_vec));
                last = None;
                continue;
            }
            if !final_ && !is(&st, libc::S_IFDIR) {
                return Err(enotdir());
            }
            last = Some((real, st));
        }
        match last {
            Some(l) => Ok(Some(l)),
            // the image's root: the top layer's
            None if done.is_empty() => match layers.first() {
                Some(top) => Ok(lstat(top)?.map(|st| (top.clone(), st))),
                None => Ok(None),
            },
            // ended on `..`: a directory already resolved
            None => View::entry(layers, &done),
        }
    }

    /// What `path` (absolute in the image) is, symlinks followed inside the image: None when
    /// it does not exist.
    pub fn stat(&self, path: &str) -> io::Result<Option<libc::stat>> {
        match self {
            View::Dir(root) => stat_in_dir(root, path),
            // a file where a directory is needed: not there, as a directory view says
            View::Layers(l) => match View::resolve_layers(l, path, true) {
                Ok(r) => Ok(r.map(|(_, st)| st)),
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(None),
                Err(e) => Err(e),
            },
        }
    }

    /// The regular file at `rel` (relative to the image's root), opened for reading without
    /// blocking on a FIFO; None when it does not exist.
    pub fn open_file(&self, rel: &str) -> io::Result<Option<File>> {
        match self {
            View::Dir(root) => {
                let mut t = Tree::open(root)?;
                match t.open_file(rel.as_bytes()) {
                    Ok(f) => Ok(Some(f)),
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
                    Err(e) => Err(e),
                }
            }
            View::Layers(l) => {
                let Some((real, st)) = View::resolve_layers(l, &format!("/{rel}"), true)? else {
                    return Ok(None);
                };
                if !is(&st, libc::S_IFREG) {
                    return Err(io::Error::other("not a regular file"));
                }
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(real)
                    .map(Some)
            }
        }
    }

    /// Whether the directory `comps` names is there: Ok(true) it is, Ok(false) it is not
    /// (`create`: made, for a directory view; the layers are never written, the monitor makes it
    /// in the mounted root), Err(ENOTDIR) something else stands in its way.
    pub fn dir(&self, comps: &[&[u8]], create: bool) -> io::Result<bool> {
        match self {
            View::Dir(root) => {
                let mut t = Tree::open(root)?;
                match t.resolve_dir(comps, create) {
                    Ok(_) => Ok(true),
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
                    Err(e) => Err(e),
                }
            }
            View::Layers(l) => {
                let p: Vec<String> = comps
                    .iter()
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .collect();
                match View::resolve_layers(l, &format!("/{}", p.join("/")), true)? {
                    Some((_, st)) if is(&st, libc::S_IFDIR) => Ok(true),
                    Some(_) => Err(enotdir()),
                    None => Ok(false),
                }
            }
        }
    }
}

/// What `path` in a directory root is, symlinks followed inside it (at most 40): None when it
/// does not exist.
fn stat_in_dir(rootfs: &Path, path: &str) -> io::Result<Option<libc::stat>> {
    use crate::store::unpack::lstatat;
    let mut t = Tree::open(rootfs)?;
    let mut p = path.to_string();
    for _ in 0..40 {
        let comps = clean_components(p.as_bytes());
        let Some((name, parent)) = comps.split_last() else {
            return Ok(None);
        };
        let dir = match t.resolve_dir(parent, false) {
            Ok(d) => d,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        use std::os::fd::AsRawFd;
        let Some(st) = lstatat(dir.as_raw_fd(), name)? else {
            return Ok(None);
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            return Ok(Some(st));
        }
        let target = cw_runtime::fsx::readlinkat(dir.as_raw_fd(), name)?;
        let target = String::from_utf8_lossy(&target).into_owned();
        p = if target.starts_with('/') {
            target
        } else {
            let parent: Vec<String> = parent
                .iter()
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect();
            format!("/{}/{target}", parent.join("/"))
        };
    }
    Err(io::Error::from_raw_os_error(libc::ELOOP))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mkfile(p: &Path, text: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn whiteout(p: &Path) -> bool {
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) == 0 }
    }

    fn opaque(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        let n = std::ffi::CString::new("user.overlay.opaque").unwrap();
        let r = unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
    }

    fn read(v: &View, rel: &str) -> Option<String> {
        v.open_file(rel).unwrap().map(|mut f| {
            let mut s = String::new();
            io::Read::read_to_string(&mut f, &mut s).unwrap();
            s
        })
    }

    /// Two layers as the store keeps them, merged as overlayfs merges them.
    #[test]
    fn layers_merge_as_overlayfs_merges_them() {
        let t = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/target")).unwrap();
        let (top, low) = (t.path().join("top"), t.path().join("low"));
        mkfile(&low.join("etc/passwd"), "bottom");
        mkfile(&low.join("etc/group"), "g");
        mkfile(&low.join("opaque-dir/old"), "old");
        mkfile(&low.join("gone"), "gone");
        mkfile(&low.join("b/x"), "x");
        mkfile(&low.join("deep/er/f"), "f");
        mkfile(&top.join("etc/passwd"), "top");
        mkfile(&top.join("opaque-dir/new"), "new");
        opaque(&top.join("opaque-dir"));
        mkfile(&top.join("b"), "a file over a directory");
        symlink("/etc/passwd", top.join("link")).unwrap();
        symlink("etc", top.join("rel")).unwrap();
        symlink("l2", top.join("l1")).unwrap();
        symlink("l1", top.join("l2")).unwrap();
        let wh = whiteout(&top.join("gone"));
        let v = View::Layers(vec![top.clone(), low.clone()]);
        // the top layer's file wins; a directory merges
        assert_eq!(read(&v, "etc/passwd").as_deref(), Some("top"));
        assert_eq!(read(&v, "etc/group").as_deref(), Some("g"));
        // an opaque directory hides what lies under it
        assert!(v.stat("/opaque-dir/new").unwrap().is_some());
        assert!(v.stat("/opaque-dir/old").unwrap().is_none());
        if wh {
            // a whiteout hides the path
            assert!(v.stat("/gone").unwrap().is_none());
        } else {
            eprintln!("SKIP (whiteout part): mknod 0/0 refused here");
        }
        // symlinks followed inside the image, absolute and relative; `..` clamped at its root
        assert_eq!(read(&v, "link").as_deref(), Some("top"));
        assert!(v.stat("/rel/group").unwrap().is_some());
        assert!(v.stat("/etc/../../../etc/group").unwrap().is_some());
        assert!(v.stat("/deep/er/..").unwrap().is_some());
        assert_eq!(v.stat("/l1").unwrap_err().raw_os_error(), Some(libc::ELOOP));
        // a file over a lower directory ends the merge there
        assert!(v.stat("/b/x").unwrap().is_none());
        assert_eq!(
            v.dir(&[b"b"], false).unwrap_err().raw_os_error(),
            Some(libc::ENOTDIR)
        );
        assert!(v.dir(&[b"deep", b"er"], false).unwrap());
        assert!(!v.dir(&[b"nope"], true).unwrap());
        // the layers are never written
        assert!(!top.join("nope").exists() && !low.join("nope").exists());
        // a FIFO where a file is read (an image's /etc/passwd): refused at once, never opened
        let fifo = std::ffi::CString::new(top.join("etc/fifo").as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let t0 = std::time::Instant::now();
        let e = v.open_file("etc/fifo").unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
        // the root
        assert!(v.stat("/").unwrap().is_some());
    }
}
