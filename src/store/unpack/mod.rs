//! Layer extraction that cannot leave its root.
//!
//! Every path in a layer is untrusted. Each entry's parent directory is resolved component by
//! component from a directory fd of the root with `O_NOFOLLOW`, symlinks inside the tree are
//! followed by hand with `..` clamped at the root (like `openat2(RESOLVE_IN_ROOT)`, but on any
//! kernel), and the final component is only ever touched with `*at` calls that do not follow it.
//! Device nodes from layers are skipped; `trusted.overlay.*` xattrs from layers are dropped.
//! Whiteouts become overlayfs whiteouts (char 0/0) and opaque markers `trusted.overlay.opaque=y`
//! ([`Whiteouts::Overlay`]), or are applied by deletion to a flattened tree ([`Whiteouts::Apply`]).

mod budget;
mod compression;
mod meta;
mod tree;

pub use budget::Budget;
pub use compression::{decompressor, sniff};
pub use cw_runtime::fsx::{check, cstr, fstat, is_type, list_dir, lstatat, openat, remove_all_at};
pub use meta::{is_overlay_xattr, opaque_xattr, show_path};
pub use tree::{clean_components, is_whiteout, Tree};

use meta::{entry_meta, set_opaque, set_xattrs, Meta};
use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
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

/// chown's EINVAL: the owner has no id in this user namespace (a user's cw holds its
/// subordinate ids only), said as such.
fn unmapped_owner(e: io::Error, m: &Meta) -> io::Error {
    if e.raw_os_error() != Some(libc::EINVAL) {
        return e;
    }
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "owner {}:{} has no id in this user namespace (a user's cw has uids/gids up to its count of subordinate ids in /etc/subuid and /etc/subgid)",
            m.uid, m.gid
        ),
    )
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
        })
        .map(drop)
        .map_err(|e| unmapped_owner(e, m))
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

    /// The directory a new entry `name` goes in, resolved (and created) inside the tree, with
    /// whatever stood at `name` cleared for it; also whether an existing directory was kept (a
    /// directory entry merges into it) and whether a whiteout stood there.
    fn make_room(
        &mut self,
        parent: &[&[u8]],
        name: &[u8],
        dir: bool,
        shown: &str,
    ) -> Result<(OwnedFd, bool, bool), UnpackError> {
        let pfd = self
            .tree
            .resolve_dir(parent, true)
            .map_err(entry_err(shown, "resolving parent"))?;
        let (kept, had_whiteout) = self
            .clear_for(pfd.as_raw_fd(), name, dir)
            .map_err(entry_err(shown, "replacing"))?;
        Ok((pfd, kept, had_whiteout))
    }

    /// Owner, mode (`chmod`: not for a symlink, whose mode is not its own) and times of the node
    /// `name` just made in `p`, never following it.
    fn set_node_meta(
        &self,
        p: RawFd,
        name: &[u8],
        meta: &Meta,
        chmod: bool,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let c = cstr(name).map_err(entry_err(shown, "naming"))?;
        self.chown_at(p, name, meta)
            .map_err(entry_err(shown, "chown"))?;
        if chmod {
            check(unsafe { libc::fchmodat(p, c.as_ptr(), meta.mode, 0) })
                .map_err(entry_err(shown, "chmod"))?;
        }
        let ts = [meta.mtime, meta.mtime];
        check(unsafe { libc::utimensat(p, c.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
            .map_err(entry_err(shown, "setting times"))?;
        Ok(())
    }

    fn entry<R: Read>(&mut self, mut e: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw_path = e.path_bytes().into_owned();
        let shown = show_path(&raw_path);
        let err = |op: &'static str| entry_err(&shown, op);
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
                let (pfd, _, _) = self.make_room(parent, name, false, &shown)?;
                let fd = openat(
                    pfd.as_raw_fd(),
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
                    .map_err(|e| unmapped_owner(e, &meta))
                    .map_err(err("chown"))?;
                }
                check(unsafe { libc::fchmod(fdr, meta.mode) }).map_err(err("chmod"))?;
                set_xattrs(fdr, &meta.xattrs, &mut self.stats).map_err(err("setting xattrs"))?;
                let ts = [meta.mtime, meta.mtime];
                check(unsafe { libc::futimens(fdr, ts.as_ptr()) }).map_err(err("setting times"))?;
            }
            T::Directory => {
                let (pfd, kept, had_whiteout) = self.make_room(parent, name, true, &shown)?;
                let p = pfd.as_raw_fd();
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
                let c = cstr(name).map_err(err("symlink"))?;
                let (pfd, _, _) = self.make_room(parent, name, false, &shown)?;
                let p = pfd.as_raw_fd();
                check(unsafe { libc::symlinkat(target.as_ptr(), p, c.as_ptr()) })
                    .map_err(err("creating symlink"))?;
                self.set_node_meta(p, name, &meta, false, &shown)?;
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
                let (pfd, _, _) = self.make_room(parent, name, false, &shown)?;
                let tc = cstr(tname).map_err(err("link"))?;
                let c = cstr(name).map_err(err("link"))?;
                check(unsafe {
                    libc::linkat(tfd.as_raw_fd(), tc.as_ptr(), pfd.as_raw_fd(), c.as_ptr(), 0)
                })
                .map_err(err("creating hard link"))?;
            }
            T::Fifo => {
                let c = cstr(name).map_err(err("fifo"))?;
                let (pfd, _, _) = self.make_room(parent, name, false, &shown)?;
                let p = pfd.as_raw_fd();
                check(unsafe { libc::mknodat(p, c.as_ptr(), libc::S_IFIFO | 0o600, 0) })
                    .map_err(err("creating fifo"))?;
                self.set_node_meta(p, name, &meta, true, &shown)?;
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

/// An entry's error: the operation and the entry's path as the layer names it.
fn entry_err(shown: &str, op: &'static str) -> impl FnOnce(io::Error) -> UnpackError {
    let path = shown.to_string();
    move |source| UnpackError::Entry { path, op, source }
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

#[cfg(test)]
mod tests {
    use super::meta::{parse_mtime, xattr_allowed};
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
