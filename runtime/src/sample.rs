//! The memory of a run that has no cgroup, by sampling its processes: a run without root on
//! cgroup v1, or on v2 without a delegated subtree, has no memory controller to hold it, and the
//! worker must still end a bundle past its memory limit with cl-worker's message. The monitor
//! asks [`Sampler::sample`] every [`INTERVAL`] and kills the run once it is over its limit.
//!
//! What is counted is what a memory cgroup would mostly charge: each process's proportional set
//! size (`Pss` of `/proc/<pid>/smaps_rollup`: pages shared by a forked worker pool are counted
//! once, not once per process) plus what the run's `/dev/shm` holds (a tmpfs whose pages belong
//! to no process). The run's processes are those in its pid namespace, told by the namespace's
//! inode: the seccomp filter lets none of them make another. A sample is no hard limit: a run
//! can allocate faster than one interval, and page cache is not counted; the kill follows within
//! an interval of the first sample over the limit.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

/// How often a run without a cgroup is sampled.
pub const INTERVAL: Duration = Duration::from_millis(500);

/// Samples the run whose init is `init`.
#[derive(Debug)]
pub struct Sampler {
    init: i32,
    /// dev and inode of the run's pid namespace, once readable: until the init has exec'd the
    /// run's command it is not dumpable and its memory still belongs to the host's user
    /// namespace, so its `ns/pid` is closed to the monitor (EACCES) for a few milliseconds.
    ns: Option<(u64, u64)>,
    /// Samples that could not read the namespace.
    misses: u32,
    /// The highest sample so far.
    pub peak: u64,
}

impl Sampler {
    /// A sampler for the run whose init (pid 1 of its pid namespace) is `init` on the host.
    pub fn new(init: i32) -> Sampler {
        Sampler {
            init,
            ns: None,
            misses: 0,
            peak: 0,
        }
    }

    /// Bytes the run holds now (and the peak updated); 0 while its namespace cannot be read yet.
    pub fn sample(&mut self) -> u64 {
        let ns = match self.ns {
            Some(ns) => ns,
            None => match fs::metadata(format!("/proc/{}/ns/pid", self.init)) {
                Ok(m) => *self.ns.insert((m.dev(), m.ino())),
                Err(e) => {
                    self.misses += 1;
                    if self.misses == 20 {
                        tracing::warn!(
                            "the run's pid namespace is still unreadable after {} samples: {e}",
                            self.misses
                        );
                    }
                    return 0;
                }
            },
        };
        let mut total = shm_used(self.init);
        if let Ok(rd) = fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                match fs::metadata(format!("/proc/{pid}/ns/pid")) {
                    Ok(m) if (m.dev(), m.ino()) == ns => {}
                    _ => continue,
                }
                total += process_memory(pid).unwrap_or(0);
            }
        }
        self.peak = self.peak.max(total);
        total
    }
}

/// A process's proportional set size, or its resident set where smaps_rollup is missing (Linux
/// before 4.14).
fn process_memory(pid: u32) -> Option<u64> {
    match fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
        Ok(s) => pss_of(&s),
        Err(_) => {
            let statm = fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
            let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
            Some(pages * page_size())
        }
    }
}

/// The `Pss:` line of an smaps_rollup, in bytes.
fn pss_of(smaps_rollup: &str) -> Option<u64> {
    smaps_rollup.lines().find_map(|l| {
        let v = l.strip_prefix("Pss:")?.trim().strip_suffix("kB")?;
        v.trim().parse::<u64>().ok().map(|k| k * 1024)
    })
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64
}

/// What the run's /dev/shm (a tmpfs of its mount namespace) holds.
fn shm_used(init: i32) -> u64 {
    match nix::sys::statvfs::statvfs(format!("/proc/{init}/root/dev/shm").as_str()) {
        Ok(s) => s.blocks().saturating_sub(s.blocks_free()) * s.fragment_size(),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pss_is_read_in_bytes() {
        let s = "55d0c0a4a000-7ffd5b1fe000 ---p 00000000 00:00 0                          [rollup]\n\
                 Rss:                3840 kB\nPss:                1034 kB\nPss_Anon:            412 kB\n";
        assert_eq!(pss_of(s), Some(1034 * 1024));
        assert_eq!(pss_of("Rss: 1 kB\n"), None);
    }

    #[test]
    fn a_process_in_its_own_pid_namespace_is_counted_with_its_shm() {
        // this test's own process stands in for a run's init: its namespace holds every process
        // of the host's, so the sample counts at least this process's memory
        let me = std::process::id() as i32;
        let mut s = Sampler::new(me);
        let before = s.sample();
        let own = process_memory(me as u32).unwrap();
        assert!(own > 0 && before >= own, "{before} < {own}");
        // 32 MiB touched by this process: a later sample sees at least most of it
        let v = std::hint::black_box(vec![1u8; 32 << 20]);
        let after = s.sample();
        assert!(after >= before + (24 << 20), "{before} -> {after}");
        assert_eq!(s.peak, after.max(before));
        drop(v);
    }
}
