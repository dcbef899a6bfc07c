//! `cw run` end to end (root): real containers through libcontainer from the fixture images.

mod common;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

const TINY: &str = "127.0.0.1:5000/tiny:amd64";
const CONFIGURED: &str = "127.0.0.1:5000/tiny:config";
const EDGE: &str = "127.0.0.1:5000/edge:latest";

fn runner() -> Option<Cw> {
    runner_with(TINY)
}

/// After a run: no mounts under the store, no cgroup, no in-use record, no run dir (unless kept).
fn assert_no_leftovers(cw: &Cw) {
    cw.settle();
    let store = cw.store().display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&store),
        "mounts left under {store}:\n{}",
        mounts
            .lines()
            .filter(|l| l.contains(&store))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        cw.entries("inuse").is_empty(),
        "in-use records left: {:?}",
        cw.entries("inuse")
    );
    for id in cw.entries("runs") {
        for ctl in ["memory", "cpu", "pids", "devices"] {
            let p = format!("/sys/fs/cgroup/{ctl}/cw/{id}");
            assert!(!Path::new(&p).exists(), "cgroup left: {p}");
        }
    }
}

fn run_out(cw: &Cw, args: &[&str]) -> (i32, String, String) {
    let o = cw.run(args);
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn exit_codes_and_output_pass_through() {
    let Some(cw) = runner() else { return };
    let (rc, out, _) = run_out(
        &cw,
        &["run", "--image", TINY, "echo out; echo err >&2; exit 7"],
    );
    assert_eq!(rc, 7);
    assert_eq!(out, "out\n");
    let (rc, _, _) = run_out(&cw, &["run", "--image", TINY, "--", "true"]);
    assert_eq!(rc, 0);
    // a signal's death becomes 128+signal (pid 1 itself cannot be signalled from inside)
    let (rc, _, _) = run_out(
        &cw,
        &["run", "--image", TINY, "sh -c 'kill -9 $$'; exit $?"],
    );
    assert_eq!(rc, 137);
    let (rc, _, err) = run_out(&cw, &["run", "--image", TINY, "--", "/nonexistent"]);
    assert_ne!(rc, 0, "{err}");
    assert!(
        cw.entries("runs").is_empty(),
        "runs not removed: {:?}",
        cw.entries("runs")
    );
    assert_no_leftovers(&cw);
}

#[test]
fn stdout_to_file_and_devnull() {
    let Some(cw) = runner() else { return };
    let f = cw.dir.path().join("out.txt");
    let (rc, out, _) = run_out(
        &cw,
        &[
            "run",
            "--stdout",
            f.to_str().unwrap(),
            "--image",
            TINY,
            "echo to-file",
        ],
    );
    assert_eq!((rc, out.as_str()), (0, ""));
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "to-file\n");
    // cw run with stdout=/dev/null: the container can still write (libcontainer pitfall)
    let o = cw
        .cmd(&["run", "--image", TINY, "echo x && echo ok >&2"])
        .stdout(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_no_leftovers(&cw);
}

#[test]
fn image_config_user_workdir_env() {
    let Some(cw) = runner() else { return };
    cw.ok(&["pull", "-q", CONFIGURED]);
    let (rc, out, err) = run_out(
        &cw,
        &[
            "run",
            "--image",
            CONFIGURED,
            "id -u; id -g; pwd; echo $CW_IMAGE_ENV; echo $HOME",
        ],
    );
    assert_eq!(rc, 0, "{err}");
    assert_eq!(out, "65534\n65534\n/tmp\nfrom-image\n/home\n");
    let (_, out, _) = run_out(
        &cw,
        &[
            "run",
            "-u",
            "0:0",
            "-w",
            "/etc",
            "-e",
            "CW_IMAGE_ENV=flag",
            "--image",
            CONFIGURED,
            "id -u; pwd; echo $CW_IMAGE_ENV",
        ],
    );
    assert_eq!(out, "0\n/etc\nflag\n");
    let (_, out, _) = run_out(&cw, &["run", "-u", "nobody", "--image", TINY, "id -u"]);
    assert_eq!(out, "65534\n");
    let err = cw.fails(&["run", "-u", "nosuchuser", "--image", TINY, "true"]);
    assert!(
        err.contains("nosuchuser") && err.contains("/etc/passwd"),
        "{err}"
    );
    assert_no_leftovers(&cw);
}

#[test]
fn bind_mounts_readonly_and_readwrite() {
    let Some(cw) = runner() else { return };
    let d = cw.dir.path().join("vol");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("in.txt"), "hello").unwrap();
    let ro = format!("{}:/data:ro", d.display());
    let (rc, out, _) = run_out(
        &cw,
        &[
            "run",
            "-v",
            &ro,
            "--image",
            TINY,
            "cat /data/in.txt; touch /data/new 2>/dev/null && echo wrote || echo refused",
        ],
    );
    assert_eq!((rc, out.as_str()), (0, "hellorefused\n"));
    let rw = format!("{}:/data", d.display());
    let (rc, _, _) = run_out(
        &cw,
        &["run", "-v", &rw, "--image", TINY, "echo made > /data/new"],
    );
    assert_eq!(rc, 0);
    assert_eq!(std::fs::read_to_string(d.join("new")).unwrap(), "made\n");
    assert_no_leftovers(&cw);
}

#[test]
fn memory_limit_oom_is_detected_for_init_and_for_a_child() {
    let Some(cw) = runner() else { return };
    // the command itself is killed
    let (rc, _, err) = run_out(
        &cw,
        &[
            "run",
            "--memory",
            "32m",
            "--keep",
            "--name",
            "oom1",
            "--image",
            TINY,
            "--",
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=100M",
            "count=1",
        ],
    );
    assert_eq!(rc, 137, "{err}");
    assert!(err.contains("memory limit"), "{err}");
    let st: serde_json::Value = serde_json::from_str(&cw.ok(&["stats", "oom1"])).unwrap();
    assert_eq!(st["exit"]["oom_killed"], true);
    assert!(st["usage"]["oom_kills"].as_u64().unwrap() >= 1);
    // a child is killed, the command exits 0: still reported, from the kernel's counter
    let (rc, _, err) = run_out(
        &cw,
        &[
            "run",
            "--memory",
            "32m",
            "--keep",
            "--name",
            "oom2",
            "--image",
            TINY,
            "dd if=/dev/zero of=/dev/shm/fill bs=1M count=64 2>/dev/null; exit 0",
        ],
    );
    assert_eq!(rc, 0);
    assert!(err.contains("memory limit"), "{err}");
    let st: serde_json::Value = serde_json::from_str(&cw.ok(&["stats", "oom2"])).unwrap();
    assert_eq!(st["exit"]["oom_killed"], true);
    // no OOM without pressure
    let (_, _, err) = run_out(
        &cw,
        &[
            "run", "--memory", "64m", "--keep", "--name", "nooom", "--image", TINY, "true",
        ],
    );
    let st: serde_json::Value = serde_json::from_str(&cw.ok(&["stats", "nooom"])).unwrap();
    assert_eq!(st["exit"]["oom_killed"], false, "{err}");
    cw.ok(&["rm", "oom1", "oom2", "nooom"]);
    assert_no_leftovers(&cw);
}

#[test]
fn cpu_time_accounting_matches_the_process_own_counters() {
    let Some(cw) = runner() else { return };
    // busy loop, then print the shell's own utime+stime (clock ticks) from /proc. The cgroup
    // also counts the container's setup inside it (tens of ms on a loaded machine), so the loop
    // is long enough (~1 s) for that to stay well inside the 10 %.
    let script = "i=0; while [ $i -lt 900000 ]; do i=$((i+1)); done; set -- $(cat /proc/$$/stat); echo $((${14}+${15}))";
    let (rc, out, err) = run_out(
        &cw,
        &["run", "--keep", "--name", "cpu1", "--image", TINY, script],
    );
    assert_eq!(rc, 0, "{err}");
    let ticks: f64 = out.trim().parse().unwrap();
    let own_ns = ticks * 1e7; // USER_HZ = 100
    let st: serde_json::Value = serde_json::from_str(&cw.ok(&["stats", "cpu1"])).unwrap();
    let cg_ns = (st["usage"]["cpu_user_ns"].as_u64().unwrap()
        + st["usage"]["cpu_system_ns"].as_u64().unwrap()) as f64;
    assert!(
        own_ns > 6e8,
        "the loop was too short to measure: {own_ns} ns"
    );
    let ratio = cg_ns / own_ns;
    eprintln!("cgroup cpu {cg_ns} ns, the process's own {own_ns} ns: ratio {ratio:.3}");
    assert!(
        (0.9..=1.1).contains(&ratio),
        "cgroup cpu {cg_ns} ns vs the process's own {own_ns} ns (ratio {ratio:.3})"
    );
    cw.ok(&["rm", "cpu1"]);
    assert_no_leftovers(&cw);
}

#[test]
fn time_limit_kills_with_grace() {
    let Some(cw) = runner() else { return };
    let t = Instant::now();
    let (rc, _, err) = run_out(
        &cw,
        &[
            "run",
            "--time-limit",
            "2s",
            "--stop-timeout",
            "1s",
            "--image",
            TINY,
            "--",
            "sleep",
            "60",
        ],
    );
    let el = t.elapsed();
    assert_eq!(rc, 137, "{err}");
    assert!(err.contains("time limit"), "{err}");
    assert!(
        el >= Duration::from_secs(2) && el < Duration::from_secs(20),
        "{el:?}"
    );
    // a process that handles SIGTERM exits by itself within the grace
    let (rc, out, _) = run_out(
        &cw,
        &[
            "run",
            "--time-limit",
            "1s",
            "--stop-timeout",
            "10s",
            "--image",
            TINY,
            "trap 'echo term; exit 42' TERM; while true; do sleep 0.1; done",
        ],
    );
    assert_eq!((rc, out.as_str()), (42, "term\n"));
    assert_no_leftovers(&cw);
}

#[test]
fn detached_run_killed_from_another_process() {
    let Some(cw) = runner() else { return };
    let id = cw
        .ok(&[
            "run",
            "-d",
            "--stop-timeout",
            "1s",
            "--image",
            TINY,
            "--",
            "sleep",
            "86400",
        ])
        .trim()
        .to_string();
    std::thread::sleep(Duration::from_millis(300));
    assert!(cw.ok(&["ps"]).contains(&id));
    assert!(cw
        .ok(&["ps"])
        .lines()
        .any(|l| l.starts_with(&id) && l.contains("running")));
    let live: serde_json::Value = serde_json::from_str(&cw.ok(&["stats", &id])).unwrap();
    assert!(live["usage"]["memory_current"].as_u64().unwrap() > 0);
    cw.ok(&["kill", &id]);
    let t = Instant::now();
    while !cw
        .ok(&["ps"])
        .lines()
        .any(|l| l.starts_with(&id) && l.contains("killed"))
    {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "not killed: {}",
            cw.ok(&["ps"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    cw.ok(&["rm", &id]);
    assert_no_leftovers(&cw);
}

#[test]
fn run_survives_sigkill_of_cw_and_records_its_end() {
    let Some(cw) = runner() else { return };
    let mut child = cw
        .cmd(&[
            "run",
            "--keep",
            "--name",
            "orphan",
            "--image",
            TINY,
            "sleep 2; echo done > /tmp/x; exit 5",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        cw.ok(&["ps"])
            .lines()
            .any(|l| l.starts_with("orphan") && l.contains("running")),
        "{}",
        cw.ok(&["ps"])
    );
    let t = Instant::now();
    loop {
        let ps = cw.ok(&["ps"]);
        if ps
            .lines()
            .any(|l| l.starts_with("orphan") && l.contains("exited (5)"))
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{ps}");
        std::thread::sleep(Duration::from_millis(100));
    }
    cw.ok(&["rm", "orphan"]);
    assert_no_leftovers(&cw);
}

#[test]
fn isolation_root_cannot_raise_limits_mknod_or_see_host() {
    let Some(cw) = runner() else { return };
    let script = r#"
      v=RAISED
      echo 1073741824 > /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null && echo ${v}_V1
      echo max > /sys/fs/cgroup/memory.max 2>/dev/null && echo ${v}_V2
      mkdir /sys/fs/cgroup/x 2>/dev/null && echo ${v}_MKDIR
      mount -t cgroup -o memory cgroup /mnt 2>/dev/null && echo ${v}_MOUNT
      mknod /tmp/null c 1 3 2>/dev/null && echo ${v}_MKNOD
      unshare -n true 2>/dev/null && echo ${v}_UNSHARE
      ls /proc | grep -c '^[0-9]'
      head -c 7 /proc/1/cmdline; echo
      grep -c . /proc/keys 2>/dev/null || echo nokeys
      grep NoNewPrivs /proc/self/status
      grep CapEff /proc/self/status
    "#;
    let (rc, out, err) = run_out(&cw, &["run", "--memory", "64m", "--image", TINY, script]);
    assert_eq!(rc, 0, "{err}");
    for bad in [
        "RAISED_V1",
        "RAISED_V2",
        "RAISED_MKDIR",
        "RAISED_MOUNT",
        "RAISED_MKNOD",
        "RAISED_UNSHARE",
    ] {
        assert!(!out.contains(bad), "container could do {bad}:\n{out}");
    }
    let lines: Vec<&str> = out.lines().collect();
    let pids: usize = lines[0].trim().parse().unwrap();
    assert!(pids <= 4, "container sees {pids} processes: {out}");
    assert_eq!(lines[1], "/bin/sh", "pid 1 is not the run's command");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(!out.contains("CapEff:\t000001ffffffffff"), "{out}");
    // non-root: no capabilities at all
    let (_, out, _) = run_out(
        &cw,
        &[
            "run",
            "-u",
            "65534",
            "--image",
            TINY,
            "grep CapEff /proc/self/status",
        ],
    );
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert_no_leftovers(&cw);
}

#[test]
fn network_none_has_only_loopback_and_host_shares() {
    let Some(cw) = runner() else { return };
    let probe = "echo | nc -w 2 127.0.0.1 5000 >/dev/null 2>&1 && echo reach || echo noreach; ping -c 1 -W 2 127.0.0.1 >/dev/null && echo lo-ok; grep -c : /proc/net/dev";
    let (rc, out, err) = run_out(&cw, &["run", "--image", TINY, probe]);
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("noreach") && out.contains("lo-ok"), "{out}");
    assert_eq!(
        out.lines().last().unwrap().trim(),
        "1",
        "only lo expected: {out}"
    );
    let (_, out, _) = run_out(
        &cw,
        &[
            "run",
            "--network",
            "host",
            "--image",
            TINY,
            "echo | nc -w 2 127.0.0.1 5000 >/dev/null && echo reach",
        ],
    );
    assert!(out.contains("reach"), "{out}");
    assert_no_leftovers(&cw);
}

#[test]
fn network_private_goes_out_through_pasta_but_not_to_host_loopback() {
    let Some(cw) = runner() else { return };
    if cw_runtime::monitor::pasta_path().is_none() {
        skip("pasta (package passt) is not installed");
        return;
    }
    // an interface besides lo, with an address and a default route; the host's loopback
    // services (the registry on 127.0.0.1:5000) are out of reach
    let probe = "echo | nc -w 2 127.0.0.1 5000 >/dev/null 2>&1 && echo reach || echo noreach; grep -c : /proc/net/dev; ip -4 addr | grep -c 'inet ' ; ip route | grep -c default";
    let (rc, out, err) = run_out(
        &cw,
        &["run", "--network", "private", "--image", TINY, probe],
    );
    assert_eq!(rc, 0, "{err}");
    let l: Vec<&str> = out.lines().collect();
    assert_eq!(l, vec!["noreach", "2", "2", "1"], "{out}");
    // pasta is gone with the run
    assert_no_process_names(&cw.store());
    assert_no_leftovers(&cw);
}

#[test]
fn copy_fallback_applies_whiteouts() {
    let Some(cw) = runner() else { return };
    cw.ok(&["pull", "-q", EDGE]);
    let check = "test -e /etc/motd && echo motd-present; test -d /usr/share/lintian && echo lintian-present; ls /usr/share/doc | tr '\\n' ' '; echo; cat /opt/edge/hl-a 2>/dev/null | head -c 5; echo";
    let (rc1, a, e1) = run_out(&cw, &["run", "--image", EDGE, check]);
    let (rc2, b, e2) = run_out(&cw, &["run", "--no-overlay", "--image", EDGE, check]);
    assert_eq!((rc1, rc2), (0, 0), "{e1} {e2}");
    assert_eq!(a, b, "overlay and copy disagree");
    assert!(
        !a.contains("motd-present") && !a.contains("lintian-present"),
        "{a}"
    );
    assert_no_leftovers(&cw);
}

/// The pids limit is hit by a subshell that forks sleeps until it cannot (ash exits on a failed
/// fork); the run's shell forked nothing after it started and reads the error with builtins, so
/// the limit cannot fail the run itself, as it did when the error went through a pipe to `tail`
/// (the pipe's second fork raced the subshell's sleeps).
#[test]
fn limits_are_applied() {
    let Some(cw) = runner() else { return };
    let (rc, out, err) = run_out(&cw, &["run", "--memory", "48m", "--cpus", "0.5", "--pids-limit", "20", "--shm-size", "8m", "--keep", "--name", "lim", "--image", TINY, "df -k /dev/shm | tail -1; (i=0; while [ $i -lt 40 ]; do sleep 5 & i=$((i+1)); done) 2>/tmp/forks; while read -r l; do last=$l; done </tmp/forks; echo \"$last\""]);
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("8192"), "shm size: {out}");
    let req: serde_json::Value = serde_json::from_slice(
        &std::fs::read(cw.store().join("runs/lim/bundle/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(req["linux"]["resources"]["memory"]["limit"], 48 << 20);
    assert_eq!(req["linux"]["resources"]["cpu"]["quota"], 50000);
    assert!(
        out.contains("can't fork")
            || out.contains("Resource temporarily unavailable")
            || out.contains("fork"),
        "pids limit not hit: {out}"
    );
    cw.ok(&["rm", "lim"]);
    assert_no_leftovers(&cw);
}

/// `cw logs` of a detached run: its output as it was written, `--tail N`, and `-f` following it
/// until it ends; a run whose output went to its terminal has none, and says so.
#[test]
fn logs_of_a_detached_run_and_following_it_to_its_end() {
    let Some(cw) = runner() else { return };
    cw.ok(&[
        "run",
        "-d",
        "--name",
        "lg",
        "--image",
        TINY,
        "sh",
        "-c",
        "for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 1; done",
    ]);
    let t0 = Instant::now();
    let o = cw.run(&["logs", "-f", "lg"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out1\nout2\nout3\n");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "err1\nerr2\nerr3\n");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "followed for {:?}",
        t0.elapsed()
    );
    assert!(
        cw.store().join("runs/lg/exit.json").exists(),
        "-f returned before the end"
    );
    assert_eq!(cw.ok(&["logs", "--tail", "1", "lg"]), "out3\n");
    assert_eq!(cw.ok(&["logs", "--tail", "0", "lg"]), "");
    cw.ok(&["rm", "lg"]);
    cw.ok(&["run", "--keep", "--name", "fg", "--image", TINY, "true"]);
    let err = cw.fails(&["logs", "fg"]);
    assert!(err.contains("there are no logs"), "{err}");
    cw.ok(&["rm", "fg"]);
    assert_no_leftovers(&cw);
}

/// docker's exit codes for a command that cannot run: 127 not found, 126 not executable, each
/// with one line naming the command and the image (not libcontainer's wording).
#[test]
fn a_command_that_cannot_run_exits_126_or_127_with_its_name() {
    let Some(cw) = runner() else { return };
    for (cmd, code, says) in [
        (
            "/nonexistent",
            127,
            "/nonexistent: no such file in image 127.0.0.1:5000/tiny:amd64",
        ),
        (
            "nosuchcmd",
            127,
            "nosuchcmd: not found in the PATH of image 127.0.0.1:5000/tiny:amd64",
        ),
        ("/etc/passwd", 126, "cannot be executed"),
    ] {
        let (rc, _, err) = run_out(&cw, &["run", "--image", TINY, cmd]);
        assert_eq!(rc, code, "{cmd}: {err}");
        assert!(err.contains(says), "{cmd}: {err}");
        assert!(!err.contains("executing process"), "{cmd}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{cmd}: {err}");
    }
    // through a symlink (busybox's applets), from the PATH, and a command's own code
    let (rc, _, err) = run_out(&cw, &["run", "--image", TINY, "sh", "-c", "exit 3"]);
    assert_eq!(rc, 3, "{err}");
    assert_no_leftovers(&cw);
}

/// Memory plus swap as docker sets it (so as cl-worker's runs get it): twice --memory unless
/// --memory-swap says otherwise; read back from the run's own cgroup while it runs.
#[test]
fn memory_swap_is_dockers() {
    let Some(cw) = runner() else { return };
    let memsw = |extra: &[&str]| -> String {
        let name = format!("sw{}", rand_suffix());
        let mut args = vec!["run", "-d", "--name", &name, "--memory", "64m"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--image", TINY, "sleep", "30"]);
        cw.ok(&args);
        let (v, on_v2) = run_cgroup_file(
            &name,
            "memory",
            "memory.memsw.limit_in_bytes",
            "memory.swap.max",
        );
        cw.ok(&["rm", "-f", &name]);
        // v2 holds the swap alone, v1 memory plus swap
        if on_v2 {
            match v.parse::<u64>() {
                Ok(n) => (n + (64 << 20)).to_string(),
                Err(_) => v,
            }
        } else {
            v
        }
    };
    assert_eq!(memsw(&[]), (128u64 << 20).to_string());
    assert_eq!(memsw(&["--memory-swap", "64m"]), (64u64 << 20).to_string());
    let unlimited = memsw(&["--memory-swap", "-1"]);
    assert!(
        unlimited == "max" || unlimited.parse::<u64>().unwrap() > 1 << 60,
        "{unlimited}"
    );
    let err = cw.fails(&[
        "run",
        "--memory",
        "64m",
        "--memory-swap",
        "32m",
        "--image",
        TINY,
        "true",
    ]);
    assert!(err.contains("at least --memory"), "{err}");
    assert_no_leftovers(&cw);
}

/// The device cgroup is what stands between a run and the host's devices: the node passed with
/// `--device` (as a GPU's /dev/nvidiaN is) is created and allowed, an unassigned one is denied
/// even to a process holding a node for it. Major 42 ("sample drivers") has no driver here, so an
/// allowed open fails with ENXIO and a denied one with EPERM.
#[test]
fn device_cgroup_allows_the_passed_node_and_denies_an_unassigned_one() {
    let Some(cw) = runner() else { return };
    // device nodes must live on a filesystem without nodev: /dev itself
    let dir = Path::new("/dev").join(format!("cw-test-{}", rand_suffix()));
    std::fs::create_dir(&dir).unwrap();
    struct Rm(std::path::PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _rm = Rm(dir.clone());
    for (name, minor) in [("nvidia0", 0), ("nvidia1", 1)] {
        nix::sys::stat::mknod(
            &dir.join(name),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(42, minor),
        )
        .unwrap();
    }
    let assigned = format!("{}:/dev/nvidia1", dir.join("nvidia1").display());

    // inside: only the passed node, with its numbers, and the cgroup lets it be opened
    let (rc, out, err) = run_out(
        &cw,
        &[
            "run",
            "--device",
            &assigned,
            "--image",
            TINY,
            "ls -l /dev/ | grep nvidia; cat /dev/nvidia1",
        ],
    );
    assert_ne!(rc, 0);
    assert!(out.contains("42,   1") && out.contains("nvidia1"), "{out}");
    assert!(!out.contains("nvidia0"), "{out}");
    assert!(
        err.contains("No such device or address"),
        "the passed node must reach its (absent) driver: {err}"
    );
    assert!(!err.contains("Operation not permitted"), "{err}");

    // from the host, a process joining the run's device cgroup: the unassigned node is denied
    let id = cw
        .ok(&[
            "run", "-d", "--device", &assigned, "--image", TINY, "--", "sleep", "86400",
        ])
        .trim()
        .to_string();
    let v1 = Path::new("/sys/fs/cgroup/devices").is_dir();
    let cg = if v1 {
        format!("/sys/fs/cgroup/devices/cw/{id}")
    } else {
        format!("/sys/fs/cgroup/cw/{id}")
    };
    let t = Instant::now();
    while !Path::new(&cg).join("cgroup.procs").exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "no cgroup {cg}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let open_in_cgroup = |node: &str| {
        let o = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {cg}/cgroup.procs && exec cat {}",
                dir.join(node).display()
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let denied = open_in_cgroup("nvidia0");
    let allowed = open_in_cgroup("nvidia1");
    cw.ok(&["kill", &id]);
    let t = Instant::now();
    while cw.run(&["rm", &id]).status.code() != Some(0) {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "run {id} not removable"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        denied.contains("Operation not permitted"),
        "unassigned node: {denied}"
    );
    assert!(
        allowed.contains("No such device or address"),
        "assigned node: {allowed}"
    );
    assert_no_leftovers(&cw);

    let err = cw.fails(&["run", "--device", "/etc/hostname", "--image", TINY, "true"]);
    assert!(
        err.contains("/etc/hostname") && err.contains("not a device node"),
        "{err}"
    );
    let err = cw.fails(&[
        "run",
        "--device",
        "/dev/null:/etc/x",
        "--image",
        TINY,
        "true",
    ]);
    assert!(err.contains("under /dev"), "{err}");
}

/// A run starts with every signal at its default: none ignored (an ignored SIGPIPE survives
/// exec, so a monitor that ignores it would hand that to the container) and none blocked.
#[test]
fn signals_start_at_their_defaults() {
    let Some(cw) = runner() else { return };
    let (rc, out, err) = run_out(
        &cw,
        &[
            "run",
            "--image",
            TINY,
            "grep -E '^Sig(Ign|Blk)' /proc/self/status; yes | head -1",
        ],
    );
    assert_eq!(rc, 0, "{err}");
    assert_eq!(
        out, "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\ny\n",
        "{err}"
    );
    assert!(!err.contains("Broken pipe"), "{err}");
    assert_no_leftovers(&cw);
}

#[test]
fn under_a_batch_job_or_a_systemd_unit_cw_run_returns_after_the_teardown() {
    // their end kills what is left of cw once it returns: the monitor's teardown (mounts, upper
    // dir, cgroups) has ended by then, which `cleaned` in a kept run's directory marks
    let Some(cw) = runner() else { return };
    for var in [
        "SLURM_JOB_ID",
        "PBS_JOBID",
        "LSB_JOBID",
        "FLUX_JOB_ID",
        "INVOCATION_ID",
    ] {
        let name = format!("managed-{}", var.to_lowercase().replace('_', "-"));
        let o = cw
            .cmd(&["run", "--keep", "--name", &name, "--image", TINY, "true"])
            .env(var, "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let dir = cw.store().join("runs").join(&name);
        assert!(dir.join("exit.json").exists(), "{var}");
        assert!(
            dir.join("cleaned").exists(),
            "{var}: cw run returned before the teardown"
        );
        cw.ok(&["rm", &name]);
    }
    assert_no_leftovers(&cw);
}

#[test]
fn nested_cgroup_parents_made_for_a_run_are_removed_with_it() {
    let Some(cw) = runner() else { return };
    // As under Slurm: the parent is inside a tree that another manager made in some hierarchies
    // (here: memory only) and nobody made in the others.
    let top = format!("cwnest-{}", std::process::id());
    let job = format!("/sys/fs/cgroup/memory/{top}/job_1");
    std::fs::create_dir_all(&job).unwrap();
    let parent = format!("/{top}/job_1/step_0/cw");
    let controllers = [
        "memory", "cpu", "cpuacct", "pids", "devices", "freezer", "cpuset", "blkio",
    ];
    let left = || {
        let mut left = vec![];
        for ctl in controllers {
            let base = Path::new("/sys/fs/cgroup").join(ctl);
            if !base.is_dir() {
                continue;
            }
            for sub in ["job_1/step_0", "job_1"] {
                let p = base.join(&top).join(sub);
                let pre_existing = ctl == "memory" && sub == "job_1";
                if p.exists() != pre_existing {
                    left.push(format!("{} exists: {}", p.display(), p.exists()));
                }
            }
        }
        left
    };
    // the monitor removes them in its teardown, after `cw run` has returned: waited for
    let settled = || {
        let mut l = vec![];
        eventually(std::time::Duration::from_secs(20), || {
            l = left();
            l.is_empty()
        });
        l
    };
    let (rc, out, err) = run_out(
        &cw,
        &[
            "run",
            "--cgroup-parent",
            &parent,
            "--image",
            TINY,
            "cat /proc/1/cgroup",
        ],
    );
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("memory:/"), "{out}");
    let after_run = settled();
    // the monitor killed mid-run: whoever finishes the run (here `cw kill`) removes them
    let (id, rd, monitor, _) = started(
        &cw.store(),
        cw.cmd(&[
            "run",
            "-d",
            "--cgroup-parent",
            &parent,
            "--image",
            TINY,
            "--",
            "sleep",
            "60",
        ]),
    );
    let during = left();
    kill_monitor(&rd, monitor);
    cw.ok(&["kill", &id]);
    let lost = rd.exit().map(|e| e.reason);
    let after_recovery = settled();
    cw.ok(&["rm", &id]);
    // the other manager's directory and the top level stay: clean them (and, on failure, what
    // was left) up here
    for ctl in controllers {
        let base = Path::new("/sys/fs/cgroup").join(ctl).join(&top);
        for sub in ["job_1/step_0/cw", "job_1/step_0", "job_1", ""] {
            let _ = std::fs::remove_dir(base.join(sub));
        }
    }
    assert!(after_run.is_empty(), "after a run: {after_run:#?}");
    assert!(!during.is_empty(), "a running run's parents exist");
    assert_eq!(lost, Some(cw_runtime::rundir::Reason::Lost));
    assert!(
        after_recovery.is_empty(),
        "after recovering a run whose monitor died: {after_recovery:#?}"
    );
    assert_no_leftovers(&cw);
}

#[test]
fn the_monitor_is_the_oom_killer_last_choice_and_the_run_is_not() {
    let Some(cw) = runner() else { return };
    // cw started with a raised score (allowed without privilege): the run must get exactly that,
    // the monitor -999 where the host lets root lower it (CAP_SYS_RESOURCE)
    let mut c = cw.cmd(&[
        "run",
        "-d",
        "--stop-timeout",
        "1s",
        "--name",
        "oomadj",
        "--image",
        TINY,
        "--",
        "sleep",
        "30",
    ]);
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, || {
            std::fs::write("/proc/self/oom_score_adj", "300")
        });
    }
    let (id, _, monitor, init) = started(&cw.store(), c);
    let adj = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(adj(init), "300", "the run gets cw's own score");
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    if cap_eff & (1 << 24) != 0 {
        // CAP_SYS_RESOURCE
        assert_eq!(adj(monitor), "-999");
    } else {
        eprintln!("no CAP_SYS_RESOURCE here: the monitor's -999 is not checked");
        assert_eq!(adj(monitor), "300");
    }
    cw.ok(&["kill", &id]);
    let t = Instant::now();
    while !cw.run(&["rm", &id]).status.success() {
        assert!(t.elapsed() < Duration::from_secs(15), "the run did not end");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_no_leftovers(&cw);
}

#[test]
fn the_run_dies_with_its_monitor() {
    let Some(cw) = runner() else { return };
    // for root (capabilities kept) and for another user (uid change, capabilities dropped)
    for user in ["0:0", "1000:1000"] {
        let (id, rd, monitor, init) = started(
            &cw.store(),
            cw.cmd(&[
                "run", "-d", "--user", user, "--image", TINY, "--", "sleep", "60",
            ]),
        );
        let alive = |pid: i32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| {
                    let state = s.rsplit(')').next().unwrap_or("").trim_start();
                    !state.starts_with('Z') && !state.starts_with('X')
                })
                .unwrap_or(false)
        };
        assert!(alive(init), "the run's init {init} is not running");
        kill_monitor(&rd, monitor);
        let t = Instant::now();
        while alive(init) {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "user {user}: the run's init {init} outlived its monitor"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // whoever looks next finds it lost and cleans up: `cw kill`, or any run that starts
        if user == "0:0" {
            cw.ok(&["kill", &id]);
        } else {
            let (rc, _, err) = run_out(&cw, &["run", "--image", TINY, "true"]);
            assert_eq!(rc, 0, "{err}");
            assert!(err.contains("its monitor had died"), "{err}");
        }
        assert!(rd.cleaned(), "the lost run was not cleaned up");
        assert_eq!(
            rd.exit().map(|e| e.reason),
            Some(cw_runtime::rundir::Reason::Lost)
        );
        cw.ok(&["rm", &id]);
    }
    assert_no_leftovers(&cw);
}

/// libcontainer freezes a run's cgroup to signal all its processes; an error in between left it
/// frozen (seen in CI: the run never ended, and the next run of that name started frozen and
/// hung in its create). The monitor thaws after each kill and before each create.
#[test]
fn a_cgroup_left_frozen_does_not_hold_the_next_run() {
    let Some(cw) = runner() else { return };
    let name = format!("frozen{}", rand_suffix());
    let fz = Path::new("/sys/fs/cgroup/freezer/cw").join(&name);
    if !Path::new("/sys/fs/cgroup/freezer").is_dir() {
        eprintln!("SKIP: no cgroup v1 freezer here (a cgroup v2 host)");
        return;
    }
    std::fs::create_dir_all(&fz).unwrap();
    std::fs::write(fz.join("freezer.state"), "FROZEN").unwrap();
    let mut c = cw.cmd(&["run", "--name", &name, "--image", TINY, "echo", "not-held"]);
    c.stdout(std::process::Stdio::piped());
    let mut ch = c.spawn().unwrap();
    let t0 = Instant::now();
    while ch.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = std::fs::write(fz.join("freezer.state"), "THAWED");
            let _ = ch.wait();
            panic!("the run was held by a frozen cgroup of its name");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = ch.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "not-held\n");
    assert!(!fz.exists(), "the run's freezer cgroup was left");
}

/// `cw run -d` comes back once the container has started, as `docker run -d` does: its limits
/// are in place and `cw exec` can reach it (it once printed the id as soon as the monitor was
/// spawned, and a reader of the run's cgroup raced libcontainer's writes). A run that cannot
/// start makes `cw run -d` fail with its error and exit code, and stays for `cw ps`.
/// CVE-2019-5736: the process that creates the container (the monitor, whose clone becomes the
/// container's init) runs from a sealed copy of cw-monitor, the small binary beside cw: root on
/// the host, or a container that reaches /proc/<pid>/exe, cannot write the binary through it.
#[test]
fn the_monitor_runs_from_a_sealed_copy_of_cw_monitor() {
    let Some(cw) = runner() else { return };
    let monitor_bin = common::cw_bin().with_file_name(cw_runtime::launch::MONITOR_EXE);
    assert!(
        monitor_bin.is_file(),
        "{} is not built (cargo build --workspace builds it)",
        monitor_bin.display()
    );
    let id = cw
        .ok(&["run", "-d", "--image", TINY, "sleep", "30"])
        .trim()
        .to_string();
    let rd = cw_runtime::rundir::RunDir::new(cw.store().join("runs").join(&id));
    let pid = rd.monitor_pid().expect("the run's monitor pid");
    let argv0 = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv0 = String::from_utf8_lossy(argv0.split(|b| *b == 0).next().unwrap()).into_owned();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let write = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/exe"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"\x7fELF"));
    cw.ok(&["rm", "-f", &id]);
    assert_eq!(
        argv0,
        monitor_bin.to_string_lossy(),
        "the monitor was not started from cw-monitor"
    );
    assert!(
        exe.to_string_lossy().starts_with("/memfd:"),
        "the monitor runs from {}, not a sealed memfd",
        exe.display()
    );
    assert!(
        write.is_err(),
        "root wrote the running monitor's binary through /proc/{pid}/exe"
    );
}

#[test]
fn a_detached_run_returns_once_started_or_with_its_error() {
    let Some(cw) = runner() else { return };
    for _ in 0..5 {
        let id = cw
            .ok(&[
                "run", "-d", "--memory", "64m", "--image", TINY, "sleep", "30",
            ])
            .trim()
            .to_string();
        let rd = cw_runtime::rundir::RunDir::new(cw.store().join("runs").join(&id));
        assert!(
            rd.state().and_then(|s| s.pid).is_some(),
            "cw run -d returned before its container started"
        );
        let (v, _) = run_cgroup_file(&id, "memory", "memory.limit_in_bytes", "memory.max");
        assert_eq!(v, (64u64 << 20).to_string());
        cw.ok(&["rm", "-f", &id]);
    }
    let src = cw.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let o = cw.run(&[
        "run",
        "-d",
        "--name",
        "nostart",
        "-v",
        &format!("{}:/proc/foo", src.display()),
        "--image",
        TINY,
        "true",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{e}");
    assert!(
        e.contains("/proc/foo") && e.contains("failed to mount"),
        "{e}"
    );
    assert!(
        o.stdout.is_empty(),
        "printed an id for a run that did not start"
    );
    let ps = cw.ok(&["ps"]);
    assert!(
        ps.lines()
            .any(|l| l.starts_with("nostart") && l.contains("failed")),
        "{ps}"
    );
    cw.ok(&["rm", "nostart"]);
}

/// Run names are unique per store, the cgroup `/cw/<name>` per node: two stores (two workers'
/// work dirs, two admins' scratch stores) can start runs of one name. The second must not join
/// the first's cgroup (one limit and one account for both), and its failure must not tear the
/// first's down (its removal of "its" cgroup killed what the cgroup held).
#[test]
fn a_run_named_like_one_from_another_store_is_refused_and_leaves_it_running() {
    let Some(a) = runner() else { return };
    let Some(b) = runner() else { return };
    let name = format!("shared{}", rand_suffix());
    a.ok(&["run", "-d", "--name", &name, "--image", TINY, "sleep", "30"]);
    let o = b.run(&["run", "--name", &name, "--image", TINY, "true"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{e}");
    assert!(
        e.contains("already holds processes") && e.contains(&name),
        "{e}"
    );
    let ps = a.ok(&["ps"]);
    assert!(
        ps.lines()
            .any(|l| l.starts_with(&name) && l.contains("running")),
        "the first store's run was disturbed:\n{ps}"
    );
    a.ok(&["rm", "-f", &name]);
    assert_no_leftovers(&a);
    assert_no_leftovers(&b);
}

/// `cw run` in the foreground returns at the run's end, with its exit code and output, and its
/// monitor tears the run down after (unmount, cgroups, the run's directory): a run that leaves
/// 30,000 files in its rootfs is still being removed when `cw run` is back. What comes next
/// waits for that teardown instead of tripping over it: a run of the same name, `cw rm` of a
/// kept run, `cw rmi` of the image. A monitor killed in the middle of it leaves the rest to the
/// next cw, which finishes it and removes the directory.
#[test]
fn cw_run_returns_at_the_runs_end_and_the_teardown_follows() {
    let Some(cw) = runner() else { return };
    let files = "mkdir /d && cd /d && seq 30000 | xargs touch && echo made";
    let slow = |name: &str, keep: bool| {
        let mut args = vec!["run", "--name", name];
        if keep {
            args.push("--keep");
        }
        args.extend(["--image", TINY, "sh", "-c", files]);
        // cw.cmd, not cw.run: that one waits for the teardown
        let o = cw.cmd(&args).output().unwrap();
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&o.stdout), "made\n");
        cw_runtime::rundir::RunDir::new(cw.store().join("runs").join(name))
    };
    let rd = slow("slow", false);
    assert!(
        rd.tearing_down(),
        "cw run returned after the teardown (or it was never started): {}",
        rd.path.display()
    );
    // the same name again: waits for the teardown, then runs
    cw.ok(&["run", "--name", "slow", "--image", TINY, "true"]);
    assert!(!rd.path.exists());
    // a kept run: stays, and cw rm right after its cw run waits for its monitor's teardown
    let rd = slow("kept", true);
    assert!(rd.tearing_down());
    cw.ok(&["rm", "kept"]);
    assert!(!rd.path.exists());
    // rmi right after: the image's layers are released before it looks
    let rd = slow("last", false);
    assert!(rd.tearing_down());
    cw.ok(&["rmi", TINY]);
    assert!(!rd.path.exists());
    assert_no_leftovers(&cw);
    cw.ok(&["pull", "-q", TINY]);
    // the monitor killed during its teardown: the next cw run finishes it
    let rd = slow("cut", false);
    let monitor = rd.monitor_pid().expect("the monitor tearing the run down");
    kill_monitor(&rd, monitor);
    assert!(
        rd.path.exists(),
        "the teardown ended before the monitor was killed"
    );
    cw.ok(&["run", "--image", TINY, "true"]);
    assert!(!rd.path.exists(), "the cut teardown was not finished");
    assert_no_leftovers(&cw);
}

/// A run's overlay is mounted `volatile`: its unmount at the run's end does not sync the
/// filesystem that holds the store (every dirty page of every user of that disk; 380 ms with
/// 800 MB written beside it here, `bench/teardown.sh`), and the run's writes still land in its
/// own upper dir, which goes with the run.
#[test]
fn a_runs_overlay_is_volatile() {
    let Some(cw) = runner() else { return };
    let out = cw.ok(&[
        "run",
        "--image",
        TINY,
        "grep ' / / ' /proc/self/mountinfo; echo new > /etc/new && cat /etc/new",
    ]);
    let line = out.lines().next().unwrap_or_default();
    assert!(
        line.contains(" - overlay overlay ") && line.contains("volatile"),
        "{out}"
    );
    assert!(out.ends_with("new\n"), "{out}");
    assert_no_leftovers(&cw);
}
