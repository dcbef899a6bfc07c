//! A run's record on this worker: what is persisted in the run table (and reported in every
//! checkin), and the rules that fold what happened into it: stage changes with their profile
//! times, kill and failure messages (cl-worker's wording), limits, the crash strikes. No I/O.

use super::files;
use super::proto::{duration_str, size_str, BundleInfo, CheckinRun, Resources, Stage, StageStat};
use super::Ctx;
use cw_runtime::rundir::{Reason, RunDir};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// What lives only in memory: tasks in flight and measurement state.
#[derive(Debug, Clone, Default)]
pub struct Transient {
    /// A start or upload task works on this run.
    pub busy: bool,
    pub upload_result: Option<Result<(), String>>,
    pub upload_progress: Arc<AtomicU64>,
    pub disk_at: Option<Instant>,
    pub disk_busy: bool,
    pub last_cpu: Option<(u64, Instant)>,
    pub kill_sent: bool,
    /// The container's cgroup, read once from its request.
    pub cgroup: Option<String>,
    /// Bytes in the run's overlay upper dir (its writes outside the bundle directory).
    pub upper_usage: u64,
    /// The last question whether the server still has a finalizing run's bundle.
    pub gone_check_at: Option<Instant>,
    pub gone_check_busy: bool,
    pub disk_errors: u32,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Run {
    pub bundle: BundleInfo,
    pub resources: Resources,
    pub stage: Stage,
    pub run_status: String,
    pub bundle_path: PathBuf,
    pub bundle_start_time: f64,
    pub container_time_total: f64,
    pub container_time_user: f64,
    pub container_time_system: f64,
    /// The cw run (monitor directory) of the container.
    pub container: Option<String>,
    pub docker_image: Option<String>,
    pub is_killed: bool,
    pub kill_message: Option<String>,
    pub has_contents: bool,
    pub cpuset: Vec<usize>,
    pub gpuset: Vec<String>,
    pub max_memory: u64,
    pub disk_utilization: u64,
    pub exitcode: Option<i64>,
    pub failure_message: Option<String>,
    pub finalized: bool,
    pub is_restaged: bool,
    pub cpu_usage: f64,
    pub memory_usage: f64,
    pub bundle_profile_stats: BTreeMap<String, StageStat>,
    pub paths_to_remove: Vec<PathBuf>,
    pub bundle_dir_wait_num_tries: u32,
    /// Worker starts that found this run, in this stage, after the worker had stopped
    /// unexpectedly (see [`Run::note_unclean_restart`]).
    #[serde(default)]
    pub crash_strikes: u32,
    #[serde(skip)]
    pub t: Transient,
}

impl Run {
    pub fn new(bundle: BundleInfo, resources: Resources, bundle_path: PathBuf) -> Run {
        let mut r = Run {
            bundle,
            resources,
            stage: Stage::Preparing,
            run_status: String::new(),
            bundle_path,
            bundle_start_time: now(),
            container_time_total: 0.0,
            container_time_user: 0.0,
            container_time_system: 0.0,
            container: None,
            docker_image: None,
            is_killed: false,
            kill_message: None,
            has_contents: false,
            cpuset: vec![],
            gpuset: vec![],
            max_memory: 0,
            disk_utilization: 0,
            exitcode: None,
            failure_message: None,
            finalized: false,
            is_restaged: false,
            cpu_usage: 0.0,
            memory_usage: 0.0,
            bundle_profile_stats: BTreeMap::new(),
            paths_to_remove: vec![],
            bundle_dir_wait_num_tries: 0,
            crash_strikes: 0,
            t: Transient::default(),
        };
        r.bundle_profile_stats.insert(
            Stage::Preparing.key().into(),
            StageStat {
                start: Some(now()),
                ..Default::default()
            },
        );
        r
    }

    pub fn uuid(&self) -> &str {
        &self.bundle.uuid
    }

    pub(super) fn set_stage(&mut self, s: Stage) {
        if s == self.stage {
            return;
        }
        let t = now();
        let old = self
            .bundle_profile_stats
            .entry(self.stage.key().into())
            .or_default();
        old.end = Some(t);
        old.elapsed = old.start.map(|st| t - st);
        if !matches!(s, Stage::Finished | Stage::Restaged) {
            self.bundle_profile_stats.insert(
                s.key().into(),
                StageStat {
                    start: Some(t),
                    ..Default::default()
                },
            );
        }
        self.stage = s;
        // moving on: whatever stopped the worker before did not come back here
        self.crash_strikes = 0;
    }

    /// The worker had stopped unexpectedly (crash, abort, SIGKILL) while it had this run. A
    /// bundle that makes the worker abort would do it again at every restart with the same
    /// `--id` and keep every later bundle waiting: after CRASH_STRIKES such restarts in one
    /// stage, the run fails with a message that says why. True when it did.
    pub fn note_unclean_restart(&mut self) -> bool {
        if matches!(self.stage, Stage::Finished | Stage::Restaged) || self.finalized {
            return false;
        }
        self.crash_strikes += 1;
        if self.crash_strikes < CRASH_STRIKES {
            return false;
        }
        let msg = format!(
            "The worker stopped unexpectedly {} times while this bundle was {}; it is failed so that whatever stopped it is not repeated at every restart",
            self.crash_strikes,
            self.stage.server_state()
        );
        match self.stage {
            Stage::Preparing => self.fail_preparing(msg),
            Stage::Running => {
                self.is_killed = true;
                self.kill_message = Some(msg);
            }
            _ => {
                self.add_failure(&msg);
                self.finalize();
            }
        }
        true
    }

    /// The run's entry in a checkin (every key the server reads, all five profile stages).
    pub fn checkin_entry(&self, worker_id: &str) -> CheckinRun {
        let mut stats = BTreeMap::new();
        for s in Stage::PROFILED {
            stats.insert(
                s.key().to_string(),
                self.bundle_profile_stats
                    .get(s.key())
                    .copied()
                    .unwrap_or_default(),
            );
        }
        CheckinRun {
            uuid: self.bundle.uuid.clone(),
            run_status: self.run_status.clone(),
            bundle_start_time: self.bundle_start_time,
            container_time_total: self.container_time_total,
            container_time_user: self.container_time_user,
            container_time_system: self.container_time_system,
            docker_image: self.docker_image.clone(),
            state: self.stage.server_state().to_string(),
            remote: worker_id.to_string(),
            exitcode: self.exitcode,
            failure_message: self.failure_message.clone(),
            bundle_profile_stats: stats,
            cpu_usage: self.cpu_usage,
            memory_usage: self.memory_usage,
            disk_utilization: self.disk_utilization,
        }
    }

    pub fn dep_child_paths(&self) -> HashSet<String> {
        self.bundle
            .dependencies
            .iter()
            .map(|d| {
                files::normalize(&d.child_path)
                    .map(|c| c.join("/"))
                    .unwrap_or_default()
            })
            .collect()
    }

    pub(super) fn add_failure(&mut self, msg: &str) {
        self.failure_message = Some(match self.failure_message.take() {
            Some(f) if !f.is_empty() => format!("{f}. {msg}"),
            _ => msg.to_string(),
        });
    }

    /// The `finalize` helper: fold the kill message in, move to FINALIZING.
    pub(super) fn finalize(&mut self) {
        if self.is_killed {
            let km = self
                .kill_message
                .clone()
                .unwrap_or_else(|| "Kill requested".into());
            self.add_failure(&km);
        }
        self.set_stage(Stage::Finalizing);
        self.run_status = "Finalizing bundle.".into();
    }

    pub(super) fn fail_preparing(&mut self, msg: String) {
        self.failure_message = Some(msg);
        self.set_stage(Stage::CleaningUp);
    }

    pub fn run_dir(&self, ctx: &Ctx) -> Option<RunDir> {
        self.container
            .as_ref()
            .map(|c| RunDir::new(crate::run::runs_dir(&ctx.store).join(c)))
    }
}

/// Unexpected worker stops in one stage of a run that fail it.
pub const CRASH_STRIKES: u32 = 3;

pub(super) fn limit_messages(run: &Run, oom: bool, time_limit_hit: bool) -> Vec<String> {
    let mut msgs = vec![];
    let r = &run.resources;
    if r.time > 0 && (time_limit_hit || run.container_time_total > r.time as f64) {
        msgs.push(format!(
            "Time limit exceeded. (Container uptime {} > time limit {})",
            duration_str(run.container_time_total),
            duration_str(r.time as f64)
        ));
    }
    if oom || (r.memory > 0 && run.max_memory > r.memory) {
        msgs.push(format!(
            "Memory limit {} exceeded.",
            size_str(r.memory as f64)
        ));
    }
    if r.disk > 0 && run.disk_utilization + run.t.upper_usage > r.disk {
        msgs.push(format!("Disk limit {}b exceeded.", size_str(r.disk as f64)));
    }
    msgs
}

pub(super) fn apply_exit(
    run: &mut Run,
    ex: &cw_runtime::rundir::ExitStatus,
    container_err: Option<String>,
) {
    tracing::info!(
        "bundle {}: the container ended: exit code {} ({:?}{})",
        run.uuid(),
        ex.exit_code,
        ex.reason,
        if ex.oom_killed { ", OOM kill" } else { "" }
    );
    run.exitcode = Some(ex.exit_code as i64);
    run.container_time_total = (ex.finished_at - ex.started_at).max(0.0);
    run.container_time_user = ex.usage.cpu_user_ns as f64 / 1e9;
    run.container_time_system = ex.usage.cpu_system_ns as f64 / 1e9;
    run.max_memory = run.max_memory.max(ex.usage.memory_peak);
    let msgs = limit_messages(run, ex.oom_killed, ex.reason == Reason::TimeLimit);
    match ex.reason {
        Reason::Failed | Reason::Lost => {
            let e = ex
                .error
                .clone()
                .unwrap_or_else(|| "the container failed".into());
            run.add_failure(&e);
        }
        // the wrapper shell's own complaints (e.g. "Killed") only when no limit explains the end
        _ if msgs.is_empty() && !run.is_killed => {
            if let Some(e) = container_err.filter(|e| !e.trim().is_empty()) {
                run.add_failure(e.trim());
            }
        }
        _ => {}
    }
    if !msgs.is_empty() {
        run.is_killed = true;
        run.kill_message = Some(msgs.join(" "));
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A run with these time, memory and disk limits, for tests.
    pub(in crate::worker) fn run(time: u64, memory: u64, disk: u64) -> Run {
        Run::new(
            serde_json::from_value(serde_json::json!({"uuid": "0x1"})).unwrap(),
            Resources {
                time,
                memory,
                disk,
                ..Default::default()
            },
            PathBuf::from("/nonexistent"),
        )
    }

    #[test]
    fn a_run_that_keeps_stopping_the_worker_fails_after_three_strikes() {
        let mut r = run(0, 0, 0);
        assert!(!r.note_unclean_restart());
        assert!(!r.note_unclean_restart());
        // moving on resets the count
        r.set_stage(Stage::Running);
        assert_eq!(r.crash_strikes, 0);
        assert!(!r.note_unclean_restart());
        assert!(!r.note_unclean_restart());
        assert!(r.note_unclean_restart());
        assert!(r.is_killed);
        assert!(r
            .kill_message
            .as_deref()
            .unwrap()
            .contains("stopped unexpectedly 3 times while this bundle was running"));
        let mut p = run(0, 0, 0);
        for _ in 0..3 {
            p.note_unclean_restart();
        }
        assert_eq!(p.stage, Stage::CleaningUp);
        assert!(p
            .failure_message
            .as_deref()
            .unwrap()
            .contains("while this bundle was preparing"));
    }

    #[test]
    fn limit_message_texts() {
        let mut r = run(10, 50 << 20, 2 << 20);
        r.container_time_total = 12.5;
        r.disk_utilization = 3 << 20;
        let m = limit_messages(&r, true, false);
        assert_eq!(
            m,
            vec![
                "Time limit exceeded. (Container uptime 12.5s > time limit 10.0s)",
                "Memory limit 50m exceeded.",
                "Disk limit 2mb exceeded."
            ]
        );
        let r = run(0, 0, 0);
        assert!(limit_messages(&r, false, false).is_empty());
    }

    #[test]
    fn stages_and_profile() {
        let mut r = run(0, 0, 0);
        r.set_stage(Stage::Running);
        r.set_stage(Stage::CleaningUp);
        r.is_killed = true;
        r.finalize();
        assert_eq!(r.failure_message.as_deref(), Some("Kill requested"));
        let e = r.checkin_entry("w1");
        assert_eq!(e.state, "finalizing");
        assert_eq!(e.bundle_profile_stats.len(), 5);
        assert!(e.bundle_profile_stats["RUN_STAGE.PREPARING"]
            .elapsed
            .is_some());
        assert!(e.bundle_profile_stats["RUN_STAGE.UPLOADING_RESULTS"]
            .elapsed
            .is_none());
        let v = serde_json::to_value(&e).unwrap();
        for k in [
            "uuid",
            "run_status",
            "bundle_start_time",
            "container_time_total",
            "container_time_user",
            "container_time_system",
            "docker_image",
            "state",
            "remote",
            "exitcode",
            "failure_message",
            "cpu_usage",
            "memory_usage",
            "disk_utilization",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        let mut r = run(0, 0, 0);
        r.failure_message = Some("Exit code 1".into());
        r.is_killed = true;
        r.kill_message = Some("Kill requested: quota".into());
        r.finalize();
        assert_eq!(
            r.failure_message.as_deref(),
            Some("Exit code 1. Kill requested: quota")
        );
    }
}
