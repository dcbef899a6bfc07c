//! cgroup v2 accounting on a real cgroup2 hierarchy, also on hosts that boot cgroup v1 or hybrid:
//! the test uses the host's cgroup2 mount, or mounts one. A busy loop runs inside a fresh v2
//! cgroup; what `cgroup::read_v2` reports must match the process's own rusage within 10 %. Where
//! the memory controller is available in v2 (unified hosts), an OOM kill in the cgroup must show
//! in the kernel's counter. Root only; skips with a reason otherwise.

use cw_runtime::cgroup;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn cgroup2_root() -> Option<(PathBuf, bool)> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    for l in mounts.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        if let Some(i) = f.iter().position(|x| *x == "-") {
            if f.get(i + 1) == Some(&"cgroup2") {
                return Some((PathBuf::from(f[4]), false));
            }
        }
    }
    // none: mount one (the v2 hierarchy is a singleton; controllers bound to v1 stay there)
    let dir = std::env::temp_dir().join(format!("cw-cg2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    nix::mount::mount(
        Some("none"),
        &dir,
        Some("cgroup2"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .ok()?;
    Some((dir, true))
}

/// Run `sh -c script` inside the cgroup `cg`; returns (exit status, user+system ns from rusage).
// reaped by wait4 (for its rusage), which clippy does not see
#[allow(clippy::zombie_processes)]
fn run_in(cg: &Path, script: &str) -> (i32, u64) {
    let procs = cg.join("cgroup.procs");
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(script);
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, "0"));
    }
    let child = cmd.spawn().expect("spawning into the cgroup");
    let mut status = 0;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    assert_eq!(unsafe { libc::wait4(pid, &mut status, 0, &mut ru) }, pid);
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    (status, ns(ru.ru_utime) + ns(ru.ru_stime))
}

#[test]
fn v2_cpu_and_memory_accounting() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: needs root (creates cgroups)");
        return;
    }
    let Some((root, mounted)) = cgroup2_root() else {
        eprintln!("SKIP: no cgroup2 hierarchy and none could be mounted");
        return;
    };
    let cg = root.join(format!("cw-v2-test-{}", std::process::id()));
    std::fs::create_dir(&cg).expect("creating a v2 cgroup");
    let (st, rusage_ns) = run_in(&cg, "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done");
    assert_eq!(st, 0);
    let u = cgroup::read_v2(&cg);
    let ours = u.cpu_user_ns + u.cpu_system_ns;
    let diff = (ours as f64 - rusage_ns as f64).abs() / rusage_ns as f64;
    assert!(
        rusage_ns > 100_000_000 && diff < 0.10,
        "v2 cpu.stat says {ours} ns, the process's rusage {rusage_ns} ns"
    );
    // memory: only where the controller lives in v2
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    if controllers.split_whitespace().any(|c| c == "memory") {
        let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
        let m = root.join(format!("cw-v2-oom-{}", std::process::id()));
        std::fs::create_dir(&m).unwrap();
        std::fs::write(m.join("memory.max"), "20M").unwrap();
        std::fs::write(m.join("memory.swap.max"), "0").ok();
        let (st, _) = run_in(
            &m,
            "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo ${#x}",
        );
        let u = cgroup::read_v2(&m);
        assert!(
            u.oom_kills >= 1,
            "OOM kill not counted: {u:?} (status {st})"
        );
        assert!(u.memory_peak > 10 << 20, "{u:?}");
        std::fs::remove_dir(&m).unwrap();
    } else {
        eprintln!("SKIP (memory part): the memory controller is bound to cgroup v1 on this host");
    }
    std::fs::remove_dir(&cg).unwrap();
    if mounted {
        let _ = nix::mount::umount(&root);
        let _ = std::fs::remove_dir(&root);
    }
}
