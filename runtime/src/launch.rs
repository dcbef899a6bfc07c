//! Starting a run's monitor: which executable (`cw-monitor` beside `cw`, else `cw` itself), the
//! sealed copy of it that monitors run from (CVE-2019-5736), and the process with the descriptors
//! it inherits. The run's directory it is started on is [`crate::rundir`]'s.

use std::fs::{self, File};
use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The name of the monitor's own executable, installed beside `cw`.
pub const MONITOR_EXE: &str = "cw-monitor";

/// The executable to start a run's monitor from: `cw-monitor` beside the running executable when
/// it is there and no more writable than it (owned by the same user, not group- or
/// world-writable, a regular file), else this executable (`cw __monitor`, which seals itself).
pub fn monitor_exe() -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let self_exe = PathBuf::from("/proc/self/exe");
    let Ok(me) = std::env::current_exe() else {
        return self_exe;
    };
    let candidate = me.with_file_name(MONITOR_EXE);
    match (fs::metadata(&me), fs::symlink_metadata(&candidate)) {
        (Ok(m), Ok(c))
            if c.file_type().is_file()
                && c.uid() == m.uid()
                && c.mode() & 0o022 == 0
                && c.mode() & 0o100 != 0 =>
        {
            candidate
        }
        _ => self_exe,
    }
}

/// The monitor's executable ([`monitor_exe`]) copied once into a sealed anonymous file
/// (CVE-2019-5736: nothing that reaches a container's `/proc/<pid>/exe` can write the binary
/// that made it). Monitors start from this copy, and `pentacle::ensure_sealed` finds them sealed
/// so they do not copy themselves again: `cw run` copies once per run without first executing
/// the file on disk, and a worker copies once for all its runs (a sealed file cannot change, so
/// one copy serves every run; cw-monitor replaced on disk reaches the worker's runs when the
/// worker restarts, as a new `cw` does).
#[derive(Debug)]
pub struct SealedMonitor {
    memfd: File,
    argv0: PathBuf,
}

impl SealedMonitor {
    pub fn new() -> io::Result<SealedMonitor> {
        let exe = monitor_exe();
        let mut f = File::open(&exe)
            .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", exe.display())))?;
        let memfd = pentacle::SealOptions::new()
            .executable(true)
            .copy_and_seal(&mut f)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("copying {} into a sealed memfd: {e}", exe.display()),
                )
            })?;
        // the name the monitor shows in ps (/proc/self/exe: this executable's own path)
        let argv0 = if exe == Path::new("/proc/self/exe") {
            std::env::current_exe().unwrap_or(exe)
        } else {
            exe
        };
        Ok(SealedMonitor { memfd, argv0 })
    }
}

/// Start `exe __monitor <dir>` in its own session. Its stdout/stderr are the container's when
/// the request names no files; its stdin is the container's with `stdin`, or the first client of
/// its terminal (one end of [`crate::console::pair`]) with `tty`. `inherit`: descriptors of the
/// caller's that the monitor inherits under the same numbers ([`RunRequest::exit_pipe`],
/// [`RunRequest::net_ns`]), the only ones past its stdio.
pub fn spawn(
    exe: &SealedMonitor,
    dir: &Path,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
    inherit: &[RawFd],
) -> io::Result<Child> {
    use std::os::unix::io::AsRawFd;
    use std::os::unix::process::CommandExt;
    let inherit = inherit.to_vec();
    // the child execs the copy through the descriptor it inherits (close-on-exec: the monitor
    // does not keep it)
    let mut cmd = Command::new(format!("/proc/self/fd/{}", exe.memfd.as_raw_fd()));
    cmd.arg0(&exe.argv0)
        .arg("__monitor")
        .arg(dir)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr);
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(io::Error::from)?;
            for &fd in &inherit {
                // this process's copy only: kept open across the exec
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Take a descriptor the monitor inherited from [`spawn`] under the number its request names,
/// when `is_it` says it is what the request says (a descriptor past stdio only): made
/// close-on-exec, so that the container's init does not keep it past its exec. Any other is
/// left alone.
pub(crate) fn take_inherited(
    fd: Option<RawFd>,
    is_it: impl FnOnce(RawFd) -> bool,
) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let fd = fd.filter(|fd| *fd > 2)?;
    if !is_it(fd) {
        return None;
    }
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}
