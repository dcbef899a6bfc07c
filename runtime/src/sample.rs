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
//!
//! Cost, on a node shared by many runs and processes: a pid's namespace is read once (the pids
//! in /proc are listed each time, those seen before are known; every [`RECHECK`] samples all
//! are read again, for a pid reused by another process meanwhile), and Pss (a page-table walk,
//! milliseconds per GB) is read only when the cheap resident-set sum (counters, `statm`) comes
//! near the limit: below [`PSS_ABOVE`] of it that sum, an upper bound of Pss, is the sample.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

/// How often a run without a cgroup is sampled.
pub const INTERVAL: Duration = Duration::from_millis(500);

/// Every so many samples, every pid's namespace is read again.
pub const RECHECK: u32 = 20;

/// The fraction of the limit above which the resident-set sum is refined to Pss.
pub const PSS_ABOVE: f64 = 0.8;

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
    /// What each pid listed in /proc is known to be: in the run or not.
    known: std::collections::HashMap<u32, bool>,
    samples: u32,
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
            known: Default::default(),
            samples: 0,
            peak: 0,
        }
    }

    /// Bytes the run holds now (and the peak updated); 0 while its namespace cannot be read yet.
    /// `limit`: the run's memory limit, near which the sample is Pss.
    pub fn sample(&mut self, limit: Option<u64>) -> u64 {
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
        let pids = self.pids(ns);
        let shm = shm_used(self.init);
        let rss: u64 = pids.iter().filter_map(|p| resident(*p)).sum::<u64>() + shm;
        let total = match limit {
            Some(l) if rss as f64 > l as f64 * PSS_ABOVE => {
                pids.iter().filter_map(|p| pss(*p)).sum::<u64>() + shm
            }
            _ => rss,
        };
        self.peak = self.peak.max(total);
        total
    }

    /// The run's processes now: the pids in /proc whose pid namespace is the run's.
    fn pids(&mut self, ns: (u64, u64)) -> Vec<u32> {
        self.samples += 1;
        if self.samples.is_multiple_of(RECHECK) {
            self.known.clear();
        }
        let mut listed = std::collections::HashMap::with_capacity(self.known.len());
        if let Ok(rd) = fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let inside = match self.known.get(&pid) {
                    Some(k) => *k,
                    None => fs::metadata(format!("/proc/{pid}/ns/pid"))
                        .is_ok_and(|m| (m.dev(), m.ino()) == ns),
                };
                listed.insert(pid, inside);
            }
        }
        // a pid gone from the listing is forgotten: whoever gets it next is read anew
        self.known = listed;
        self.known
            .iter()
            .filter(|(_, inside)| **inside)
            .map(|(p, _)| *p)
            .collect()
    }
}

/// A process's resident set from its counters (cheap: no page-table walk).
fn resident(pid: u32) -> Option<u64> {
    let statm = fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

/// A process's proportional set size, or its resident set where smaps_rollup is missing (Linux
/// before 4.14).
fn pss(pid: u32) -> Option<u64> {
    match fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
        Ok(s) => pss_of(&s),
        Err(_) => resident(pid),
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
    fn a_process_in_its_pid_namespace_is_counted_by_rss_then_pss_near_the_limit() {
        // this test's own process stands in for a run's init, in a pid namespace of its own (a
        // fresh run of this test binary with only this test in it, through util-linux's
        // unshare, as root): in the host's namespace the sample summed every process of the
        // host's, and the other tests' threads beside it freed tens of MB while this one grew
        let Some(done) = crate::alone::run_alone!(
            a_process_in_its_pid_namespace_is_counted_by_rss_then_pss_near_the_limit,
            true
        ) else {
            return;
        };
        let me = std::process::id() as i32;
        let mut s = Sampler::new(me);
        // alone in its namespace, the sample is this process, whose resident set grows a few
        // pages between reads: it is read on both sides of the sample
        let own_before = resident(me as u32).unwrap();
        let before = s.sample(None);
        let own = resident(me as u32).unwrap();
        assert!(
            own > 0 && before >= own_before.min(own),
            "{before} < {own_before}, {own}"
        );
        assert!(s.known.get(&(me as u32)) == Some(&true));
        // 32 MiB touched by this process: a later sample sees at least most of it
        let v = std::hint::black_box(vec![1u8; 32 << 20]);
        let after = s.sample(None);
        assert!(after >= before + (24 << 20), "{before} -> {after}");
        assert_eq!(s.peak, after.max(before));
        // near a limit the sample is Pss, which is at most the resident sum
        let near = s.sample(Some(after));
        assert!(near <= after + (8 << 20) && near > 0, "{near} vs {after}");
        // (resident read on both sides: the test harness's own thread may allocate meanwhile)
        let rss_before = resident(me as u32).unwrap();
        let p = pss(me as u32).unwrap();
        let rss_after = resident(me as u32).unwrap();
        assert!(
            p <= rss_before.max(rss_after) + (1 << 20),
            "{p} > {rss_before}, {rss_after}"
        );
        // every RECHECK samples every pid is read again
        s.known.insert(me as u32, false);
        while s.samples % RECHECK != RECHECK - 1 {
            s.samples += 1;
        }
        assert!(s.sample(None) >= own);
        drop(v);
        done.mark();
    }
}
