//! `cw pull` and `cw run` by an ordinary user (no root, nothing setuid of cw's): a user
//! namespace with a single-id mapping (the user is root inside and the only id), or, for a user
//! with subordinate ids in /etc/subuid and /etc/subgid, one holding those too (the image's
//! owners kept); the user's own store, no cgroup on this cgroup v1 host. The test runs as root and drops to a uid with no
//! privileges for every cw command; what it checks from outside it checks as root.

mod common;
use common::*;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Output;

const TINY: &str = "127.0.0.1:5000/tiny:amd64";
/// A uid and gid no file on this machine belongs to.
const USER: u32 = 64_123;

/// A cw whose store and home belong to [`USER`], with the tiny image pulled by that user.
fn user_cw() -> Option<Cw> {
    if !is_root() {
        skip("the rootless tests start as root to become an ordinary user");
        return None;
    }
    let cw = Cw::new();
    chown(cw.dir.path());
    let o = as_user_cw(&cw, &["pull", "-q", TINY]);
    assert!(o.status.success(), "the user's pull: {}", text(&o));
    Some(cw)
}

fn chown(p: &Path) {
    std::os::unix::fs::chown(p, Some(USER), Some(USER)).unwrap();
}

fn as_user_cw(cw: &Cw, args: &[&str]) -> Output {
    as_uid_cw(cw, USER, args)
}

fn as_uid_cw(cw: &Cw, uid: u32, args: &[&str]) -> Output {
    let mut c = cw.cmd(args);
    c.uid(uid)
        .gid(uid)
        .env("HOME", cw.dir.path())
        .env_remove("XDG_DATA_HOME");
    let o = c.output().unwrap();
    // what the test checks after a run, it checks after its monitor's teardown
    if args.first() == Some(&"run") {
        cw.settle();
    }
    o
}

/// No run of `cw`'s store is left, and nothing of it is mounted on the host.
fn assert_nothing_left(cw: &Cw) {
    assert!(cw.entries("runs").is_empty(), "{:?}", cw.entries("runs"));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&cw.store().display().to_string()));
}

/// `args` run as the user: it must exit with `code`; its stdout.
fn user_out(cw: &Cw, args: &[&str], code: i32) -> String {
    let o = as_user_cw(cw, args);
    assert_eq!(o.status.code(), Some(code), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn an_ordinary_user_runs_a_container_as_root_of_its_own_user_namespace() {
    let Some(cw) = user_cw() else { return };
    // the store is the user's: its layers too (unpacked without chown)
    let layers = cw.store().join("layers");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&layers).unwrap().uid(), USER);

    let out = user_out(
        &cw,
        &[
            "run",
            "--image",
            TINY,
            "id -u; id -g; cat /proc/self/uid_map; echo hi > /tmp/x && cat /tmp/x; hostname; exit 7",
        ],
        7,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "0", "{out}");
    assert_eq!(lines[1], "0", "{out}");
    let map: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(map, ["0", &USER.to_string(), "1"], "{out}");
    assert_eq!(lines[3], "hi");
    // the host's network: its interfaces; none: only lo
    let ifaces = |s: &str| -> Vec<String> {
        s.lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(|n| n.trim().to_string())
            .collect()
    };
    let o = as_user_cw(
        &cw,
        &[
            "run",
            "--network",
            "host",
            "--image",
            TINY,
            "cat /proc/net/dev",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let host = std::fs::read_to_string("/proc/net/dev").unwrap();
    assert_eq!(ifaces(&String::from_utf8_lossy(&o.stdout)), ifaces(&host));
    let o = as_user_cw(
        &cw,
        &[
            "run",
            "--network",
            "none",
            "--image",
            TINY,
            "cat /proc/net/dev",
        ],
    );
    assert_eq!(
        ifaces(&String::from_utf8_lossy(&o.stdout)),
        ["lo"],
        "{}",
        text(&o)
    );
    // private: pasta, started from outside the run's user namespace, gives it an interface,
    // an address and a default route; the host's loopback services stay out of reach
    let probe = "echo | nc -w 2 127.0.0.1 5000 >/dev/null 2>&1 && echo reach || echo noreach; grep -c : /proc/net/dev; ip -4 addr | grep -c 'inet ' ; ip route | grep -c default";
    let o = as_user_cw(
        &cw,
        &["run", "--network", "private", "--image", TINY, probe],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["noreach", "2", "2", "1"],
        "{}",
        text(&o)
    );
    // and is gone with the run
    assert_no_process_names(&cw.store());
    // the run is gone, its directory with it, nothing mounted
    assert_nothing_left(&cw);
}

#[test]
fn a_user_namespace_gives_no_more_than_the_user_had() {
    let Some(cw) = user_cw() else { return };
    // a host directory of root's, bound read-write: the run's "root" is the user, so the
    // kernel refuses the write (its capabilities reach only what its namespace owns)
    let roots = tempfile::tempdir_in(cw.dir.path()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(roots.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(roots.path().join("f"), "root's\n").unwrap();
    let mine = cw.dir.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    chown(&mine);
    let vol_root = format!("{}:/r", roots.path().display());
    let vol_mine = format!("{}:/m", mine.display());
    let o = as_user_cw(
        &cw,
        &[
            "run",
            "-v",
            &vol_root,
            "-v",
            &vol_mine,
            "--image",
            TINY,
            "echo x > /r/f; echo r=$?; echo mine > /m/new; echo m=$?; mknod /tmp/mem c 1 1; echo n=$?; grep -c . /m/new",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("r=1") || out.contains("r=2"), "{}", text(&o));
    assert!(out.contains("m=0"), "{}", text(&o));
    // no device nodes: mknod is denied in a user namespace
    assert!(!out.contains("n=0"), "{}", text(&o));
    assert_eq!(
        std::fs::read_to_string(roots.path().join("f")).unwrap(),
        "root's\n"
    );
    // what the run wrote is the user's on the host
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(mine.join("new")).unwrap();
    assert_eq!((m.uid(), m.gid()), (USER, USER));
    // the same limits as a root run: no new privileges, seccomp filtering, masked paths
    let o = as_user_cw(
        &cw,
        &[
            "run",
            "--image",
            TINY,
            "grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status; echo keys=$(wc -c < /proc/keys)",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("NoNewPrivs:\t1"), "{}", text(&o));
    assert!(out.contains("Seccomp:\t2"), "{}", text(&o));
    // /proc/keys lists the host's keyrings: masked (read as /dev/null), as for root's runs
    assert!(out.contains("keys=0"), "{}", text(&o));
}

/// A layout the user may not read (umoci writes index.json 0600): `cw load` names the file and
/// the reason, not "neither a docker save archive nor an OCI layout".
#[test]
fn an_unreadable_layout_fails_its_load_by_name() {
    let Some(cw) = user_cw() else { return };
    let layout = fixtures_root().join("work/oci-tiny");
    if !layout.join("index.json").exists() {
        skip("no fixture layout");
        return;
    }
    let copy = tempfile::tempdir().unwrap();
    let o = std::process::Command::new("cp")
        .arg("-a")
        .arg(layout.join("."))
        .arg(copy.path())
        .output()
        .unwrap();
    assert!(o.status.success());
    // all of it readable (umoci writes its files 0600), then index.json root's alone again
    let o = std::process::Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(copy.path())
        .output()
        .unwrap();
    assert!(o.status.success());
    use std::os::unix::fs::PermissionsExt;
    let idx = copy.path().join("index.json");
    std::fs::set_permissions(&idx, std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = as_user_cw(&cw, &["load", "-i", copy.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(125), "{}", text(&o));
    let want = format!("{}: cannot open: Permission denied", idx.display());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&want),
        "{}",
        text(&o)
    );
    // readable, it loads
    std::fs::set_permissions(&idx, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = as_user_cw(&cw, &["load", "-i", copy.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_limit_without_a_cgroup_fails_with_the_reason() {
    let Some(cw) = user_cw() else { return };
    if cw_runtime::cgroup::version() != cw_runtime::cgroup::Version::V1 {
        // on v2 the user may own a delegated subtree; tests/cgroup_v2.rs covers that
        return;
    }
    let o = as_user_cw(&cw, &["run", "--memory", "64m", "--image", TINY, "true"]);
    assert_eq!(o.status.code(), Some(125), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--memory")
            && err.contains("needs a cgroup")
            && err.contains("--allow-no-cgroup"),
        "{}",
        text(&o)
    );
    // without limits the same run works
    let o = as_user_cw(&cw, &["run", "--image", TINY, "true"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// The exit record of a kept run, read as the user reads it.
fn user_stats(cw: &Cw, name: &str) -> serde_json::Value {
    let o = as_user_cw(cw, &["stats", name]);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn without_a_cgroup_the_memory_limit_is_held_by_sampling_the_runs_processes() {
    let Some(cw) = user_cw() else { return };
    if cw_runtime::cgroup::version() != cw_runtime::cgroup::Version::V1 {
        return;
    }
    // dd holds its 100 MiB buffer while it waits on a pipe nobody reads
    let t = std::time::Instant::now();
    let o = as_user_cw(
        &cw,
        &[
            "run",
            "--allow-no-cgroup",
            "--memory",
            "64m",
            "--keep",
            "--name",
            "over",
            "--image",
            TINY,
            "dd if=/dev/zero bs=100M count=1 | sleep 30",
        ],
    );
    let log = std::fs::read_to_string(cw.store().join("runs/over/monitor.log")).unwrap_or_default();
    assert_eq!(
        o.status.code(),
        Some(137),
        "{}\nmonitor.log:\n{log}",
        text(&o)
    );
    assert!(t.elapsed().as_secs() < 15, "{:?}", t.elapsed());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("more than its memory limit of 67.1 MB (it has no cgroup"),
        "{}",
        text(&o)
    );
    let v = user_stats(&cw, "over");
    assert_eq!(v["status"], "memory limit", "{v}");
    assert_eq!(v["exit"]["oom_killed"], true, "{v}");
    assert!(
        v["usage"]["memory_peak"].as_u64().unwrap() > 64 << 20,
        "{v}"
    );

    // what the run's /dev/shm holds counts: its pages belong to no process
    let o = as_user_cw(
        &cw,
        &[
            "run",
            "--allow-no-cgroup",
            "--memory",
            "64m",
            "--shm-size",
            "256m",
            "--image",
            TINY,
            "head -c 100m /dev/zero > /dev/shm/x; sleep 30",
        ],
    );
    assert_eq!(o.status.code(), Some(137), "{}", text(&o));

    // under the limit: the run ends by itself, its peak and CPU time recorded
    let o = as_user_cw(
        &cw,
        &[
            "run", "--allow-no-cgroup", "--memory", "256m", "--cpus", "1", "--keep", "--name",
            "under", "--image", TINY,
            "dd if=/dev/zero bs=32M count=1 | sleep 2; i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v = user_stats(&cw, "under");
    let peak = v["usage"]["memory_peak"].as_u64().unwrap();
    assert!(peak > 30 << 20 && peak < 256 << 20, "{v}");
    assert!(
        v["usage"]["cpu_user_ns"].as_u64().unwrap() > 50_000_000,
        "{v}"
    );
    assert_eq!(v["exit"]["oom_killed"], false, "{v}");
    for n in ["over", "under"] {
        let o = as_user_cw(&cw, &["rm", n]);
        assert!(o.status.success(), "{}", text(&o));
    }
    // a live run: cw stats samples it as its monitor does
    let o = as_user_cw(
        &cw,
        &[
            "run",
            "-d",
            "--name",
            "live",
            "--stop-timeout",
            "1s",
            "--image",
            TINY,
            "dd if=/dev/zero bs=48M count=1 | sleep 60",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let t = std::time::Instant::now();
    loop {
        let v = user_stats(&cw, "live");
        let now = v["usage"]["memory_current"].as_u64().unwrap_or(0);
        if v["status"] == "running" && now > 40 << 20 {
            assert!(now < 200 << 20, "{v}");
            break;
        }
        assert!(t.elapsed().as_secs() < 20, "no sampled memory: {v}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let o = as_user_cw(&cw, &["rm", "-f", "live"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn the_images_config_applies_and_a_user_without_an_id_is_refused_by_name() {
    let Some(cw) = user_cw() else { return };
    const CONFIGURED: &str = "127.0.0.1:5000/tiny:config";
    let o = as_user_cw(&cw, &["pull", "-q", CONFIGURED]);
    assert!(o.status.success(), "{}", text(&o));
    // its USER is 65534: without subordinate ids there is no such id in the run
    let o = as_user_cw(&cw, &["run", "--image", CONFIGURED, "true"]);
    assert_eq!(o.status.code(), Some(125), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("65534:65534") && err.contains("without root"),
        "{}",
        text(&o)
    );
    // as root of the run: its workdir and env from the image, flags over them
    let o = as_user_cw(
        &cw,
        &[
            "run",
            "-u",
            "0:0",
            "--image",
            CONFIGURED,
            "pwd; echo $CW_IMAGE_ENV",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "/tmp\nfrom-image\n",
        "{}",
        text(&o)
    );
    let o = as_user_cw(
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
            "pwd; echo $CW_IMAGE_ENV",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "/etc\nflag\n",
        "{}",
        text(&o)
    );
}

#[test]
fn a_users_runs_are_killed_timed_out_listed_and_removed_by_that_user() {
    let Some(cw) = user_cw() else { return };
    let o = as_user_cw(
        &cw,
        &[
            "run",
            "-d",
            "--name",
            "r1",
            "--stop-timeout",
            "1s",
            "--image",
            TINY,
            "sh",
            "-c",
            "echo started; exec sleep 100",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    // its output, read by the user's cw logs (the line comes as the run starts)
    let t = std::time::Instant::now();
    loop {
        let o = as_user_cw(&cw, &["logs", "r1"]);
        if String::from_utf8_lossy(&o.stdout) == "started\n" {
            break;
        }
        assert!(t.elapsed().as_secs() < 20, "cw logs r1: {}", text(&o));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let ps = as_user_cw(&cw, &["ps"]);
    let ps = String::from_utf8_lossy(&ps.stdout).into_owned();
    assert!(
        ps.lines()
            .any(|l| l.starts_with("r1") && l.contains("running")),
        "{ps}"
    );
    // another process of the user's stops it
    let o = as_user_cw(&cw, &["kill", "r1"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = std::time::Instant::now();
    loop {
        let o = as_user_cw(&cw, &["stats", "r1"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if let Some(code) = v["exit"]["exit_code"].as_i64() {
            // sleep, pid 1 of the run, ignores SIGTERM: the SIGKILL after the grace ends it
            assert_eq!(
                (code, v["exit"]["reason"].as_str()),
                (137, Some("killed")),
                "{v}"
            );
            break;
        }
        assert!(t.elapsed().as_secs() < 20, "r1 did not end: {}", text(&o));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let o = as_user_cw(&cw, &["rm", "r1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(cw.entries("runs").is_empty(), "{:?}", cw.entries("runs"));

    // the time limit holds, and says so
    let t = std::time::Instant::now();
    let o = as_user_cw(
        &cw,
        &[
            "run",
            "--time-limit",
            "1s",
            "--stop-timeout",
            "1s",
            "--image",
            TINY,
            "sleep",
            "60",
        ],
    );
    assert_eq!(o.status.code(), Some(137), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("time limit"),
        "{}",
        text(&o)
    );
    assert!(t.elapsed().as_secs() < 20);
    assert!(cw.entries("runs").is_empty(), "{:?}", cw.entries("runs"));
}

#[test]
fn a_users_rootfs_is_an_overlay_mounted_in_the_runs_user_namespace_that_merges_as_roots() {
    let Some(cw) = user_cw() else { return };
    if !cw_runtime::overlay::unprivileged_supported() {
        skip("overlayfs in a user namespace needs Linux 5.11");
        return;
    }
    const EDGE: &str = "127.0.0.1:5000/edge:latest";
    let o = as_user_cw(&cw, &["pull", "-q", EDGE]);
    assert!(o.status.success(), "{}", text(&o));
    // the root is an overlay of the user's layers, mounted with userxattr and volatile (its
    // unmount syncs nothing); writes go to the run's upper dir
    let out = user_out(
        &cw,
        &[
            "run",
            "--image",
            TINY,
            "grep ' / / ' /proc/self/mountinfo; rm /bin/true && echo removed; echo new > /etc/new",
        ],
        0,
    );
    assert!(
        out.contains(" - overlay overlay ")
            && out.contains("userxattr")
            && out.contains("volatile")
            && out.contains(cw.store().join("layers").to_str().unwrap())
            && out.contains("removed"),
        "{}",
        text(&o)
    );
    // the layers are untouched: the next run has /bin/true and no /etc/new
    let o = as_user_cw(
        &cw,
        &[
            "run",
            "--image",
            TINY,
            "test -e /bin/true && test ! -e /etc/new",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // whiteouts, opaque dirs, hard links and odd modes of the edge image: what a root run of the
    // same image sees, name for name
    let check = "test -e /etc/motd && echo motd-present; test -d /usr/share/lintian && echo lintian-present; ls /usr/share/doc | tr '\\n' ' '; echo; find / -xdev | sort | md5sum; ls -ln /opt/edge | awk '{print $1, $5, $9, $10, $11}' | md5sum";
    let o = as_user_cw(&cw, &["run", "--image", EDGE, check]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let root = Cw::new();
    root.ok(&["pull", "-q", EDGE]);
    let want = root.ok(&["run", "--image", EDGE, check]);
    // modes (setuid bits too), sizes and names; owners differ by design: root inside is the
    // user, and the image's other ids have no id in a single-id namespace
    let names = |s: &str| s.lines().take(3).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(names(&String::from_utf8_lossy(&o.stdout)), names(&want));
    assert!(
        !want.contains("motd-present") && !want.contains("lintian-present"),
        "{want}"
    );
    // what the preparation reads through the layers before anything is mounted: a missing
    // working directory (made by the monitor), a missing command, the image's user
    let o = as_user_cw(&cw, &["run", "-w", "/new/dir", "--image", TINY, "pwd"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "/new/dir\n",
        "{}",
        text(&o)
    );
    let o = as_user_cw(&cw, &["run", "--image", TINY, "no-such-command"]);
    assert_eq!(o.status.code(), Some(127), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no-such-command: not found"),
        "{}",
        text(&o)
    );
    let o = as_user_cw(&cw, &["run", "-w", "/bin/sh", "--image", TINY, "pwd"]);
    assert_eq!(o.status.code(), Some(125), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("a file where it needs a directory"),
        "{}",
        text(&o)
    );
    // nothing left (the overlay lived in the monitor's namespace)
    assert_nothing_left(&cw);
}

#[test]
fn a_users_cgroup_whose_controllers_cannot_be_had_counts_as_none() {
    let Some(cw) = user_cw() else { return };
    // a hybrid host's cgroup2 (its controllers are v1's), as Ubuntu 20.04 delegates it to a
    // user's systemd: writable by the user, yet no memory or pids for a run's cgroup below it
    let unified = Path::new("/sys/fs/cgroup/unified");
    if !unified.join("cgroup.procs").exists() {
        eprintln!(
            "NOT APPLICABLE: this host has no hybrid cgroup2 mount at {}",
            unified.display()
        );
        return;
    }
    let top = unified.join(format!("cwtest-{}", rand_suffix()));
    let _gone = RemovedTree(top.clone());
    let shell = top.join("shell");
    std::fs::create_dir_all(&shell).unwrap();
    for e in ["", "shell"] {
        for f in [
            "",
            "cgroup.procs",
            "cgroup.subtree_control",
            "cgroup.threads",
        ] {
            let p = top.join(e).join(f);
            std::os::unix::fs::chown(&p, Some(USER), Some(USER)).unwrap();
        }
    }
    // cw started as the user from inside that cgroup (root moves the shell there first)
    let in_cgroup = |args: &[&str]| -> Output {
        let c = cw.cmd(args);
        let mut sh = std::process::Command::new("sh");
        sh.arg("-c")
            .arg("echo $$ > \"$0\" && u=$1 && shift && exec setpriv --reuid $u --regid $u --clear-groups \"$@\"")
            .arg(shell.join("cgroup.procs"))
            .arg(USER.to_string())
            .arg(c.get_program())
            .args(c.get_args())
            .env("HOME", cw.dir.path())
            .env_remove("XDG_DATA_HOME");
        for (k, v) in c.get_envs() {
            match v {
                Some(v) => sh.env(k, v),
                None => sh.env_remove(k),
            };
        }
        sh.output().unwrap()
    };
    let o = in_cgroup(&["run", "--image", TINY, "echo ok"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = in_cgroup(&["run", "--memory", "64m", "--image", TINY, "true"]);
    assert_eq!(o.status.code(), Some(125), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("needs a cgroup"),
        "{}",
        text(&o)
    );
    let o = in_cgroup(&[
        "run",
        "--allow-no-cgroup",
        "--memory",
        "64m",
        "--image",
        TINY,
        "dd if=/dev/zero bs=100M count=1 | sleep 30",
    ]);
    assert_eq!(o.status.code(), Some(137), "{}", text(&o));
}

/// A cgroup tree the test made, removed (deepest first) when the test ends, failed or not.
struct RemovedTree(PathBuf);

impl Drop for RemovedTree {
    fn drop(&mut self) {
        let mut dirs = vec![];
        let mut stack = vec![self.0.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
            dirs.push(d);
        }
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[test]
fn without_a_cgroup_the_process_limit_is_the_runs_rlimit_nproc() {
    let Some(cw) = user_cw() else { return };
    if !cw_runtime::userns::nproc_per_user_namespace() {
        eprintln!(
            "NOT APPLICABLE: before Linux 5.14 RLIMIT_NPROC counts every process of the user"
        );
        return;
    }
    // the default limit holds without a cgroup, and counts the run's processes only: this
    // user's own processes outside (the test's cw) do not use it up
    let o = as_user_cw(
        &cw,
        &[
            "run",
            "--image",
            TINY,
            "grep 'Max processes' /proc/self/limits",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let limits: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(limits[2..4], ["4096", "4096"], "{}", text(&o));
    // a fork bomb's worth of children stops at the asked limit
    let out = user_out(
        &cw,
        &[
            "run",
            "--allow-no-cgroup",
            "--pids-limit",
            "20",
            "--image",
            TINY,
            "i=0; while [ $i -lt 40 ]; do sleep 5 & i=$((i+1)); done 2>&1 | tail -1; true",
        ],
        0,
    );
    assert!(
        out.contains("can't fork") || out.contains("Resource temporarily unavailable"),
        "{}",
        text(&o)
    );
    // asked for without accepting a run without a cgroup: refused, as before
    let o = as_user_cw(&cw, &["run", "--pids-limit", "20", "--image", TINY, "true"]);
    assert_eq!(o.status.code(), Some(125), "{}", text(&o));
}

// ---- with subordinate ids (newuidmap/newgidmap, /etc/subuid and /etc/subgid)

/// A user with 4,000,000 subordinate ids from 10,000,000: enough for the edge image's uid
/// 3,000,000.
const SUBUSER: u32 = 64_128;
const SUBSTART: u32 = 10_000_000;
/// A user with the usual 65,536.
const SMALLUSER: u32 = 64_129;
const SMALLSTART: u32 = 14_000_000;
const EDGE: &str = "127.0.0.1:5000/edge:latest";

/// A cw whose store and home belong to `uid`, who has `count` subordinate ids from `start`;
/// None (skipped) without newuidmap.
fn subid_cw(uid: u32, start: u32, count: u32) -> Option<Cw> {
    if !is_root() {
        skip("the rootless tests start as root to become an ordinary user");
        return None;
    }
    if !Path::new("/usr/bin/newuidmap").exists() {
        skip("newuidmap (package uidmap) is not installed");
        return None;
    }
    subid_user(uid, start, count);
    let cw = Cw::new();
    std::os::unix::fs::chown(cw.dir.path(), Some(uid), Some(uid)).unwrap();
    Some(cw)
}

fn out_of(o: &Output, code: i32) -> String {
    assert_eq!(o.status.code(), Some(code), "{}", text(o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The edge image's owners and modes, as `ls -lnR` shows them (owners included).
const TREE: &str = "ls -lnR /opt/edge | awk 'NF > 2 {print $1, $3, $4, $5, $9}'";

#[test]
fn a_user_with_subordinate_ids_keeps_the_images_owners_and_runs_its_users() {
    let Some(cw) = subid_cw(SUBUSER, SUBSTART, 4_000_000) else {
        return;
    };
    let o = as_uid_cw(&cw, SUBUSER, &["--log", "info", "pull", "-q", EDGE]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{}", text(&o));
    // the mapping chosen is said at --log info
    assert!(
        err.contains("ids 1-4000000 are your subordinate uids 10000000-13999999"),
        "{err}"
    );
    // on the host, the layers' files belong to the subordinate ids the image's owners map to:
    // 0 is the user, n > 0 is start + n - 1
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::BTreeSet::new();
    for l in cw.entries("layers") {
        let d = cw.store().join("layers").join(&l).join("opt/edge/owned");
        for (f, want) in [
            ("by-1000", SUBSTART + 999),
            ("by-nobody", SUBSTART + 65533),
            ("by-3000000", SUBSTART + 2_999_999),
        ] {
            if let Ok(m) = std::fs::symlink_metadata(d.join(f)) {
                assert_eq!((m.uid(), m.gid()), (want, want), "{f}");
                seen.insert(f);
            }
        }
        if let Ok(m) = std::fs::symlink_metadata(d) {
            assert_eq!(m.uid(), SUBSTART + 999);
            let top = std::fs::symlink_metadata(cw.store().join("layers").join(&l)).unwrap();
            assert_eq!(top.uid(), SUBUSER, "a layer's own dir is the user's");
        }
    }
    assert_eq!(seen.len(), 3, "{seen:?}");

    // inside, the tree is what a root run of the same image shows: owners, setuid modes, sizes
    let root = Cw::new();
    root.ok(&["pull", "-q", EDGE]);
    let want = root.ok(&["run", "--image", EDGE, TREE]);
    assert!(want.contains(" 3000000 3000000 "), "{want}");
    let got = out_of(&as_uid_cw(&cw, SUBUSER, &["run", "--image", EDGE, TREE]), 0);
    assert_eq!(got, want);
    // the same from a copy of the layers (root of the namespace may read the image's mode-000
    // files, which stop a single-id user's copy)
    let got = out_of(
        &as_uid_cw(
            &cw,
            SUBUSER,
            &["run", "--no-overlay", "--image", EDGE, TREE],
        ),
        0,
    );
    assert_eq!(got, want);

    // the image's users run as themselves; what they write in the run is theirs; root of the
    // run is still the user outside and holds no capability over the host
    let o = as_uid_cw(
        &cw,
        SUBUSER,
        &[
            "run",
            "-u",
            "1000:1000",
            "--image",
            EDGE,
            "id -u; id -g; touch /tmp/f; stat -c '%u %g' /tmp/f; cat /opt/edge/owned/by-1000; echo x > /opt/edge/regular.txt; echo w=$?",
        ],
    );
    let out = out_of(&o, 0);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["1000", "1000", "1000 1000", "uid/gid 1000", "w=1"],
        "{}",
        text(&o)
    );
    let out = out_of(
        &as_uid_cw(
            &cw,
            SUBUSER,
            &[
                "run",
                "--image",
                EDGE,
                "cat /proc/self/uid_map | tr -s ' ' | sed 's/^ //'; chown 4000001 /tmp; echo c=$?",
            ],
        ),
        0,
    );
    // the run's namespace nests in cw's with the same ids; beyond them nothing can be owned
    assert!(out.starts_with("0 0 1\n1 1 4000000\n"), "{out}");
    assert!(out.contains("c=1"), "{out}");

    // a detached run of an image user, stopped by the user; private network through pasta
    let o = as_uid_cw(
        &cw,
        SUBUSER,
        &[
            "run",
            "-d",
            "--name",
            "sub",
            "-u",
            "1000",
            "--image",
            EDGE,
            "sleep 300",
        ],
    );
    out_of(&o, 0);
    // cw exec joins it: as the image's user by default (the run's), as its root with -u 0
    let id = |args: &[&str]| {
        let mut a = vec!["exec"];
        a.extend_from_slice(args);
        a.extend_from_slice(&[
            "sub",
            "sh",
            "-c",
            "id -u; cat /proc/1/comm; stat -c %u /opt/edge/owned/by-1000",
        ]);
        out_of(&as_uid_cw(&cw, SUBUSER, &a), 0)
    };
    assert_eq!(id(&[]), "1000\nsleep\n1000\n");
    assert_eq!(id(&["-u", "0"]), "0\nsleep\n1000\n");
    out_of(&as_uid_cw(&cw, SUBUSER, &["kill", "sub"]), 0);
    let o = as_uid_cw(&cw, SUBUSER, &["rm", "-f", "sub"]);
    out_of(&o, 0);
    let probe = "ip -4 addr | grep -c 'inet '; ip route | grep -c default";
    let out = out_of(
        &as_uid_cw(
            &cw,
            SUBUSER,
            &[
                "run",
                "--network",
                "private",
                "-u",
                "1000",
                "--image",
                EDGE,
                probe,
            ],
        ),
        0,
    );
    assert_eq!(out, "2\n1\n");
    assert_nothing_left(&cw);
    // the user removes what belongs to their subordinate ids: the image and its layers
    out_of(&as_uid_cw(&cw, SUBUSER, &["rmi", EDGE]), 0);
    out_of(&as_uid_cw(&cw, SUBUSER, &["prune"]), 0);
    assert!(
        cw.entries("layers").is_empty(),
        "{:?}",
        cw.entries("layers")
    );
}

#[test]
fn an_image_owner_beyond_the_users_subordinate_ids_fails_its_pull_by_name() {
    let Some(cw) = subid_cw(SMALLUSER, SMALLSTART, 65_536) else {
        return;
    };
    // tiny: its owners are in range
    out_of(
        &as_uid_cw(&cw, SMALLUSER, &["pull", "-q", "127.0.0.1:5000/tiny:amd64"]),
        0,
    );
    let o = as_uid_cw(&cw, SMALLUSER, &["pull", "-q", EDGE]);
    assert_eq!(o.status.code(), Some(125), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        (err.contains("\"opt/edge/owned/by-3000000\"") || err.contains("\"opt/gnu/big-uid\""))
            && err.contains("owner 3000000:3000000 has no id in this user namespace")
            && err.contains("/etc/subuid"),
        "{err}"
    );
    // nothing of the failed layer is left behind for the user to remove
    assert!(cw.entries("tmp").is_empty(), "{:?}", cw.entries("tmp"));
    // an image user beyond the ids is refused by name
    let o = as_uid_cw(
        &cw,
        SMALLUSER,
        &[
            "run",
            "-u",
            "70000",
            "--image",
            "127.0.0.1:5000/tiny:amd64",
            "true",
        ],
    );
    assert_eq!(o.status.code(), Some(125), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("uids 0-65536"),
        "{}",
        text(&o)
    );
    // and a user without subordinate ids gets the single-id mapping, said at --log info with
    // the reason: nobody (a name, no range), and a uid without a name (newuidmap needs one)
    for (uid, why) in [
        (
            65_534,
            "no subordinate uids for nobody (getsubids nobody)".to_string(),
        ),
        (
            USER,
            format!("uid {USER} has no name in the user database, which newuidmap needs"),
        ),
    ] {
        let single = Cw::new();
        std::os::unix::fs::chown(single.dir.path(), Some(uid), Some(uid)).unwrap();
        let o = as_uid_cw(
            &single,
            uid,
            &["--log", "info", "pull", "-q", "127.0.0.1:5000/tiny:amd64"],
        );
        assert!(o.status.success(), "{}", text(&o));
        let want = format!("single-id mapping (the image's files and processes all belong to root inside, which is you): {why}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(&want),
            "{want}\n{}",
            text(&o)
        );
    }
}

/// The run suite's subset for a user with subordinate ids, the run's processes as the image's
/// users: the image's USER, workdir and env, the exit code, a bind mount, the sampled memory
/// limit and the time limit.
#[test]
fn a_user_with_subordinate_ids_runs_as_the_images_user_under_its_limits() {
    let Some(cw) = subid_cw(SMALLUSER, SMALLSTART, 65_536) else {
        return;
    };
    const CONFIGURED: &str = "127.0.0.1:5000/tiny:config";
    out_of(&as_uid_cw(&cw, SMALLUSER, &["pull", "-q", CONFIGURED]), 0);
    // its USER is 65534, its workdir /tmp; 65534 is in a 65,536-id range
    let o = as_uid_cw(
        &cw,
        SMALLUSER,
        &[
            "run",
            "--image",
            CONFIGURED,
            "id -u; id -g; pwd; echo $CW_IMAGE_ENV; exit 7",
        ],
    );
    assert_eq!(out_of(&o, 7), "65534\n65534\n/tmp\nfrom-image\n");
    // a bind mount: what the image's user writes there belongs on the host to the subordinate
    // id it maps to, what the run's root writes to the user
    let vol = tempfile::tempdir_in(cw.dir.path()).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::set_permissions(vol.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let v = format!("{}:/v", vol.path().display());
    let o = as_uid_cw(
        &cw,
        SMALLUSER,
        &[
            "run",
            "-v",
            &v,
            "--image",
            CONFIGURED,
            "echo a > /v/by-image-user",
        ],
    );
    out_of(&o, 0);
    let o = as_uid_cw(
        &cw,
        SMALLUSER,
        &[
            "run",
            "-u",
            "0",
            "-v",
            &v,
            "--image",
            CONFIGURED,
            "echo b > /v/by-root",
        ],
    );
    out_of(&o, 0);
    let owner = |f: &str| std::fs::metadata(vol.path().join(f)).unwrap().uid();
    assert_eq!(owner("by-image-user"), SMALLSTART + 65_533);
    assert_eq!(owner("by-root"), SMALLUSER);
    // the memory limit, sampled, holds for the image user's processes
    let o = as_uid_cw(
        &cw,
        SMALLUSER,
        &[
            "run",
            "--allow-no-cgroup",
            "--memory",
            "64m",
            "--image",
            CONFIGURED,
            "dd if=/dev/zero bs=100M count=1 | sleep 30",
        ],
    );
    assert_eq!(o.status.code(), Some(137), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("more than its memory limit"),
        "{}",
        text(&o)
    );
    // what cw exec starts in the run counts too: the run is stopped for it
    let o = as_uid_cw(
        &cw,
        SMALLUSER,
        &[
            "run",
            "-d",
            "--name",
            "m",
            "--allow-no-cgroup",
            "--memory",
            "64m",
            "--image",
            CONFIGURED,
            "sleep 60",
        ],
    );
    out_of(&o, 0);
    let o = as_uid_cw(
        &cw,
        SMALLUSER,
        &[
            "exec",
            "m",
            "sh",
            "-c",
            "dd if=/dev/zero bs=100M count=1 | sleep 30",
        ],
    );
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    // the exec's end may come a moment before the run's record
    let t = std::time::Instant::now();
    let v = loop {
        let o = as_uid_cw(&cw, SMALLUSER, &["stats", "m"]);
        let v: serde_json::Value = serde_json::from_str(&out_of(&o, 0)).unwrap();
        if !v["exit"].is_null() || t.elapsed().as_secs() > 15 {
            break v;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(v["exit"]["reason"], "memory_limit", "{v}");
    out_of(&as_uid_cw(&cw, SMALLUSER, &["rm", "m"]), 0);
    // the time limit
    let t = std::time::Instant::now();
    let o = as_uid_cw(
        &cw,
        SMALLUSER,
        &[
            "run",
            "--time-limit",
            "1s",
            "--stop-timeout",
            "1s",
            "--image",
            CONFIGURED,
            "sleep",
            "60",
        ],
    );
    assert_eq!(o.status.code(), Some(137), "{}", text(&o));
    assert!(t.elapsed().as_secs() < 20);
    assert_nothing_left(&cw);
}

/// Where the kernel mounts no overlayfs in a user namespace (before 5.11): fuse-overlayfs,
/// chosen here with `CW_USER_OVERLAY=fuse`. The run's root is its mount, merged as the kernel's
/// overlay merges the edge image; writes stay in the run; its process goes with the run.
#[test]
fn a_users_rootfs_through_fuse_overlayfs_merges_as_the_kernels() {
    let Some(cw) = user_cw() else { return };
    if cw_runtime::overlay::fuse_overlayfs_path().is_none() {
        skip("fuse-overlayfs is not installed");
        return;
    }
    let fuse = |args: &[&str]| {
        let mut c = cw.cmd(args);
        c.uid(USER)
            .gid(USER)
            .env("HOME", cw.dir.path())
            .env("CW_USER_OVERLAY", "fuse")
            .env_remove("XDG_DATA_HOME");
        c.output().unwrap()
    };
    const EDGE: &str = "127.0.0.1:5000/edge:latest";
    assert!(as_user_cw(&cw, &["pull", "-q", EDGE]).status.success());
    let o = fuse(&[
        "--log",
        "info",
        "run",
        "--image",
        TINY,
        "grep ' / / ' /proc/self/mountinfo; rm /bin/true && echo removed; echo new > /etc/new",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains(" - fuse.fuse-overlayfs ") && out.contains("removed"),
        "{}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("mounts its layers with fuse-overlayfs"),
        "{}",
        text(&o)
    );
    let o = fuse(&[
        "run",
        "--image",
        TINY,
        "test -e /bin/true && test ! -e /etc/new",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // the edge image's whiteouts, opaque dirs and names: what the kernel's overlay shows
    let check = "test -e /etc/motd && echo motd-present; test -d /usr/share/lintian && echo lintian-present; ls /usr/share/doc | tr '\\n' ' '; echo; find / -xdev | sort | md5sum";
    let want = user_out(&cw, &["run", "--image", EDGE, check], 0);
    let o = fuse(&["run", "--image", EDGE, check]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), want, "{}", text(&o));
    // a detached run: its fuse-overlayfs lives as long as it, and goes with it
    let o = fuse(&["run", "-d", "--name", "fz", "--image", TINY, "sleep 60"]);
    assert!(o.status.success(), "{}", text(&o));
    let store = cw.store();
    let running = std::process::Command::new("pgrep")
        .args(["-f", &format!("fuse-overlayfs .*{}", store.display())])
        .output()
        .unwrap();
    assert!(running.status.success(), "no fuse-overlayfs for the run");
    let o = fuse(&["rm", "-f", "fz"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_no_process_names(&store);
    assert_nothing_left(&cw);
}

/// `find`'s view of a tree: every path with its mode, owner, size and mtime.
fn snapshot(p: &Path) -> String {
    let o = std::process::Command::new("find")
        .arg(p)
        .args(["-printf", "%p %m %u:%g %s %T@\n"])
        .output()
        .unwrap();
    let mut l: Vec<&str> = std::str::from_utf8(&o.stdout).unwrap().lines().collect();
    l.sort();
    l.join("\n")
}

/// A user's cw keeps to the user's own store: by default `~/.local/share/cw`, closed to others;
/// root's, named with `--store`, is refused by the kernel (closed to others, 0700), the error
/// names it, and it is left exactly as it was, by a user with subordinate ids too (root of
/// their namespace has no power over files of the host's root).
#[test]
fn a_users_store_is_its_own_and_roots_is_never_touched() {
    let Some(sub) = subid_cw(SMALLUSER, SMALLSTART, 65_536) else {
        return;
    };
    let root = Cw::new();
    root.ok(&["pull", "-q", TINY]);
    // the store's parent open to all: what stops the user is the store's own mode
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::set_permissions(root.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    root.settle_store();
    let before = snapshot(&root.store());
    let store = root.store().display().to_string();
    for uid in [USER, SMALLUSER] {
        for args in [
            &["images"][..],
            &["pull", "-q", TINY],
            &["run", "--image", TINY, "true"],
            &["rmi", TINY],
            &["prune", "--max-size", "1k"],
        ] {
            let o = std::process::Command::new(cw_bin())
                .args(["--store", &store, "--config", "/dev/null"])
                .args(args)
                .uid(uid)
                .gid(uid)
                .env("HOME", sub.dir.path())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success(), "{uid} {args:?}: {}", text(&o));
            assert!(
                err.contains(&store) && err.contains("ermission denied"),
                "{uid} {args:?}: {}",
                text(&o)
            );
        }
    }
    assert_eq!(snapshot(&root.store()), before, "root's store changed");
    // without --store: the user's own, under $HOME, closed to others
    let o = std::process::Command::new(cw_bin())
        .args(["--config", "/dev/null", "pull", "-q", TINY])
        .uid(SMALLUSER)
        .gid(SMALLUSER)
        .env("HOME", sub.dir.path())
        .env_remove("XDG_DATA_HOME")
        .env_remove("CW_STORE")
        .output()
        .unwrap();
    out_of(&o, 0);
    let own = sub.dir.path().join(".local/share/cw");
    let m = std::fs::metadata(&own).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777), (SMALLUSER, 0o700));
    assert!(std::fs::read_dir(own.join("images")).unwrap().count() > 0);
}
