//! A run's network: loopback in its own namespace, and pasta for `--network private`.

use crate::request::{Network, RunRequest};
use crate::{Error, Result};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Make a network namespace of its own for a run, loopback up, in a thread that ends with it
/// (the namespace of this process and its other threads stays as it was): a descriptor of it,
/// for [`crate::request::RunRequest::net_ns`].
pub fn make_namespace() -> std::thread::JoinHandle<io::Result<OwnedFd>> {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        loopback_up()?;
        Ok(std::fs::File::open("/proc/thread-self/ns/net")?.into())
    })
}

/// The monitor's network for the run (`none` and `private`), which the container inherits (the
/// spec asks for no namespace of its own): only loopback, and it is up; for `private`, pasta adds the way out.
pub(crate) fn isolate_network(
    dir: &Path,
    req: &RunRequest,
    made: Option<OwnedFd>,
    rootless_pasta: Option<RootlessPasta>,
) -> Result<()> {
    if !matches!(req.network, Network::None | Network::Private) {
        return Ok(());
    }
    let host_ns = File::open("/proc/self/ns/net")
        .map_err(|e| Error::Host(format!("opening the host network namespace: {e}")))?;
    // the namespace cw made for the run, never the one the monitor is in (the host's)
    let joined = made
        .filter(|ns| !same_file(ns, &host_ns))
        .map(|ns| nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET));
    if !matches!(joined, Some(Ok(()))) {
        if let Some(Err(e)) = joined {
            tracing::info!("joining the network namespace cw made: {e}; making one");
        }
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| Error::Host(format!("creating a network namespace: {e}")))?;
    }
    loopback_up().map_err(|e| Error::Host(format!("bringing up loopback: {e}")))?;
    if req.network == Network::Private {
        match rootless_pasta {
            Some(p) => p.start()?,
            None => start_pasta(dir, &host_ns)?,
        }
    }
    Ok(())
}

/// Take the network namespace `cw run` made for the run ([`RunRequest::net_ns`]): the inherited
/// descriptor when it is one of a network namespace (close-on-exec from here on, so that the
/// container does not inherit it); any other descriptor is left alone.
pub(crate) fn take_net_ns(fd: Option<i32>) -> Option<OwnedFd> {
    // NS_GET_NSTYPE (Linux 4.11): a namespace's type, EINVAL/ENOTTY for any other file
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    crate::launch::take_inherited(fd, |fd| {
        let nstype = unsafe { libc::ioctl(fd, NS_GET_NSTYPE as _) };
        nstype == libc::CLONE_NEWNET
    })
}

/// Whether two open files are the same file (a namespace: the same namespace).
fn same_file(a: &impl AsRawFd, b: &impl AsRawFd) -> bool {
    let st = |f: &dyn AsRawFd| {
        nix::sys::stat::fstat(f.as_raw_fd())
            .ok()
            .map(|s| (s.st_dev, s.st_ino))
    };
    matches!((st(a), st(b)), (Some(x), Some(y)) if x == y)
}

pub(crate) fn loopback_up() -> io::Result<()> {
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo\0".iter().enumerate() {
        ifr.ifr_name[i] = *b as libc::c_char;
    }
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Where the program `name` is: PATH, then the directories `then`.
pub(crate) fn find_program(name: &str, then: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(then.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Where the `pasta` binary is (PATH, then /usr/bin and /usr/local/bin).
pub fn pasta_path() -> Option<PathBuf> {
    find_program("pasta", &["/usr/bin", "/usr/local/bin"])
}

/// Connect this (new) network namespace to the outside with pasta, started from the host's
/// namespace: no port forwarding either way, the gateway address not mapped to the host (so the
/// host's loopback services stay out of reach). pasta forks into the background once the
/// interface is configured; its pid is kept for cleanup.
pub(crate) fn start_pasta(dir: &Path, host_ns: &File) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let pasta = pasta_path().ok_or_else(|| {
        Error::Host(
            "network \"private\" needs pasta (Debian/Ubuntu package passt); install it or use --network none|host".into(),
        )
    })?;
    // pasta joins a namespace bound to a file (as `ip netns` makes them); /proc/PID/ns/net is
    // refused by the packaged version. It quits by itself when the file is unmounted.
    let nsf = dir.join("netns");
    File::create(&nsf).map_err(|e| Error::Host(format!("{}: {e}", nsf.display())))?;
    nix::mount::mount(
        Some("/proc/self/ns/net"),
        &nsf,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| Error::Host(format!("binding the run's network namespace: {e}")))?;
    let ns = nsf.to_string_lossy().into_owned();
    let pidfile = dir.join("pasta.pid");
    let host_fd = host_ns.as_raw_fd();
    let mut cmd = Command::new(&pasta);
    cmd.args(["--runas", "0", "--config-net", "--no-map-gw", "--quiet"])
        .args(["-t", "none", "-u", "none", "-T", "none", "-U", "none"])
        .args(["--netns", &ns, "--netns-only", "-P"])
        .arg(&pidfile)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(host_fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd
        .output()
        .map_err(|e| Error::Host(format!("starting {}: {e}", pasta.display())))?;
    if !out.status.success() {
        let err: String = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| !l.contains("syslog"))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(Error::Host(format!(
            "pasta could not connect the run's network ({}): {err}",
            out.status
        )));
    }
    Ok(())
}

/// pasta for a run without root, forked before the monitor enters its user namespace: pasta must
/// run in the host's network namespace, which nothing inside that user namespace can join again.
/// The helper waits on a pipe; [`RootlessPasta::start`], called once the run's network
/// namespace exists, lets it exec pasta with the monitor's pid, and pasta joins the monitor's
/// user and network namespaces from outside (their owner may: they are the user's own).
pub(crate) struct RootlessPasta {
    pid: Pid,
    go: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

impl RootlessPasta {
    /// Fork the helper. The monitor must be single-threaded (it is).
    pub(crate) fn fork(dir: &Path) -> Result<RootlessPasta> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let pasta = pasta_path().ok_or_else(|| {
            Error::Host(
                "network \"private\" needs pasta (Debian/Ubuntu package passt); install it or use --network none|host".into(),
            )
        })?;
        let pidfile = dir.join("pasta.pid");
        let me = std::process::id().to_string();
        let cstr =
            |b: &[u8]| CString::new(b).map_err(|e| Error::Host(format!("pasta's arguments: {e}")));
        let exe = cstr(pasta.as_os_str().as_bytes())?;
        let mut argv = vec![exe.clone()];
        for a in [
            "--config-net",
            "--no-map-gw",
            "--quiet",
            "-t",
            "none",
            "-u",
            "none",
            "-T",
            "none",
            "-U",
            "none",
            "-P",
        ] {
            argv.push(cstr(a.as_bytes())?);
        }
        argv.push(cstr(pidfile.as_os_str().as_bytes())?);
        if nix::unistd::geteuid().is_root() {
            // root of the user's subordinate-id namespace: pasta would otherwise change to
            // "nobody" there, a subordinate id that may not join the run's namespaces
            argv.push(cstr(b"--runas")?);
            argv.push(cstr(b"0")?);
        }
        argv.push(cstr(me.as_bytes())?);
        let host = |e: nix::errno::Errno| Error::Host(format!("starting pasta's helper: {e}"));
        let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(host)?;
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(host)?;
        let null = File::open("/dev/null").map_err(|e| Error::Host(format!("/dev/null: {e}")))?;
        match unsafe { nix::unistd::fork() }.map_err(host)? {
            nix::unistd::ForkResult::Child => {
                // async-signal-safe calls only: wait for the word, then become pasta
                let mut b = [0u8; 1];
                let n = unsafe { libc::read(go_r.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
                if n != 1 {
                    unsafe { libc::_exit(1) };
                }
                unsafe {
                    libc::dup2(null.as_raw_fd(), 0);
                    libc::dup2(null.as_raw_fd(), 1);
                    libc::dup2(err_w.as_raw_fd(), 2);
                }
                let _ = nix::unistd::execv(&exe, &argv);
                unsafe { libc::_exit(127) };
            }
            nix::unistd::ForkResult::Parent { child } => Ok(RootlessPasta {
                pid: child,
                go: Some(go_w),
                stderr: Some(err_r),
            }),
        }
    }

    /// Let pasta connect the monitor's (new) network namespace; returns once it has configured
    /// the interface and gone to the background.
    pub(crate) fn start(mut self) -> Result<()> {
        use std::io::Read;
        let go = self.go.take().unwrap();
        if nix::unistd::write(&go, b"g") != Ok(1) {
            return Err(Error::Host("pasta's helper is gone".into()));
        }
        drop(go);
        let mut err = String::new();
        let _ = File::from(self.stderr.take().unwrap()).read_to_string(&mut err);
        let st = nix::sys::wait::waitpid(self.pid, None);
        let tun = nix::unistd::access("/dev/net/tun", nix::unistd::AccessFlags::W_OK);
        match st {
            Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => Ok(()),
            st => Err(Error::Host(format!(
                "pasta could not connect the run's network ({st:?}): {}{}",
                err.lines()
                    .filter(|l| !l.contains("syslog"))
                    .collect::<Vec<_>>()
                    .join("; "),
                if tun.is_err() {
                    " (/dev/net/tun is closed to this user: distributions' udev rules make it 0666, as rootless podman needs too)"
                } else {
                    ""
                }
            ))),
        }
    }
}

impl Drop for RootlessPasta {
    /// Not started: the helper reads end-of-file and exits; it is reaped here.
    fn drop(&mut self) {
        if self.go.take().is_some() {
            let _ = nix::sys::wait::waitpid(self.pid, None);
        }
    }
}

pub(crate) fn stop_pasta(dir: &Path) {
    if let Ok(s) = fs::read_to_string(dir.join("pasta.pid")) {
        if let Ok(pid) = s.trim().parse::<i32>() {
            // only if it still is our pasta (the pid may have been reused after a reboot): its
            // command line names this run's pid file (its comm is e.g. "passt.avx2")
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let ours = dir.join("pasta.pid");
            let ours = ours.as_os_str().as_encoded_bytes();
            if cmdline.split(|b| *b == 0).any(|a| a == ours) {
                let _ = signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let _ = fs::remove_file(dir.join("pasta.pid"));
    }
    let nsf = dir.join("netns");
    if nsf.exists() {
        let _ = nix::mount::umount2(&nsf, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_file(&nsf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    /// The network namespace a thread is in: (device, inode) of its nsfs file.
    fn netns_of_this_thread() -> (u64, u64) {
        let st = nix::sys::stat::stat("/proc/thread-self/ns/net").unwrap();
        (st.st_dev, st.st_ino)
    }

    fn id(f: &impl AsRawFd) -> (u64, u64) {
        let st = nix::sys::stat::fstat(f.as_raw_fd()).unwrap();
        (st.st_dev, st.st_ino)
    }

    #[test]
    fn only_a_network_namespace_is_taken_as_the_runs() {
        let d = tempfile::tempdir().unwrap();
        let file = File::create(d.path().join("not-a-namespace")).unwrap();
        let uts = File::open("/proc/self/ns/uts").unwrap();
        for not in [
            Some(file.as_raw_fd()),
            Some(uts.as_raw_fd()),
            Some(2),
            Some(-1),
            None,
        ] {
            assert!(take_net_ns(not).is_none(), "{not:?} was taken");
        }
        let net = File::open("/proc/self/ns/net").unwrap();
        let taken = take_net_ns(Some(net.into_raw_fd())).expect("a network namespace's descriptor");
        let flags = unsafe { libc::fcntl(taken.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "kept open for the container");
    }

    #[test]
    fn the_monitor_joins_the_namespace_made_for_the_run_but_never_the_hosts() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: making network namespaces needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let req = crate::spec::tests::req(0);
        assert_eq!(req.network, Network::None);
        let host = netns_of_this_thread();
        let made = crate::net::make_namespace().join().unwrap().unwrap();
        let made_id = id(&made);
        assert_ne!(made_id, host);
        // namespaces are per thread: each case runs in a thread of its own
        let isolated = |made: OwnedFd| {
            std::thread::scope(|s| {
                s.spawn(|| {
                    isolate_network(d.path(), &req, Some(made), None).unwrap();
                    netns_of_this_thread()
                })
                .join()
                .unwrap()
            })
        };
        let joined = isolated(made);
        assert_eq!(
            joined, made_id,
            "the monitor did not join the namespace made for it"
        );
        // offered the namespace it is already in (the host's), it makes one of its own
        let hosts = File::open("/proc/self/ns/net").unwrap().into();
        let own = isolated(hosts);
        assert_ne!(own, host, "the run was given the host's network");
        assert_ne!(own, made_id);
    }
}
