//! The per-run monitor: a single-threaded `cw __monitor <run-dir>` process in its own session.
//!
//! It creates the container through libcontainer (never from a threaded process), waits for it,
//! enforces the time limit and kill requests (SIGTERM, then SIGKILL after the grace period), and
//! writes the exit status and final cgroup accounting atomically into `exit.json` before it tears
//! anything down. A `cw` that dies does not take the run with it; any later `cw` finds the run by
//! its directory, reads `state.json`/`exit.json`, signals the monitor, or recovers a run whose
//! monitor is gone.
//!
//! The run directory it works in is [`crate::rundir`]'s.

mod executor;
mod signals;
mod stdio;
mod teardown;

pub(crate) use teardown::cleanup;

use crate::cgroup::{self, Usage};
pub use crate::net::pasta_path;
use crate::request::{Network, RunRequest};
use crate::rundir::{
    proc_start_time, replace_file, unix_now, ExitStatus, Reason, RunDir, State, PARENTS_FILE,
};
use crate::{Error, Result};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long teardown waits for the processes of a killed run to leave its cgroup.
pub(crate) const RUN_CGROUP_GONE_WITHIN: Duration = Duration::from_secs(10);

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

fn fail(dir: &Path, req: &RunRequest, started: f64, err: Error) -> i32 {
    let msg = err.to_string();
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
    teardown::record_exit(dir, req, &ex);
    teardown::cleanup(req, dir);
    teardown::remove_if_asked(dir);
    1
}

/// The whole of a monitor process (`cw-monitor __monitor DIR`, or `cw __monitor DIR`), once it
/// runs sealed: its log into the run's `monitor.log`, panics there too, then [`main`]. Returns
/// the process's exit code. Single-threaded from here on: no runtime, no helper threads.
pub fn process_main(dir: &Path) -> i32 {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("monitor.log"));
    if let Ok(f) = log {
        // libcgroups warns of every v1 controller the host has not mounted (hugetlb, net_cls…)
        // each time it looks at the run's cgroups, in the container's creation too: only its
        // errors are the run's business, as in cw's own log
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info,libcgroups=error"))
            .with_writer(std::sync::Mutex::new(f))
            .with_ansi(false)
            .init();
    }
    // a detached monitor's stderr is /dev/null: a panic must reach the run's log, where `cw`
    // reports it when the run is found without its monitor
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!(target: "cw::monitor", "the monitor panicked: {info}");
        default_hook(info);
    }));
    main(dir)
}

/// The monitor process's main. Returns its exit code (0 when the status was recorded).
///
/// Phases: [`enter`] (pid record, signals, OOM score), [`crate::net::isolate_network`], [`prepare`] (GPU ld
/// cache, the OCI bundle, stdio), [`launch`] (libcontainer create and start, the terminal),
/// [`supervise`] (wait, time limit, kills, the terminal's relay), [`finish`] (exit.json, then
/// teardown). A phase that fails is the run's error, recorded by [`fail`].
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
    teardown::take_exit_pipe(req.exit_pipe);
    let mut made_net_ns = crate::net::take_net_ns(req.net_ns);
    let mut run = || -> Result<()> {
        let entered = enter(dir)?;
        // without root, pasta must start from the host's network namespace, which the monitor
        // cannot join again once in its user namespace: its helper is forked first
        let pasta = if crate::userns::needed() && req.network == Network::Private {
            Some(crate::net::RootlessPasta::fork(dir)?)
        } else {
            None
        };
        // without root: a user namespace first, so that what follows belongs to it
        let rootless = if crate::userns::needed() {
            Some(crate::userns::enter()?)
        } else {
            None
        };
        let req = match &rootless {
            Some(u) => crate::userns::check(&req, u)?,
            None => req.clone(),
        };
        let req = &req;
        if let Some(parent) = rootless.as_ref().and_then(|u| u.delegated.as_ref()) {
            // where the run's cgroup is as the host names it: a cw that recovers the run after
            // this monitor died is outside the mount namespace that binds `parent` here
            let host = parent.join(req.cgroup_path().trim_start_matches('/'));
            replace_file(
                &dir.join(crate::rundir::HOST_CGROUP_FILE),
                host.as_os_str().as_encoded_bytes(),
            )
            .map_err(|e| Error::Host(format!("recording the run's cgroup: {e}")))?;
        }
        if let Some(o) = &req.overlay {
            // a run without root: its overlay can only be mounted here, in its user namespace
            let mounted = if o.fuse {
                crate::overlay::mount_fuse(
                    &o.lower,
                    &o.upper,
                    &o.work,
                    &req.rootfs,
                    &dir.join("fuse-overlayfs.log"),
                )
                .map(|pid| {
                    // for the teardown (cleanup), here or by whoever recovers the run
                    let _ = replace_file(&dir.join(teardown::FUSE_PID), pid.to_string().as_bytes());
                })
            } else {
                crate::overlay::mount(
                    &o.lower,
                    &o.upper,
                    &o.work,
                    &req.rootfs,
                    crate::userns::inside(),
                )
            };
            mounted.map_err(|e| {
                Error::Host(format!(
                    "mounting the run's {} at {} in its user namespace: {e} (cw run --no-overlay copies the layers instead)",
                    if o.fuse { "fuse-overlayfs" } else { "overlayfs" },
                    req.rootfs.display()
                ))
            })?;
            // docker makes a missing working directory; the preparation could not (no mount yet)
            crate::overlay::make_dir_in_root(&req.rootfs, &req.cwd)
                .map_err(|e| Error::Request(format!("working directory {}: {e}", req.cwd)))?;
        }
        crate::net::isolate_network(dir, req, made_net_ns.take(), pasta)?;
        let prepared = prepare(dir, req, entered.inherited_oom_adj, rootless.as_ref())?;
        let limits_here = rootless.as_ref().is_some_and(|u| u.cgroup);
        let mut launched = launch(dir, req, prepared, started, limits_here)?;
        if rootless.is_some_and(|u| !u.cgroup) {
            // no cgroup to account for the run or to hold its memory: its processes are sampled
            launched.sampler = Some(crate::sample::Sampler::new(launched.pid.as_raw()));
        }
        let (status, reason) = supervise(req, &entered.signals, &mut launched);
        finish(dir, req, started, status, reason, launched);
        Ok(())
    };
    match run() {
        Ok(()) => 0,
        Err(msg) => fail(dir, &req, started, msg),
    }
}

struct Entered {
    /// The read end of the signal self-pipe.
    signals: OwnedFd,
    /// The OOM score cw was started with, for the container.
    inherited_oom_adj: i32,
}

/// Record the monitor's pid, reset inherited signal dispositions, take signals through a
/// self-pipe, and keep the kernel's OOM killer off the monitor.
fn enter(dir: &Path) -> Result<Entered> {
    let me = std::process::id() as i32;
    let _ = replace_file(
        &dir.join("monitor.pid"),
        format!("{me} {}", proc_start_time(me).unwrap_or(0)).as_bytes(),
    );
    signals::reset_ignored_signals();
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
    let sig_r = signals::install()?;
    Ok(Entered {
        signals: sig_r,
        inherited_oom_adj,
    })
}

struct Prepared {
    bundle: PathBuf,
    /// Without a terminal: the container's stdin, stdout and stderr.
    stdio: Option<stdio::Stdio3>,
    /// Pipes standing in for /dev/null outputs, drained by [`supervise`].
    drains: Vec<OwnedFd>,
    /// With a terminal: the console socket libcontainer sends the pty master to.
    console_listener: Option<OwnedFd>,
}

/// What the container needs before it is created: the GPU libraries in the image's ld cache,
/// the OCI bundle, its stdio or its console socket.
fn prepare(
    dir: &Path,
    req: &RunRequest,
    inherited_oom_adj: i32,
    rootless: Option<&crate::userns::Entered>,
) -> Result<Prepared> {
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
    let mut spec = match rootless {
        Some(u) => crate::spec::build_rootless(req, u.cgroup)?,
        None => crate::spec::build(req)?,
    };
    spec["process"]["oomScoreAdj"] = inherited_oom_adj.into();
    if let Some(cpus) = &req.limits.cpuset {
        let no_cgroup = rootless.is_some_and(|u| !u.cgroup);
        if no_cgroup || !cgroup::controller_available(&req.cgroup_parent, "cpuset") {
            // a v2 subtree without the cpuset controller (not delegated, or a kernel without
            // it): libcontainer would fail on cpuset.cpus. The CPUs are then this process's
            // affinity, which the container's processes inherit; they are not held to it.
            if let Some(c) = spec
                .pointer_mut("/linux/resources/cpu")
                .and_then(|c| c.as_object_mut())
            {
                c.remove("cpus");
            }
            cgroup::pin_affinity(cpus)
                .map_err(|e| e.context(format_args!("setting the CPU affinity {cpus:?}")))?;
            tracing::warn!(
                "no cpuset controller under {}: the run's CPUs {cpus} are its processes' affinity, not enforced",
                req.cgroup_parent
            );
        }
    }
    let bundle = dir.join("bundle");
    fs::create_dir_all(&bundle)
        .and_then(|_| fs::write(bundle.join("config.json"), spec.to_string()))
        .map_err(|e| Error::Host(format!("writing the OCI bundle: {e}")))?;
    let mut drains = Vec::new();
    // with a terminal, the container's stdio is its pty (libcontainer makes it) and libcontainer
    // takes no other; the console socket gets the pty's master
    let (stdio, console_listener) = match req.tty {
        Some(_) => {
            let l = crate::console::listen(dir, crate::console::CONSOLE_SOCKET, libc::SOCK_STREAM)
                .map_err(|e| {
                    Error::host(
                        format_args!(
                            "creating {}",
                            dir.join(crate::console::CONSOLE_SOCKET).display()
                        ),
                        e,
                    )
                })?;
            (None, Some(l))
        }
        None => (Some(stdio::stdio(req, &mut drains)?), None),
    };
    Ok(Prepared {
        bundle,
        stdio,
        drains,
        console_listener,
    })
}

struct Launched {
    container: Container,
    pid: Pid,
    console: Option<crate::console::Console>,
    drains: Vec<OwnedFd>,
    /// Parent cgroups that creating the run's cgroup made, removed with it.
    made_parents: Vec<PathBuf>,
    /// A run without a cgroup: its memory, sampled (its limit enforced from it).
    sampler: Option<crate::sample::Sampler>,
}

/// Create and start the container through libcontainer; a failure undoes what was made and
/// names what libcontainer's init logged about it.
fn launch(
    dir: &Path,
    req: &RunRequest,
    p: Prepared,
    started: f64,
    limits_here: bool,
) -> Result<Launched> {
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
    // where this attempt's lines start in the log the container's init inherits
    let log_path = dir.join("monitor.log");
    let log_start = fs::metadata(&log_path).map_or(0, |m| m.len());
    let explain = |what: &str, e: &dyn std::error::Error| {
        let chain = error_chain(e);
        match crate::initlog::detail_since(&log_path, log_start, &req.rootfs) {
            Some(d) if chain.contains("failed to prepare rootfs") => {
                Error::Container(format!("{what}: preparing its root filesystem: {d}"))
            }
            Some(d) => Error::Container(format!("{what}: {chain} ({d})")),
            None => Error::Container(format!("{what}: {chain}")),
        }
    };
    let Prepared {
        bundle,
        stdio,
        drains,
        console_listener,
    } = p;
    if let Some(d) = cgroup::held_by_others(&req.cgroup_path()) {
        return Err(Error::Request(format!(
            "the run's cgroup {} already holds processes: a run named {:?} from another store \
             is using it; give this run another name",
            d.display(),
            req.id
        )));
    }
    // a cgroup of this name left frozen by an earlier run's interrupted kill would hold this
    // run's init before it is ready, and the create would wait for ever
    cgroup::thaw(&req.cgroup_path());
    let built = ContainerBuilder::new(req.id.clone(), SyscallType::default())
        .with_root_path(&lc_root)
        .and_then(|b| {
            let b = b
                .with_executor(executor::DiesWithMonitor {
                    monitor: monitor_pidfd.as_ref().map_or(-1, |f| f.as_raw_fd()),
                })
                .with_console_socket(
                    console_listener
                        .as_ref()
                        .map(|_| dir.join(crate::console::CONSOLE_SOCKET)),
                );
            match stdio {
                Some((i, o, e)) => b.with_stdin(i).with_stdout(o).with_stderr(e),
                None => b,
            }
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
            let msg = explain("creating the container", &e);
            if let Ok(mut c) = Container::load(lc_root.join(&req.id)) {
                let _ = c.delete(true);
            }
            cgroup::remove_run(&req.cgroup_path(), RUN_CGROUP_GONE_WITHIN);
            cgroup::remove_parents(&made_parents);
            return Err(msg);
        }
    };
    let undo = |container: &mut Container, msg: Error| {
        let _ = container.delete(true);
        cgroup::remove_run(&req.cgroup_path(), RUN_CGROUP_GONE_WITHIN);
        cgroup::remove_parents(&made_parents);
        Err(msg)
    };
    if limits_here {
        // a user's run below a delegated cgroup: its limits, before its command starts
        let cpuset = cgroup::controller_available(&req.cgroup_parent, "cpuset");
        if let Err(e) = cgroup::write_v2_limits(&req.cgroup_path(), &req.limits, cpuset) {
            return undo(&mut container, e.context("the run's limits"));
        }
    }
    let console = match (&console_listener, req.tty) {
        (Some(l), Some(size)) => match stdio::open_console(dir, req, l, size) {
            Ok(c) => Some(c),
            Err(e) => return undo(&mut container, e.context("the run's terminal")),
        },
        _ => None,
    };
    drop(console_listener);
    let _ = fs::remove_file(dir.join(crate::console::CONSOLE_SOCKET));
    if let Err(e) = container.start() {
        let msg = explain("starting the container", &e);
        return undo(&mut container, msg);
    }
    // the init inherited the lock's descriptor and closes it at exec
    drop(parents_lock);
    let Some(pid) = container.pid() else {
        return undo(
            &mut container,
            Error::Container("the container has no pid".into()),
        );
    };
    let st = State {
        status: "running".into(),
        pid: Some(pid.as_raw()),
        started_at: started,
    };
    let _ = replace_file(&dir.join("state.json"), &serde_json::to_vec(&st).unwrap());
    teardown::report_start(pid.as_raw());
    Ok(Launched {
        container,
        pid,
        console,
        drains,
        made_parents,
        sampler: None,
    })
}

/// Wait for the container's init while enforcing the time limit and kill requests (SIGTERM,
/// SIGKILL after the grace, at once when asked again) and relaying its terminal. Its exit code
/// (128+signal) and signal, and why it ended.
fn supervise(req: &RunRequest, sig_r: &OwnedFd, l: &mut Launched) -> ((i32, Option<i32>), Reason) {
    let t0 = Instant::now();
    let grace = Duration::from_secs(req.kill_grace_secs);
    let mut reason = Reason::Exited;
    let mut kill_at: Option<Instant> = None;
    let mut sigkilled = false;
    // a signal to every process of the run's cgroup; a run without root and without a cgroup
    // has none to list them by, and a signal to its init, pid 1 of the run's pid namespace:
    // SIGKILL to it ends every process in that namespace
    let all = !crate::userns::inside() || cgroup::v2_dir(&req.cgroup_path()).is_dir();
    // a run without a cgroup is sampled on its interval, not at every wake (output, terminal)
    let mut next_sample = t0;
    let status = 'outer: loop {
        let now = Instant::now();
        let mut wake: Option<Instant> = kill_at.filter(|_| !sigkilled);
        if reason == Reason::Exited {
            if let Some(tl) = req.time_limit {
                let d = t0 + Duration::from_secs(tl);
                wake = Some(wake.map_or(d, |w| w.min(d)));
            }
        }
        if l.sampler.is_some() && !sigkilled {
            wake = Some(wake.map_or(next_sample, |w| w.min(next_sample)));
        }
        let timeout = wake
            .map(|w| w.saturating_duration_since(now).as_millis().min(60_000) as i32)
            .unwrap_or(60_000);
        let mut pfds: Vec<libc::pollfd> = std::iter::once(sig_r)
            .chain(l.drains.iter())
            .map(|f| libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let mut con_fds = l.console.as_ref().map(|c| c.poll_fds()).unwrap_or_default();
        pfds.extend(con_fds.iter().map(|f| f.0));
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
        let mut buf = [0u8; 4096];
        for (i, p) in pfds.iter().enumerate().skip(1).take(l.drains.len()) {
            if p.revents & (libc::POLLIN | libc::POLLHUP) != 0 {
                let _ = (&File::from(l.drains[i - 1].try_clone().unwrap())).read(&mut buf);
            }
        }
        if let Some(c) = &mut l.console {
            for (f, p) in con_fds.iter_mut().zip(&pfds[1 + l.drains.len()..]) {
                f.0 = *p;
            }
            c.handle(&con_fds);
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
                if let Err(e) = l.container.kill(Signal::SIGTERM, all) {
                    tracing::warn!("SIGTERM to the run: {e}");
                }
                cgroup::thaw(&req.cgroup_path());
                kill_at = Some(now + grace);
            }
        } else if term_requested && !sigkilled {
            kill_at = Some(now); // asked again: no more grace
        }
        if let (Some(sm), false, true) = (&mut l.sampler, sigkilled, now >= next_sample) {
            next_sample = now + crate::sample::INTERVAL;
            let held = sm.sample(req.limits.memory);
            if let Some(limit) = req.limits.memory.filter(|m| held > *m) {
                // a run without a cgroup over its memory limit: what the kernel's OOM killer
                // would do to a cgroup's run, at once and to all of it
                tracing::warn!(
                    "the run holds {held} bytes, over its memory limit of {limit}: SIGKILL"
                );
                reason = Reason::MemoryLimit;
                kill_at = Some(now);
            }
        }
        if let Some(k) = kill_at {
            if now >= k && !sigkilled {
                if let Err(e) = l.container.kill(Signal::SIGKILL, all) {
                    tracing::warn!("SIGKILL to the run: {e}");
                }
                cgroup::thaw(&req.cgroup_path());
                sigkilled = true;
            }
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(p, code)) if p == l.pid => break 'outer (code, None),
                Ok(WaitStatus::Signaled(p, s, _)) if p == l.pid => {
                    break 'outer (128 + s as i32, Some(s as i32))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    };
    (status, reason)
}

/// A run without a cgroup's accounting: its sampled peak, and the CPU time of the processes the
/// monitor and the run's init waited for (what a process that was never waited for used is
/// lost with it, as a cgroup would not lose it).
fn sampled_usage(sm: &crate::sample::Sampler, reason: Reason) -> Usage {
    let ru = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN);
    let ns =
        |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000_000 + t.tv_usec() as u64 * 1000;
    let (user, system) = ru.map_or((0, 0), |r| (ns(r.user_time()), ns(r.system_time())));
    Usage {
        cpu_user_ns: user,
        cpu_system_ns: system,
        memory_current: 0,
        memory_peak: sm.peak,
        oom_kills: (reason == Reason::MemoryLimit) as u64,
    }
}

/// Record the end (exit.json, with the final accounting) before anything is torn down, then
/// delete the container, its parent cgroups and the run's mounts.
fn finish(
    dir: &Path,
    req: &RunRequest,
    started: f64,
    status: (i32, Option<i32>),
    reason: Reason,
    mut l: Launched,
) {
    if let Some(c) = l.console.take() {
        // what the container wrote last reaches the attached terminals before the run is over
        c.finish(2000);
    }
    let _ = fs::remove_file(dir.join(crate::console::ATTACH_SOCKET));
    let usage = match &l.sampler {
        Some(sm) => sampled_usage(sm, reason),
        None => cgroup::read(&req.cgroup_path()),
    };
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
    teardown::record_exit(dir, req, &ex);
    if let Err(e) = l.container.delete(true) {
        tracing::warn!("deleting the container: {e}");
    }
    cgroup::remove_run(&req.cgroup_path(), RUN_CGROUP_GONE_WITHIN);
    {
        let _lock = cgroup::parents_lock(&req.cgroup_parent);
        cgroup::remove_parents(&l.made_parents);
    }
    teardown::cleanup(req, dir);
    teardown::remove_if_asked(dir);
}
