//! The container's stdin, stdout and stderr, and its terminal when it has one.

use crate::request::RunRequest;
use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

pub(super) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Whether `fd` is /dev/null (char device 1:3).
fn is_dev_null(fd: RawFd) -> bool {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    unsafe {
        libc::fstat(fd, &mut st) == 0
            && (st.st_mode & libc::S_IFMT) == libc::S_IFCHR
            && st.st_rdev == libc::makedev(1, 3)
    }
}

/// An output fd for the container: the named file, or a copy of ours. /dev/null is never passed
/// (libcontainer would reopen it read-only inside): a pipe we drain stands in for it.
fn output(path: &Option<PathBuf>, ours: RawFd, drains: &mut Vec<OwnedFd>) -> io::Result<OwnedFd> {
    if let Some(p) = path {
        let f = OpenOptions::new().create(true).append(true).open(p)?;
        return Ok(f.into());
    }
    if is_dev_null(ours) || unsafe { libc::fcntl(ours, libc::F_GETFD) } < 0 {
        let (r, w) = pipe()?;
        drains.push(r);
        // the container's end must block like a normal file
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETFL, 0) };
        return Ok(w);
    }
    let fd = unsafe { libc::fcntl(ours, libc::F_DUPFD_CLOEXEC, 3) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) type Stdio3 = (OwnedFd, OwnedFd, OwnedFd);

/// The container's stdin, stdout and stderr without a terminal.
pub(super) fn stdio(req: &RunRequest, drains: &mut Vec<OwnedFd>) -> Result<Stdio3> {
    let (o, e) = match (
        output(&req.stdout, 1, drains),
        output(&req.stderr, 2, drains),
    ) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => {
            return Err(Error::Host(format!("opening the output files: {e}")))
        }
    };
    // `-i`: ours, inherited from cw run (a pipe, a file, a terminal); else /dev/null
    let ours = (req.stdin && unsafe { libc::fcntl(0, libc::F_GETFD) } >= 0 && !is_dev_null(0))
        .then(|| unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3) })
        .filter(|fd| *fd >= 0);
    let i = match ours {
        Some(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
        None => File::open("/dev/null")
            .map_err(|e| Error::Host(format!("opening /dev/null: {e}")))?
            .into(),
    };
    Ok((i, o, e))
}

/// Take the pty master libcontainer sent, size it, and open the attach socket. The first client
/// is the monitor's stdin when `cw run -it` passed one end of a socket pair there.
pub(super) fn open_console(
    dir: &Path,
    req: &RunRequest,
    listener: &OwnedFd,
    size: crate::console::Size,
) -> Result<crate::console::Console> {
    use crate::console;
    let master =
        console::receive_master(listener, 10_000).map_err(|e| Error::Host(e.to_string()))?;
    let _ = console::set_size(master.as_raw_fd(), size);
    let attach =
        console::listen(dir, console::ATTACH_SOCKET, libc::SOCK_SEQPACKET).map_err(|e| {
            Error::host(
                format_args!("creating {}", dir.join(console::ATTACH_SOCKET).display()),
                e,
            )
        })?;
    let log = match &req.stdout {
        Some(p) => Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| Error::Host(format!("opening {}: {e}", p.display())))?,
        ),
        None => None,
    };
    let mut c = console::Console::new(master, Some(attach), log);
    if console::is_seqpacket(0) {
        let fd = unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3) };
        if fd >= 0 {
            c.add_client(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        // the monitor keeps no other copy: when cw run goes, its client goes
        if let Ok(null) = File::open("/dev/null") {
            unsafe { libc::dup2(null.as_raw_fd(), 0) };
        }
    }
    Ok(c)
}
