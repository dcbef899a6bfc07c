//! A run's overlayfs: the image's layer dirs (read-only lowers, top first) under a per-run
//! upper dir. Mounted by `cw` for root's runs, and by the monitor inside the run's user namespace
//! for a run without root (`userxattr`, Linux 5.11+).

use std::io;
use std::path::{Path, PathBuf};

/// Whether this kernel mounts overlayfs in a user namespace (5.11 added `userxattr` and
/// unprivileged overlay mounts).
pub fn unprivileged_supported() -> bool {
    crate::userns::kernel_at_least(5, 11)
}

/// Make the directory `path` (absolute in the container) under `root` where it is missing, as
/// docker makes a missing working directory: every component resolved inside `root`
/// (`openat2` with RESOLVE_IN_ROOT: symlinks followed, `..` clamped, no magic links), missing
/// ones made 0755. A non-directory in the way is an error (ENOTDIR).
pub fn make_dir_in_root(root: &Path, path: &str) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let rootfd = std::fs::File::open(root)?;
    let comps: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
    const RESOLVE_IN_ROOT: u64 = 0x10;
    let open = |p: &str| -> io::Result<OwnedFd> {
        let c = CString::new(if p.is_empty() { "." } else { p })
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let how = OpenHow {
            flags: (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
            mode: 0,
            resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
        };
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                rootfd.as_raw_fd(),
                c.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
        }
    };
    for i in 1..=comps.len() {
        match open(&comps[..i].join("/")) {
            Ok(_) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // its parent resolved a moment ago; O_PATH fds cannot be written through, so the
                // parent is opened again for the mkdirat
                let parent = CString::new(comps[..i - 1].join("/"))
                    .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
                let how = OpenHow {
                    flags: (libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
                    mode: 0,
                    resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
                };
                let p = if i == 1 {
                    CString::new(".").unwrap()
                } else {
                    parent
                };
                let fd = unsafe {
                    libc::syscall(
                        libc::SYS_openat2,
                        rootfd.as_raw_fd(),
                        p.as_ptr(),
                        &how as *const OpenHow,
                        std::mem::size_of::<OpenHow>(),
                    )
                };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let pfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
                let name = CString::new(comps[i - 1])
                    .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
                if unsafe { libc::mkdirat(pfd.as_raw_fd(), name.as_ptr(), 0o755) } != 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(e);
                    }
                }
                open(&comps[..i].join("/"))?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Legacy mount(2) data is one page: beyond this, the new mount API is used.
const MAX_MOUNT_DATA: usize = 4000;

/// Mount an overlay of `lowers` (top first) with `upper` and `work` at `target`. `userxattr`: the
/// overlay of a user namespace (Linux 5.11+), whose opaque markers are `user.overlay.opaque`.
pub fn mount(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
    userxattr: bool,
) -> io::Result<()> {
    let lower: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let data = format!(
        "lowerdir={},upperdir={},workdir={}{}",
        lower.join(":"),
        upper.display(),
        work.display(),
        if userxattr { ",userxattr" } else { "" }
    );
    if data.len() <= MAX_MOUNT_DATA {
        return nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(data.as_str()),
        )
        .map_err(io::Error::from);
    }
    mount_overlay_fsconfig(&lower, upper, work, target, userxattr)
}

/// fsopen/fsconfig with one `lowerdir+` per layer (Linux 6.8+): no page-size bound on layer count.
fn mount_overlay_fsconfig(
    lowers: &[String],
    upper: &Path,
    work: &Path,
    target: &Path,
    userxattr: bool,
) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const FSCONFIG_SET_STRING: libc::c_uint = 1;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    let c = |s: &str| {
        CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
    };
    let fsname = c("overlay")?;
    let fs = unsafe {
        libc::syscall(
            libc::SYS_fsopen,
            fsname.as_ptr(),
            1, /* FSOPEN_CLOEXEC */
        )
    };
    if fs < 0 {
        return Err(io::Error::last_os_error());
    }
    let fs = unsafe { OwnedFd::from_raw_fd(fs as i32) };
    let set = |k: &str, v: &str| -> io::Result<()> {
        let (k, v) = (c(k)?, c(v)?);
        let r = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                FSCONFIG_SET_STRING,
                k.as_ptr(),
                v.as_ptr(),
                0,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    for l in lowers {
        set("lowerdir+", l)?;
    }
    set("upperdir", &upper.display().to_string())?;
    set("workdir", &work.display().to_string())?;
    if userxattr {
        const FSCONFIG_SET_FLAG: libc::c_uint = 0;
        let k = c("userxattr")?;
        if unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                FSCONFIG_SET_FLAG,
                k.as_ptr(),
                0usize,
                0,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    if unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            0usize,
            0usize,
            0,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    let m = unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            1, /* FSMOUNT_CLOEXEC */
            0,
        )
    };
    if m < 0 {
        return Err(io::Error::last_os_error());
    }
    let m = unsafe { OwnedFd::from_raw_fd(m as i32) };
    let empty = c("")?;
    let t = c(&target.display().to_string())?;
    if unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            m.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
