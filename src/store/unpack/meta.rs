//! An entry's metadata from its tar header and PAX records, and the xattrs set from it.

use super::UnpackStats;
use cw_runtime::fsx::{check, cstr, openat};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};

pub(super) struct Meta {
    pub(super) mode: u32,
    pub(super) uid: u64,
    pub(super) gid: u64,
    pub(super) mtime: libc::timespec,
    pub(super) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// overlayfs's own xattrs (trusted.overlay.*, and user.overlay.* under `userxattr`): from a
/// layer they could redirect it, so they are never taken from one nor carried into a copy.
pub fn is_overlay_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

pub(super) fn xattr_allowed(name: &[u8]) -> bool {
    if is_overlay_xattr(name) || name.starts_with(b"security.selinux") {
        return false;
    }
    name.starts_with(b"user.")
        || name.starts_with(b"security.")
        || name.starts_with(b"trusted.")
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

pub(super) fn parse_mtime(v: &[u8]) -> Option<libc::timespec> {
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
pub(super) fn pax_id(v: &[u8], what: &str) -> io::Result<u64> {
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

pub(super) fn entry_meta<R: Read>(
    e: &mut tar::Entry<'_, R>,
    stats: &mut UnpackStats,
) -> io::Result<Meta> {
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

pub(super) fn set_xattrs(
    fd: RawFd,
    xattrs: &[(Vec<u8>, Vec<u8>)],
    stats: &mut UnpackStats,
) -> io::Result<()> {
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

/// The xattr that marks a directory opaque for overlayfs: `trusted.overlay.opaque` in a root
/// store; `user.overlay.opaque` in a user's (trusted.* needs CAP_SYS_ADMIN; a user's overlay is
/// mounted with `userxattr` inside the run's user namespace, where overlayfs reads user.*).
pub fn opaque_xattr() -> &'static str {
    if cw_runtime::userns::host_root() {
        "trusted.overlay.opaque"
    } else {
        "user.overlay.opaque"
    }
}

pub(super) fn set_opaque(parent: RawFd) -> io::Result<()> {
    // O_PATH fds do not take xattrs: reopen the directory for reading
    let d = openat(parent, b".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let k = cstr(opaque_xattr().as_bytes())?;
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
