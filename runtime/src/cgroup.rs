//! What cw does with a run's cgroup beside libcontainer (which makes it and applies the spec's
//! limits):
//! - accounting: CPU user/system time, current and peak memory, and OOM kills from the kernel's
//!   own counter (v1 `memory.oom_control` oom_kill, v2 `memory.events` oom_kill), never inferred
//!   from an exit code; v1 is read through cgroups-rs, v2 from its files;
//! - the host's layout (which version, where a pid's v2 cgroup is, which controllers a parent
//!   gives, whether a run's cgroup is already another store's run's), the limits a user's
//!   delegated v2 cgroup gets written directly, and `--cpuset-cpus` as an affinity where there is
//!   no cgroup;
//! - the parents a run's creation made below a nested `--cgroup-parent` (recorded, locked, and
//!   removed after it when no other run uses them);
//! - removal: thawing, killing what is left, and removing the run's directories within a bound;
//! - [`warm_attach`], which takes the cgroup lock's first grace period off the start's path.

use crate::{Error, Result};
use cgroups_rs::cpuacct::CpuAcctController;
use cgroups_rs::memory::MemController;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Usage {
    pub cpu_user_ns: u64,
    pub cpu_system_ns: u64,
    pub memory_current: u64,
    pub memory_peak: u64,
    pub oom_kills: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// Which cgroup layout the host has (hybrid counts as v1: the controllers are there).
pub fn version() -> Version {
    if cgroups_rs::hierarchies::is_cgroup2_unified_mode() {
        Version::V2
    } else {
        Version::V1
    }
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn keyed(p: &Path, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(p).ok()?;
    s.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

pub fn v2_dir(cgroup_path: &str) -> PathBuf {
    Path::new(cgroups_rs::hierarchies::UNIFIED_MOUNTPOINT).join(cgroup_path.trim_start_matches('/'))
}

/// The cgroup v2 directory process `pid` is in, as this process's cgroup namespace shows it;
/// None on a host whose memory controller is v1's, or at the top.
pub fn v2_dir_of(pid: i32) -> Option<PathBuf> {
    if version() != Version::V2 {
        return None;
    }
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = own_cgroup(&s, None)?;
    (!rel.as_os_str().is_empty()).then(|| v2_dir(&rel.to_string_lossy()))
}

/// A process's cgroup relative to a hierarchy's root, from its `/proc/<pid>/cgroup`: the unified
/// hierarchy's (`0::`) for `controller` None, else the v1 hierarchy that has `controller`; empty
/// for the root. None where there is none, and where the path climbs (`/../..`: the process is
/// outside the root of the cgroup namespace it reads from), which names no directory below the
/// mount point that a write may follow.
fn own_cgroup(proc_cgroup: &str, controller: Option<&str>) -> Option<PathBuf> {
    let rel = proc_cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctls, rel) = (f.next()?, f.next()?, f.next()?);
        let ours = match controller {
            None => ctls.is_empty(),
            Some(c) => ctls.split(',').any(|x| x == c),
        };
        ours.then_some(rel)
    })?;
    let rel = Path::new(rel.trim().trim_start_matches('/'));
    rel.components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
        .then(|| rel.to_path_buf())
}

/// A user's run below a delegated cgroup v2 subtree: its limits written to its cgroup's files,
/// as libcontainer writes a root run's (the same values: memory.swap.max is the swap part of
/// memory plus swap). libcontainer is given no resources for such a run: with any, it also
/// loads the device cgroup's eBPF program, which needs the host's CAP_SYS_ADMIN (the
/// container's /dev holds only the nodes bound from the host, which the user could open
/// anyway). Called between the create and the start, while the init waits.
pub fn write_v2_limits(cgroup_path: &str, l: &crate::request::Limits, cpuset: bool) -> Result<()> {
    let dir = v2_dir(cgroup_path);
    let put = |f: &str, v: String| {
        std::fs::write(dir.join(f), &v)
            .map_err(|e| Error::Host(format!("writing {v:?} to {}: {e}", dir.join(f).display())))
    };
    if let Some(m) = l.memory {
        put("memory.max", m.to_string())?;
        let swap = l
            .memory_swap
            .unwrap_or_else(|| (m as i64).saturating_mul(2));
        let swap = if swap < 0 {
            "max".to_string()
        } else {
            (swap as u64).saturating_sub(m).to_string()
        };
        // a kernel without swap accounting has no memory.swap.max: nothing to hold
        if dir.join("memory.swap.max").exists() {
            put("memory.swap.max", swap)?;
        }
    }
    if let Some(c) = l.cpus {
        let period = 100_000u64;
        let quota = ((c * period as f64).round() as i64).max(1000);
        put("cpu.max", format!("{quota} {period}"))?;
    }
    if let (Some(c), true) = (&l.cpuset, cpuset) {
        put("cpuset.cpus", c.clone())?;
    }
    if let Some(p) = l.pids.filter(|p| *p > 0) {
        put("pids.max", p.to_string())?;
    }
    Ok(())
}

/// Read the usage of the cgroup at `cgroup_path` (absolute within the hierarchy, e.g. `/cw/run1`).
pub fn read(cgroup_path: &str) -> Usage {
    match version() {
        Version::V1 => {
            let cg = cgroups_rs::Cgroup::load(
                Box::new(cgroups_rs::hierarchies::V1::new()),
                cgroup_path.trim_start_matches('/'),
            );
            let mut u = Usage::default();
            if let Some(m) = cg.controller_of::<MemController>() {
                let s = m.memory_stat();
                u.memory_current = s.usage_in_bytes;
                u.memory_peak = s.max_usage_in_bytes;
                u.oom_kills = s.oom_control.oom_kill;
            }
            if let Some(c) = cg.controller_of::<CpuAcctController>() {
                let a = c.cpuacct();
                (u.cpu_user_ns, u.cpu_system_ns) =
                    split_runtime(a.usage, a.usage_user, a.usage_sys);
            }
            u
        }
        Version::V2 => read_v2(&v2_dir(cgroup_path)),
    }
}

/// On v1, `cpuacct.usage` is the scheduler's exact runtime, while `cpuacct.usage_user` and
/// `usage_sys` are timer-tick samples, which drift from it on a busy or virtualised host (a
/// 1 s busy loop was once sampled as 1.32 s). The total is taken from the exact figure and
/// split in the samples' ratio, as the kernel does for a process's utime/stime
/// (`cputime_adjust`) and for v2's cpu.stat.
fn split_runtime(total: u64, user_samples: u64, sys_samples: u64) -> (u64, u64) {
    if sys_samples == 0 {
        return (total, 0);
    }
    if user_samples == 0 {
        return (0, total);
    }
    let user = (total as u128 * user_samples as u128 / (user_samples as u128 + sys_samples as u128))
        as u64;
    (user, total - user)
}

/// The hierarchies libcontainer makes a run's cgroup path in: every v1 mount point (its own
/// listing), or the unified one on v2.
/// Start, in a thread of this process, the wait that the container's first `cgroup.procs` write
/// would otherwise pay on the run's critical path. Every move between cgroups takes one global
/// lock of the kernel's (cgroup_threadgroup_rwsem), whose writer waits for an RCU grace period
/// unless another writer came within about the last one: 5–7 ms on the development VM at rest,
/// 0.05 ms right after another move (`bench/start.sh`'s notes in BENCHMARKS.md). Moving this
/// process into the cgroup it is already in ("0" to its own `cgroup.procs`: nothing changes)
/// takes that lock; done as `cw run` starts, the wait overlaps the monitor's start, and
/// libcontainer's write a few ms later finds the lock warm. Where this process may not write its
/// cgroup (a user's cw on cgroup v1) nothing happens; hosts that mount their cgroups with
/// `favordynmods` (Linux 6.0+) never pay the wait.
pub fn warm_attach() {
    std::thread::spawn(|| {
        let dir = match version() {
            Version::V2 => v2_dir_of(std::process::id() as i32),
            // the lock is one for every hierarchy: pids' serves. In a cgroup namespace the path
            // may climb (`/../..`): only a plain one names this process's cgroup
            Version::V1 => own_cgroup(
                &std::fs::read_to_string("/proc/self/cgroup").ok()?,
                Some("pids"),
            )
            .map(|rel| Path::new("/sys/fs/cgroup/pids").join(rel)),
        };
        // an existing cgroup.procs only: nothing is created where the path misleads
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(dir?.join("cgroup.procs"));
        let _ = procs.and_then(|mut f| std::io::Write::write_all(&mut f, b"0"));
        Some(())
    });
}

fn mount_points() -> Vec<PathBuf> {
    match version() {
        Version::V1 => libcgroups::v1::util::list_subsystem_mount_points().unwrap_or_default(),
        Version::V2 => vec![PathBuf::from(cgroups_rs::hierarchies::UNIFIED_MOUNTPOINT)],
    }
}

/// `cgroup_parent` relative to a hierarchy's root, when it is nested (two or more plain
/// components), which is when removing its parents can apply; None for a top-level parent such
/// as the default `/cw`, which stays as Docker's `/docker` does, and for one with `..` in it.
fn nested(cgroup_parent: &str) -> Option<&Path> {
    let rel = Path::new(cgroup_parent.trim_start_matches('/'));
    let plain = rel
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    (plain && rel.components().count() >= 2).then_some(rel)
}

/// The directories between each hierarchy's top level and `cgroup_parent` (inclusive) that do
/// not exist yet, deepest first. Creating the run's cgroup makes them (libcontainer creates the whole
/// path in every hierarchy), and nobody else removes them: under Slurm, a parent inside the job's
/// cgroup left a `cw` directory that kept Slurm from removing the job's own cgroups, and copies of
/// the job's path in the hierarchies Slurm does not use (cpu, pids, blkio...) piled up per job.
/// Reads the mount table only for a nested parent.
pub fn missing_parents(cgroup_parent: &str) -> Vec<PathBuf> {
    if nested(cgroup_parent).is_none() {
        return Vec::new();
    }
    missing_parents_in(&mount_points(), cgroup_parent)
}

fn missing_parents_in(roots: &[PathBuf], cgroup_parent: &str) -> Vec<PathBuf> {
    // a directory that exists has every parent: filtering keeps what is missing, deepest first
    let mut out = parents_below_roots(roots, cgroup_parent);
    out.retain(|p| !p.exists());
    out
}

/// Every directory between each hierarchy's top level (exclusive, it stays) and `cgroup_parent`
/// (inclusive), deepest first per hierarchy; none unless the parent is [`nested`].
fn parents_below_roots(roots: &[PathBuf], cgroup_parent: &str) -> Vec<PathBuf> {
    let Some(rel) = nested(cgroup_parent) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for root in roots {
        let mut p = root.join(rel);
        while p.parent().is_some_and(|q| q != root.as_path()) {
            out.push(p.clone());
            p.pop();
        }
    }
    out
}

/// Of the parents a monitor recorded as made for its run (read back when the monitor died and
/// another process finishes the run), those that [`missing_parents`] could have listed for
/// `cgroup_parent`: a record that names anything else is ignored.
pub fn recorded_parents(cgroup_parent: &str, recorded: &[PathBuf]) -> Vec<PathBuf> {
    recorded_parents_in(&mount_points(), cgroup_parent, recorded)
}

fn recorded_parents_in(
    roots: &[PathBuf],
    cgroup_parent: &str,
    recorded: &[PathBuf],
) -> Vec<PathBuf> {
    let allowed = parents_below_roots(roots, cgroup_parent);
    recorded
        .iter()
        .filter(|p| allowed.contains(p))
        .cloned()
        .collect()
}

/// Held by a monitor while it creates its run's cgroups and while it removes parents, when the
/// parent is deep enough for [`missing_parents`] to list anything: otherwise one run's cleanup
/// could remove a parent between another's `mkdir` of it and of its own cgroup inside. None for
/// a top-level parent such as the default `/cw`, which is never removed.
pub fn parents_lock(cgroup_parent: &str) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    nested(cgroup_parent)?;
    let path = lock_dir()?.join("cgroup-parents.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .ok()?;
    use std::os::fd::AsRawFd;
    while unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return None;
        }
    }
    Some(f)
}

/// Where the parents lock lives: root's is `/run/cw` (made 0700; /run is root's, so no other
/// user can make it first, and it is used only as root's own directory); a user's is their
/// runtime directory (`$XDG_RUNTIME_DIR`, 0700), or none. Never a world-writable directory such
/// as /run/lock: any local user could make the lock there first and hold it, stalling every
/// root run that nests its cgroup (or plant a link for root to create a file through).
fn lock_dir() -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if nix::unistd::geteuid().is_root() && !crate::userns::inside() {
        let d = PathBuf::from("/run/cw");
        let _ = std::fs::DirBuilder::new().mode(0o700).create(&d);
        let m = std::fs::symlink_metadata(&d).ok()?;
        if m.is_dir() && m.uid() == 0 && m.mode() & 0o022 == 0 {
            return Some(d);
        }
        tracing::warn!(
            "{} is not root's own directory: cgroup parents are made without the lock",
            d.display()
        );
        return None;
    }
    let d = PathBuf::from(std::env::var_os("XDG_RUNTIME_DIR")?);
    let m = std::fs::symlink_metadata(&d).ok()?;
    (m.is_dir() && m.uid() == nix::unistd::geteuid().as_raw() && m.mode() & 0o077 == 0).then_some(d)
}

/// Whether a run under `cgroup_parent` can have the controller `name`: on v2, listed in
/// `cgroup.controllers` of the parent or, where the parent is still to be made, of its nearest
/// existing ancestor (libcontainer enables what is listed there on the way down); on v1, its
/// hierarchy is mounted.
pub fn controller_available(cgroup_parent: &str, name: &str) -> bool {
    match version() {
        Version::V1 => Path::new("/sys/fs/cgroup").join(name).is_dir(),
        Version::V2 => {
            let mut dir = v2_dir(cgroup_parent);
            loop {
                if let Ok(c) = std::fs::read_to_string(dir.join("cgroup.controllers")) {
                    return c.split_whitespace().any(|x| x == name);
                }
                if !dir.pop() {
                    return false;
                }
            }
        }
    }
}

/// The CPUs a cpuset list ("0-3,8,10-11") names, in order, one part at a time: a range is not
/// expanded ahead, so a caller meets a bad or out-of-reach CPU where it stands in the list.
pub fn cpu_list(list: &str) -> impl Iterator<Item = Result<usize>> + '_ {
    list.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .flat_map(|part| -> Box<dyn Iterator<Item = Result<usize>>> {
            let range = match part.split_once('-') {
                Some((a, b)) => a.parse::<usize>().ok().zip(b.parse::<usize>().ok()),
                None => part.parse::<usize>().ok().map(|n| (n, n)),
            };
            match range {
                Some((a, b)) => Box::new((a..=b).map(Ok)),
                None => Box::new(std::iter::once(Err(Error::Request(format!(
                    "{part:?} is not a CPU number or range"
                ))))),
            }
        })
}

/// A cpuset list as this process's CPU affinity, which its children inherit.
pub fn pin_affinity(list: &str) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for c in cpu_list(list) {
        let c = c?;
        set.set(c).map_err(|e| {
            Error::Request(format!("CPU {c} is beyond what this kernel can name: {e}"))
        })?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .map_err(|e| Error::Host(format!("sched_setaffinity: {e}")))
}

/// Make sure the run's own cgroup is gone from every hierarchy. libcontainer's delete kills what
/// it lists and retries the rmdir for about 100 ms, then gives up at the first hierarchy that
/// still has a task (a process that takes longer to die: a large address space to free, a frozen
/// cgroup, a child reparented at the namespace's end), leaving that cgroup and every one it had
/// not reached yet. Here each remaining directory is thawed, what it holds is killed again, and
/// the rmdir is retried until `within` has passed; a cgroup still there after names itself.
pub fn remove_run(cgroup_path: &str, within: std::time::Duration) {
    let rel = cgroup_path.trim_start_matches('/');
    if rel.is_empty() {
        return;
    }
    let left: Vec<PathBuf> = mount_points().into_iter().map(|m| m.join(rel)).collect();
    remove_dirs(left, within, || thaw(cgroup_path));
}

/// [`remove_run`] for one cgroup v2 directory named as the host names it: a user's run below a
/// delegated cgroup, recovered by a cw outside the mount namespace its monitor bound it in.
/// What it still holds is killed first (`cgroup.kill`, Linux 5.14; else each process).
pub fn remove_run_dir(dir: &Path, within: std::time::Duration) {
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let d = dir.to_path_buf();
    remove_dirs(vec![d.clone()], within, || {
        let _ = std::fs::write(d.join("cgroup.freeze"), "0");
    });
}

fn remove_dirs(mut left: Vec<PathBuf>, within: std::time::Duration, thaw: impl Fn()) {
    let deadline = std::time::Instant::now() + within;
    let mut delay = std::time::Duration::from_millis(10);
    loop {
        let mut last = None;
        left.retain(|dir| match std::fs::remove_dir(dir) {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => false,
            Err(e) => {
                last = Some(e);
                true
            }
        });
        let Some(err) = last else { return };
        if std::time::Instant::now() >= deadline {
            for dir in &left {
                tracing::warn!("removing the run's cgroup {}: {err}", dir.display());
            }
            return;
        }
        // a frozen task takes its SIGKILL only once thawed (the freezer is its own hierarchy)
        thaw();
        for dir in &left {
            for pid in procs(dir) {
                if pid > 1 {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(std::time::Duration::from_millis(200));
    }
}

/// A hierarchy's directory for `cgroup_path` that already holds processes: the cgroup of a
/// live run of the same name, started from another store (run names are unique per store, the
/// cgroup path `<parent>/<name>` is per node). Joining it would put two runs under one limit and
/// one account, and either's teardown would kill the other.
pub fn held_by_others(cgroup_path: &str) -> Option<PathBuf> {
    let rel = cgroup_path.trim_start_matches('/');
    if rel.is_empty() {
        return None;
    }
    mount_points()
        .into_iter()
        .map(|m| m.join(rel))
        .find(|d| !procs(d).is_empty())
}

/// The processes a cgroup directory lists (none when it cannot be read).
fn procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|p| p.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Remove what [`missing_parents`] listed, once the run's own cgroup is gone. rmdir only takes an
/// empty cgroup (no tasks, no children), so a parent that another run is still using stays.
pub fn remove_parents(dirs: &[PathBuf]) {
    for d in dirs {
        match std::fs::remove_dir(d) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT) | Some(libc::EBUSY) | Some(libc::ENOTEMPTY)
                ) => {}
            Err(e) => tracing::warn!("removing the cgroup {}: {e}", d.display()),
        }
    }
}

/// Thaw the run's cgroup. libcontainer freezes it to signal every process of a run and thaws it
/// after, but an error in between (a pid list it could not read, a signal it could not send)
/// returns early and leaves it frozen: the run then never ends, and a later run of the same name
/// starts frozen. Called after every such kill.
pub fn thaw(cgroup_path: &str) {
    let rel = cgroup_path.trim_start_matches('/');
    let (file, value) = match version() {
        Version::V1 => (
            Path::new("/sys/fs/cgroup/freezer")
                .join(rel)
                .join("freezer.state"),
            "THAWED",
        ),
        Version::V2 => (v2_dir(cgroup_path).join("cgroup.freeze"), "0"),
    };
    match std::fs::read_to_string(&file) {
        Ok(s) if s.trim() == "THAWED" || s.trim() == "0" => {}
        Ok(_) => {
            if let Err(e) = std::fs::write(&file, value) {
                tracing::warn!("thawing {}: {e}", file.display());
            }
        }
        Err(_) => {}
    }
}

/// cgroup v2 files of one cgroup directory.
pub fn read_v2(dir: &Path) -> Usage {
    let current = read_u64(&dir.join("memory.current")).unwrap_or(0);
    Usage {
        cpu_user_ns: keyed(&dir.join("cpu.stat"), "user_usec").unwrap_or(0) * 1000,
        cpu_system_ns: keyed(&dir.join("cpu.stat"), "system_usec").unwrap_or(0) * 1000,
        memory_current: current,
        // memory.peak needs kernel 5.19; older kernels give the current value only
        memory_peak: read_u64(&dir.join("memory.peak")).unwrap_or(current),
        oom_kills: keyed(&dir.join("memory.events"), "oom_kill").unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `warm_attach` writes "0" into as root, and `v2_dir_of`'s answer: a cgroup namespace
    /// whose root is not above the process shows a climbing path, joined to the mount point it
    /// would name a file outside the hierarchy (/sys/fs/cgroup/x/cgroup.procs).
    #[test]
    fn a_process_cgroup_is_only_a_plain_path_below_the_root() {
        let v1 = "13:pids:/user.slice/u-1.slice\n4:cpu,cpuacct:/a/b\n1:name=systemd:/s\n0::/u/v\n";
        let rel = |text: &str, c| own_cgroup(text, c).map(|p| p.display().to_string());
        assert_eq!(
            rel(v1, Some("pids")).as_deref(),
            Some("user.slice/u-1.slice")
        );
        assert_eq!(rel(v1, Some("cpuacct")).as_deref(), Some("a/b"));
        assert_eq!(rel(v1, None).as_deref(), Some("u/v"));
        assert_eq!(rel(v1, Some("memory")), None);
        assert_eq!(rel("0::/\n", None).as_deref(), Some(""));
        assert_eq!(rel("0::/..hidden/x\n", None).as_deref(), Some("..hidden/x"));
        for climbing in [
            "0::/../x",
            "0::/../../..",
            "0::/a/../../b",
            "0::/./x",
            "0::..",
        ] {
            assert_eq!(rel(climbing, None), None, "{climbing}");
            let v1 = climbing.replacen("0::", "12:pids:", 1);
            assert_eq!(rel(&v1, Some("pids")), None, "{v1}");
        }
    }

    /// A run's cgroup holding a frozen process (SIGKILL cannot take effect until it is thawed:
    /// what libcontainer's delete leaves behind) is emptied and removed in every hierarchy.
    #[test]
    fn a_cgroup_whose_task_is_frozen_is_emptied_and_removed() {
        if unsafe { libc::geteuid() } != 0 || version() != Version::V1 {
            eprintln!("SKIP: needs root and the cgroup v1 freezer (cgroup_v2.rs covers v2)");
            return;
        }
        let path = format!("/cw/remove-run-test-{}", std::process::id());
        // an orphan (reaped by init, as a run's processes are once its monitor is gone: a zombie
        // child of this test would hold its cgroup until waited for)
        let o = std::process::Command::new("sh")
            .args(["-c", "sleep 1000 </dev/null >/dev/null 2>&1 & echo $!"])
            .output()
            .unwrap();
        let pid = String::from_utf8_lossy(&o.stdout).trim().to_string();
        let pid_n: i32 = pid.parse().unwrap();
        let kill = || unsafe { libc::kill(pid_n, libc::SIGKILL) };
        let dirs: Vec<PathBuf> = mount_points()
            .into_iter()
            .map(|m| m.join(path.trim_start_matches('/')))
            .collect();
        for d in &dirs {
            for dir in [d.parent().unwrap(), d.as_path()] {
                let _ = std::fs::create_dir(dir);
                // a new v1 cpuset starts with no CPUs and no memory nodes: the parent's
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let empty =
                        std::fs::read_to_string(dir.join(f)).is_ok_and(|v| v.trim().is_empty());
                    if empty {
                        let v = std::fs::read(dir.parent().unwrap().join(f)).unwrap();
                        std::fs::write(dir.join(f), v).unwrap();
                    }
                }
            }
            if let Err(e) = std::fs::write(d.join("cgroup.procs"), &pid) {
                kill();
                panic!("moving the test process into {}: {e}", d.display());
            }
        }
        let fz = Path::new("/sys/fs/cgroup/freezer").join(path.trim_start_matches('/'));
        std::fs::write(fz.join("freezer.state"), "FROZEN").unwrap();
        // what libcontainer's delete does: a SIGKILL, then an rmdir that finds the task
        kill();
        assert!(
            std::fs::remove_dir(&fz).is_err(),
            "a frozen task should hold its cgroup"
        );
        remove_run(&path, std::time::Duration::from_secs(10));
        let left: Vec<_> = dirs.iter().filter(|d| d.exists()).collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        // dead: gone, or a zombie waiting for its reaper
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, r)| &r[..1]);
        assert!(
            matches!(state, None | Some("Z") | Some("X")),
            "the frozen task is still alive: {stat}"
        );
    }

    #[test]
    fn cpu_lists_part_by_part() {
        let all = |l: &str| {
            cpu_list(l)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())
        };
        assert_eq!(all("0-3,8, 10-11"), Ok(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(all(""), Ok(vec![]));
        assert_eq!(all("3-1"), Ok(vec![]));
        assert_eq!(all("1,x"), Err("\"x\" is not a CPU number or range".into()));
        // a huge range is walked, not built: the first CPU comes at once
        assert_eq!(
            cpu_list("5-4000000000").next().map(|r| r.ok()),
            Some(Some(5))
        );
    }

    #[test]
    fn v1_runtime_is_split_in_the_samples_ratio() {
        assert_eq!(split_runtime(1_000, 0, 0), (1_000, 0));
        assert_eq!(split_runtime(1_000, 4, 0), (1_000, 0));
        assert_eq!(split_runtime(1_000, 0, 4), (0, 1_000));
        assert_eq!(split_runtime(1_000_000_000, 1_320, 0), (1_000_000_000, 0));
        assert_eq!(split_runtime(1_000, 3, 1), (750, 250));
        // no overflow at large totals
        assert_eq!(
            split_runtime(u64::MAX, 1, 1),
            (u64::MAX / 2, u64::MAX - u64::MAX / 2)
        );
    }

    #[test]
    fn missing_parents_are_listed_deepest_first_per_hierarchy() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("memory"), d.path().join("pids"));
        std::fs::create_dir_all(a.join("slurm/job_1")).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let got = missing_parents_in(&[a.clone(), b.clone()], "/slurm/job_1/step_0/cw");
        assert_eq!(
            got,
            vec![
                a.join("slurm/job_1/step_0/cw"),
                a.join("slurm/job_1/step_0"),
                b.join("slurm/job_1/step_0/cw"),
                b.join("slurm/job_1/step_0"),
                b.join("slurm/job_1"),
            ]
        );
        assert!(missing_parents_in(std::slice::from_ref(&a), "/slurm/job_1").is_empty());
        assert!(missing_parents_in(std::slice::from_ref(&a), "/").is_empty());
        assert!(missing_parents_in(std::slice::from_ref(&a), "/cw").is_empty());
        assert!(parents_lock("/cw").is_none());
        assert!(missing_parents("/cw").is_empty());
        // a parent with .. is never walked
        assert!(missing_parents_in(std::slice::from_ref(&a), "/../../x").is_empty());
        assert!(missing_parents_in(std::slice::from_ref(&a), "/slurm/../y").is_empty());
        // removal takes only empty directories, deepest first
        for p in &got {
            std::fs::create_dir_all(p).unwrap();
        }
        std::fs::write(b.join("slurm/job_1/keep"), "").unwrap();
        remove_parents(&got);
        assert!(!a.join("slurm/job_1/step_0").exists());
        assert!(a.join("slurm/job_1").exists());
        assert!(!b.join("slurm/job_1/step_0").exists());
        assert!(b.join("slurm/job_1/keep").exists());
        std::fs::remove_file(b.join("slurm/job_1/keep")).unwrap();
        remove_parents(&got);
        assert!(!b.join("slurm/job_1").exists());
        assert!(b.join("slurm").exists(), "the top level stays");
    }

    #[test]
    fn recorded_parents_are_kept_only_between_a_top_level_and_the_parent() {
        let roots = [
            PathBuf::from("/sys/fs/cgroup/memory"),
            PathBuf::from("/sys/fs/cgroup/pids"),
        ];
        let rec = |v: &[&str]| v.iter().map(PathBuf::from).collect::<Vec<_>>();
        let good = rec(&[
            "/sys/fs/cgroup/memory/slurm/job_1/cw",
            "/sys/fs/cgroup/pids/slurm/job_1/cw",
            "/sys/fs/cgroup/pids/slurm/job_1",
        ]);
        assert_eq!(recorded_parents_in(&roots, "/slurm/job_1/cw", &good), good);
        let bad = rec(&[
            "/sys/fs/cgroup/pids/slurm",            // a top level
            "/sys/fs/cgroup/memory",                // a hierarchy
            "/sys/fs/cgroup/memory/slurm/job_2/cw", // another job
            "/etc/slurm/job_1/cw",                  // not a cgroup
            "/sys/fs/cgroup/memory/slurm/job_1/cw/../../x",
        ]);
        assert!(recorded_parents_in(&roots, "/slurm/job_1/cw", &bad).is_empty());
        assert!(recorded_parents_in(&roots, "/cw", &good).is_empty());
    }

    #[test]
    fn parses_v2_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("cpu.stat"),
            "usage_usec 30\nuser_usec 20\nsystem_usec 10\n",
        )
        .unwrap();
        std::fs::write(d.path().join("memory.current"), "4096\n").unwrap();
        std::fs::write(d.path().join("memory.peak"), "8192\n").unwrap();
        std::fs::write(
            d.path().join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        let u = read_v2(d.path());
        assert_eq!(
            u,
            Usage {
                cpu_user_ns: 20_000,
                cpu_system_ns: 10_000,
                memory_current: 4096,
                memory_peak: 8192,
                oom_kills: 1
            }
        );
    }
}
