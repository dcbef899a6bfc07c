//! Runs for a user without root on the host. The monitor, started by that user, makes a user
//! namespace of its own where the user's uid and gid are root: the only ids (a single-id
//! mapping, as enroot and Charliecloud do: every file of the image appears owned by root), or,
//! started by a cw inside the user's subordinate ids' namespace ([`enter_subordinate`]), those
//! ids too. Then a mount namespace, and the run's cgroup:
//! - on a cgroup v2 host where the cgroup above cw's is delegated to the user
//!   ([`delegated_parent`]: systemd's `user@.service`, `systemd-run --user --scope`), that cgroup
//!   is bound on /sys/fs/cgroup and the run gets a cgroup of its own below it with its limits,
//!   as a root run does below /sys/fs/cgroup;
//! - elsewhere (cgroup v1 like this host, a hybrid host's cgroup2 without controllers, no
//!   delegation) a cgroup namespace in which `/sys/fs/cgroup` is a fresh cgroup2 mount of the
//!   monitor's own cgroup, where libcontainer's v2 manager goes on where it may not write: the
//!   run has no cgroup, and a limit asked for fails the run with a message saying so rather
//!   than being dropped, unless the run accepts its memory being sampled instead
//!   (`crate::sample`).
//!
//! libcontainer, run from inside, takes itself for rootless (its `rootless_required`): device
//! nodes are bound from the host.
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
use std::path::Path;

mod ids;
use ids::{contiguous, own_ranges, unshare_mapped_by_helper};
pub use ids::{
    describe, enter_subordinate, parse_getsubids, parse_subids, subordinate_ids, SubRange,
};

/// Whether the running kernel is at least `major.minor`.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return false;
    }
    let r = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let mut it = r
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|x| x.parse::<u32>().ok());
    (it.next().unwrap_or(0), it.next().unwrap_or(0)) >= (major, minor)
}

/// Whether RLIMIT_NPROC counts the processes of a user namespace apart (Linux 5.14's ucounts):
/// then it bounds one run's processes, where before it counted every process of the user.
pub fn nproc_per_user_namespace() -> bool {
    kernel_at_least(5, 14)
}

/// Whether this process is root on the host: euid 0 outside every user namespace. A user's cw
/// that entered its subordinate ids' namespace ([`enter_subordinate`]) is root there, not here.
pub fn host_root() -> bool {
    nix::unistd::geteuid().is_root() && !inside()
}

/// Whether [`enter_subordinate`] may enter a user namespace (and so must run before any thread
/// exists): not as root on the host, nor inside a namespace already.
pub fn enters_subordinate() -> bool {
    !(host_root() || inside())
}

/// Whether runs started by this process need a user namespace: it is not root on the host.
pub fn needed() -> bool {
    !host_root()
}

/// Whether this process is inside a user namespace that is not the host's (its uid map does
/// not span every id), as a monitor is after [`enter`]: root there is no root on the host.
pub fn inside() -> bool {
    fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| !m.contains("4294967295"))
}

/// Why a run started by this process would have no cgroup of its own (None: it would have one),
/// asked without making namespaces, for a report: the cgroup v2 directory this process is in
/// must be the user's, and [`cgroup_refusal`] must find nothing against it. [`enter`] decides
/// the same for the monitor's own cgroup.
pub fn own_cgroup_refusal() -> Option<String> {
    if crate::cgroup::version() == crate::cgroup::Version::V2 {
        return delegated_parent().err();
    }
    let none =
        || Some("no cgroup v2 directory of this user's (cgroup v1, or no delegation)".into());
    let Some(rel) = fs::read_to_string("/proc/self/cgroup").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_string))
    }) else {
        return none();
    };
    let Ok(mi) = fs::read_to_string("/proc/self/mountinfo") else {
        return none();
    };
    // the cgroup2 mount whose root is the hierarchy's root (field 4 is "/")
    let mount = mi.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let f: Vec<&str> = pre.split_whitespace().collect();
        (post.starts_with("cgroup2 ") && f.get(3) == Some(&"/"))
            .then(|| f.get(4).map(|m| m.to_string()))?
    });
    let dir = Path::new(&mount?).join(rel.trim().trim_start_matches('/'));
    if nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).is_err() {
        return none();
    }
    cgroup_refusal(&dir, false)
}

/// What [`enter`] found.
#[derive(Debug, Clone, Default)]
pub struct Entered {
    /// The run can have a cgroup of its own (the user owns the monitor's cgroup v2 directory).
    pub cgroup: bool,
    /// The delegated cgroup bound on the monitor's /sys/fs/cgroup, as the host names it: the
    /// run's cgroup is below it, where a cw outside the monitor's mount namespace finds it.
    pub delegated: Option<std::path::PathBuf>,
    /// How many uids and gids (from 0) the run has: 1 in a single-id mapping, 1 + the
    /// subordinate ids where cw entered them ([`enter_subordinate`]).
    pub ids: (u32, u32),
}

/// Enter the user, mount and cgroup namespaces described above. The monitor must be
/// single-threaded (the kernel refuses CLONE_NEWUSER otherwise). Started by a cw inside its
/// subordinate ids' namespace, the run's namespace nests in it with the same ids (written by a
/// helper left outside: a namespace cannot map more than its creator's own id from inside);
/// started from the host's, it maps the user alone.
pub fn enter() -> Result<Entered> {
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    // asked as the user, before the user namespace: ownership as the host sees it
    let delegated = delegated_parent();
    let (ur, gr) = (own_ranges("uid"), own_ranges("gid"));
    let ids = if inside() && contiguous(&ur) > 1 {
        let lines = |r: &[(u32, u32)]| {
            r.iter()
                .map(|(first, n)| format!("{first} {first} {n}\n"))
                .collect::<String>()
        };
        let (um, gm) = (lines(&ur), lines(&gr));
        unshare_mapped_by_helper(move |pid| {
            for (f, m) in [("uid_map", &um), ("gid_map", &gm)] {
                let f = format!("/proc/{pid}/{f}");
                fs::write(&f, m).map_err(|e| format!("writing {m:?} to {f}: {e}"))?;
            }
            Ok(())
        })?;
        (contiguous(&ur), contiguous(&gr))
    } else {
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
        (1, 1)
    };
    if let Ok(parent) = &delegated {
        // the delegated parent is libcontainer's /sys/fs/cgroup: runs get cgroups of their own
        // below it, with their limits. No cgroup namespace: from one rooted at this process's
        // own cgroup the kernel would refuse to move the container into a sibling of it
        unshare(CloneFlags::CLONE_NEWNS)
            .map_err(|e| Error::Host(format!("creating the run's mount namespace: {e}")))?;
        private_mounts()?;
        mount(
            Some(parent.as_path()),
            "/sys/fs/cgroup",
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            Error::Host(format!(
                "binding the delegated cgroup {} on /sys/fs/cgroup: {e}",
                parent.display()
            ))
        })?;
        tracing::info!(
            "the run's cgroup is below the delegated cgroup {}",
            parent.display()
        );
        return Ok(Entered {
            cgroup: true,
            ids,
            delegated: Some(parent.clone()),
        });
    }
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWCGROUP).map_err(|e| {
        Error::Host(format!(
            "creating the run's mount and cgroup namespaces: {e}"
        ))
    })?;
    // the v1 hierarchies (and a hybrid host's v2 one) are root's: libcontainer sees only the
    // cgroup2 view of this process's own cgroup
    cgroup2_view()?;
    let probe = format!("/sys/fs/cgroup/.cw-probe-{}", std::process::id());
    let writable = fs::create_dir(&probe).is_ok();
    if writable {
        let _ = fs::remove_dir(&probe);
    }
    let refusal = if writable {
        cgroup_refusal(Path::new("/sys/fs/cgroup"), true)
    } else {
        Some("this user may not write the cgroup it is in".into())
    };
    // on a cgroup v2 host, the reason no delegated parent served says more
    let refusal = match (refusal, delegated) {
        (Some(_), Err(why)) if crate::cgroup::version() == crate::cgroup::Version::V2 => Some(why),
        (r, _) => r,
    };
    if let Some(why) = &refusal {
        tracing::info!("{why}: the run has no cgroup");
    }
    Ok(Entered {
        cgroup: refusal.is_none(),
        ids,
        delegated: None,
    })
}

fn private_mounts() -> Result<()> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| Error::Host(format!("making the mounts private: {e}")))
}

/// In a new mount namespace (and a cgroup namespace of this user namespace's), the mounts made
/// private and a fresh cgroup2 mount on /sys/fs/cgroup: the cgroup namespace's own view, which
/// libcontainer is given in place of the host's hierarchies (root's).
pub(crate) fn cgroup2_view() -> Result<()> {
    private_mounts()?;
    mount(
        Some("cgroup2"),
        "/sys/fs/cgroup",
        Some("cgroup2"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| Error::Host(format!("mounting cgroup2 on /sys/fs/cgroup: {e}")))
}

/// Where a user's runs get cgroups of their own, with their limits, on a cgroup v2 host: the
/// parent of the cgroup this process is in, where the user owns it (a delegated subtree:
/// systemd's `user@.service`, under which `systemd-run --user --scope cw …` starts cw in a
/// scope of its own, or a site's) and it gives its children the memory and pids controllers.
/// Not the process's own cgroup: v2 enables controllers only below a cgroup without processes,
/// and this one holds this process (and often the user's shell); its parent holds none once
/// its children have controllers. Err: why not, for the run's log and the worker's report.
pub fn delegated_parent() -> std::result::Result<std::path::PathBuf, String> {
    if crate::cgroup::version() != crate::cgroup::Version::V2 {
        return Err("the host's memory controller is cgroup v1's (cgroup v1 or hybrid): no cgroup of a user's can have it".into());
    }
    let rel = fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        })
        .ok_or("no cgroup v2 entry in /proc/self/cgroup")?;
    let rel = rel.trim().trim_start_matches('/');
    let own = Path::new(cgroups_rs::hierarchies::UNIFIED_MOUNTPOINT).join(rel);
    let parent = own
        .parent()
        .filter(|p| rel.contains('/') && p.starts_with(cgroups_rs::hierarchies::UNIFIED_MOUNTPOINT))
        .ok_or_else(|| format!("cw's cgroup /{rel} is at the top of the hierarchy (root's)"))?
        .to_path_buf();
    let not_delegated = || {
        format!(
            "the cgroup above cw's, {}, is not delegated to this user (systemd-run --user --scope starts cw in a scope of the user's own)",
            parent.display()
        )
    };
    use nix::unistd::{access, AccessFlags};
    for f in ["", "cgroup.procs", "cgroup.subtree_control"] {
        access(&parent.join(f), AccessFlags::W_OK).map_err(|_| not_delegated())?;
    }
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(&parent).map_err(|_| not_delegated())?;
    if m.uid() != nix::unistd::getuid().as_raw() {
        return Err(not_delegated());
    }
    match cgroup_refusal(&parent, true) {
        None => Ok(parent),
        Some(why) => Err(format!("{}: {why}", parent.display())),
    }
}

/// The controllers a run's cgroup needs (memory for its limit and accounting, pids for its
/// process limit).
const NEEDED: [&str; 2] = ["memory", "pids"];

/// Why a cgroup the user may write (`dir`) cannot give a run's cgroup below it the controllers
/// it needs; None when it can. They must be available to it (a hybrid host's cgroup2 mount has
/// none: its controllers are v1's) and enabled for its children, which cgroup v2 refuses
/// (EBUSY) while the cgroup holds processes, as the monitor's own does. `enable`: enable them
/// where they are not yet (the monitor, in its own view); else only look (a report), where
/// processes in `dir` are the kernel's answer already.
fn cgroup_refusal(dir: &Path, enable: bool) -> Option<String> {
    let have = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let missing: Vec<&str> = NEEDED
        .into_iter()
        .filter(|c| !have.split_whitespace().any(|h| h == *c))
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "the cgroup this user may write lacks the {} controller(s) (a hybrid host's cgroup2 has none)",
            missing.join(", ")
        ));
    }
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    if NEEDED
        .iter()
        .all(|c| enabled.split_whitespace().any(|h| h == *c))
    {
        return None;
    }
    let cannot = |e: &dyn std::fmt::Display| {
        Some(format!(
            "the memory and pids controllers cannot be enabled below this user's cgroup ({e}: cgroup v2 gives them only to a cgroup without processes of its own)"
        ))
    };
    if !enable {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        return if procs.trim().is_empty() {
            None
        } else {
            cannot(&"it holds processes")
        };
    }
    match fs::write(dir.join("cgroup.subtree_control"), "+memory +pids") {
        Ok(()) => None,
        Err(e) => cannot(&e),
    }
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
/// request as the container gets it. A run without a cgroup that accepts that
/// (`Limits::without_cgroup_ok`) keeps its memory limit (the monitor samples it) and its cpuset
/// (the affinity); what it loses is logged.
pub fn check(req: &RunRequest, e: &Entered) -> Result<RunRequest> {
    let mut req = req.clone();
    let (nu, ng) = e.ids;
    if req.uid >= nu || req.gid >= ng {
        return Err(Error::Request(if (nu, ng) == (1, 1) {
            format!(
                "the image's user {}:{} has no id in a run without root: with a single-id user namespace only root (the caller) exists inside (subordinate ids in /etc/subuid and /etc/subgid, with newuidmap and newgidmap installed, give runs the image's users)",
                req.uid, req.gid
            )
        } else {
            format!(
                "the image's user {}:{} has no id in this run: its user namespace has uids 0-{} and gids 0-{} (this user's subordinate ids)",
                req.uid,
                req.gid,
                nu - 1,
                ng - 1
            )
        }));
    }
    // groups the user belongs to in the image that have no id here are dropped
    req.additional_gids.retain(|g| *g < ng);
    if !e.cgroup {
        let asked = asked_limits(&req.limits);
        if !asked.is_empty() && !req.limits.without_cgroup_ok {
            return Err(Error::Request(format!(
                "{} needs a cgroup, and a run without root has none here (cgroup v1, or no cgroup v2 directory of this user's whose memory and pids controllers can be enabled below it); --allow-no-cgroup runs it with the memory limit sampled instead",
                asked.join(", ")
            )));
        }
        let l = &mut req.limits;
        if let Some(m) = l.memory {
            tracing::info!(
                "no cgroup: the memory limit ({m} bytes) is enforced by sampling the run's processes every {:?}",
                crate::sample::INTERVAL
            );
        }
        if let Some(c) = &l.cpuset {
            tracing::info!("no cgroup: the CPUs {c} are the run's affinity, not enforced");
        }
        if l.cpus.take().is_some() {
            tracing::warn!("no cgroup: the CPU quota (--cpus) is not applied");
        }
        // the process limit becomes the run's RLIMIT_NPROC (spec::build_rootless), which counts
        // the run's own processes on a kernel that counts them per user namespace; before, it
        // would count every process of the user's, so only an asked-for limit is kept there
        match l.pids {
            Some(p) if p > 0 && (nproc_per_user_namespace() || p != DEFAULT_PIDS_LIMIT) => {
                tracing::info!("no cgroup: the process limit {p} is the run's RLIMIT_NPROC");
            }
            _ => l.pids = None,
        }
        l.memory_swap = None;
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
    fn a_cgroup_gives_a_run_memory_and_pids_only_where_v2_allows_it() {
        let t = tempfile::tempdir().unwrap();
        let put = |f: &str, v: &str| fs::write(t.path().join(f), v).unwrap();
        // a hybrid host's cgroup2: no controllers at all
        put("cgroup.controllers", "cpu io\n");
        let why = cgroup_refusal(t.path(), false).unwrap();
        assert!(why.contains("lacks the memory, pids"), "{why}");
        // available, not enabled, and processes inside: the kernel would refuse them
        put("cgroup.controllers", "cpu io memory pids\n");
        put("cgroup.subtree_control", "\n");
        put("cgroup.procs", "4242\n");
        let why = cgroup_refusal(t.path(), false).unwrap();
        assert!(why.contains("holds processes"), "{why}");
        // no processes of its own, or already enabled: a run can have them
        put("cgroup.procs", "");
        assert_eq!(cgroup_refusal(t.path(), false), None);
        put("cgroup.procs", "4242\n");
        put("cgroup.subtree_control", "memory pids\n");
        assert_eq!(cgroup_refusal(t.path(), false), None);
    }

    #[test]
    fn what_a_run_without_root_can_have() {
        let none = Entered {
            cgroup: false,
            ids: (1, 1),
            ..Default::default()
        };
        let ok = check(&req(), &none).unwrap();
        // the default pids limit is a default: not an error without a cgroup, and kept as the
        // run's RLIMIT_NPROC where the kernel counts a user namespace's processes apart
        let kept = nproc_per_user_namespace().then_some(DEFAULT_PIDS_LIMIT);
        assert_eq!(ok.limits.pids, kept);
        // the image root's other groups have no id in a single-id namespace
        assert_eq!(ok.additional_gids, vec![0]);
        let mut r = req();
        r.limits.memory = Some(1 << 30);
        r.limits.pids = Some(10);
        let e = check(&r, &none).unwrap_err();
        assert!(matches!(e, Error::Request(_)), "{e}");
        assert!(
            e.to_string()
                .starts_with("--memory, --pids-limit needs a cgroup"),
            "{e}"
        );
        // with a cgroup of its own the limits stay
        // accepted without a cgroup: memory stays for the monitor's sampling, the cpuset for the
        // affinity; the pids limit goes
        r.limits.cpuset = Some("0".into());
        r.limits.cpus = Some(1.5);
        r.limits.without_cgroup_ok = true;
        let ok = check(&r, &none).unwrap();
        assert_eq!(ok.limits.memory, Some(1 << 30));
        assert_eq!(ok.limits.cpuset.as_deref(), Some("0"));
        // an asked-for process limit is the run's RLIMIT_NPROC; the CPU quota is gone
        assert_eq!((ok.limits.pids, ok.limits.cpus), (Some(10), None));
        r.limits.without_cgroup_ok = false;
        let with = check(
            &r,
            &Entered {
                cgroup: true,
                ids: (1, 1),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            (with.limits.memory, with.limits.pids),
            (Some(1 << 30), Some(10))
        );
        let mut r = req();
        r.uid = 1000;
        let single = Entered {
            cgroup: true,
            ids: (1, 1),
            ..Default::default()
        };
        let e = check(&r, &single).unwrap_err();
        assert!(e.to_string().contains("1000:0"), "{e}");
        assert!(e.to_string().contains("/etc/subuid"), "{e}");
        // with subordinate ids: the image's users and groups inside the range are theirs
        let mapped = Entered {
            cgroup: true,
            ids: (65537, 65537),
            ..Default::default()
        };
        r.gid = 1000;
        r.additional_gids = vec![0, 10, 65536, 65537, 70000];
        let ok = check(&r, &mapped).unwrap();
        assert_eq!((ok.uid, ok.gid), (1000, 1000));
        assert_eq!(ok.additional_gids, vec![0, 10, 65536]);
        r.uid = 65537;
        let e = check(&r, &mapped).unwrap_err();
        assert!(e.to_string().contains("uids 0-65536"), "{e}");
    }
}
