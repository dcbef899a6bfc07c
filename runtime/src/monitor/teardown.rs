//! The end of a run, after the container has exited: its record reported to `cw run` before the
//! slow part, then the release of what it held on the host and, where asked, the removal of
//! its directory. [`cleanup`] also serves a cw that finishes the teardown of a run whose monitor
//! died.

use crate::net::stop_pasta;
use crate::request::RunRequest;
use crate::rundir::{replace_file, ExitStatus, RunEvent};
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

/// The pid of a user's run's fuse-overlayfs, in its run directory.
pub(super) const FUSE_PID: &str = "fuse-overlayfs.pid";

/// Release what the run holds on the host (its network helper, mounts, fuse-overlayfs, upper
/// dir or copied rootfs, libcontainer's state) and mark it `cleaned`: the end of the monitor's
/// teardown, or of a recovery by another cw ([`crate::rundir::RunDir::recover`]).
pub(crate) fn cleanup(req: &RunRequest, dir: &Path) {
    stop_pasta(dir);
    for m in &req.cleanup.unmount {
        if let Err(e) = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH) {
            // EPERM: a user's cw outside the run's user namespace, where its overlay was
            // mounted (and went with it): nothing of the run's is mounted here
            let not_here = e == nix::errno::Errno::EPERM && crate::userns::needed();
            if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT && !not_here {
                tracing::warn!("unmounting {}: {e}", m.display());
            }
        }
    }
    // fuse-overlayfs leaves with its mount; before the upper dir it serves is removed
    if let Some(pid) = fs::read_to_string(dir.join(FUSE_PID))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        crate::overlay::stop_fuse(pid, &req.rootfs);
        let _ = fs::remove_file(dir.join(FUSE_PID));
    }
    // what the container wrote (its upper dir, a copied rootfs) is a tree someone else made: any
    // depth, odd files, possibly a mount left behind; removed with bounded fds and stack
    for p in req.cleanup.remove.iter().chain([&dir.join("lc")]) {
        if let Err(e) = crate::fsx::remove_tree(p) {
            tracing::warn!("removing {}: {e}", p.display());
        }
    }
    let _ = File::create(dir.join("cleaned"));
}

/// The pipe of [`RunRequest::exit_pipe`], once taken ([`take_exit_pipe`]).
static EXIT_PIPE: std::sync::Mutex<Option<File>> = std::sync::Mutex::new(None);

/// Take the inherited write end of `cw run`'s exit pipe: a FIFO, or nothing (a descriptor the
/// request names that is not one is left alone). Close-on-exec from here on, so that the
/// container's init does not keep it past its exec.
pub(super) fn take_exit_pipe(fd: Option<i32>) {
    let is_fifo = |fd| {
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let stat = unsafe { libc::fstat(fd, &mut st) };
        stat == 0 && st.st_mode & libc::S_IFMT == libc::S_IFIFO
    };
    if let Some(p) = crate::launch::take_inherited(fd, is_fifo) {
        *EXIT_PIPE.lock().unwrap_or_else(|e| e.into_inner()) = Some(File::from(p));
    }
}

/// The container has started: tell `cw run` its init's pid on the pipe, so that the signals it
/// passes on reach the init from then on (it waits for this line, it does not poll).
pub(super) fn report_start(pid: i32) {
    if let Some(p) = EXIT_PIPE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        let _ = p.write_all(&RunEvent::Started(pid).line());
    }
}

/// The run's end is recorded: tell `cw run` (the exit record on its pipe), and let go of the
/// terminal or pipes the monitor shares with it (a `$(cw run …)` waits for them to close), so
/// that what follows, the teardown, is off its critical path. Where `cw run` took the record
/// and the request asks for it, the run's directory is marked for removal at the end of the
/// teardown (a run whose `cw run` had died stays for `cw ps`, `attach` and `rm`, as a kept one).
fn report_exit(dir: &Path, req: &RunRequest, ex: &ExitStatus) {
    if let Some(mut p) = EXIT_PIPE.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let line = RunEvent::Exited(ex.clone()).line();
        // EPIPE where no cw reads any more (the monitor's SIGPIPE handler does nothing)
        if p.write_all(&line).is_ok() && req.remove_when_done {
            let _ = File::create(dir.join(crate::rundir::REMOVING_FILE));
        }
    }
    if let Ok(null) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// The last of the teardown: the run's directory, where [`report_exit`] marked it. Renamed out
/// of the way first (`runs/.gone-…`, which no cw lists), so that it vanishes at once for
/// whoever waits for it, then removed.
pub(super) fn remove_if_asked(dir: &Path) {
    if !dir.join(crate::rundir::REMOVING_FILE).exists() {
        return;
    }
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let gone = dir.with_file_name(format!(".gone-{name}-{}", std::process::id()));
    let target = match fs::rename(dir, &gone) {
        Ok(()) => gone,
        Err(e) => {
            tracing::warn!("moving the run's directory {} aside: {e}", dir.display());
            dir.to_path_buf()
        }
    };
    if let Err(e) = crate::fsx::remove_tree(&target) {
        tracing::warn!("removing the run's directory {}: {e}", target.display());
    }
}

/// Write the run's end to `exit.json` (atomically) and report it ([`report_exit`]): from here
/// on the run is over for every cw, and what follows is teardown.
pub(super) fn record_exit(dir: &Path, req: &RunRequest, ex: &ExitStatus) {
    if let Err(e) = replace_file(
        &dir.join("exit.json"),
        &serde_json::to_vec_pretty(ex).unwrap(),
    ) {
        tracing::error!("writing exit.json: {e}");
    }
    report_exit(dir, req, ex);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::IntoRawFd;

    fn cloexec(fd: i32) -> bool {
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        flags & libc::FD_CLOEXEC != 0
    }

    /// The request names the exit pipe by number: only a FIFO is taken (written to and closed
    /// by the monitor); any other descriptor there, or stdio, is left as it was.
    #[test]
    fn only_a_fifo_is_taken_as_the_exit_pipe() {
        let d = tempfile::tempdir().unwrap();
        let file = File::create(d.path().join("not-a-pipe")).unwrap();
        let fd = file.as_raw_fd();
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        for not in [Some(fd), Some(0), Some(2), Some(-1), Some(987_654), None] {
            take_exit_pipe(not);
            assert!(EXIT_PIPE.lock().unwrap().is_none(), "{not:?} was taken");
        }
        assert!(!cloexec(fd), "a regular file's descriptor was changed");
        assert!(
            unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0,
            "it was closed"
        );

        let (r, w) = nix::unistd::pipe().unwrap();
        let wfd = w.into_raw_fd();
        assert!(!cloexec(wfd));
        take_exit_pipe(Some(wfd));
        let taken = EXIT_PIPE
            .lock()
            .unwrap()
            .take()
            .expect("the FIFO was not taken");
        assert_eq!(taken.as_raw_fd(), wfd);
        assert!(
            cloexec(wfd),
            "the exit pipe would outlive the container's exec"
        );
        (&taken).write_all(b"x").unwrap();
        drop(taken);
        let mut got = String::new();
        File::from(r).read_to_string(&mut got).unwrap();
        assert_eq!(got, "x");
    }
}
