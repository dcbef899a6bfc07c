//! A run's root filesystem: an overlayfs of the image's layer dirs (read-only lowers, base last)
//! plus a per-run upper dir, or a flattened copy where overlayfs cannot be used.

use crate::image::digest::Digest;
use crate::image_view::View;
use crate::store::unpack::{self, Whiteouts};
use crate::store::Store;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("layer {0} is not in the store (pull the image again)")]
    MissingLayer(Digest),
    #[error("layer {0} was unpacked before this machine restarted and was not yet synced to disk then, so its files may be incomplete (pull the image again)")]
    TornLayer(Digest),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

pub struct Rootfs {
    /// The directory to use as the container's root.
    pub path: PathBuf,
    /// Mounted (overlay) or copied.
    pub overlay: bool,
    /// What to remove after unmounting.
    pub scratch: Vec<PathBuf>,
    /// A run without root: the overlay its monitor mounts at `path` inside the run's user
    /// namespace (nothing is mounted yet).
    pub deferred: Option<cw_runtime::request::Overlay>,
}

impl Rootfs {
    /// How the preparation reads the image: the layers as the deferred overlay will merge them,
    /// or the ready root.
    pub fn view(&self) -> View {
        match &self.deferred {
            Some(o) => View::Layers(o.lower.clone()),
            None => View::Dir(self.path.clone()),
        }
    }
}

fn ioe(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RootfsError {
    let path = path.to_path_buf();
    move |source| RootfsError::Io { what, path, source }
}

/// Build the rootfs for `run` inside `run_dir` from `layers` (base first).
pub fn create(
    store: &Store,
    run: &str,
    run_dir: &Path,
    layers: &[Digest],
    force_copy: bool,
) -> Result<Rootfs, RootfsError> {
    let mut lowers = Vec::new();
    for l in layers.iter().rev() {
        match store.layer_record(l) {
            Some(r) if !r.maybe_torn() => {}
            Some(_) => return Err(RootfsError::TornLayer(l.clone())),
            None => return Err(RootfsError::MissingLayer(l.clone())),
        }
        lowers.push(store.layer_dir(l));
    }
    let target = run_dir.join("rootfs");
    std::fs::create_dir_all(&target).map_err(ioe("creating", &target))?;
    store
        .mark_in_use(run, layers, &target)
        .map_err(|e| RootfsError::Io {
            what: "recording",
            path: target.clone(),
            source: io::Error::other(e.to_string()),
        })?;
    // without root the overlay is mounted by the monitor inside the run's user namespace
    // (overlayfs allows that from Linux 5.11, with `userxattr`): the preparation reads the
    // layers through a merged view meanwhile
    let rootless = cw_runtime::userns::needed();
    let chosen = rootless.then(cw_runtime::overlay::user_overlay);
    let user_overlay = matches!(chosen, Some(Ok(_)));
    match &chosen {
        Some(Err(why)) if !force_copy => {
            tracing::info!("a run without root: its layers are copied into its rootfs ({why})")
        }
        Some(Ok(cw_runtime::overlay::UserOverlay::Fuse)) if !force_copy => {
            tracing::info!("a run without root: its monitor mounts its layers with fuse-overlayfs")
        }
        _ => {}
    }
    if !force_copy && (!rootless || user_overlay) {
        let upper = run_dir.join("upper");
        let work = run_dir.join("work");
        std::fs::create_dir_all(&upper).map_err(ioe("creating", &upper))?;
        std::fs::create_dir_all(&work).map_err(ioe("creating", &work))?;
        if lowers.is_empty() {
            // an image without layers: an empty lower
            let empty = run_dir.join("empty");
            std::fs::create_dir_all(&empty).map_err(ioe("creating", &empty))?;
            lowers.push(empty);
        }
        if user_overlay {
            tracing::debug!(
                "a run without root: its monitor mounts the overlay in its user namespace"
            );
            return Ok(Rootfs {
                path: target,
                overlay: true,
                scratch: vec![upper.clone(), work.clone()],
                deferred: Some(cw_runtime::request::Overlay {
                    lower: lowers,
                    upper,
                    work,
                    fuse: matches!(chosen, Some(Ok(cw_runtime::overlay::UserOverlay::Fuse))),
                }),
            });
        }
        match cw_runtime::overlay::mount(&lowers, &upper, &work, &target, false) {
            Ok(()) => {
                return Ok(Rootfs {
                    path: target,
                    overlay: true,
                    scratch: vec![upper, work],
                    deferred: None,
                })
            }
            Err(e) => tracing::warn!("overlayfs mount failed ({e}); copying the layers instead"),
        }
    }
    for l in layers {
        copy_layer(&store.layer_dir(l), &target).map_err(ioe("copying layer into", &target))?;
    }
    Ok(Rootfs {
        path: target,
        overlay: false,
        scratch: vec![],
        deferred: None,
    })
}

/// Apply an unpacked (overlay-form) layer dir onto a flattened tree: re-tar it and unpack in
/// Apply mode, which turns whiteouts (char 0/0) and opaque markers into deletions.
fn copy_layer(layer: &Path, target: &Path) -> io::Result<()> {
    let (r, w) = std::io::pipe()?;
    let src = layer.to_path_buf();
    let writer = std::thread::spawn(move || -> io::Result<()> {
        let mut b = tar::Builder::new(w);
        b.follow_symlinks(false);
        b.mode(tar::HeaderMode::Complete);
        append_tree(&mut b, &src, Path::new(""))?;
        b.finish()
    });
    let res = unpack::unpack(
        r,
        target,
        unpack::Options {
            whiteouts: Whiteouts::Apply,
            // every copied rootfs is a whole image: many of them must not fill the disk
            budget: Some(unpack::Budget::for_dir(target, None, "the rootfs copy")),
            ..Default::default()
        },
    );
    writer
        .join()
        .map_err(|_| io::Error::other("tar writer panicked"))??;
    res.map(|_| ()).map_err(io::Error::other)
}

fn append_tree<W: io::Write>(b: &mut tar::Builder<W>, root: &Path, rel: &Path) -> io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let dir = root.join(rel);
    let mut names: Vec<_> = std::fs::read_dir(&dir)?.flatten().collect();
    names.sort_by_key(|e| e.file_name());
    // an opaque directory: emit the marker first, so lower content goes before this layer's
    if xattr_get(&dir, crate::store::unpack::opaque_xattr()).as_deref() == Some(b"y")
        && !rel.as_os_str().is_empty()
    {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, rel.join(".wh..wh..opq"), io::empty())?;
    }
    for e in names {
        let name = e.file_name();
        let p = rel.join(&name);
        let md = std::fs::symlink_metadata(e.path())?;
        if md.file_type().is_char_device() && md.rdev() == 0 {
            let mut h = tar::Header::new_gnu();
            h.set_size(0);
            h.set_entry_type(tar::EntryType::Regular);
            let mut wh = std::ffi::OsString::from(".wh.");
            wh.push(&name);
            b.append_data(&mut h, rel.join(wh), io::empty())?;
            continue;
        }
        let xs = xattrs_of(&e.path());
        if !xs.is_empty() {
            b.append_pax_extensions(xs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        }
        if md.file_type().is_fifo() {
            // the tar builder cannot take special files by path
            let mut h = tar::Header::new_gnu();
            h.set_metadata_in_mode(&md, tar::HeaderMode::Complete);
            h.set_entry_type(tar::EntryType::Fifo);
            h.set_size(0);
            b.append_data(&mut h, &p, io::empty())?;
        } else {
            b.append_path_with_name(e.path(), &p)
                .map_err(|err| io::Error::other(format!("{}: {err}", p.display())))?;
        }
        if md.is_dir() {
            append_tree(b, root, &p)?;
        }
    }
    Ok(())
}

/// xattrs to carry into a copied tree as PAX `SCHILY.xattr.*` records (not overlay's own).
fn xattrs_of(p: &Path) -> Vec<(String, Vec<u8>)> {
    use std::os::unix::ffi::OsStrExt;
    let Ok(cp) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return vec![];
    };
    let mut names = vec![0u8; 64 << 10];
    let n = unsafe {
        libc::llistxattr(
            cp.as_ptr(),
            names.as_mut_ptr() as *mut libc::c_char,
            names.len(),
        )
    };
    if n <= 0 {
        return vec![];
    }
    let mut out = vec![];
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|x| !x.is_empty())
    {
        if crate::store::unpack::is_overlay_xattr(name) {
            continue;
        }
        let Ok(cn) = std::ffi::CString::new(name) else {
            continue;
        };
        let mut v = vec![0u8; 64 << 10];
        let k = unsafe {
            libc::lgetxattr(
                cp.as_ptr(),
                cn.as_ptr(),
                v.as_mut_ptr() as *mut libc::c_void,
                v.len(),
            )
        };
        if k >= 0 {
            v.truncate(k as usize);
            out.push((format!("SCHILY.xattr.{}", String::from_utf8_lossy(name)), v));
        }
    }
    out
}

pub(crate) fn xattr_get(p: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let cp = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    let cn = std::ffi::CString::new(name).ok()?;
    let mut buf = [0u8; 16];
    let n = unsafe {
        libc::lgetxattr(
            cp.as_ptr(),
            cn.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    (n >= 0).then(|| buf[..n as usize].to_vec())
}

/// Read a small text file from inside a rootfs without following links out of it, and without
/// blocking on a FIFO or a device planted there: `None` when it does not exist, an error naming
/// it when it is not a regular file or is larger than `limit`.
pub fn read_file(view: &View, rel: &str, limit: u64) -> Result<Option<String>, String> {
    let named = |e: io::Error| format!("the image's /{rel}: {e}");
    let Some(f) = view.open_file(rel).map_err(named)? else {
        return Ok(None);
    };
    let mut b = Vec::new();
    f.take(limit + 1).read_to_end(&mut b).map_err(named)?;
    if b.len() as u64 > limit {
        return Err(format!("the image's /{rel} is larger than {limit} bytes"));
    }
    Ok(Some(String::from_utf8_lossy(&b).into_owned()))
}

/// A uid or gid as a number: (uid_t)-1 means "unchanged" to setuid(2), so a run asked to be
/// 4294967295 would stay root; it and anything larger are refused.
fn id_number(s: &str, what: &str) -> Result<Option<u32>, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    match s.parse::<u32>() {
        Ok(n) if n < u32::MAX => Ok(Some(n)),
        _ => Err(format!("{what} {s} is out of range (at most 4294967294)")),
    }
}

/// Resolve a docker-style user spec (`uid`, `uid:gid`, `name`, `name:group`) against the rootfs's
/// /etc/passwd and /etc/group. Returns (uid, gid, supplementary gids, home).
pub fn resolve_user(rootfs: &View, spec: &str) -> Result<(u32, u32, Vec<u32>, String), String> {
    let passwd = read_file(rootfs, "etc/passwd", 4 << 20)?.unwrap_or_default();
    let group = read_file(rootfs, "etc/group", 4 << 20)?.unwrap_or_default();
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let u = if u.is_empty() { "0" } else { u };
    let pw: Vec<Vec<&str>> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 7)
        .collect();
    let u_num = id_number(u, "uid")?;
    let entry = pw
        .iter()
        .find(|f| f[0] == u || (u_num.is_some() && f[2] == u));
    let uid: u32 = match u_num {
        Some(n) => n,
        None => match entry {
            Some(f) => id_number(
                f[2],
                &format!("the image's /etc/passwd gives user {u:?} uid"),
            )?
            .ok_or_else(|| format!("user {u:?} has no numeric uid in the image's /etc/passwd"))?,
            None => return Err(format!("user {u:?} is not in the image's /etc/passwd")),
        },
    };
    let home = entry.map(|f| f[5].to_string()).unwrap_or_else(|| {
        if uid == 0 {
            "/root".into()
        } else {
            "/".into()
        }
    });
    let grp: Vec<Vec<&str>> = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect();
    let gid: u32 = match g {
        Some(g) => match id_number(g, "gid")? {
            Some(n) => n,
            None => match grp.iter().find(|f| f[0] == g) {
                Some(f) => id_number(
                    f[2],
                    &format!("the image's /etc/group gives group {g:?} gid"),
                )?
                .ok_or_else(|| {
                    format!("group {g:?} has no numeric gid in the image's /etc/group")
                })?,
                None => return Err(format!("group {g:?} is not in the image's /etc/group")),
            },
        },
        None => match entry {
            Some(f) => id_number(
                f[3],
                &format!("the image's /etc/passwd gives user {u:?} gid"),
            )?
            .unwrap_or(if uid == 0 { 0 } else { uid }),
            None => {
                if uid == 0 {
                    0
                } else {
                    uid
                }
            }
        },
    };
    let name = entry.map(|f| f[0]).unwrap_or("");
    let mut extra: Vec<u32> = if g.is_none() && !name.is_empty() {
        grp.iter()
            .filter(|f| f[3].split(',').any(|m| m == name))
            .filter_map(|f| f[2].parse().ok())
            .filter(|&x: &u32| x != gid && x != u32::MAX)
            .collect()
    } else {
        vec![]
    };
    extra.sort_unstable();
    extra.dedup();
    Ok((uid, gid, extra, home))
}
