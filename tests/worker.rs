//! `cw worker` end to end against the real CodaLab server (PyPI codalab 1.7.5 + MariaDB on
//! 127.0.0.1, started by tests/fixtures/codalab/server.sh) and the real `cl` client. Images come
//! from the local registry acting as the docker.io mirror. Each test has its own worker(s) on a
//! tag of its own (`--tag-exclusive`), so tests run side by side on one server.
//! Bundle states are read from the server's database (each `cl` call costs seconds of imports).

mod common;

use common::codalab::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Worker {
    child: Option<Child>,
    dir: PathBuf,
    id: String,
    tag: String,
    extra: Vec<String>,
    /// RLIMIT_NOFILE for the worker (as systemd's 1024), if set.
    nofile: Option<u64>,
    /// The uid (and gid) of an ordinary user the worker runs as, if not root.
    user: Option<u32>,
}

impl Worker {
    fn start(tag: &str, extra: &[&str]) -> Worker {
        Worker::start_as(tag, tag, extra)
    }

    fn start_as(tag: &str, name: &str, extra: &[&str]) -> Worker {
        Worker::start_with(tag, name, extra, None, None)
    }

    /// A worker started with at most `nofile` open files.
    fn start_limited(tag: &str, extra: &[&str], nofile: u64) -> Worker {
        Worker::start_with(tag, tag, extra, Some(nofile), None)
    }

    fn start_with(
        tag: &str,
        name: &str,
        extra: &[&str],
        nofile: Option<u64>,
        user: Option<u32>,
    ) -> Worker {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-stores");
        std::fs::create_dir_all(&base).unwrap();
        let dir = base.join(format!("worker-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(u) = user {
            std::os::unix::fs::chown(&dir, Some(u), Some(u)).unwrap();
        }
        let mut w = Worker {
            child: None,
            dir,
            id: format!("w-{name}"),
            tag: tag.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            nofile,
            user,
        };
        w.spawn();
        w
    }

    /// A worker run by the ordinary user `uid` (no privileges), its work dir and store that
    /// user's.
    fn start_as_user(tag: &str, uid: u32) -> Worker {
        Worker::start_with(tag, tag, &[], None, Some(uid))
    }

    /// SIGTERM, and the worker must be gone within `secs`.
    fn terminate_within(&mut self, secs: u64) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let t = Instant::now();
        while c.try_wait().unwrap().is_none() {
            if t.elapsed() > Duration::from_secs(secs) {
                let _ = c.kill();
                let _ = c.wait();
                panic!("the worker ignored SIGTERM for {secs}s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn spawn(&mut self) {
        let s = server();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("worker.log"))
            .unwrap();
        let mut c = Command::new(cw_bin());
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            unsafe {
                c.pre_exec(move || {
                    let l = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        if let Some(u) = self.user {
            use std::os::unix::process::CommandExt;
            c.uid(u).gid(u).env("HOME", &self.dir);
        }
        c.args(["--store", self.dir.join("store").to_str().unwrap()])
            .args(["--registry-mirror", &format!("http://{REG}")])
            .arg("worker");
        if !self.extra.iter().any(|a| a == "--server") {
            c.args(["--server", &s.url, "--ws-server", &s.ws]);
        }
        c.args(["--work-dir", self.dir.join("work").to_str().unwrap()])
            .args([
                "--id",
                &self.id,
                "--tag",
                &self.tag,
                "--tag-exclusive",
                "--verbose",
            ])
            .args(&self.extra)
            .env("CODALAB_USERNAME", "codalab")
            .env("CODALAB_PASSWORD", "codalab")
            .stdout(Stdio::null())
            .stderr(log);
        let before = self.log().matches("Worker started!").count();
        self.child = Some(c.spawn().expect("starting cw worker"));
        // ready once it has logged "Worker started!" (the log is appended to across restarts)
        let t = Instant::now();
        while self.log().matches("Worker started!").count() <= before {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "worker did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("worker.log")).unwrap_or_default()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// After the bundles ended: no run directory, bundle directory or mount of this worker left.
    fn assert_clean(&self) {
        let t = Instant::now();
        loop {
            let runs: Vec<_> = std::fs::read_dir(self.dir.join("store/runs"))
                .map(|r| r.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            let bundles: Vec<_> = std::fs::read_dir(self.dir.join("work/runs"))
                .map(|r| r.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            let trash: Vec<_> = std::fs::read_dir(self.dir.join("work/trash"))
                .map(|r| r.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            let ours = mounts
                .lines()
                .filter(|l| l.contains(self.dir.to_str().unwrap()))
                .count();
            if runs.is_empty() && bundles.is_empty() && trash.is_empty() && ours == 0 {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "left behind: runs {runs:?}, bundle dirs {bundles:?}, trash {trash:?}, {ours} mounts\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        // a worker that stops leaves its runs going (by design): a failed test must not
        let store = self.dir.join("store");
        for e in std::fs::read_dir(store.join("runs"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = Command::new(cw_bin())
                .args(["--store", store.to_str().unwrap(), "rm", "-f"])
                .arg(e.file_name())
                .output();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn tag(name: &str) -> String {
    format!("{name}-{}", rand_suffix())
}

fn need_root() -> bool {
    if !is_root() {
        skip("cw worker tests need root (containers, mounts, cgroups)");
        return false;
    }
    true
}

#[test]
fn run_ready_and_failed() {
    if !need_root() {
        return;
    }
    let s = server();
    let t = tag("basic");
    let w = Worker::start(&t, &[]);
    // cl runs ask for network by default: with pasta the run has its own namespace, so the
    // server's database on the host's loopback is out of its reach
    let ok = s.run(&t, &[], "echo hi; echo err >&2; echo $HOME $CODALAB; pwd; mkdir out; echo 42 > out/answer; echo | nc -w 2 127.0.0.1 13306 >/dev/null 2>&1 && echo db-reachable || echo db-unreachable");
    let bad = s.run(&t, &[], "echo before; exit 3");
    assert_eq!(
        s.wait_state(&ok, &["ready", "failed"], 120),
        "ready",
        "{}",
        w.log()
    );
    let isolated = cw_runtime::monitor::pasta_path().is_some();
    assert_eq!(
        s.cat(&format!("{ok}/stdout")),
        format!(
            "hi\n/{ok} true\n/{ok}\ndb-{}",
            if isolated { "unreachable" } else { "reachable" }
        )
    );
    assert_eq!(s.cat(&format!("{ok}/stderr")), "err");
    assert_eq!(s.cat(&format!("{ok}/out/answer")), "42");
    assert_eq!(s.meta(&ok, "remote"), w.id);
    assert!(
        s.meta(&ok, "docker_image")
            .starts_with("codalab/ubuntu@sha256:"),
        "{}",
        s.meta(&ok, "docker_image")
    );
    let msg = s.wait_failure(&bad, "failed", 120, &|| w.log());
    assert_eq!(msg, "Exit code 3");
    assert_eq!(s.meta(&bad, "exitcode"), "3");
    assert_eq!(s.cat(&format!("{bad}/stdout")), "before");
    w.assert_clean();
}

#[test]
fn an_ordinary_users_worker_runs_bundles_and_holds_their_memory_limit() {
    if !need_root() {
        return;
    }
    // a uid with no privileges and no file on this machine: the worker and its runs have only
    // what that user has (no cgroup here, on cgroup v1: the memory limit is sampled)
    users_worker(
        64_124,
        "user",
        "root is this user (64124:64124) and the only id",
    );
}

/// The same for a user with subordinate ids: the worker runs inside the user namespace that
/// holds them, and each bundle's nests in it.
#[test]
fn a_worker_of_a_user_with_subordinate_ids_runs_bundles_in_a_namespace_nested_in_its_own() {
    if !need_root() {
        return;
    }
    if !Path::new("/usr/bin/newuidmap").exists() {
        skip("newuidmap (package uidmap) is not installed");
        return;
    }
    subid_user(64_132, 15_000_000, 65_536);
    users_worker(
        64_132,
        "subuser",
        "root is this user, and ids 1-65536 its subordinate ids",
    );
}

fn users_worker(user: u32, tag_name: &str, said: &str) {
    let s = server();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("hello.txt"), "hello dep\n").unwrap();
    let dep = s.cl(&["upload", src.path().join("hello.txt").to_str().unwrap()]);
    let t = tag(tag_name);
    let w = Worker::start_as_user(&t, user);
    assert!(w.log().contains("running without root"), "{}", w.log());
    assert!(w.log().contains(said), "{}", w.log());
    let h = format!("h.txt:{dep}");
    // cl runs ask for network by default: pasta's, from outside the run's user namespace
    let ok = s.run(
        &t,
        &[&h],
        "cat h.txt; id -u; touch h.txt 2>/dev/null && echo writable || echo read-only; ip route | grep -c default; echo | nc -w 2 127.0.0.1 13306 >/dev/null 2>&1 && echo db-reachable || echo db-unreachable; echo 42 > answer",
    );
    let mem = s.run(
        &t,
        &["--request-memory", "50m"],
        "echo m; x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo survived ${#x}",
    );
    assert_eq!(
        s.wait_state(&ok, &["ready", "failed"], 120),
        "ready",
        "{}",
        w.log()
    );
    assert_eq!(
        s.cat(&format!("{ok}/stdout")),
        "hello dep\n0\nread-only\n1\ndb-unreachable"
    );
    assert_eq!(s.cat(&format!("{ok}/answer")), "42");
    assert_eq!(
        s.wait_failure(&mem, "failed", 120, &|| w.log()),
        "Memory limit 50m exceeded."
    );
    assert_eq!(s.cat(&format!("{mem}/stdout")), "m");
    // what the runs made is the user's, and nothing of theirs is left
    use std::os::unix::fs::MetadataExt;
    let store = std::fs::metadata(w.dir.join("store")).unwrap();
    assert_eq!((store.uid(), store.mode() & 0o777), (user, 0o700));
    w.assert_clean();
}

#[test]
fn dependencies_file_and_directory() {
    if !need_root() {
        return;
    }
    let s = server();
    let t = tag("deps");
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("hello.txt"), "hello dep\n").unwrap();
    let d = src.path().join("dir");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    std::fs::write(d.join("sub/b.txt"), "deep\n").unwrap();
    std::fs::write(d.join(".wh.not-a-whiteout"), "plain file\n").unwrap();
    let f = s.cl(&["upload", src.path().join("hello.txt").to_str().unwrap()]);
    let dd = s.cl(&["upload", d.to_str().unwrap()]);
    let w = Worker::start(&t, &[]);
    let mut args = vec![
        "run",
        "--request-queue",
        &t,
        "--request-docker-image",
        "codalab/ubuntu:1.9",
    ];
    let (a1, a2, a3) = (
        format!("h.txt:{f}"),
        format!("d:{dd}"),
        format!("nested/deep:{dd}/sub"),
    );
    args.extend([a1.as_str(), a2.as_str(), a3.as_str()]);
    args.push("cat h.txt d/sub/b.txt nested/deep/b.txt d/.wh.not-a-whiteout; touch d/x 2>/dev/null && echo writable || echo read-only; echo out > result");
    let uuid = s.cl(&args);
    assert_eq!(
        s.wait_state(&uuid, &["ready", "failed"], 120),
        "ready",
        "{}",
        w.log()
    );
    assert_eq!(
        s.cat(&format!("{uuid}/stdout")),
        "hello dep\ndeep\ndeep\nplain file\nread-only"
    );
    // dependencies are not part of the results
    let listing = s.cat(&uuid);
    assert!(
        listing.contains("result") && !listing.contains("h.txt"),
        "{listing}"
    );
    // the cache holds one copy per (parent, path) and reports them in checkins
    let cache: Vec<String> = std::fs::read_dir(w.dir.join("work/dependencies"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(cache.len(), 3, "{cache:?}");
    let deps = s.sql(&format!(
        "select dependencies from worker_dependency where worker_id='{}'",
        w.id
    ));
    assert!(deps.contains(&f) && deps.contains(&dd), "{deps}");
    w.assert_clean();
}

#[test]
fn kill_write_cat_while_running() {
    if !need_root() {
        return;
    }
    let s = server();
    let t = tag("kill");
    let w = Worker::start(&t, &[]);
    let waiter = s.run(&t, &[], "printf 'l1\\nl2\\nl3\\nl4\\nl5\\n' > multi; mkdir sub; echo deep > sub/f; echo started; while [ ! -f go ]; do sleep 0.2; done; cat go; echo; echo done");
    let victim = s.run(&t, &[], "echo victim; sleep 86400");
    s.wait_state(&waiter, &["running"], 120);
    s.wait_state(&victim, &["running"], 120);
    // read a running bundle: file contents and the directory listing
    let t0 = Instant::now();
    loop {
        let o = s.cl_output(&["cat", &format!("{waiter}/stdout")]);
        if String::from_utf8_lossy(&o.stdout).contains("started") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "cl cat of a running bundle: {o:?}"
        );
    }
    let ls = s.cat(&waiter);
    assert!(ls.contains("stdout") && ls.contains("multi"), "{ls}");
    // summarize_file: head and tail with the server's truncation text between
    let summary = s.cl(&[
        "cat",
        "--head",
        "1",
        "--tail",
        "1",
        &format!("{waiter}/multi"),
    ]);
    assert!(
        summary.starts_with("l1\n") && summary.ends_with("l5") && !summary.contains("l3"),
        "{summary}"
    );
    // stream_directory: the whole running bundle as a tar.gz
    let dl = tempfile::tempdir().unwrap();
    let dest = dl.path().join("b");
    s.cl(&["download", &waiter, "-o", dest.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(dest.join("sub/f")).unwrap(),
        "deep\n"
    );
    assert!(dest.join("multi").exists());
    // read_file_section: a byte range of a running bundle's file, through the REST API
    let token = Command::new("curl")
        .args([
            "-s",
            "-u",
            "codalab_cli_client:",
            "-H",
            "X-Requested-With: XMLHttpRequest",
        ])
        .args([
            "-d",
            "grant_type=password&username=codalab&password=codalab",
        ])
        .arg(format!("{}/rest/oauth2/token", s.url))
        .output()
        .unwrap();
    let token: serde_json::Value = serde_json::from_slice(&token.stdout).unwrap();
    let range = Command::new("curl")
        .args([
            "-s",
            "-H",
            "X-Requested-With: XMLHttpRequest",
            "-H",
            "Range: bytes=3-7",
        ])
        .arg("-H")
        .arg(format!(
            "Authorization: Bearer {}",
            token["access_token"].as_str().unwrap()
        ))
        .arg(format!(
            "{}/rest/bundles/{waiter}/contents/blob/multi",
            s.url
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&range.stdout),
        "l2\nl3",
        "{range:?}"
    );
    // cl write lands in the running bundle
    s.cl(&["write", &format!("{waiter}/go"), "hello world"]);
    assert_eq!(
        s.wait_state(&waiter, &["ready", "failed"], 120),
        "ready",
        "{}",
        w.log()
    );
    assert_eq!(
        s.cat(&format!("{waiter}/stdout")),
        "started\nhello world\ndone"
    );
    // cl kill → killed, with the output up to then
    s.cl(&["kill", &victim]);
    let msg = s.wait_failure(&victim, "killed", 120, &|| w.log());
    assert_eq!(msg, "Kill requested");
    assert_eq!(s.cat(&format!("{victim}/stdout")), "victim");
    w.assert_clean();
}

#[test]
fn netcat_reaches_the_run() {
    if !need_root() {
        return;
    }
    let s = server();
    let t = tag("nc");
    let w = Worker::start(&t, &[]);
    let uuid = s.run(
        &t,
        &[],
        "echo pong-from-run | nc -l -p 5005 > got; cat got; echo; echo served",
    );
    s.wait_state(&uuid, &["running"], 120);
    let t0 = Instant::now();
    let reply = loop {
        let o = s.cl_output(&["netcat", &uuid, "5005", "ping-from-client"]);
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        if out.contains("pong-from-run") {
            break out;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "cl netcat: {o:?}\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(reply.contains("pong-from-run"), "{reply}");
    assert_eq!(s.wait_state(&uuid, &["ready", "failed"], 120), "ready");
    assert_eq!(s.cat(&format!("{uuid}/stdout")), "ping-from-client\nserved");
    w.assert_clean();
}

#[test]
fn limits_time_memory_disk() {
    if !need_root() {
        return;
    }
    let s = server();
    let t = tag("limits");
    let w = Worker::start(&t, &[]);
    let time = s.run(&t, &["--request-time", "3"], "echo t; sleep 600");
    let mem = s.run(
        &t,
        &["--request-memory", "50m"],
        "echo m; x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo survived ${#x}",
    );
    let msg = s.wait_failure(&time, "failed", 120, &|| w.log());
    assert!(
        msg.starts_with("Time limit exceeded. (Container uptime "),
        "{msg}"
    );
    assert!(msg.ends_with(" > time limit 3.0s)"), "{msg}");
    assert_eq!(
        s.wait_failure(&mem, "failed", 120, &|| w.log()),
        "Memory limit 50m exceeded."
    );
    assert_eq!(s.cat(&format!("{mem}/stdout")), "m");
    let disk = s.run(
        &t,
        &["--request-disk", "2m"],
        "echo d; head -c 5000000 /dev/zero > big; sleep 600",
    );
    assert_eq!(
        s.wait_failure(&disk, "failed", 120, &|| w.log()),
        "Disk limit 2mb exceeded."
    );
    // real cpu accounting reaches the server (the official worker always sends 0)
    let busy = s.run(
        &t,
        &[],
        "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; echo $i",
    );
    assert_eq!(s.wait_state(&busy, &["ready", "failed"], 120), "ready");
    let user: f64 = s.meta(&busy, "time_user").parse().unwrap();
    assert!(user > 0.2, "time_user {user}");
    w.assert_clean();
}

#[test]
fn two_workers_share_the_queue() {
    if !need_root() {
        return;
    }
    let s = server();
    let t = tag("pair");
    let a = Worker::start_as(&t, &format!("{t}-a"), &["--slots", "1"]);
    let b = Worker::start_as(&t, &format!("{t}-b"), &["--slots", "1"]);
    let uuids: Vec<String> = (0..3)
        .map(|i| s.run(&t, &[], &format!("sleep 3; echo run{i}")))
        .collect();
    let mut remotes = std::collections::BTreeSet::new();
    for (i, u) in uuids.iter().enumerate() {
        assert_eq!(
            s.wait_state(u, &["ready", "failed"], 180),
            "ready",
            "{}\n{}",
            a.log(),
            b.log()
        );
        assert_eq!(s.cat(&format!("{u}/stdout")), format!("run{i}"));
        remotes.insert(s.meta(u, "remote"));
    }
    assert_eq!(remotes.len(), 2, "both workers ran bundles: {remotes:?}");
    a.assert_clean();
    b.assert_clean();
}

#[test]
fn worker_sigkill_and_restart_keeps_the_run() {
    if !need_root() {
        return;
    }
    let s = server();
    let t = tag("restart");
    let mut w = Worker::start(&t, &[]);
    let uuid = s.run(
        &t,
        &[],
        "for i in 1 2 3 4 5 6 7 8; do echo line$i; sleep 1; done",
    );
    s.wait_state(&uuid, &["running"], 120);
    std::thread::sleep(Duration::from_secs(2));
    w.kill9();
    // the monitor keeps the container going while no worker exists; meanwhile another run on
    // the store loses its monitor (as when a Slurm job holding it was cancelled)
    let t0 = Instant::now();
    let store = w.dir.join("store");
    let cw = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cw"));
        c.args(["--store", store.to_str().unwrap()])
            .args(["--registry-mirror", &format!("http://{REG}")])
            .args(args);
        c
    };
    let (lost_id, lost, monitor, _) = started(
        &store,
        cw(&[
            "run",
            "-d",
            "--image",
            "codalab/ubuntu:1.9",
            "--",
            "sleep",
            "60",
        ]),
    );
    kill_monitor(&lost, monitor);
    std::thread::sleep(Duration::from_secs(4).saturating_sub(t0.elapsed()));
    w.spawn();
    assert_eq!(
        s.wait_state(&uuid, &["ready", "failed"], 120),
        "ready",
        "{}",
        w.log()
    );
    let want: String = (1..=8).map(|i| format!("line{i}\n")).collect();
    assert_eq!(s.cat(&format!("{uuid}/stdout")), want.trim());
    assert!(w.log().contains("resuming 1 run(s)"), "{}", w.log());
    // the restarted worker released the lost run's mounts and cgroups
    assert!(lost.cleaned(), "{}", w.log());
    assert!(w.log().contains("its monitor had died"), "{}", w.log());
    let o = cw(&["rm", &lost_id]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    w.assert_clean();
}

/// A TCP forwarder in front of the CodaLab server that can play dead (connections closed at
/// once) or answer chosen requests with 502. Each forwarded request carries `Connection: close`
/// so that every request of the worker passes through the decision here.
struct Gate {
    addr: String,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// (path part, how many more requests with it get a 502)
    faults: std::sync::Arc<std::sync::Mutex<Vec<(String, usize)>>>,
}

impl Gate {
    fn start(upstream: &str) -> Gate {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let faults = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, usize)>::new()));
        let (d, f, up) = (down.clone(), faults.clone(), upstream.to_string());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let (d, f, up) = (d.clone(), f.clone(), up.clone());
                std::thread::spawn(move || {
                    if d.load(std::sync::atomic::Ordering::SeqCst) {
                        return; // dropped: the server is "down"
                    }
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match c.read(&mut b) {
                            Ok(1) => head.push(b[0]),
                            _ => return,
                        }
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let path = text.split(' ').nth(1).unwrap_or("").to_string();
                    {
                        let mut f = f.lock().unwrap();
                        if let Some(e) = f
                            .iter_mut()
                            .find(|(p, n)| *n > 0 && path.contains(p.as_str()))
                        {
                            e.1 -= 1;
                            let _ = c.write_all(b"HTTP/1.1 502 Injected\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                            return;
                        }
                    }
                    let upgrade = text.to_ascii_lowercase().contains("\r\nupgrade:");
                    let mut fwd = String::new();
                    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
                        if !upgrade && line.to_ascii_lowercase().starts_with("connection:") {
                            continue;
                        }
                        fwd.push_str(line);
                        fwd.push_str("\r\n");
                    }
                    if !upgrade {
                        fwd.push_str("Connection: close\r\n");
                    }
                    fwd.push_str("\r\n");
                    let Ok(mut u) = std::net::TcpStream::connect(&up) else {
                        return;
                    };
                    if u.write_all(fwd.as_bytes()).is_err() {
                        return;
                    }
                    let (mut c2, mut u2) = (c.try_clone().unwrap(), u.try_clone().unwrap());
                    let t = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut c2, &mut u2);
                        let _ = u2.shutdown(std::net::Shutdown::Write);
                    });
                    let _ = std::io::copy(&mut u, &mut c);
                    let _ = c.shutdown(std::net::Shutdown::Both);
                    let _ = t.join();
                });
            }
        });
        Gate { addr, down, faults }
    }
    fn set_down(&self, v: bool) {
        self.down.store(v, std::sync::atomic::Ordering::SeqCst);
    }
    fn fail_next(&self, path_part: &str, n: usize) {
        self.faults.lock().unwrap().push((path_part.to_string(), n));
    }
}

fn worker_through(gate: &Gate, ws: &Gate, tag: &str, extra: &[&str]) -> Worker {
    let mut args = vec![
        "--server".to_string(),
        format!("http://{}", gate.addr),
        "--ws-server".to_string(),
        format!("ws://{}", ws.addr),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    Worker::start(tag, &refs)
}

#[test]
fn server_down_two_minutes_during_a_run() {
    if !need_root() {
        return;
    }
    let s = server();
    let rest = Gate::start(s.url.trim_start_matches("http://"));
    let ws = Gate::start(s.ws.trim_start_matches("ws://"));
    let t = tag("outage");
    let w = worker_through(&rest, &ws, &t, &[]);
    let uuid = s.run(&t, &[], "for i in $(seq 1 150); do echo $i; sleep 1; done");
    s.wait_state(&uuid, &["running"], 120);
    rest.set_down(true);
    ws.set_down(true);
    std::thread::sleep(Duration::from_secs(120));
    // the server gave the worker up meanwhile; the run itself went on
    assert_eq!(s.state(&uuid), "worker_offline");
    assert!(
        w.log()
            .contains("Disconnected from server! Failed check in"),
        "{}",
        w.log()
    );
    rest.set_down(false);
    ws.set_down(false);
    assert_eq!(
        s.wait_state(&uuid, &["ready", "failed", "killed"], 180),
        "ready",
        "{}",
        w.log()
    );
    let want: Vec<String> = (1..=150).map(|i| i.to_string()).collect();
    assert_eq!(s.cat(&format!("{uuid}/stdout")), want.join("\n"));
    w.assert_clean();
}

#[test]
fn dependency_download_fails_then_succeeds() {
    if !need_root() {
        return;
    }
    let s = server();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("data.txt"), "payload\n").unwrap();
    let dep = s.cl(&["upload", src.path().join("data.txt").to_str().unwrap()]);
    let rest = Gate::start(s.url.trim_start_matches("http://"));
    let ws = Gate::start(s.ws.trim_start_matches("ws://"));
    let t = tag("depretry");
    let w = worker_through(
        &rest,
        &ws,
        &t,
        &["--download-dependencies-max-retries", "3"],
    );
    // two failed attempts, the third one works
    rest.fail_next(&format!("/bundles/{dep}/contents/blob"), 2);
    let arg = format!("d.txt:{dep}");
    let ok = s.cl(&[
        "run",
        "--request-queue",
        &t,
        "--request-docker-image",
        "codalab/ubuntu:1.9",
        &arg,
        "cat d.txt",
    ]);
    assert_eq!(
        s.wait_state(&ok, &["ready", "failed"], 120),
        "ready",
        "{}",
        w.log()
    );
    assert_eq!(s.cat(&format!("{ok}/stdout")), "payload");
    // every attempt failing: the run fails with cl-worker's message
    let src2 = tempfile::tempdir().unwrap();
    std::fs::write(src2.path().join("other.txt"), "x\n").unwrap();
    let dep2 = s.cl(&["upload", src2.path().join("other.txt").to_str().unwrap()]);
    rest.fail_next(&format!("/bundles/{dep2}/contents/blob"), 100);
    let arg2 = format!("o.txt:{dep2}");
    let bad = s.cl(&[
        "run",
        "--request-queue",
        &t,
        "--request-docker-image",
        "codalab/ubuntu:1.9",
        &arg2,
        "cat o.txt",
    ]);
    let msg = s.wait_failure(&bad, "failed", 120, &|| w.log());
    assert!(
        msg.starts_with("Failed to download dependency o.txt: Dependency download failed:"),
        "{msg}"
    );
    assert!(msg.contains("502"), "{msg}");
    w.assert_clean();
}

/// Hostile images and bundles (issue 12) fail their own bundle with a message that names the
/// reason; the worker (at systemd's 1024 open files) keeps serving others and stops on SIGTERM.
#[test]
fn hostile_images_and_bundles_fail_alone_and_the_worker_keeps_serving() {
    if !need_root() {
        return;
    }
    let s = server();
    let v = rand_suffix();
    let d = tempfile::tempdir().unwrap();
    // a layer 15,000 directories deep whose diff id is wrong; an image whose /etc/passwd is a FIFO
    oci_layout(
        &d.path().join("deep"),
        "deep",
        &[chain_layer(15_000)],
        serde_json::json!({}),
        true,
    );
    push_layout(&d.path().join("deep"), "deep", &format!("hostile/deep:{v}"));
    oci_layout(
        &d.path().join("fifo"),
        "fifo",
        &[
            busybox_layer(),
            layer_tar(&[("etc/passwd", tar::EntryType::Fifo, "", b"", 0o644)]),
        ],
        serde_json::json!({}),
        false,
    );
    push_layout(&d.path().join("fifo"), "fifo", &format!("hostile/fifo:{v}"));
    let t = tag("hostile");
    let mut w = Worker::start_limited(&t, &[], 1024);
    let with_image = |image: &str| {
        s.cl(&[
            "run",
            "--request-queue",
            &t,
            "--request-docker-image",
            image,
            "echo never",
        ])
    };
    let deep = with_image(&format!("hostile/deep:{v}"));
    let fifo = with_image(&format!("hostile/fifo:{v}"));
    // 1,500 directories in the bundle (more than the worker's fds), 3 MB at the bottom; kept
    // out of the results, which CodaLab 1.7.5's server cannot take at that depth (its own
    // `cl upload` of such a tree fails with "Error while parsing chunked transfer body.")
    let chain = s.run(
        &t,
        &["--exclude-patterns", "chain", "--request-disk", "2m"],
        "p=d; i=1; while [ $i -lt 500 ]; do p=$p/d; i=$((i+1)); done; \
         mkdir chain && cd chain && for k in 1 2 3; do mkdir -p $p && cd -P $p || exit 1; done; \
         head -c 3000000 /dev/zero > big; sleep 600",
    );
    // 3 MB outside the bundle directory, in the container's own /tmp
    let tmp = s.run(
        &t,
        &["--request-disk", "2m"],
        "head -c 3000000 /dev/zero > /tmp/big; sleep 600",
    );
    let msg = s.wait_failure(&deep, "failed", 180, &|| w.log());
    assert!(msg.contains("deeper than 512 directories"), "{msg}");
    assert!(
        msg.len() < 1000,
        "an unreadable message: {} bytes",
        msg.len()
    );
    let msg = s.wait_failure(&fifo, "failed", 120, &|| w.log());
    assert!(
        msg.contains("/etc/passwd") && msg.contains("not a regular file"),
        "{msg}"
    );
    for b in [&chain, &tmp] {
        assert_eq!(
            s.wait_failure(b, "failed", 180, &|| w.log()),
            "Disk limit 2mb exceeded.",
            "bundle {b}"
        );
    }
    let ok = s.run(&t, &[], "echo fine");
    assert_eq!(
        s.wait_state(&ok, &["ready", "failed"], 120),
        "ready",
        "{}",
        w.log()
    );
    assert_eq!(s.cat(&format!("{ok}/stdout")), "fine");
    w.assert_clean();
    w.terminate_within(30);
}

/// CodaLab's own suite (module write) needs a short run to be `running` on the server while it
/// runs: `cl write`, `cl netcat` and `cl cat` are refused before. The server applies a checkin's
/// report when it arrives and then holds it 5 s, so the container's start must be reported by
/// the checkin that follows it, not one 5 s later.
#[test]
fn a_short_run_is_running_on_the_server_while_it_runs() {
    if !need_root() {
        return;
    }
    let s = server();
    let t = tag("prompt");
    let w = Worker::start(&t, &[]);
    // warm the image cache, as the suite's later runs are
    let warm = s.run(&t, &[], "true");
    assert_eq!(s.wait_state(&warm, &["ready", "failed"], 120), "ready");
    for _ in 0..3 {
        let uuid = s.run(&t, &[], "sleep 5");
        let t0 = Instant::now();
        let mut seen: Vec<String> = vec![];
        let mut when = vec![];
        loop {
            let st = s.state(&uuid);
            if seen.last() != Some(&st) {
                seen.push(st.clone());
                when.push(t0.elapsed());
            }
            if st == "ready" || st == "failed" {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "{seen:?}\n{}",
                w.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let running_at = seen.iter().position(|x| x == "running");
        assert!(
            running_at.is_some(),
            "never seen running: {seen:?}\n{}",
            w.log()
        );
        eprintln!("sleep 5: {seen:?} at {when:?}");
        // and usable while it runs: `cl write` reaches it (the run waits for the file, so the
        // client's own start-up time, seconds under load, does not matter)
        let uuid = s.run(
            &t,
            &[],
            "for i in $(seq 60); do [ -f msg ] && break; sleep 0.5; done; cat msg",
        );
        let t0 = Instant::now();
        while s.state(&uuid) != "running" {
            assert!(t0.elapsed() < Duration::from_secs(60), "{}", w.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        let started = t0.elapsed();
        s.cl(&["write", &format!("{uuid}/msg"), "hello"]);
        assert_eq!(s.wait_state(&uuid, &["ready", "failed"], 120), "ready");
        assert_eq!(
            s.cat(&format!("{uuid}/stdout")),
            "hello",
            "running after {started:?}"
        );
    }
    w.assert_clean();
}

/// A run whose bundle the server deleted while it ran never gets `mark_finalized`: the worker
/// asks the server after 30 s in FINALIZING, and drops it and its files on a 404 (before, it
/// reported it at every checkin for ever, across restarts).
#[test]
fn a_finalizing_run_whose_bundle_the_server_deleted_is_dropped() {
    if !need_root() {
        return;
    }
    let s = server();
    let t = tag("gone");
    let w = Worker::start(&t, &[]);
    let uuid = s.run(&t, &[], "sleep 15; echo done");
    s.wait_state(&uuid, &["running"], 60);
    // what the server does to a run over its user's quota (it fails it), then `cl rm`
    s.sql(&format!(
        "update bundle set state='failed' where uuid='{uuid}'"
    ));
    s.cl(&["rm", &uuid]);
    assert_eq!(s.state(&uuid), "", "the server still has {uuid}");
    let state = w.dir.join(format!("work/worker-state-{}.json", w.id));
    let t0 = Instant::now();
    loop {
        let st = std::fs::read_to_string(&state).unwrap_or_default();
        if !st.contains(&uuid[2..]) && !st.contains(&uuid) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the worker still holds {uuid}:\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        w.log().contains("the server no longer has it"),
        "{}",
        w.log()
    );
    w.assert_clean();
}

/// A dependency key that is an absolute path (`cl run /foo/bar:<dir>`, CodaLab's run module)
/// is where the dependency appears in the container, as with cl-worker; nothing is made on the
/// host at that path.
#[test]
fn absolute_dependency_keys_are_container_paths() {
    if !need_root() {
        return;
    }
    let s = server();
    let t = tag("absdeps");
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("f1"), "file one\n").unwrap();
    let d = src.path().join("dir");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("f2"), "in dir\n").unwrap();
    let f = s.cl(&["upload", src.path().join("f1").to_str().unwrap()]);
    let dd = s.cl(&["upload", d.to_str().unwrap()]);
    let w = Worker::start(&t, &[]);
    let (a1, a2) = (format!("/cw-abs/bar:{dd}"), format!("/cw-abs/bar2:{f}"));
    let uuid = s.cl(&[
        "run",
        "--request-queue",
        &t,
        "--request-docker-image",
        "codalab/ubuntu:1.9",
        &a1,
        &a2,
        "cat /cw-abs/bar2 /cw-abs/bar/f2; ls /cw-abs; touch /cw-abs/bar/x 2>/dev/null || echo read-only",
    ]);
    assert_eq!(
        s.wait_state(&uuid, &["ready", "failed"], 120),
        "ready",
        "{}\n{}",
        s.meta(&uuid, "failure_message"),
        w.log()
    );
    assert_eq!(
        s.cat(&format!("{uuid}/stdout")),
        "file one\nin dir\nbar\nbar2\nread-only"
    );
    assert!(!Path::new("/cw-abs").exists(), "made on the host");
    // the kernel's own trees cannot be covered
    let bad = s.cl(&[
        "run",
        "--request-queue",
        &t,
        "--request-docker-image",
        "codalab/ubuntu:1.9",
        &format!("/proc/x:{f}"),
        "true",
    ]);
    let msg = s.wait_failure(&bad, "failed", 120, &|| w.log());
    assert!(msg.contains("would cover the container's /proc"), "{msg}");
    w.assert_clean();
}

/// A bundle that keeps stopping the worker (before, a hostile image aborted it at every restart
/// with the same --id, and every later bundle stayed staged) is failed on the third unexpected
/// stop in one stage; the worker then serves the next bundle. A SIGKILL stands in for the abort.
#[test]
fn a_bundle_that_keeps_stopping_the_worker_is_failed_and_the_worker_goes_on() {
    if !need_root() {
        return;
    }
    let s = server();
    let t = tag("strikes");
    let mut w = Worker::start(&t, &[]);
    let uuid = s.run(&t, &[], "sleep 600");
    s.wait_state(&uuid, &["running"], 120);
    for _ in 0..3 {
        w.kill9();
        w.spawn();
    }
    let msg = s.wait_failure(&uuid, "failed", 120, &|| w.log());
    assert!(
        msg.contains("The worker stopped unexpectedly 3 times while this bundle was running"),
        "{msg}"
    );
    let ok = s.run(&t, &[], "echo next");
    assert_eq!(
        s.wait_state(&ok, &["ready", "failed"], 120),
        "ready",
        "{}",
        w.log()
    );
    assert_eq!(s.cat(&format!("{ok}/stdout")), "next");
    // one unexpected stop is a restart like any other: the run goes on
    let more = s.run(&t, &[], "sleep 4; echo survived");
    s.wait_state(&more, &["running"], 120);
    w.kill9();
    w.spawn();
    assert_eq!(
        s.wait_state(&more, &["ready", "failed"], 120),
        "ready",
        "{}",
        w.log()
    );
    assert_eq!(s.cat(&format!("{more}/stdout")), "survived");
    w.assert_clean();
}

/// A bundle's memory limit comes with as much swap again, as docker (so cl-worker) gives it:
/// on a host with swap, what passes under cl-worker is not killed under cw. Read back from the
/// run's own cgroup while it runs.
#[test]
fn a_bundle_gets_dockers_swap_allowance() {
    if !need_root() {
        return;
    }
    let s = server();
    let t = tag("swap");
    let w = Worker::start(&t, &[]);
    let uuid = s.run(&t, &["--request-memory", "50m"], "sleep 8");
    s.wait_state(&uuid, &["running"], 120);
    let (v, on_v2) = run_cgroup_file(
        &format!("codalab_run_{uuid}"),
        "memory",
        "memory.memsw.limit_in_bytes",
        "memory.swap.max",
    );
    let total: u64 = v.parse::<u64>().unwrap() + if on_v2 { 50 << 20 } else { 0 };
    assert_eq!(total, 100 << 20, "memory+swap of a 50m bundle: {v}");
    assert_eq!(
        s.wait_state(&uuid, &["ready", "failed"], 120),
        "ready",
        "{}",
        w.log()
    );
    w.assert_clean();
}
