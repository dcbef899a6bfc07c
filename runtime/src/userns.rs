//! Runs for a user without root on the host. The monitor, started by that user, makes a user
//! namespace of its own where the user's uid and gid are root and the only ids (a single-id
//! mapping, as enroot and Charliecloud do: every file of the image appears owned by root), then a
//! mount and a cgroup namespace in which `/sys/fs/cgroup` is a fresh cgroup2 mount of the
//! monitor's own cgroup. libcontainer, run from inside, takes itself for rootless (its
//! `rootless_required`): device nodes are bound from the host, and its cgroup v2 manager goes on
//! where it may not write. Where the user owns that cgroup (a delegated v2 subtree: a systemd
//! user slice, a Slurm job's cgroup) the run gets one of its own with its limits; where not
//! (cgroup v1 like this host, no delegation) the run has no cgroup, and a limit asked for fails
//! the run with a message saying so rather than being dropped.
//!
//! Namespaces the container gets afterwards (pid, ipc, uts, mount, cgroup, and network for
//! `none`/`private`, which the monitor makes after this one) belong to this user namespace, so
//! proc, mqueue and sysfs can be mounted in them. Nothing made here gives the user more than
//! they had: a user namespace's capabilities reach only what it owns.

use crate::error::{Error, Result};
use crate::request::{Limits, RunRequest, DEFAULT_PIDS_LIMIT};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use std::fs;

/// Whether runs started by this process need a user namespace: it is not root on the host.
pub fn needed() -> bool {
    !nix::unistd::geteuid().is_root()
}

/// Whether this process is inside a user namespace that is not the host's (its uid map does
/// not span every id), as a monitor is after [`enter`]: root there is no root on the host.
pub fn inside() -> bool {
    fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| !m.contains("4294967295"))
}

/// What [`enter`] found.
#[derive(Debug, Clone, Copy)]
pub struct Entered {
    /// The run can have a cgroup of its own (the user owns the monitor's cgroup v2 directory).
    pub cgroup: bool,
}

/// Enter the user, mount and cgroup namespaces described above. The monitor must be
/// single-threaded (the kernel refuses CLONE_NEWUSER otherwise).
pub fn enter() -> Result<Entered> {
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    unshare(CloneFlags::CLONE_NEWUSER).map_err(|e| {
        Error::Host(format!(
            "creating a user namespace for a run without root: {e} (the kernel must allow unprivileged user namespaces: user.max_user_namespaces, kernel.unprivileged_userns_clone, AppArmor's restrict_unprivileged_userns)"
        ))
    })?;
    let write = |f: &str, s: String| {
        fs::write(f, &s).map_err(|e| Error::Host(format!("writing {s:?} to {f}: {e}")))
    };
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("0 {uid} 1"))?;
    write("/proc/self/gid_map", format!("0 {gid} 1"))?;
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWCGROUP).map_err(|e| {
        Error::Host(format!(
            "creating the run's mount and cgroup namespaces: {e}"
        ))
    })?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| Error::Host(format!("making the mounts private: {e}")))?;
    // the v1 hierarchies (and a hybrid host's v2 one) are root's: libcontainer sees only the
    // cgroup2 view of this process's own cgroup
    mount(
        Some("cgroup2"),
        "/sys/fs/cgroup",
        Some("cgroup2"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| Error::Host(format!("mounting cgroup2 on /sys/fs/cgroup: {e}")))?;
    let probe = format!("/sys/fs/cgroup/.cw-probe-{}", std::process::id());
    let cgroup = fs::create_dir(&probe).is_ok();
    if cgroup {
        let _ = fs::remove_dir(&probe);
    }
    Ok(Entered { cgroup })
}

/// The limits a run asked for that need a cgroup (the default pids limit is a default, not a
/// request).
pub fn asked_limits(l: &Limits) -> Vec<&'static str> {
    let mut v = Vec::new();
    if l.memory.is_some() {
        v.push("--memory");
    }
    if l.cpus.is_some() {
        v.push("--cpus");
    }
    if l.cpuset.is_some() {
        v.push("--cpuset-cpus");
    }
    if l.pids.is_some_and(|p| p != DEFAULT_PIDS_LIMIT) {
        v.push("--pids-limit");
    }
    v
}

/// Check a request against what a run without root can have, given [`Entered`]; returns the
/// request as the container gets it.
pub fn check(req: &RunRequest, e: Entered) -> Result<RunRequest> {
    let mut req = req.clone();
    if req.uid != 0 || req.gid != 0 {
        return Err(Error::Request(format!(
            "the image's user {}:{} has no id in a run without root: with a single-id user namespace only root (the caller) exists inside",
            req.uid, req.gid
        )));
    }
    if req.network == crate::request::Network::Private {
        return Err(Error::Request(
            "--network private (pasta) is not available to a run without root yet: use none (the default) or host".into(),
        ));
    }
    // the image's root may belong to other groups: they have no id here
    req.additional_gids.retain(|g| *g == 0);
    if !e.cgroup {
        let asked = asked_limits(&req.limits);
        if !asked.is_empty() {
            return Err(Error::Request(format!(
                "{} needs a cgroup, and a run without root has none here (cgroup v1, or a cgroup v2 directory this user does not own: a systemd user slice with delegation or a Slurm job's cgroup gives one)",
                asked.join(", ")
            )));
        }
        req.limits.pids = None;
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::*;

    fn req() -> RunRequest {
        serde_json::from_value(serde_json::json!({
            "id": "t", "rootfs": "/r", "readonly_rootfs": false, "args": ["true"], "env": [],
            "cwd": "/", "uid": 0, "gid": 0, "additional_gids": [0, 10], "hostname": "h",
            "mounts": [], "limits": {"memory": null, "memory_swap": null, "cpus": null,
            "cpuset": null, "pids": DEFAULT_PIDS_LIMIT, "shm_size": 65536}, "network": "none",
            "time_limit": null, "kill_grace_secs": 1, "stdout": null, "stderr": null,
            "cgroup_parent": "/cw", "devices": [], "host_files": [],
            "cleanup": {"unmount": [], "remove": []}
        }))
        .unwrap()
    }

    #[test]
    fn what_a_run_without_root_can_have() {
        let none = Entered { cgroup: false };
        let ok = check(&req(), none).unwrap();
        // the default pids limit is a default: dropped without a cgroup, not an error
        assert_eq!(ok.limits.pids, None);
        // the image root's other groups have no id in a single-id namespace
        assert_eq!(ok.additional_gids, vec![0]);
        let mut r = req();
        r.limits.memory = Some(1 << 30);
        r.limits.pids = Some(10);
        let e = check(&r, none).unwrap_err();
        assert!(matches!(e, Error::Request(_)), "{e}");
        assert!(
            e.to_string()
                .starts_with("--memory, --pids-limit needs a cgroup"),
            "{e}"
        );
        // with a cgroup of its own the limits stay
        let with = check(&r, Entered { cgroup: true }).unwrap();
        assert_eq!(
            (with.limits.memory, with.limits.pids),
            (Some(1 << 30), Some(10))
        );
        let mut r = req();
        r.uid = 1000;
        let e = check(&r, Entered { cgroup: true }).unwrap_err();
        assert!(e.to_string().contains("1000:0"), "{e}");
    }
}
