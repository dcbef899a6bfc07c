//! `cw exec`: a process inside a running run, through libcontainer's tenant builder. It joins the
//! run's namespaces and cgroup (so the run's limits and accounting include it) and gets the
//! run's own process settings from the run's OCI bundle: its capabilities, no_new_privs, and
//! its seccomp filter — never more than the run has.
//!
//! The run's seccomp filter is not in its spec (the init's executor loads the one compiled when
//! cw was built, [`crate::seccomp`]), and libcontainer rebuilds a tenant's `linux` section from
//! the namespaces and the cgroup path alone anyway; [`TenantExecutor`] loads the same filter in
//! the new process right before its exec, after no_new_privs is set and the capabilities are
//! dropped.
//!
//! The caller must be single-threaded (libcontainer forks).

use crate::rundir::RunDir;
use crate::{Error, Result};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::Spec;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

/// What `cw exec` asks for; None keeps what the run has.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub args: Vec<String>,
    /// NAME=VALUE, over the run's environment.
    pub env: Vec<String>,
    pub cwd: Option<String>,
    /// uid, gid, supplementary gids.
    pub user: Option<(u32, u32, Vec<u32>)>,
    /// A terminal: libcontainer sends its master to this console socket.
    pub console_socket: Option<std::path::PathBuf>,
    /// Connect our stdin (without a terminal).
    pub stdin: bool,
}

#[derive(Clone)]
struct TenantExecutor;

impl Executor for TenantExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        crate::seccomp::load()
            .map_err(|e| ExecutorError::Other(format!("loading the run's seccomp filter: {e}")))?;
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

/// Replace or add `NAME=VALUE` entries.
pub fn merge_env(base: &[String], over: &[String]) -> Vec<String> {
    let name = |e: &str| e.split('=').next().unwrap_or("").to_string();
    let mut out: Vec<String> = base
        .iter()
        .filter(|b| !over.iter().any(|o| name(o) == name(b)))
        .cloned()
        .collect();
    out.extend(over.iter().cloned());
    out
}

fn dup(fd: i32) -> Result<OwnedFd> {
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if n < 0 {
        return Err(Error::Host(format!(
            "duplicating fd {fd}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Start the process; its host pid. It is a child of the caller.
pub fn exec(rd: &RunDir, o: &ExecOptions) -> Result<i32> {
    let req = rd.request().map_err(|e| {
        Error::Host(format!(
            "reading {}: {e}",
            rd.path.join("request.json").display()
        ))
    })?;
    if rd.exit().is_some() || rd.state().and_then(|s| s.pid).is_none() {
        return Err(Error::Request(format!("run {} is not running", req.id)));
    }
    // libcontainer forks from here: with another thread alive a lock it held would stay held
    // in the child
    if std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count()) > 1 {
        return Err(Error::Host(
            "internal error: cw exec must start the process from a single thread".into(),
        ));
    }
    if o.args.is_empty() {
        return Err(Error::Request("cw exec needs a command".into()));
    }
    let config = rd.path.join("bundle/config.json");
    let spec = Spec::load(&config)
        .map_err(|e| Error::Host(format!("reading {}: {e}", config.display())))?;
    let mut p = spec
        .process()
        .clone()
        .ok_or_else(|| Error::Host(format!("{} has no process", config.display())))?;
    p.set_args(Some(o.args.clone()));
    p.set_env(Some(merge_env(
        p.env().as_deref().unwrap_or_default(),
        &o.env,
    )));
    if let Some(c) = &o.cwd {
        p.set_cwd(c.into());
    }
    if let Some((uid, gid, extra)) = &o.user {
        let mut u = p.user().clone();
        u.set_uid(*uid);
        u.set_gid(*gid);
        u.set_additional_gids(Some(extra.clone()));
        p.set_user(u);
    }
    p.set_terminal(Some(o.console_socket.is_some()));
    let pfile = rd.path.join(format!("exec-{}.json", std::process::id()));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&pfile)
            .map_err(|e| Error::Host(format!("writing {}: {e}", pfile.display())))?;
        f.write_all(&serde_json::to_vec(&p).map_err(|e| Error::Host(e.to_string()))?)
            .map_err(|e| Error::Host(format!("writing {}: {e}", pfile.display())))?;
    }
    if crate::userns::needed() {
        join_the_runs_user_namespace(rd)?;
    }
    let built = (|| -> Result<i32> {
        let b = ContainerBuilder::new(req.id.clone(), SyscallType::default())
            .with_root_path(rd.path.join("lc"))
            .map_err(|e| Error::Container(crate::monitor::error_chain(&e)))?
            .with_executor(TenantExecutor)
            .with_console_socket(o.console_socket.clone());
        let b = if o.console_socket.is_some() {
            b
        } else {
            let stdin = if o.stdin {
                dup(0)?
            } else {
                File::open("/dev/null")
                    .map_err(|e| Error::Host(e.to_string()))?
                    .into()
            };
            b.with_stdin(stdin)
                .with_stdout(dup(1)?)
                .with_stderr(dup(2)?)
        };
        let pid = b
            .as_tenant()
            .with_process(Some(&pfile))
            .with_detach(o.console_socket.is_some())
            .build()
            .map_err(|e| Error::Container(crate::monitor::error_chain(&e)))?;
        Ok(pid.as_raw())
    })();
    let _ = std::fs::remove_file(&pfile);
    built.map_err(|e| e.context(format_args!("exec in run {}", req.id)))
}

/// A run without root: the namespaces its monitor made before the container (not in the
/// run's spec, so libcontainer would not join them), joined here through the run's init: the
/// user namespace first (only from inside it may this process join the others), the network
/// namespace, and a cgroup2 view of the run's cgroup namespace on /sys/fs/cgroup in a mount
/// namespace of our own, as the monitor made for libcontainer; libcontainer then joins the
/// run's mount namespace and the rest. The init's /proc entries, not the monitor's: the monitor
/// runs from a sealed copy, is not dumpable, and its memory is the host's user namespace's.
fn join_the_runs_user_namespace(rd: &RunDir) -> Result<()> {
    let pid = rd
        .state()
        .and_then(|s| s.pid)
        .ok_or_else(|| Error::Request("the run has no process".into()))?;
    use nix::sched::CloneFlags as F;
    // all opened first: once inside the user namespace this process may read less of /proc
    let mut fds = Vec::new();
    for (ns, flag) in [
        ("user", F::CLONE_NEWUSER),
        ("net", F::CLONE_NEWNET),
        ("cgroup", F::CLONE_NEWCGROUP),
    ] {
        let p = format!("/proc/{pid}/ns/{ns}");
        let f = File::open(&p).map_err(|e| Error::Host(format!("opening {p}: {e}")))?;
        fds.push((p, f, flag));
    }
    for (p, f, flag) in fds {
        nix::sched::setns(&f, flag)
            .map_err(|e| Error::Host(format!("joining the run's namespace {p}: {e}")))?;
    }
    nix::sched::unshare(F::CLONE_NEWNS)
        .map_err(|e| Error::Host(format!("a mount namespace for cw exec: {e}")))?;
    crate::userns::cgroup2_view().map_err(|e| e.context("cw exec"))?;
    Ok(())
}

/// Wait for the exec'd child; shell convention (128+signal).
pub fn wait(pid: i32) -> i32 {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, c)) => return c,
            Ok(WaitStatus::Signaled(_, s, _)) => return 128 + s as i32,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return 255,
        }
    }
}

/// The console socket for an exec's terminal, in the run directory.
pub fn console_socket(dir: &Path) -> std::path::PathBuf {
    dir.join(format!("exec-{}.sock", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_by_name() {
        let base = vec!["PATH=/bin".to_string(), "A=1".into(), "B=2".into()];
        let got = merge_env(&base, &["A=9".into(), "C=3".into()]);
        assert_eq!(got, vec!["PATH=/bin", "B=2", "A=9", "C=3"]);
    }
}
