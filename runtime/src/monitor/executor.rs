//! The executor libcontainer's init runs: its default one, plus the parent-death signal and the
//! run's seccomp filter.

use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use std::io;
use std::os::fd::RawFd;

/// libcontainer's default executor with the run's seccomp filter ([`crate::seccomp`]), and the
/// container's init dies with its monitor: a run
/// without one is lost anyway (see [`RunDir::recover`]), and an init the monitor left behind
/// would run on outside every accounting, and outside a batch system's reach. Under Slurm, a job
/// step's SIGKILL reaches cw and its monitor but not a container in cgroups nested below the
/// step's, so without this the container outlived its job.
#[derive(Clone)]
pub(super) struct DiesWithMonitor {
    /// A pidfd of the monitor (inherited by the init, closed at its exec), or -1.
    pub(super) monitor: RawFd,
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
        // where libcontainer loads a spec's filter (after no_new_privs, the user and the
        // capabilities; before the init reports ready): the one compiled when cw was built
        crate::seccomp::load().map_err(|e| {
            ExecutorValidationError::ArgValidationError(format!(
                "loading the run's seccomp filter: {e}"
            ))
        })?;
        DefaultExecutor {}.validate(spec)
    }
}
