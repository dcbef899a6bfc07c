//! Accounting from the run's cgroup: CPU user/system time, current and peak memory, and OOM kills
//! from the kernel's own counter (v1 `memory.oom_control` oom_kill, v2 `memory.events` oom_kill),
//! never inferred from an exit code. cgroup v1 is read through cgroups-rs; v2 from its files.

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
