//! cw under a real Slurm (root): a one-node Slurm 22.05 with proctrack/cgroup and task/cgroup on
//! 127.0.0.1 (tests/fixtures/slurm.sh, started here and stopped after). A run nested under its
//! job's cgroup with the README's `--cgroup-parent` is bounded by the job's memory limit;
//! `scancel` of an `sbatch` job mid-run leaves no process, mount or cgroup of the run; the
//! README's worker script as an `sbatch` job executes two `cl run`s from the local CodaLab server
//! and exits when idle, submitted by root and by an ordinary user (cw without root); and
//! CodaLab's own `cl-worker-manager` (slurm-batch) starts `cw worker` and
//! completes a `cl run`. Skips, saying why, without root or where Slurm cannot be started.

mod common;
use common::codalab::server;
use common::*;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const TINY: &str = "127.0.0.1:5000/tiny:amd64";

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/slurm.sh")
}

struct Slurm {
    conf: String,
}

impl Slurm {
    fn start() -> Option<Slurm> {
        let o = Command::new("bash")
            .arg(script())
            .arg("start")
            .output()
            .ok()?;
        if !o.status.success() {
            skip(&format!(
                "Slurm could not be started: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
            return None;
        }
        let env = Command::new("bash")
            .arg(script())
            .arg("env")
            .output()
            .ok()?;
        let conf = String::from_utf8_lossy(&env.stdout)
            .trim()
            .trim_start_matches("export SLURM_CONF=")
            .to_string();
        Some(Slurm { conf })
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.env("SLURM_CONF", &self.conf);
        c
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(script()).arg("stop").output();
    }
}

/// A job step's script: the README's --cgroup-parent (the step's memory cgroup), then cw run.
fn step_script(cw: &Cw, name: &str, cmd: &str) -> std::path::PathBuf {
    let p = cw.dir.path().join(format!("{name}.sh"));
    let body = format!(
        "#!/bin/sh\nP=$(awk -F: '$2 ~ /(^|,)memory(,|$)/ || $1 == 0 {{print $3; exit}}' /proc/self/cgroup)\nexec {} --store {} --config /dev/null run --name {name} --keep --cgroup-parent \"$P\" --image {TINY} {cmd}\n",
        cw_bin().display(),
        cw.store().display()
    );
    std::fs::write(&p, body).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn text(o: &Output) -> String {
    format!(
        "rc {:?}\n{}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn cgroup_dirs_named(name: &str) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![std::path::PathBuf::from("/sys/fs/cgroup")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                if e.file_name() == name {
                    out.push(e.path().display().to_string());
                }
                stack.push(e.path());
            }
        }
    }
    out
}

/// One Slurm for every step (its ports and state directory are fixed), in order.
#[test]
fn cw_under_a_real_slurm() {
    if !is_root() {
        skip("Slurm's daemons and cw's runs need root");
        return;
    }
    let cw = Cw::new();
    cw.ok(&["pull", "-q", TINY]);
    let Some(slurm) = Slurm::start() else { return };
    a_jobs_memory_limit_bounds_the_run_nested_in_it(&slurm, &cw);
    scancel_of_a_batch_job_stops_its_run_and_leaves_nothing(&slurm, &cw);
    the_readme_worker_job_runs_two_cl_runs_and_exits_when_idle(&slurm, None);
    // the same job submitted by an ordinary user: cw without root (user namespaces, no cgroup
    // of the runs' own on this v1 host: their memory sampled)
    the_readme_worker_job_runs_two_cl_runs_and_exits_when_idle(&slurm, Some(JOB_UID));
    codalabs_worker_manager_starts_cw_worker_through_slurm(&slurm);
    drop(slurm);
}

fn a_jobs_memory_limit_bounds_the_run_nested_in_it(slurm: &Slurm, cw: &Cw) {
    // the job's memory limit bounds the run nested under it: 1.5 GB of anonymous memory in a
    // job of 1 GB is killed, in a job of 3 GB it is not (the debug cw-monitor's sealed copy of
    // itself, ~180 MB, is charged to the job too)
    let eat = "'head -c 1500m /dev/zero | tail >/dev/null'";
    let small = step_script(cw, "small", eat);
    let o = slurm
        .cmd("srun")
        .args(["--mem=1000M", small.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(cw.ok(&["ps"]).contains("small"), "{}", text(&o));
    let big = step_script(cw, "big", eat);
    let o = slurm
        .cmd("srun")
        .args(["--mem=3000M", big.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let ps = cw.ok(&["ps"]);
    assert!(ps.contains("exited (0)"), "{ps}");
    assert!(ps.contains("exited (137)") || ps.contains("lost"), "{ps}");
    cw.ok(&["rm", "small", "big"]);
}

fn scancel_of_a_batch_job_stops_its_run_and_leaves_nothing(slurm: &Slurm, cw: &Cw) {
    // sbatch, then scancel mid-run: the run stops cleanly and nothing of it is left
    let job = step_script(cw, "batch1", "sleep 300");
    let o = slurm
        .cmd("sbatch")
        .args(["--parsable", "--mem=1000M", "-o", "/dev/null"])
        .arg(&job)
        .output()
        .unwrap();
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(!id.is_empty(), "{}", text(&o));
    let t0 = Instant::now();
    while !cw.ok(&["ps"]).contains("running") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the job's run never started"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // "running" is a live monitor; its container's cgroup comes a moment later
    let mut before = cgroup_dirs_named("batch1");
    while before.is_empty() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
        before = cgroup_dirs_named("batch1");
    }
    assert!(
        before.iter().any(|d| d.contains(&format!("job_{id}/"))),
        "the run is not nested in job {id}'s cgroup: {before:?}"
    );
    let o = slurm.cmd("scancel").arg(&id).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let t0 = Instant::now();
    loop {
        let q = slurm
            .cmd("squeue")
            .args(["-h", "-j", &id])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&q.stdout).trim().is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "job {id} did not end"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    let ps = cw.ok(&["ps"]);
    assert!(
        ps.contains("killed"),
        "scancel did not stop the run cleanly: {ps}"
    );
    assert!(
        cgroup_dirs_named("batch1").is_empty(),
        "{:?}",
        cgroup_dirs_named("batch1")
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let store = cw.store().display().to_string();
    assert!(!mounts.contains(&store), "mounts left under {store}");
    // the container's own process (its command line exactly; cw's client names it too)
    let t0 = Instant::now();
    while let Some(pid) = pid_of("sleep 300") {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the run's process {pid} outlived the job: {}",
            describe_pid(pid)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    cw.ok(&["rm", "batch1"]);
}

/// A worker's own files: its store and work dir, CodaLab's password file (mode 600), and a bin
/// dir where `cw` and `cl-worker` are this build's cw (what an admin links), first on PATH.
struct WorkerFiles {
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
    password: std::path::PathBuf,
}

impl WorkerFiles {
    fn new(name: &str) -> WorkerFiles {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/test-stores")
            .join(format!("slurm-{name}-{}", rand_suffix()));
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        for n in ["cw", "cl-worker"] {
            std::os::unix::fs::symlink(cw_bin(), bin.join(n)).unwrap();
        }
        let password = dir.join("codalab-password");
        std::fs::write(&password, "codalab\ncodalab\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
        WorkerFiles { dir, bin, password }
    }

    /// What the job's environment must hold for the worker: PATH, the server, the password
    /// file, the store and work dir, and the local registry as docker.io's mirror.
    fn env(&self, server: &str) -> Vec<(String, String)> {
        vec![
            (
                "PATH".into(),
                format!(
                    "{}:{}",
                    self.bin.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            ),
            ("CODALAB_SERVER".into(), server.into()),
            (
                "CODALAB_PASSWORD_FILE".into(),
                self.password.display().to_string(),
            ),
            (
                "CW_STORE".into(),
                self.dir.join("store").display().to_string(),
            ),
            (
                "CW_WORK_DIR".into(),
                self.dir.join("work").display().to_string(),
            ),
            ("CW_REGISTRY_MIRROR".into(), format!("http://{REG}")),
        ]
    }

    /// Nothing of the worker's runs is mounted, and its store holds no run.
    fn assert_clean(&self) {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let d = self.dir.display().to_string();
        assert!(!mounts.contains(&d), "mounts left under {d}");
        let runs: Vec<_> = std::fs::read_dir(self.dir.join("store/runs"))
            .map(|r| r.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(runs.is_empty(), "runs left in the worker's store: {runs:?}");
    }
}

impl Drop for WorkerFiles {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `scontrol show job` of a finished job (Slurm keeps it MinJobAge, 300 s): its JobState.
fn job_state(slurm: &Slurm, id: &str) -> String {
    let o = slurm
        .cmd("scontrol")
        .args(["show", "job", "-o", id])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&o.stdout).to_string();
    s.split_whitespace()
        .find_map(|w| w.strip_prefix("JobState="))
        .unwrap_or("")
        .to_string()
}

/// Wait until squeue no longer lists job `id`.
fn wait_job_gone(slurm: &Slurm, id: &str, secs: u64, why: &dyn Fn() -> String) {
    let t0 = Instant::now();
    loop {
        let q = slurm.cmd("squeue").args(["-h", "-j", id]).output().unwrap();
        if String::from_utf8_lossy(&q.stdout).trim().is_empty() {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "job {id} still queued or running after {secs}s\n{}",
            why()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The pid of a process whose command line is exactly `cmdline` (space-separated), if any.
/// What a process is, for a failure: its status lines that tell whose and what state, and its
/// cgroups.
fn describe_pid(pid: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let keep: Vec<&str> = status
        .lines()
        .filter(|l| {
            ["State:", "PPid:", "NSpid:", "Uid:"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .collect();
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    format!("{}; cgroups:\n{cg}", keep.join("; "))
}

/// A container's process by its command line: in a pid namespace other than this test's (a
/// `sleep 300` of someone else's on the machine is not the run's).
fn pid_of(cmdline: &str) -> Option<i32> {
    let ours = std::fs::read_link("/proc/self/ns/pid").ok()?;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        if std::fs::read_link(e.path().join("ns/pid")).ok()? == ours {
            return None;
        }
        let c = std::fs::read(e.path().join("cmdline")).ok()?;
        let c = String::from_utf8_lossy(&c).replace('\0', " ");
        (c.trim_end() == cmdline).then_some(pid)
    })
}

/// scripts/slurm-worker.sbatch, the README's worker script (the README shows this file), as an
/// `sbatch` job against the local CodaLab server: it executes two `cl run`s, nested in the job's
/// cgroup, then leaves when idle, and the job ends COMPLETED with nothing of the runs left.
/// The ordinary user tests/fixtures/slurm.sh makes for jobs submitted without root.
const JOB_UID: u32 = 64131;

fn the_readme_worker_job_runs_two_cl_runs_and_exits_when_idle(slurm: &Slurm, user: Option<u32>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("scripts/slurm-worker.sbatch");
    let body = std::fs::read_to_string(&script).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        readme.contains(&body),
        "README.md must show scripts/slurm-worker.sbatch as it is"
    );
    let s = server();
    let tag = format!("slurm-{}", rand_suffix());
    let first = s.run(&tag, &[], "sleep 6.5; echo one");
    let second = s.run(&tag, &[], "echo two");
    let f = WorkerFiles::new("job");
    let out = f.dir.join("job.out");
    let mut sbatch = slurm.cmd("sbatch");
    if let Some(u) = user {
        // the user's own files: the worker's dir, its password file (0600), the job's output
        for p in [&f.dir, &f.bin, &f.password] {
            std::os::unix::fs::lchown(p, Some(u), Some(u)).unwrap();
        }
        // sbatch hands the job the submitter's environment: a user's own HOME, not the test's
        use std::os::unix::process::CommandExt;
        sbatch
            .uid(u)
            .gid(u)
            .current_dir(&f.dir)
            .env("HOME", &f.dir)
            .env("USER", "cwjobuser")
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_DATA_HOME");
    }
    let o = sbatch
        .args(["--parsable", "--mem=3000M", "--cpus-per-task=1"])
        .arg("-o")
        .arg(&out)
        .arg(&script)
        .args([
            "--ws-server",
            &s.ws,
            "--tag",
            &tag,
            "--tag-exclusive",
            "--verbose",
        ])
        .envs(f.env(&s.url))
        .env("CW_IDLE_SECONDS", "10")
        .output()
        .unwrap();
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(!id.is_empty(), "{}", text(&o));
    let log = || std::fs::read_to_string(&out).unwrap_or_default();
    s.wait_state(&first, &["running", "ready", "failed"], 180);
    // the run's process lives in the job's cgroup
    let t0 = Instant::now();
    let pid = loop {
        if let Some(p) = pid_of("sleep 6.5") {
            break p;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the first run's process never appeared\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    assert!(
        cg.contains(&format!("/job_{id}/")),
        "the run is not nested in job {id}'s cgroup:\n{cg}"
    );
    for (uuid, want) in [(&first, "one"), (&second, "two")] {
        assert_eq!(
            s.wait_state(uuid, &["ready", "failed"], 180),
            "ready",
            "{}",
            log()
        );
        assert_eq!(s.cat(&format!("{uuid}/stdout")), want);
        assert_eq!(s.meta(uuid, "remote"), format!("slurm-{id}"));
    }
    wait_job_gone(slurm, &id, 120, &log);
    assert_eq!(job_state(slurm, &id), "COMPLETED", "{}", log());
    assert!(log().contains("idle for 10s: exiting"), "{}", log());
    if user.is_some() {
        assert!(log().contains("running without root"), "{}", log());
    }
    f.assert_clean();
    let t0 = Instant::now();
    while !cgroup_dirs_named(&format!("job_{id}")).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "job {id}'s cgroups were not removed (a run's cgroup inside holds them): {:?}",
            cgroup_dirs_named(&format!("job_{id}"))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// CodaLab's own worker manager (`cl-worker-manager … slurm-batch`, codalab 1.7.5) sees a staged
/// bundle, writes its sbatch script and submits it; the job's `srun cl-worker …` starts cw
/// (linked as cl-worker on PATH), which executes the bundle and leaves when idle.
fn codalabs_worker_manager_starts_cw_worker_through_slurm(slurm: &Slurm) {
    let s = server();
    let mgr = Path::new(&s.cl).with_file_name("cl-worker-manager");
    assert!(mgr.exists(), "{} (codalab 1.7.5) is missing", mgr.display());
    let tag = format!("mgr-{}", rand_suffix());
    let uuid = s.run(&tag, &[], "echo managed");
    let f = WorkerFiles::new("manager");
    let mlog = f.dir.join("manager.log");
    let log_file = std::fs::File::create(&mlog).unwrap();
    let mut child = Command::new(&mgr)
        .args([
            "--server",
            &s.url,
            "--min-workers",
            "0",
            "--max-workers",
            "1",
        ])
        .args(["--sleep-time", "2", "--min-seconds-between-workers", "0"])
        .args(["--worker-idle-seconds", "10", "--worker-tag", &tag])
        .arg("--worker-tag-exclusive")
        .arg("--worker-work-dir-prefix")
        .arg(f.dir.join("work"))
        .args([
            "slurm-batch",
            "--partition",
            "debug",
            "--nodelist",
            "localhost",
        ])
        .args([
            "--cpus",
            "1",
            "--gpus",
            "0",
            "--memory-mb",
            "3000",
            "--user",
            "root",
        ])
        .arg("--password-file")
        .arg(&f.password)
        .arg("--slurm-work-dir")
        .arg(f.dir.join("slurm"))
        .envs(s.env.iter().cloned())
        .envs(f.env(&s.url))
        .env("SLURM_CONF", &slurm.conf)
        .current_dir(&f.dir)
        .stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("starting cl-worker-manager");
    let logs = || {
        let mut t = std::fs::read_to_string(&mlog).unwrap_or_default();
        // the manager's job scripts and their output: <slurm-work-dir>/<worker id>/<id>.{slurm,out}
        let jobs = std::fs::read_dir(f.dir.join("slurm"))
            .into_iter()
            .flatten()
            .flatten();
        for e in jobs.flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten()) {
            if e.path()
                .extension()
                .is_some_and(|x| x == "out" || x == "slurm")
            {
                t += &format!(
                    "\n--- {}\n{}",
                    e.path().display(),
                    std::fs::read_to_string(e.path()).unwrap_or_default()
                );
            }
        }
        t
    };
    let state = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        s.wait_state(&uuid, &["ready", "failed"], 240)
    }));
    let _ = child.kill();
    let _ = child.wait();
    let state = state.unwrap_or_else(|_| panic!("the managed bundle did not end\n{}", logs()));
    assert_eq!(state, "ready", "{}", logs());
    assert_eq!(s.cat(&format!("{uuid}/stdout")), "managed");
    let text = logs();
    assert!(
        text.contains("Submitted batch job") || text.contains("Executed command: sbatch"),
        "{text}"
    );
    // the manager's job ran cw, not Python's cl-worker
    assert!(
        text.contains("Worker started!") && text.contains(" at http://127.0.0.1"),
        "{text}"
    );
    let remote = s.meta(&uuid, "remote");
    assert!(
        text.contains(&remote),
        "worker {remote} is not the manager's:\n{text}"
    );
    // the worker leaves when idle and its job ends
    let t0 = Instant::now();
    loop {
        let q = slurm
            .cmd("squeue")
            .args(["-h", "-o", "%A %j"])
            .output()
            .unwrap();
        let q = String::from_utf8_lossy(&q.stdout).to_string();
        if !q.contains("codalab-slurm-worker") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the manager's worker job did not end when idle: {q}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    f.assert_clean();
}
