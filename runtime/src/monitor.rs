//! The per-run monitor: a single-threaded `cw __monitor <run-dir>` process in its own session.
//!
//! It creates the container through libcontainer (never from a threaded process), waits for it,
//! enforces the time limit and kill requests (SIGTERM, then SIGKILL after the grace period), and
//! writes the exit status and final cgroup accounting atomically into `exit.json` before it tears
//! anything down. A `cw` that dies does not take the run with it; any later `cw` finds the run by
//! its directory, reads `state.json`/`exit.json`, signals the monitor, or recovers a run whose
//! monitor is gone.
//!
//! Run directory:
//! ```text
//! request.json   what to run (written by the caller before the monitor starts)
//! monitor.pid    the monitor's pid and start time (so a recycled pid is not mistaken for it)
//! bundle/        the OCI bundle (config.json)
//! lc/            libcontainer's state
//! state.json     {"status":"running","pid":…,"started_at":…}
//! exit.json      the final status and accounting (the run is over when this exists)
//! cleaned        resources (cgroup, mounts, dirs) are released
//! monitor.log    libcontainer's and the monitor's log
//! ```

use crate::cgroup::{self, Usage};
use crate::request::{Network, RunRequest};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The parent cgroups the monitor's creating the run made (JSON list of paths), written before it
/// creates them, when there are any.
const PARENTS_FILE: &str = "cgroup-parents.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The command exited by itself (or by a signal it caused).
    Exited,
    /// Killed on request (`cw kill`, the worker, a signal to the monitor).
    Killed,
    /// Killed for running past its time limit.
    TimeLimit,
    /// The container could not be created or started.
    Failed,
    /// The monitor died; the run was found and cleaned up by another process.
    Lost,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExitStatus {
    /// Shell convention: the exit code, or 128+signal.
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub reason: Reason,
    /// The kernel OOM-killed at least one process of the run (from the cgroup's counter).
    pub oom_killed: bool,
    pub usage: Usage,
    pub started_at: f64,
    pub finished_at: f64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct State {
    pub status: String,
    pub pid: Option<i32>,
    pub started_at: f64,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Write `data` to `path` atomically and durably: a temp file in the same directory (a name no
/// other writer, thread or process, can be using), fsync, rename; the temp file is removed on
/// failure. For what must survive a power cut: the image store's blobs and records, the
/// worker's run table.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    write_via_rename(path, data, true)
}

/// Write `data` to `path` atomically but without fsync: any other process sees the old content
/// or the new, never a mix. For state that means nothing after a reboot, whose runs a power cut
/// ends anyway: a run's request, pid, state and exit records, in-use records. Their fsyncs
/// (six per run) were about a quarter of `cw run true`'s start-to-exit time here (47.6 -> 34.4
/// ms), and cost far more on network filesystems.
pub fn replace_file(path: &Path, data: &[u8]) -> io::Result<()> {
    write_via_rename(path, data, false)
}

fn write_via_rename(path: &Path, data: &[u8], durable: bool) -> io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}-{}-{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x"),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    ));
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// A run directory and what can be read from it.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

fn proc_start_time(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    after.split(' ').nth(19)?.parse().ok()
}

impl RunDir {
    pub fn new(path: impl Into<PathBuf>) -> RunDir {
        RunDir { path: path.into() }
    }

    pub fn request(&self) -> io::Result<RunRequest> {
        let b = fs::read(self.path.join("request.json"))?;
        serde_json::from_slice(&b).map_err(io::Error::other)
    }

    pub fn write_request(&self, r: &RunRequest) -> io::Result<()> {
        fs::create_dir_all(&self.path)?;
        replace_file(
            &self.path.join("request.json"),
            &serde_json::to_vec_pretty(r).unwrap(),
        )
    }

    pub fn state(&self) -> Option<State> {
        serde_json::from_slice(&fs::read(self.path.join("state.json")).ok()?).ok()
    }

    pub fn exit(&self) -> Option<ExitStatus> {
        serde_json::from_slice(&fs::read(self.path.join("exit.json")).ok()?).ok()
    }

    pub fn cleaned(&self) -> bool {
        self.path.join("cleaned").exists()
    }

    /// Record the process preparing this run (before anything is mounted for it), so that a run
    /// whose preparer died half-way can be told from one being prepared, and released.
    pub fn write_creator(&self) -> io::Result<()> {
        let pid = std::process::id() as i32;
        let start = proc_start_time(pid).unwrap_or(0);
        replace_file(
            &self.path.join("creator"),
            format!("{pid} {start}\n").as_bytes(),
        )
    }

    /// A run being prepared by a live process (no request written yet).
    pub fn being_prepared(&self) -> bool {
        let Ok(s) = fs::read_to_string(self.path.join("creator")) else {
            return false;
        };
        let Some((pid, start)) = s.trim().split_once(' ') else {
            return false;
        };
        match (pid.parse::<i32>(), start.parse::<u64>()) {
            (Ok(pid), Ok(start)) => proc_start_time(pid) == Some(start),
            _ => false,
        }
    }

    /// A run whose preparation died before it wrote its request (a killed `cw run`): what it may
    /// hold is its rootfs mount and its dir.
    pub fn abandoned(&self) -> bool {
        !self.path.join("request.json").exists()
            && !self.monitor_started()
            && !self.being_prepared()
    }

    /// Whether the monitor has written its pid: a run without one is still being started (or
    /// never was), not one whose monitor died.
    pub fn monitor_started(&self) -> bool {
        self.path.join("monitor.pid").exists()
    }

    /// The monitor's pid if it is still that process (pid and start time match).
    pub fn monitor_pid(&self) -> Option<i32> {
        let s = fs::read_to_string(self.path.join("monitor.pid")).ok()?;
        let (pid, start) = s.trim().split_once(' ')?;
        let pid: i32 = pid.parse().ok()?;
        let start: u64 = start.parse().ok()?;
        (proc_start_time(pid) == Some(start)).then_some(pid)
    }

    /// Ask the monitor to stop the run (SIGTERM to the container, SIGKILL after the grace).
    /// Without a live monitor, the run is recovered here. Returns false if it had already ended.
    pub fn kill(&self) -> io::Result<bool> {
        if self.exit().is_some() && self.cleaned() {
            return Ok(false);
        }
        match self.monitor_pid() {
            Some(pid) => {
                signal::kill(Pid::from_raw(pid), Signal::SIGTERM).map_err(io::Error::from)?;
                Ok(true)
            }
            None => {
                self.recover()?;
                Ok(true)
            }
        }
    }

    /// Finish a run whose monitor is gone: kill what is left, record it as lost, release resources.
    pub fn recover(&self) -> io::Result<()> {
        let req = self.request()?;
        let lc = self.path.join("lc").join(&req.id);
        let mut usage = Usage::default();
        if lc.exists() {
            if let Ok(mut c) = Container::load(lc.clone()) {
                let _ = c.kill(Signal::SIGKILL, true);
                if let Ok(cfg) = c.spec() {
                    usage = cgroup::read(&cgroup_path_string(&cfg.cgroup_path));
                }
                let _ = c.delete(true);
            }
        }
        let recorded: Vec<PathBuf> = fs::read(self.path.join(PARENTS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let parents = cgroup::recorded_parents(&req.cgroup_parent, &recorded);
        if !parents.is_empty() {
            let _lock = cgroup::parents_lock(&req.cgroup_parent);
            cgroup::remove_parents(&parents);
        }
        if self.exit().is_none() {
            let st = self.state();
            let ex = ExitStatus {
                exit_code: 137,
                signal: Some(9),
                reason: Reason::Lost,
                oom_killed: usage.oom_kills > 0,
                usage,
                started_at: st.map(|s| s.started_at).unwrap_or(0.0),
                finished_at: unix_now(),
                error: Some("the run's monitor process died; the run was stopped".into()),
            };
            replace_file(
                &self.path.join("exit.json"),
                &serde_json::to_vec_pretty(&ex).unwrap(),
            )?;
        }
        cleanup(&req, &self.path);
        Ok(())
    }

    /// Block until the run has ended (exit.json and cleanup), polling.
    pub fn wait(&self, poll: Duration) -> io::Result<ExitStatus> {
        loop {
            if let Some(e) = self.exit() {
                if self.cleaned() || self.monitor_pid().is_none() {
                    return Ok(e);
                }
            } else if self.monitor_pid().is_none() && self.monitor_started() {
                // died without writing the status
                std::thread::sleep(Duration::from_millis(50));
                if self.exit().is_none() && self.monitor_pid().is_none() {
                    self.recover()?;
                    continue;
                }
            }
            std::thread::sleep(poll);
        }
    }
}

fn cgroup_path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Start `exe __monitor <dir>` in its own session. Its stdout/stderr are the container's when the
/// request names no files.
pub fn spawn(exe: &Path, dir: &Path, stdout: Stdio, stderr: Stdio) -> io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(exe);
    cmd.arg("__monitor")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(io::Error::from)?;
            Ok(())
        });
    }
    cmd.spawn()
}

// ---- inside the monitor

static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        unsafe { libc::write(fd, &b as *const u8 as *const libc::c_void, 1) };
    }
}

extern "C" fn on_sigpipe(_: libc::c_int) {}

/// Set every signal that arrived ignored back to its default. An ignored signal stays ignored
/// across fork and exec, so what cw was started with (nohup's SIGHUP; the SIG_IGN glibc's
/// posix_spawn leaves on its internal signals 32 and 33 in every child a Rust program spawns)
/// would otherwise reach the container. Raw rt_sigaction: glibc refuses to touch 32 and 33,
/// which this single-threaded process never needs.
fn reset_ignored_signals() {
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: libc::c_ulong,
        restorer: usize,
        mask: u64,
    }
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let mut old = KernelSigaction {
            handler: 0,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        let got = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                std::ptr::null::<KernelSigaction>(),
                &mut old as *mut KernelSigaction,
                8usize,
            )
        };
        if got == 0 && old.handler == libc::SIG_IGN {
            let dfl = KernelSigaction {
                handler: libc::SIG_DFL,
                flags: 0,
                restorer: 0,
                mask: 0,
            };
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &dfl as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8usize,
                )
            };
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Bring `lo` up in the current network namespace.
fn loopback_up() -> io::Result<()> {
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

/// Where the `pasta` binary is (PATH, then /usr/bin and /usr/local/bin).
pub fn pasta_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join("pasta"))
        .find(|p| p.is_file())
}

/// Connect this (new) network namespace to the outside with pasta, started from the host's
/// namespace: no port forwarding either way, the gateway address not mapped to the host (so the
/// host's loopback services stay out of reach). pasta forks into the background once the
/// interface is configured; its pid is kept for cleanup.
fn start_pasta(dir: &Path, host_ns: &File) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let pasta = pasta_path().ok_or(
        "network \"private\" needs pasta (Debian/Ubuntu package passt); install it or use --network none|host",
    )?;
    // pasta joins a namespace bound to a file (as `ip netns` makes them); /proc/PID/ns/net is
    // refused by the packaged version. It quits by itself when the file is unmounted.
    let nsf = dir.join("netns");
    File::create(&nsf).map_err(|e| format!("{}: {e}", nsf.display()))?;
    nix::mount::mount(
        Some("/proc/self/ns/net"),
        &nsf,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("binding the run's network namespace: {e}"))?;
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
        .map_err(|e| format!("starting {}: {e}", pasta.display()))?;
    if !out.status.success() {
        let err: String = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| !l.contains("syslog"))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(format!(
            "pasta could not connect the run's network ({}): {err}",
            out.status
        ));
    }
    Ok(())
}

fn stop_pasta(dir: &Path) {
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

/// libcontainer's default executor, and the container's init dies with its monitor: a run
/// without one is lost anyway (see [`RunDir::recover`]), and an init the monitor left behind
/// would run on outside every accounting, and outside a batch system's reach. Under Slurm, a job
/// step's SIGKILL reaches cw and its monitor but not a container in cgroups nested below the
/// step's, so without this the container outlived its job.
#[derive(Clone)]
struct DiesWithMonitor {
    /// A pidfd of the monitor (inherited by the init, closed at its exec), or -1.
    monitor: RawFd,
}

impl Executor for DiesWithMonitor {
    fn exec(&self, spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorError> {
        DefaultExecutor {}.exec(spec)
    }

    /// Runs in the init after its uid, gid and capability changes (each of which clears the
    /// parent-death signal) and before it waits for the start; the exec keeps the signal unless
    /// the program gains privileges (file capabilities).
    fn validate(&self, spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorValidationError> {
        // the init's parent is the monitor (libcontainer clones it with CLONE_PARENT)
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
            return Err(ExecutorValidationError::ArgValidationError(format!(
                "setting the parent-death signal: {}",
                io::Error::last_os_error()
            )));
        }
        // the monitor may have died before that: its pidfd is readable then
        if self.monitor >= 0 {
            let mut p = libc::pollfd {
                fd: self.monitor,
                events: libc::POLLIN,
                revents: 0,
            };
            if unsafe { libc::poll(&mut p, 1, 0) } > 0 && p.revents != 0 {
                return Err(ExecutorValidationError::ArgValidationError(
                    "the run's monitor process is gone".into(),
                ));
            }
        }
        DefaultExecutor {}.validate(spec)
    }
}

fn cleanup(req: &RunRequest, dir: &Path) {
    stop_pasta(dir);
    for m in &req.cleanup.unmount {
        if let Err(e) = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH) {
            if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
                tracing::warn!("unmounting {}: {e}", m.display());
            }
        }
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

/// An error with every source it wraps, on one line: libcontainer's top-level errors ("failed to
/// prepare rootfs") name neither the path nor the operation; their sources do.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn fail(dir: &Path, req: &RunRequest, started: f64, msg: String) -> i32 {
    tracing::error!("{msg}");
    let ex = ExitStatus {
        exit_code: 125,
        signal: None,
        reason: Reason::Failed,
        oom_killed: false,
        usage: Usage::default(),
        started_at: started,
        finished_at: unix_now(),
        error: Some(msg),
    };
    let _ = replace_file(
        &dir.join("exit.json"),
        &serde_json::to_vec_pretty(&ex).unwrap(),
    );
    cleanup(req, dir);
    1
}

/// The monitor process's main. Returns its exit code (0 when the status was recorded).
pub fn main(dir: &Path) -> i32 {
    let rd = RunDir::new(dir);
    let req = match rd.request() {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "cw monitor: reading {}: {e}",
                dir.join("request.json").display()
            );
            return 2;
        }
    };
    let started = unix_now();
    let me = std::process::id() as i32;
    let _ = replace_file(
        &dir.join("monitor.pid"),
        format!("{me} {}", proc_start_time(me).unwrap_or(0)).as_bytes(),
    );

    reset_ignored_signals();
    // When memory runs out above the run's own limit (a Slurm job's, the host's), the kernel must
    // pick the run's processes, not the monitor: without it a job's OOM took the monitor and the
    // run's record with it. The container gets back the score cw was started with.
    let inherited_oom_adj = fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .unwrap_or(0);
    if let Err(e) = fs::write("/proc/self/oom_score_adj", "-999") {
        // lowering needs CAP_SYS_RESOURCE, which some sandboxes take even from root
        tracing::info!("the monitor keeps oom_score_adj {inherited_oom_adj}: {e}");
    }
    // signals arrive through a self-pipe; handlers (not a blocked mask) so children start clean
    let (sig_r, sig_w) = match pipe() {
        Ok(p) => p,
        Err(e) => return fail(dir, &req, started, format!("creating a pipe: {e}")),
    };
    SIGNAL_PIPE.store(sig_w.as_raw_fd(), Ordering::Relaxed);
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
    ] {
        unsafe { signal::sigaction(s, &act) }.ok();
    }
    // A broken stdout pipe must not kill the monitor, but SIGPIPE must not be *ignored* either:
    // an ignored signal stays ignored across exec, and the container (forked from here) would
    // start with it (`yes | head -1` printing "Broken pipe" instead of ending quietly). A
    // handler that does nothing gives the monitor EPIPE and is reset to the default by exec.
    let noop = SigAction::new(
        SigHandler::Handler(on_sigpipe),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    unsafe { signal::sigaction(Signal::SIGPIPE, &noop) }.ok();

    if matches!(req.network, Network::None | Network::Private) {
        // The container inherits this private namespace (the spec asks for none of its own):
        // only loopback, and it is up; for Private, pasta adds the way out.
        let host_ns = match File::open("/proc/self/ns/net") {
            Ok(f) => f,
            Err(e) => {
                return fail(
                    dir,
                    &req,
                    started,
                    format!("opening the host network namespace: {e}"),
                )
            }
        };
        if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
            return fail(
                dir,
                &req,
                started,
                format!("creating a network namespace: {e}"),
            );
        }
        if let Err(e) = loopback_up() {
            return fail(dir, &req, started, format!("bringing up loopback: {e}"));
        }
        if req.network == Network::Private {
            if let Err(e) = start_pasta(dir, &host_ns) {
                return fail(dir, &req, started, e);
            }
        }
    }

    if !req.ldconfig_dirs.is_empty() {
        // driver libraries into the image's ld cache, before the container exists
        if let Err(e) = crate::ldcache::update(
            &req.rootfs,
            &req.host_files,
            &req.ldconfig_dirs,
            &dir.join("ldconfig.log"),
        ) {
            eprintln!(
                "cw: ldconfig over the run's rootfs: {e}; the GPU libraries resolve through LD_LIBRARY_PATH only"
            );
        }
    }

    let mut spec = match crate::spec::build(&req) {
        Ok(s) => s,
        Err(e) => return fail(dir, &req, started, e),
    };
    if let Some(p) = spec.process_mut() {
        p.set_oom_score_adj(Some(inherited_oom_adj));
    }
    let bundle = dir.join("bundle");
    if let Err(e) = fs::create_dir_all(&bundle).and_then(|_| {
        spec.save(bundle.join("config.json"))
            .map_err(io::Error::other)
    }) {
        return fail(dir, &req, started, format!("writing the OCI bundle: {e}"));
    }
    let mut drains = Vec::new();
    let (stdout, stderr) = match (
        output(&req.stdout, 1, &mut drains),
        output(&req.stderr, 2, &mut drains),
    ) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => {
            return fail(dir, &req, started, format!("opening the output files: {e}"))
        }
    };
    let stdin = match File::open("/dev/null") {
        Ok(f) => f,
        Err(e) => return fail(dir, &req, started, format!("opening /dev/null: {e}")),
    };
    let lc_root = dir.join("lc");
    let _ = fs::create_dir_all(&lc_root);
    // the parent cgroups that creating this run's cgroup will make, to be removed with it
    let parents_lock = cgroup::parents_lock(&req.cgroup_parent);
    let made_parents = cgroup::missing_parents(&req.cgroup_parent);
    // pidfd_open(2) (Linux 5.3); without it the init only has the parent-death signal
    let monitor_pidfd = match unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) } {
        fd if fd >= 0 => Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }),
        _ => None,
    };
    if !made_parents.is_empty() {
        // for whoever finishes the run if this process dies (RunDir::recover)
        let _ = replace_file(
            &dir.join(PARENTS_FILE),
            &serde_json::to_vec(&made_parents).unwrap(),
        );
    }
    let built = ContainerBuilder::new(req.id.clone(), SyscallType::default())
        .with_root_path(&lc_root)
        .and_then(|b| {
            b.with_executor(DiesWithMonitor {
                monitor: monitor_pidfd.as_ref().map_or(-1, |f| f.as_raw_fd()),
            })
            .with_stdin(stdin)
            .with_stdout(stdout)
            .with_stderr(stderr)
            .validate_id()
        })
        .and_then(|b| {
            b.as_init(&bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
        });
    let mut container = match built {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("creating the container: {}", error_chain(&e));
            if let Ok(mut c) = Container::load(lc_root.join(&req.id)) {
                let _ = c.delete(true);
            }
            cgroup::remove_parents(&made_parents);
            return fail(dir, &req, started, msg);
        }
    };
    let cgroup_path = req.cgroup_path();
    if let Err(e) = container.start() {
        let msg = format!("starting the container: {}", error_chain(&e));
        let _ = container.delete(true);
        cgroup::remove_parents(&made_parents);
        return fail(dir, &req, started, msg);
    }
    // the init inherited the lock's descriptor and closes it at exec
    drop(parents_lock);
    let Some(pid) = container.pid() else {
        let _ = container.delete(true);
        cgroup::remove_parents(&made_parents);
        return fail(dir, &req, started, "the container has no pid".into());
    };
    let st = State {
        status: "running".into(),
        pid: Some(pid.as_raw()),
        started_at: started,
    };
    let _ = replace_file(&dir.join("state.json"), &serde_json::to_vec(&st).unwrap());

    let t0 = Instant::now();
    let grace = Duration::from_secs(req.kill_grace_secs);
    let mut reason = Reason::Exited;
    let mut kill_at: Option<Instant> = None;
    let mut sigkilled = false;
    let status = 'outer: loop {
        let now = Instant::now();
        let mut wake: Option<Instant> = kill_at.filter(|_| !sigkilled);
        if reason == Reason::Exited {
            if let Some(tl) = req.time_limit {
                let d = t0 + Duration::from_secs(tl);
                wake = Some(wake.map_or(d, |w| w.min(d)));
            }
        }
        let timeout = wake
            .map(|w| w.saturating_duration_since(now).as_millis().min(60_000) as i32)
            .unwrap_or(60_000);
        let mut pfds: Vec<libc::pollfd> = std::iter::once(&sig_r)
            .chain(drains.iter())
            .map(|f| libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
        let mut buf = [0u8; 4096];
        for (i, p) in pfds.iter().enumerate().skip(1) {
            if p.revents & (libc::POLLIN | libc::POLLHUP) != 0 {
                let _ = (&File::from(drains[i - 1].try_clone().unwrap())).read(&mut buf);
            }
        }
        let mut term_requested = false;
        loop {
            let n = unsafe {
                libc::read(
                    sig_r.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                )
            };
            if n <= 0 {
                break;
            }
            for &s in &buf[..n as usize] {
                if s as i32 != libc::SIGCHLD {
                    term_requested = true;
                }
            }
        }
        let now = Instant::now();
        if reason == Reason::Exited {
            let timed_out = req
                .time_limit
                .is_some_and(|tl| now >= t0 + Duration::from_secs(tl));
            if term_requested || timed_out {
                reason = if term_requested {
                    Reason::Killed
                } else {
                    Reason::TimeLimit
                };
                tracing::info!("stopping the run ({reason:?}): SIGTERM, SIGKILL in {grace:?}");
                let _ = container.kill(Signal::SIGTERM, true);
                kill_at = Some(now + grace);
            }
        } else if term_requested && !sigkilled {
            kill_at = Some(now); // asked again: no more grace
        }
        if let Some(k) = kill_at {
            if now >= k && !sigkilled {
                let _ = container.kill(Signal::SIGKILL, true);
                sigkilled = true;
            }
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(p, code)) if p == pid => break 'outer (code, None),
                Ok(WaitStatus::Signaled(p, s, _)) if p == pid => {
                    break 'outer (128 + s as i32, Some(s as i32))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    };
    let usage = cgroup::read(&cgroup_path);
    let ex = ExitStatus {
        exit_code: status.0,
        signal: status.1,
        reason,
        oom_killed: usage.oom_kills > 0,
        usage,
        started_at: started,
        finished_at: unix_now(),
        error: None,
    };
    if let Err(e) = replace_file(
        &dir.join("exit.json"),
        &serde_json::to_vec_pretty(&ex).unwrap(),
    ) {
        tracing::error!("writing exit.json: {e}");
    }
    if let Err(e) = container.delete(true) {
        tracing::warn!("deleting the container: {e}");
    }
    {
        let _lock = cgroup::parents_lock(&req.cgroup_parent);
        cgroup::remove_parents(&made_parents);
    }
    cleanup(&req, dir);
    0
}
