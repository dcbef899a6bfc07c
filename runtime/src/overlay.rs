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

/// How a run without root gets its overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserOverlay {
    /// The kernel's overlayfs, mounted in the run's user namespace (Linux 5.11+).
    Kernel,
    /// fuse-overlayfs (Debian's package), for kernels before 5.11.
    Fuse,
}

/// Where fuse-overlayfs is (PATH, then /usr/bin).
pub fn fuse_overlayfs_path() -> Option<PathBuf> {
    crate::net::find_program("fuse-overlayfs", &["/usr/bin"])
}

/// The overlay a run without root gets: the kernel's where it mounts one in a user namespace,
/// else fuse-overlayfs where installed; None: its layers are copied. `CW_USER_OVERLAY=fuse` (or
/// `kernel`) picks one (a kernel whose overlayfs in user namespaces a site has disabled).
pub fn user_overlay() -> std::result::Result<UserOverlay, String> {
    let fuse = || {
        fuse_overlayfs_path()
            .map(|_| UserOverlay::Fuse)
            .ok_or_else(|| {
                "fuse-overlayfs is not installed (Debian/Ubuntu package fuse-overlayfs)".to_string()
            })
    };
    match std::env::var("CW_USER_OVERLAY").as_deref() {
        Ok("fuse") => fuse(),
        Ok("kernel") => Ok(UserOverlay::Kernel),
        _ if unprivileged_supported() => Ok(UserOverlay::Kernel),
        _ => fuse().map_err(|e| {
            format!("a kernel before 5.11 mounts no overlayfs in a user namespace, and {e}")
        }),
    }
}

/// Mount an overlay of `lowers` (top first) with `upper` and `work` at `target` by
/// fuse-overlayfs, from inside the run's user and mount namespaces: run in the foreground as
/// this process's child (no daemon of its own to outlive the run), its stderr to `log`; returns
/// its pid once the mount is there. It leaves when the mount goes ([`stop_fuse`]).
pub fn mount_fuse(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
    log: &Path,
) -> io::Result<i32> {
    let exe = fuse_overlayfs_path().ok_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, "fuse-overlayfs is not installed")
    })?;
    // its -o list splits at ',' and its lowerdir at ':'
    for p in lowers.iter().map(|p| p.as_path()).chain([upper, work]) {
        let s = p.to_string_lossy();
        if s.contains(',') || s.contains(':') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{s}: fuse-overlayfs cannot take a path with ',' or ':'"),
            ));
        }
    }
    let lower: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let err = std::fs::File::create(log)?;
    let mut child = std::process::Command::new(&exe)
        .arg("-f")
        .arg("-o")
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            upper.display(),
            work.display()
        ))
        .arg(target)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(err)
        .spawn()?;
    let said = || {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.contains("unknown argument ignored"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let t = std::time::Instant::now();
    loop {
        if nix::sys::statfs::statfs(target)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::FUSE_SUPER_MAGIC)
        {
            return Ok(child.id() as i32);
        }
        if let Some(st) = child.try_wait()? {
            return Err(io::Error::other(format!(
                "{} ({st}): {}",
                exe.display(),
                said()
            )));
        }
        if t.elapsed() > std::time::Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other(format!(
                "{}: no mount after 10 s: {}",
                exe.display(),
                said()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// After the run's rootfs is unmounted: fuse-overlayfs `pid` (the monitor's child, or, for a
/// recovery by another cw, a process whose command line names `target`) leaves by itself; it is
/// waited for up to 2 s, then killed.
pub fn stop_fuse(pid: i32, target: &Path) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let p = nix::unistd::Pid::from_raw(pid);
    let ours = || {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            c.split(|b| *b == 0)
                .any(|a| a == target.as_os_str().as_encoded_bytes())
        })
    };
    let t = std::time::Instant::now();
    while t.elapsed() < std::time::Duration::from_secs(2) {
        match waitpid(p, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(_) => return,
            // not our child: gone when its /proc entry no longer names the target
            Err(_) if !ours() => return,
            Err(_) => {}
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    if ours() {
        let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
        let _ = waitpid(p, None);
    }
}

/// Make the directory `path` (absolute in the container) under `root` where it is missing, as
/// docker makes a missing working directory: resolved inside `root` by `pathrs` (symlinks
/// followed within it, `..` clamped; openat2 with RESOLVE_IN_ROOT where the kernel has it),
/// missing components made 0755. A non-directory in the way is an error.
pub fn make_dir_in_root(root: &Path, path: &str) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let r = pathrs::Root::open(root).map_err(io::Error::other)?;
    r.mkdir_all(path, &std::fs::Permissions::from_mode(0o755))
        .map(|_| ())
        .map_err(io::Error::other)
}

/// Legacy mount(2) data is one page: beyond this, the new mount API is used.
const MAX_MOUNT_DATA: usize = 4000;

/// The option of [`mount`]'s overlays that skips every sync of their upper filesystem.
const VOLATILE: &str = ",volatile";

/// Mount an overlay of `lowers` (top first) with `upper` and `work` at `target`. `userxattr`: the
/// overlay of a user namespace (Linux 5.11+), whose opaque markers are `user.overlay.opaque`.
///
/// `volatile` (Linux 5.10+; without it where the kernel refuses it): the overlay never syncs its
/// upper filesystem. Without it, unmounting a run's overlay synced the whole filesystem holding
/// the store (`ovl_sync_fs`: every dirty page of every user of that disk, and a cache flush) and
/// the teardown waited on the disk: most of its off-CPU time in a `perf` of 30 runs here. A
/// run's upper dir is removed with the run, so nothing of it needs to reach the disk; a sync
/// inside the container skips only what the rootfs holds (bind mounts sync as ever).
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
    if data.len() + VOLATILE.len() <= MAX_MOUNT_DATA {
        let mount = |data: &str| {
            nix::mount::mount(
                Some("overlay"),
                target,
                Some("overlay"),
                nix::mount::MsFlags::empty(),
                Some(data),
            )
        };
        return match mount(&format!("{data}{VOLATILE}")) {
            // a kernel before 5.10
            Err(nix::errno::Errno::EINVAL) => mount(&data),
            r => r,
        }
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
    const FSCONFIG_SET_FLAG: libc::c_uint = 0;
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
    // fsconfig(2): a string option, a flag, or the create command
    let fsconfig = |cmd: libc::c_uint, key: Option<&str>, value: Option<&str>| -> io::Result<()> {
        let (k, v) = (key.map(c).transpose()?, value.map(c).transpose()?);
        let ptr = |x: &Option<CString>| x.as_ref().map_or(std::ptr::null(), |x| x.as_ptr());
        let r =
            unsafe { libc::syscall(libc::SYS_fsconfig, fs.as_raw_fd(), cmd, ptr(&k), ptr(&v), 0) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let set = |k: &str, v: &str| fsconfig(FSCONFIG_SET_STRING, Some(k), Some(v));
    for l in lowers {
        set("lowerdir+", l)?;
    }
    set("upperdir", &upper.display().to_string())?;
    set("workdir", &work.display().to_string())?;
    if userxattr {
        fsconfig(FSCONFIG_SET_FLAG, Some("userxattr"), None)?;
    }
    // see [`mount`]; every kernel with `lowerdir+` (6.8) has it
    fsconfig(FSCONFIG_SET_FLAG, Some("volatile"), None)?;
    fsconfig(FSCONFIG_CMD_CREATE, None, None)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The new mount API's path (taken past one page of options, e.g. hundreds of layers), called
    /// directly: the top lower's file wins, a lower one shows through, writes go to the upper.
    #[test]
    fn an_overlay_mounted_through_fsconfig_merges_its_layers() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: mounting needs root");
            return;
        }
        let t = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap();
        let d = |n: &str| {
            let p = t.path().join(n);
            std::fs::create_dir_all(&p).unwrap();
            p
        };
        let (top, low) = (d("top"), d("low"));
        std::fs::write(top.join("f"), "top").unwrap();
        std::fs::write(low.join("f"), "low").unwrap();
        std::fs::write(low.join("g"), "g").unwrap();
        for userxattr in [false, true] {
            let (upper, work, target) = (
                d(&format!("upper{userxattr}")),
                d(&format!("work{userxattr}")),
                d(&format!("merged{userxattr}")),
            );
            let lowers = [top.display().to_string(), low.display().to_string()];
            mount_overlay_fsconfig(&lowers, &upper, &work, &target, userxattr).unwrap();
            let read = |n: &str| std::fs::read_to_string(target.join(n)).unwrap();
            let merged = (read("f"), read("g"));
            std::fs::write(target.join("new"), "n").unwrap();
            nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).unwrap();
            assert_eq!(merged, ("top".to_string(), "g".to_string()));
            assert!(upper.join("new").is_file() && !top.join("new").exists());
        }
    }

    #[test]
    fn a_missing_working_directory_is_made_inside_the_root_whatever_its_links_say() {
        let t = tempfile::tempdir().unwrap();
        let (root, outside) = (t.path().join("root"), t.path().join("outside"));
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("etc/passwd"), "").unwrap();
        // a link that names the host's path of a directory outside the root, and one up
        std::os::unix::fs::symlink(&outside, root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("up")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etcl")).unwrap();
        // the host's path means nothing inside the root: a dangling link, refused
        assert!(make_dir_in_root(&root, "/abs/made").is_err());
        // links resolve inside the root, `..` stops at it
        make_dir_in_root(&root, "/etcl/made").unwrap();
        make_dir_in_root(&root, "/up/x/y").unwrap();
        assert!(root.join("etc/made").is_dir());
        assert!(root.join("x/y").is_dir());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        assert!(!t.path().join("x").exists());
        // an existing one is left as it is; a file in the way is an error
        make_dir_in_root(&root, "/etc").unwrap();
        assert!(make_dir_in_root(&root, "/etc/passwd/x").is_err());
    }
}
