//! A run's directory: the one place a run's state lives, written by the monitor and read by
//! any `cw` (`ps`, `kill`, `rm`, `stats`, `logs`, `attach`, `exec`) and the worker.
//!
//! Run directory:
//! ```text
//! request.json   what to run (written by the caller before the monitor starts)
//! monitor.pid    the monitor's pid and start time (so a recycled pid is not mistaken for it)
//! bundle/        the OCI bundle (config.json)
//! lc/            libcontainer's state
//! state.json     {"status":"running","pid":…,"started_at":…}
//! exit.json      the final status and accounting (the run is over when this exists)
//! cleaned        resources (cgroup, mounts, dirs) are released
//! monitor.log    libcontainer's and the monitor's log
//! creator        the preparing cw's pid (a run whose preparer died is abandoned)
//! cgroup-parents.json  parent cgroups the run's creation made (removed with it)
//! cgroup.host    a user's run below a delegated cgroup: its cgroup as the host names it
//! removing       its `cw run` took the exit record: the directory goes after the teardown
//! attach.sock    a -t run's terminal, while it runs (console.sock: libcontainer's, briefly)
//! exec-<pid>.json / .sock   a `cw exec`'s process and terminal socket, while it starts
//! meta.json, stdout, stderr, container.out/.err   cw's and the worker's records, the output
//! ```

use crate::cgroup::{self, Usage};
use crate::request::RunRequest;
use libcontainer::container::Container;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The parent cgroups the monitor's creating the run made (JSON list of paths), written before it
/// creates them, when there are any.
pub(crate) const PARENTS_FILE: &str = "cgroup-parents.json";

/// Made by the monitor once `cw run` has taken the exit record of a run it was asked to remove
/// ([`RunRequest::remove_when_done`]): the directory goes at the end of the teardown, by the
/// monitor or by whoever finishes a teardown cut short.
pub const REMOVING_FILE: &str = "removing";

/// A user's run below a delegated cgroup v2 subtree: its cgroup as the host names it (the
/// monitor binds the delegated cgroup on its own /sys/fs/cgroup), written before the container
/// is created, for whoever recovers the run.
pub(crate) const HOST_CGROUP_FILE: &str = "cgroup.host";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The command exited by itself (or by a signal it caused).
    Exited,
    /// Killed on request (`cw kill`, the worker, a signal to the monitor).
    Killed,
    /// Killed for running past its time limit.
    TimeLimit,
    /// Killed by the monitor for holding more than its memory limit: a run without a cgroup,
    /// whose memory is sampled (`crate::sample`); `oom_killed` is set too.
    MemoryLimit,
    /// The container could not be created or started.
    Failed,
    /// The monitor died; the run was found and cleaned up by another process.
    Lost,
}

/// What a foreground run's monitor tells `cw run` on its pipe ([`crate::request::RunRequest::exit_pipe`]),
/// a line each: the container's start (`started PID`), then its end (the exit record, as in
/// `exit.json`, on one line).
#[derive(Debug, Clone, PartialEq)]
pub enum RunEvent {
    Started(i32),
    Exited(ExitStatus),
}

impl RunEvent {
    /// The line for this event, newline included.
    pub fn line(&self) -> Vec<u8> {
        let mut l = match self {
            RunEvent::Started(pid) => format!("started {pid}").into_bytes(),
            RunEvent::Exited(ex) => serde_json::to_vec(ex).unwrap_or_default(),
        };
        l.push(b'\n');
        l
    }

    /// The event of a line, or None for one that is neither.
    pub fn parse(line: &str) -> Option<RunEvent> {
        let line = line.trim_end();
        match line.strip_prefix("started ") {
            Some(pid) => pid.parse().ok().filter(|p| *p > 0).map(RunEvent::Started),
            None => serde_json::from_str(line).ok().map(RunEvent::Exited),
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExitStatus {
    /// Shell convention: the exit code, or 128+signal.
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub reason: Reason,
    /// The kernel OOM-killed at least one process of the run (from the cgroup's counter), or
    /// the monitor killed a run without a cgroup over its memory limit.
    pub oom_killed: bool,
    pub usage: Usage,
    pub started_at: f64,
    pub finished_at: f64,
    pub error: Option<String>,
}

/// What a run is, read from its directory in one place: its exit record first, then a live
/// monitor, then how far its start got. Every verb (`ps`, `stats`, `rm`, `attach`, `exec`) asks
/// this rather than probing the files itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Its request is being written by a live cw, or its monitor has not written its pid yet.
    Created,
    /// Its monitor is alive and no exit is recorded (the container may still be starting).
    Running,
    /// Its exit is recorded (teardown may still be under way).
    Ended(ExitStatus),
    /// Its monitor died without recording the exit.
    Lost,
    /// The cw preparing it died before it wrote its request.
    Abandoned,
}

impl Status {
    pub fn is_running(&self) -> bool {
        matches!(self, Status::Running)
    }

    /// Whether a stop request has anything to stop or to release (`cw rm -f`, `cw kill`).
    pub fn can_be_stopped(&self) -> bool {
        matches!(self, Status::Created | Status::Running | Status::Lost)
    }

    /// Whether the run is over for good: ended, or lost with its monitor.
    pub fn is_over(&self) -> bool {
        matches!(self, Status::Ended(_) | Status::Lost)
    }
}

impl std::fmt::Display for Status {
    /// `cw ps`'s word for it (padded as the format asks).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let exited;
        f.pad(match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Ended(e) => match e.reason {
                Reason::Exited => {
                    exited = format!("exited ({})", e.exit_code);
                    &exited
                }
                Reason::Killed => "killed",
                Reason::TimeLimit => "time limit",
                Reason::MemoryLimit => "memory limit",
                Reason::Failed => "failed",
                Reason::Lost => "lost",
            },
            Status::Lost => "lost",
            Status::Abandoned => "abandoned",
        })
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct State {
    pub status: String,
    pub pid: Option<i32>,
    pub started_at: f64,
}

pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Write `data` to `path` atomically and durably: a temp file in the same directory (a name no
/// other writer, thread or process, can be using), fsync, rename; the temp file is removed on
/// failure. For what must survive a power cut: the image store's blobs and records, the
/// worker's run table.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    write_via_rename(path, data, true)
}

/// Write `data` to `path` atomically but without fsync: any other process sees the old content
/// or the new, never a mix. For state that means nothing after a reboot, whose runs a power cut
/// ends anyway: a run's request, pid, state and exit records, in-use records. Their fsyncs
/// (six per run) were about a quarter of `cw run true`'s start-to-exit time here (47.6 -> 34.4
/// ms), and cost far more on network filesystems.
pub fn replace_file(path: &Path, data: &[u8]) -> io::Result<()> {
    write_via_rename(path, data, false)
}

fn write_via_rename(path: &Path, data: &[u8], durable: bool) -> io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}-{}-{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x"),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    ));
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// A run directory and what can be read from it.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

pub(crate) fn proc_start_time(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    after.split(' ').nth(19)?.parse().ok()
}

impl RunDir {
    pub fn new(path: impl Into<PathBuf>) -> RunDir {
        RunDir { path: path.into() }
    }

    pub fn request(&self) -> io::Result<RunRequest> {
        let b = fs::read(self.path.join("request.json"))?;
        serde_json::from_slice(&b).map_err(io::Error::other)
    }

    pub fn write_request(&self, r: &RunRequest) -> io::Result<()> {
        fs::create_dir_all(&self.path)?;
        replace_file(
            &self.path.join("request.json"),
            &serde_json::to_vec_pretty(r).unwrap(),
        )
    }

    pub fn state(&self) -> Option<State> {
        serde_json::from_slice(&fs::read(self.path.join("state.json")).ok()?).ok()
    }

    pub fn exit(&self) -> Option<ExitStatus> {
        serde_json::from_slice(&fs::read(self.path.join("exit.json")).ok()?).ok()
    }

    /// The run's [`Status`].
    pub fn status(&self) -> Status {
        match (self.exit(), self.monitor_pid()) {
            (Some(e), _) => Status::Ended(e),
            (None, Some(_)) => Status::Running,
            (None, None) if self.abandoned() => Status::Abandoned,
            // the monitor has not written its pid yet (or was never started)
            (None, None) if !self.monitor_started() => Status::Created,
            (None, None) => Status::Lost,
        }
    }

    pub fn cleaned(&self) -> bool {
        self.path.join("cleaned").exists()
    }

    /// Record the process preparing this run (before anything is mounted for it), so that a run
    /// whose preparer died half-way can be told from one being prepared, and released.
    pub fn write_creator(&self) -> io::Result<()> {
        let pid = std::process::id() as i32;
        let start = proc_start_time(pid).unwrap_or(0);
        replace_file(
            &self.path.join("creator"),
            format!("{pid} {start}\n").as_bytes(),
        )
    }

    /// A run being prepared by a live process (no request written yet).
    pub fn being_prepared(&self) -> bool {
        let Ok(s) = fs::read_to_string(self.path.join("creator")) else {
            return false;
        };
        let Some((pid, start)) = s.trim().split_once(' ') else {
            return false;
        };
        match (pid.parse::<i32>(), start.parse::<u64>()) {
            (Ok(pid), Ok(start)) => proc_start_time(pid) == Some(start),
            _ => false,
        }
    }

    /// A run whose preparation died before it wrote its request (a killed `cw run`): what it may
    /// hold is its rootfs mount and its dir.
    pub fn abandoned(&self) -> bool {
        !self.path.join("request.json").exists()
            && !self.monitor_started()
            && !self.being_prepared()
    }

    /// Whether the monitor has written its pid: a run without one is still being started (or
    /// never was), not one whose monitor died.
    pub fn monitor_started(&self) -> bool {
        self.path.join("monitor.pid").exists()
    }

    /// The monitor's pid if it is still that process (pid and start time match).
    pub fn monitor_pid(&self) -> Option<i32> {
        let s = fs::read_to_string(self.path.join("monitor.pid")).ok()?;
        let (pid, start) = s.trim().split_once(' ')?;
        let pid: i32 = pid.parse().ok()?;
        let start: u64 = start.parse().ok()?;
        (proc_start_time(pid) == Some(start)).then_some(pid)
    }

    /// Ask the monitor to stop the run (SIGTERM to the container, SIGKILL after the grace).
    /// Without a live monitor, the run is recovered here. Returns false if it had already ended.
    pub fn kill(&self) -> io::Result<bool> {
        if self.exit().is_some() && self.cleaned() {
            return Ok(false);
        }
        match self.monitor_pid() {
            Some(pid) => {
                signal::kill(Pid::from_raw(pid), Signal::SIGTERM).map_err(io::Error::from)?;
                Ok(true)
            }
            None => {
                self.recover()?;
                Ok(true)
            }
        }
    }

    /// Finish a run whose monitor is gone: kill what is left, record it as lost, release resources.
    pub fn recover(&self) -> io::Result<()> {
        let req = self.request()?;
        let lc = self.path.join("lc").join(&req.id);
        let mut usage = Usage::default();
        if lc.exists() {
            if let Ok(mut c) = Container::load(lc.clone()) {
                // by its cgroup, and its init too (a run without root may have no cgroup: SIGKILL
                // to pid 1 of its pid namespace ends the rest)
                let _ = c.kill(Signal::SIGKILL, true);
                if let Some(pid) = c.pid() {
                    let _ = signal::kill(pid, Signal::SIGKILL);
                }
                if let Ok(cfg) = c.spec() {
                    usage = cgroup::read(&cgroup_path_string(&cfg.cgroup_path));
                }
                let _ = c.delete(true);
            }
        }
        // also when the monitor died before libcontainer recorded the container
        cgroup::remove_run(&req.cgroup_path(), crate::monitor::RUN_CGROUP_GONE_WITHIN);
        if let Some(dir) = self.host_cgroup(&req) {
            // a user's run below a delegated cgroup, which the paths above do not reach
            if dir.is_dir() {
                usage = cgroup::read_v2(&dir);
            }
            cgroup::remove_run_dir(&dir, crate::monitor::RUN_CGROUP_GONE_WITHIN);
        }
        let recorded: Vec<PathBuf> = fs::read(self.path.join(PARENTS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let parents = cgroup::recorded_parents(&req.cgroup_parent, &recorded);
        if !parents.is_empty() {
            let _lock = cgroup::parents_lock(&req.cgroup_parent);
            cgroup::remove_parents(&parents);
        }
        if self.exit().is_none() {
            let st = self.state();
            let ex = ExitStatus {
                exit_code: 137,
                signal: Some(9),
                reason: Reason::Lost,
                oom_killed: usage.oom_kills > 0,
                usage,
                started_at: st.map(|s| s.started_at).unwrap_or(0.0),
                finished_at: unix_now(),
                error: Some("the run's monitor process died; the run was stopped".into()),
            };
            replace_file(
                &self.path.join("exit.json"),
                &serde_json::to_vec_pretty(&ex).unwrap(),
            )?;
        }
        crate::monitor::cleanup(&req, &self.path);
        Ok(())
    }

    /// The run's cgroup as its monitor recorded it for the host ([`HOST_CGROUP_FILE`]): only a
    /// directory of the unified hierarchy whose path ends in the run's own cgroup path.
    fn host_cgroup(&self, req: &RunRequest) -> Option<PathBuf> {
        let s = fs::read_to_string(self.path.join(HOST_CGROUP_FILE)).ok()?;
        let p = PathBuf::from(s.trim());
        let rel = req.cgroup_path();
        let rel = rel.trim_start_matches('/');
        let plain = p
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        (plain
            && !rel.is_empty()
            && p.starts_with(cgroups_rs::hierarchies::UNIFIED_MOUNTPOINT)
            && p.ends_with(rel)
            && p != Path::new(cgroups_rs::hierarchies::UNIFIED_MOUNTPOINT).join(rel))
        .then_some(p)
    }

    /// The run has ended and its monitor is still tearing it down (unmount, cgroups, removals:
    /// after `cw run` returned, or while a `cw rm` would race it); once cleaned, a monitor that
    /// is to remove the directory ([`REMOVING_FILE`]) is still at it.
    pub fn tearing_down(&self) -> bool {
        self.exit().is_some()
            && self.monitor_pid().is_some()
            && (!self.cleaned() || self.to_be_removed())
    }

    /// The run's directory goes at the end of its teardown ([`REMOVING_FILE`]).
    pub fn to_be_removed(&self) -> bool {
        self.path.join(REMOVING_FILE).exists()
    }

    /// Wait (polling, at most `within`) for the teardown [`RunDir::tearing_down`] describes to
    /// end; whether it did.
    pub fn settle(&self, within: Duration) -> bool {
        let t = std::time::Instant::now();
        while self.tearing_down() {
            if t.elapsed() >= within {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Block until the run has ended (exit.json and cleanup), polling.
    pub fn wait(&self, poll: Duration) -> io::Result<ExitStatus> {
        loop {
            if !self.path.is_dir() {
                // removed under us (`cw rm -f` from elsewhere): nothing will ever be recorded
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "the run's directory {} was removed before its end was recorded",
                        self.path.display()
                    ),
                ));
            }
            if let Some(e) = self.exit() {
                if self.cleaned() || self.monitor_pid().is_none() {
                    return Ok(e);
                }
            } else if self.monitor_pid().is_none() && self.monitor_started() {
                // died without writing the status
                std::thread::sleep(Duration::from_millis(50));
                if self.exit().is_none() && self.monitor_pid().is_none() {
                    self.recover()?;
                    continue;
                }
            }
            std::thread::sleep(poll);
        }
    }
}

fn cgroup_path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_events_are_lines_that_read_back_and_nothing_else_is_one() {
        let ex = ExitStatus {
            exit_code: 3,
            signal: None,
            reason: Reason::Exited,
            oom_killed: false,
            usage: Usage::default(),
            started_at: 1.5,
            finished_at: 2.5,
            error: Some("a\nb".into()),
        };
        for ev in [RunEvent::Started(42), RunEvent::Exited(ex)] {
            let line = ev.line();
            assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1, "{ev:?}");
            assert!(line.ends_with(b"\n"));
            assert_eq!(
                RunEvent::parse(std::str::from_utf8(&line).unwrap()),
                Some(ev)
            );
        }
        for junk in [
            "",
            "started",
            "started 0",
            "started -1",
            "started x",
            "{\"exit_code\":1}",
            "hello",
        ] {
            assert_eq!(RunEvent::parse(junk), None, "{junk:?}");
        }
    }

    fn ended(reason: Reason, code: i32) -> Status {
        Status::Ended(ExitStatus {
            exit_code: code,
            signal: None,
            reason,
            oom_killed: false,
            usage: Usage::default(),
            started_at: 0.0,
            finished_at: 0.0,
            error: None,
        })
    }

    #[test]
    fn waiting_for_a_run_whose_directory_was_removed_ends() {
        // `cw run` waits here after its monitor exits; a `cw rm -f` from elsewhere may have
        // removed the directory by then (seen under Slurm: the job's cw waited for ever)
        let d = tempfile::tempdir().unwrap();
        let rd = RunDir::new(d.path().join("gone"));
        let e = rd.wait(Duration::from_millis(5)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("was removed"), "{e}");
    }

    #[test]
    fn a_recorded_host_cgroup_is_taken_only_as_the_runs_own_below_the_unified_hierarchy() {
        let d = tempfile::tempdir().unwrap();
        let rd = RunDir::new(d.path().to_path_buf());
        let req: RunRequest = serde_json::from_value(serde_json::json!({
            "id": "r1", "rootfs": "/r", "readonly_rootfs": false, "args": ["true"], "env": [],
            "cwd": "/", "uid": 0, "gid": 0, "additional_gids": [], "hostname": "h",
            "mounts": [], "limits": {"memory": null, "memory_swap": null, "cpus": null,
            "cpuset": null, "pids": null, "shm_size": 65536}, "network": "none",
            "time_limit": null, "kill_grace_secs": 1, "stdout": null, "stderr": null,
            "cgroup_parent": "/cw", "devices": [], "host_files": [],
            "cleanup": {"unmount": [], "remove": []}
        }))
        .unwrap();
        let with = |s: &str| {
            fs::write(d.path().join(HOST_CGROUP_FILE), s).unwrap();
            rd.host_cgroup(&req)
        };
        assert_eq!(rd.host_cgroup(&req), None);
        assert_eq!(
            with("/sys/fs/cgroup/user.slice/u/cw/r1\n"),
            Some(PathBuf::from("/sys/fs/cgroup/user.slice/u/cw/r1"))
        );
        for bad in [
            // another run's, a parent, outside the hierarchy, climbing out, relative, root's own
            "/sys/fs/cgroup/user.slice/u/cw/r2",
            "/sys/fs/cgroup/user.slice/u",
            "/tmp/cw/r1",
            "/sys/fs/cgroup/../../tmp/cw/r1",
            "/sys/fs/cgroup/a/../cw/r1",
            "sys/fs/cgroup/u/cw/r1",
            "/sys/fs/cgroup/cw/r1",
        ] {
            assert_eq!(with(bad), None, "{bad}");
        }
    }

    #[test]
    fn status_words_and_guards() {
        assert_eq!(ended(Reason::Exited, 3).to_string(), "exited (3)");
        assert_eq!(ended(Reason::TimeLimit, 137).to_string(), "time limit");
        assert_eq!(ended(Reason::Lost, 137).to_string(), "lost");
        // cw ps pads the column
        assert_eq!(format!("{:<9}|", Status::Running), "running  |");
        assert_eq!(
            format!("{:<12}|", ended(Reason::Exited, 0)),
            "exited (0)  |"
        );
        for (s, stop, over) in [
            (Status::Created, true, false),
            (Status::Running, true, false),
            (Status::Lost, true, true),
            (Status::Abandoned, false, false),
            (ended(Reason::Killed, 143), false, true),
        ] {
            assert_eq!(s.can_be_stopped(), stop, "{s}");
            assert_eq!(s.is_over(), over, "{s}");
            assert_eq!(s.is_running(), s == Status::Running, "{s}");
        }
    }

    #[test]
    fn status_read_from_the_directory() {
        let d = tempfile::tempdir().unwrap();
        let rd = RunDir::new(d.path());
        assert_eq!(rd.status(), Status::Abandoned);
        rd.write_creator().unwrap();
        assert_eq!(rd.status(), Status::Created);
        // this process as the monitor (its real start time): running
        let me = std::process::id() as i32;
        let start = proc_start_time(me).unwrap();
        fs::write(d.path().join("monitor.pid"), format!("{me} {start}")).unwrap();
        assert_eq!(rd.status(), Status::Running);
        // an exit record wins over a live monitor (teardown under way)
        let ex = match ended(Reason::Exited, 0) {
            Status::Ended(e) => e,
            _ => unreachable!(),
        };
        fs::write(d.path().join("exit.json"), serde_json::to_vec(&ex).unwrap()).unwrap();
        assert_eq!(rd.status(), Status::Ended(ex));
    }
}
