//! The run state machine's decisions for the stages that follow a container: what a pass does
//! to a run, from plain facts about its container, as actions for the caller to carry out. No
//! I/O here, so cl-worker's semantics (stage order, limit and kill messages, restaging, a
//! monitor found gone after a restart) are table-tested without a server (the tests below).
//! `runs.rs` reads the facts, calls these, and performs the actions.

use super::proto::Stage;
use super::record::{apply_exit, limit_messages, Run};
use cw_runtime::rundir::ExitStatus;

/// What the run directory says about a run's container, read once per pass.
#[derive(Debug, Clone, Default)]
pub struct Container {
    /// The run has a container: a run directory with its request.
    pub exists: bool,
    /// Its exit record, once the container has ended.
    pub exit: Option<ExitStatus>,
    /// Its monitor process is alive.
    pub monitor_alive: bool,
    /// Its monitor got as far as recording its pid (so a missing monitor died).
    pub monitor_started: bool,
    /// The monitor released the run's mounts and cgroup.
    pub cleaned: bool,
    /// Seconds since the container started, while it runs.
    pub uptime: Option<f64>,
    /// The bundle command's wrapper shell's stderr (its first bytes), once it ended.
    pub stderr: Option<String>,
}

/// What a pass asks the caller to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Stop the container (SIGTERM, SIGKILL after the grace) through its monitor.
    Kill,
    /// The monitor died before recording the end: finish the run for it.
    Recover,
    /// Measure the bundle's disk use (and its overlay's) again.
    MeasureDisk,
    /// Remove the run directory (unmount, delete the container's upper dir).
    RemoveRunDir,
    /// Give back the run's dependencies in the cache and remove its dependency links.
    ReleaseDependencies,
    /// Shared file system: delete what the exclude patterns name, in place.
    DeleteExcluded,
    /// Remove the bundle directory (its results are on the server).
    DiscardBundle,
    /// Ask the server whether it still has a finalizing bundle.
    CheckStillKnown,
}

/// RUNNING: the container's end, live limits, kills and restaging.
pub fn running(run: &mut Run, c: &Container) -> Vec<Action> {
    if !c.exists {
        run.failure_message = Some("Docker container not found".into());
        run.set_stage(Stage::CleaningUp);
        return vec![];
    }
    if let Some(ex) = &c.exit {
        apply_exit(run, ex, c.stderr.clone());
        run.run_status = "Uploading results.".into();
        run.set_stage(Stage::CleaningUp);
        return vec![Action::MeasureDisk];
    }
    if let Some(t) = c.uptime {
        run.container_time_total = t.max(0.0);
    }
    let mut actions = vec![Action::MeasureDisk];
    let msgs = limit_messages(run, false, false);
    if !msgs.is_empty() {
        run.is_killed = true;
        run.kill_message = Some(msgs.join(" "));
    }
    if run.is_killed || run.is_restaged {
        if !run.t.kill_sent {
            run.t.kill_sent = true;
            actions.push(Action::Kill);
        }
        run.set_stage(Stage::CleaningUp);
    }
    actions
}

/// CLEANING_UP: wait for the container to be gone and released, then on to the upload (or
/// straight to FINALIZING when there is nothing to upload, or RESTAGED).
pub fn cleaning_up(run: &mut Run, c: &Container, shared_fs: bool) -> Vec<Action> {
    let mut actions = vec![];
    if c.exists {
        match &c.exit {
            None => {
                if c.monitor_alive {
                    if (run.is_killed || run.is_restaged) && !run.t.kill_sent {
                        run.t.kill_sent = true;
                        actions.push(Action::Kill);
                    }
                } else if c.monitor_started {
                    actions.push(Action::Recover);
                }
                // still stopping, being recovered, or the monitor has not written its pid yet
                return actions;
            }
            Some(ex) => {
                if !c.cleaned && c.monitor_alive {
                    return actions; // the monitor is unmounting
                }
                if run.exitcode.is_none() {
                    apply_exit(run, ex, None);
                }
                actions.push(Action::RemoveRunDir);
            }
        }
    }
    actions.push(Action::ReleaseDependencies);
    if run.is_restaged {
        run.set_stage(Stage::Restaged);
        return actions;
    }
    if !shared_fs && run.has_contents {
        run.run_status = "Uploading results.".into();
        run.set_stage(Stage::UploadingResults);
        return actions;
    }
    if shared_fs && run.has_contents {
        actions.push(Action::DeleteExcluded);
    }
    run.finalize();
    actions
}

/// UPLOADING_RESULTS, once the upload task has reported.
pub fn uploaded(run: &mut Run, result: Result<(), String>) {
    if let Err(e) = result {
        run.add_failure(&format!("Error while uploading: {e}"));
    }
    run.finalize();
}

/// FINALIZING: until the server's `mark_finalized` (or the bundle is found gone).
pub fn finalizing(run: &mut Run, shared_fs: bool) -> Vec<Action> {
    if run.is_restaged {
        run.set_stage(Stage::Restaged);
        return vec![];
    }
    if !run.finalized {
        return vec![Action::CheckStillKnown];
    }
    run.run_status = "Finished".into();
    run.set_stage(Stage::Finished);
    if shared_fs {
        vec![]
    } else {
        vec![Action::DiscardBundle]
    }
}

#[cfg(test)]
mod tests {
    use super::Action::*;
    use super::*;
    use cw_runtime::cgroup::Usage;
    use cw_runtime::rundir::Reason;

    /// A run in RUNNING with these limits, its container started.
    fn run(time: u64, memory: u64, disk: u64) -> Run {
        let mut r = crate::worker::record::tests::run(time, memory, disk);
        r.set_stage(Stage::Running);
        r.has_contents = true;
        r
    }

    fn exit(code: i32, reason: Reason, oom: bool) -> ExitStatus {
        ExitStatus {
            exit_code: code,
            signal: None,
            reason,
            oom_killed: oom,
            usage: Usage::default(),
            started_at: 100.0,
            finished_at: 112.5,
            error: (reason == Reason::Failed).then(|| "creating the container: no".into()),
        }
    }

    fn live() -> Container {
        Container {
            exists: true,
            monitor_alive: true,
            monitor_started: true,
            uptime: Some(1.0),
            ..Default::default()
        }
    }

    fn ended(ex: ExitStatus, stderr: Option<&str>) -> Container {
        Container {
            exists: true,
            exit: Some(ex),
            monitor_alive: false,
            monitor_started: true,
            cleaned: true,
            uptime: None,
            stderr: stderr.map(str::to_string),
        }
    }

    /// One row: a run (time, memory, disk limits; killed; restaged; disk used), what its
    /// container says, and what must come of a RUNNING pass.
    struct Row {
        name: &'static str,
        limits: (u64, u64, u64),
        killed: bool,
        restaged: bool,
        disk_used: u64,
        container: Container,
        stage: Stage,
        actions: Vec<Action>,
        exitcode: Option<i64>,
        failure: Option<&'static str>,
        kill_message: Option<&'static str>,
    }

    #[test]
    fn running_passes() {
        let rows = vec![
            Row {
                name: "exit 0",
                limits: (0, 0, 0),
                killed: false,
                restaged: false,
                disk_used: 0,
                container: ended(exit(0, Reason::Exited, false), Some("")),
                stage: Stage::CleaningUp,
                actions: vec![MeasureDisk],
                exitcode: Some(0),
                failure: None,
                kill_message: None,
            },
            Row {
                name: "the wrapper shell's complaint is the failure when no limit explains the end",
                limits: (0, 0, 0),
                killed: false,
                restaged: false,
                disk_used: 0,
                container: ended(
                    exit(137, Reason::Exited, false),
                    Some("bash: line 1: 7 Killed\n"),
                ),
                stage: Stage::CleaningUp,
                actions: vec![MeasureDisk],
                exitcode: Some(137),
                failure: Some("bash: line 1: 7 Killed"),
                kill_message: None,
            },
            Row {
                name: "an OOM kill is the memory limit, not the shell's complaint",
                limits: (0, 50 << 20, 0),
                killed: false,
                restaged: false,
                disk_used: 0,
                container: ended(exit(137, Reason::Exited, true), Some("Killed")),
                stage: Stage::CleaningUp,
                actions: vec![MeasureDisk],
                exitcode: Some(137),
                failure: None,
                kill_message: Some("Memory limit 50m exceeded."),
            },
            Row {
                name: "the monitor's time limit",
                limits: (10, 0, 0),
                killed: false,
                restaged: false,
                disk_used: 0,
                container: ended(exit(143, Reason::TimeLimit, false), None),
                stage: Stage::CleaningUp,
                actions: vec![MeasureDisk],
                exitcode: Some(143),
                failure: None,
                kill_message: Some(
                    "Time limit exceeded. (Container uptime 12.5s > time limit 10.0s)",
                ),
            },
            Row {
                name: "a container that could not be created",
                limits: (0, 0, 0),
                killed: false,
                restaged: false,
                disk_used: 0,
                container: ended(exit(125, Reason::Failed, false), None),
                stage: Stage::CleaningUp,
                actions: vec![MeasureDisk],
                exitcode: Some(125),
                failure: Some("creating the container: no"),
                kill_message: None,
            },
            Row {
                name: "no container",
                limits: (0, 0, 0),
                killed: false,
                restaged: false,
                disk_used: 0,
                container: Container::default(),
                stage: Stage::CleaningUp,
                actions: vec![],
                exitcode: None,
                failure: Some("Docker container not found"),
                kill_message: None,
            },
            Row {
                name: "still running within its limits",
                limits: (10, 50 << 20, 2 << 20),
                killed: false,
                restaged: false,
                disk_used: 1 << 20,
                container: live(),
                stage: Stage::Running,
                actions: vec![MeasureDisk],
                exitcode: None,
                failure: None,
                kill_message: None,
            },
            Row {
                name: "past its disk limit while running",
                limits: (0, 0, 2 << 20),
                killed: false,
                restaged: false,
                disk_used: 3 << 20,
                container: live(),
                stage: Stage::CleaningUp,
                actions: vec![MeasureDisk, Kill],
                exitcode: None,
                failure: None,
                kill_message: Some("Disk limit 2mb exceeded."),
            },
            Row {
                name: "cl kill",
                limits: (0, 0, 0),
                killed: true,
                restaged: false,
                disk_used: 0,
                container: live(),
                stage: Stage::CleaningUp,
                actions: vec![MeasureDisk, Kill],
                exitcode: None,
                failure: None,
                kill_message: None,
            },
            Row {
                name: "restaged by the server",
                limits: (0, 0, 0),
                killed: false,
                restaged: true,
                disk_used: 0,
                container: live(),
                stage: Stage::CleaningUp,
                actions: vec![MeasureDisk, Kill],
                exitcode: None,
                failure: None,
                kill_message: None,
            },
        ];
        for row in rows {
            let mut r = run(row.limits.0, row.limits.1, row.limits.2);
            r.is_killed = row.killed;
            r.is_restaged = row.restaged;
            r.disk_utilization = row.disk_used;
            let actions = running(&mut r, &row.container);
            assert_eq!(r.stage, row.stage, "{}: stage", row.name);
            assert_eq!(actions, row.actions, "{}: actions", row.name);
            assert_eq!(r.exitcode, row.exitcode, "{}: exit code", row.name);
            assert_eq!(
                r.failure_message.as_deref(),
                row.failure,
                "{}: failure",
                row.name
            );
            assert_eq!(
                r.kill_message.as_deref(),
                row.kill_message,
                "{}: kill message",
                row.name
            );
        }
    }

    #[test]
    fn a_kill_is_sent_once() {
        let mut r = run(0, 0, 0);
        r.is_killed = true;
        assert_eq!(running(&mut r, &live()), vec![MeasureDisk, Kill]);
        // CLEANING_UP while the monitor stops it: no second kill, no progress
        assert_eq!(cleaning_up(&mut r, &live(), false), vec![]);
        assert_eq!(r.stage, Stage::CleaningUp);
        // a worker restarted in CLEANING_UP (kill_sent is not persisted) sends it again
        r.t.kill_sent = false;
        assert_eq!(cleaning_up(&mut r, &live(), false), vec![Kill]);
    }

    #[test]
    fn cleaning_up_passes() {
        // the monitor died before recording the end (found after a restart): recovered
        let mut r = run(0, 0, 0);
        r.set_stage(Stage::CleaningUp);
        let gone = Container {
            exists: true,
            monitor_started: true,
            ..Default::default()
        };
        assert_eq!(cleaning_up(&mut r, &gone, false), vec![Recover]);
        assert_eq!(r.stage, Stage::CleaningUp);
        // a monitor that has not written its pid yet: wait
        let early = Container {
            exists: true,
            ..Default::default()
        };
        assert_eq!(cleaning_up(&mut r, &early, false), vec![]);
        // ended, but the monitor still unmounting: wait
        let mut unmounting = ended(exit(0, Reason::Exited, false), None);
        unmounting.cleaned = false;
        unmounting.monitor_alive = true;
        assert_eq!(cleaning_up(&mut r, &unmounting, false), vec![]);
        // ended and released: the end is recorded if RUNNING did not see it, then the upload
        let done = ended(exit(3, Reason::Exited, false), None);
        assert_eq!(
            cleaning_up(&mut r, &done, false),
            vec![RemoveRunDir, ReleaseDependencies]
        );
        assert_eq!(r.exitcode, Some(3));
        assert_eq!(r.stage, Stage::UploadingResults);
        assert_eq!(r.run_status, "Uploading results.");

        // nothing to upload (it never started): straight to FINALIZING, the kill folded in
        let mut r = run(0, 0, 0);
        r.set_stage(Stage::CleaningUp);
        r.has_contents = false;
        r.failure_message = Some("Failed to download Docker image: 404".into());
        r.is_killed = true;
        r.kill_message = Some("Kill requested: no longer wanted".into());
        assert_eq!(
            cleaning_up(&mut r, &Container::default(), false),
            vec![ReleaseDependencies]
        );
        assert_eq!(r.stage, Stage::Finalizing);
        assert_eq!(
            r.failure_message.as_deref(),
            Some("Failed to download Docker image: 404. Kill requested: no longer wanted")
        );

        // restaged: no upload, no finalizing
        let mut r = run(0, 0, 0);
        r.set_stage(Stage::CleaningUp);
        r.is_restaged = true;
        cleaning_up(&mut r, &done, false);
        assert_eq!(r.stage, Stage::Restaged);

        // a shared file system: the exclusions are deleted in place, nothing is uploaded
        let mut r = run(0, 0, 0);
        r.set_stage(Stage::CleaningUp);
        assert_eq!(
            cleaning_up(&mut r, &done, true),
            vec![RemoveRunDir, ReleaseDependencies, DeleteExcluded]
        );
        assert_eq!(r.stage, Stage::Finalizing);
    }

    #[test]
    fn a_bundle_goes_through_cl_workers_stages_in_order() {
        let mut r = run(0, 0, 0);
        let mut seen = vec![r.stage];
        let c = ended(exit(0, Reason::Exited, false), None);
        running(&mut r, &c);
        seen.push(r.stage);
        cleaning_up(&mut r, &c, false);
        seen.push(r.stage);
        uploaded(&mut r, Ok(()));
        seen.push(r.stage);
        assert_eq!(finalizing(&mut r, false), vec![CheckStillKnown]);
        assert_eq!(r.stage, Stage::Finalizing);
        r.finalized = true; // the server's mark_finalized
        assert_eq!(finalizing(&mut r, false), vec![DiscardBundle]);
        seen.push(r.stage);
        assert_eq!(
            seen,
            vec![
                Stage::Running,
                Stage::CleaningUp,
                Stage::UploadingResults,
                Stage::Finalizing,
                Stage::Finished
            ]
        );
        assert_eq!(r.run_status, "Finished");
        assert_eq!(r.failure_message, None);
        // each stage's profile has a start and an end
        for s in [
            Stage::Preparing,
            Stage::Running,
            Stage::CleaningUp,
            Stage::UploadingResults,
            Stage::Finalizing,
        ] {
            let p = r.bundle_profile_stats[s.key()];
            assert!(p.start.is_some() && p.end.is_some(), "{s:?}");
        }
        // a failed upload is the failure, and the run still finalizes
        let mut r = run(0, 0, 0);
        r.set_stage(Stage::UploadingResults);
        uploaded(&mut r, Err("HTTP 500".into()));
        assert_eq!(r.stage, Stage::Finalizing);
        assert_eq!(
            r.failure_message.as_deref(),
            Some("Error while uploading: HTTP 500")
        );
        // shared file system: the bundle stays where the server put it
        r.finalized = true;
        assert_eq!(finalizing(&mut r, true), vec![]);
        assert_eq!(r.stage, Stage::Finished);
    }
}
