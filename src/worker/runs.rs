//! One bundle's life on this worker (spec §7): PREPARING (cpus/gpus, dependencies, image) →
//! RUNNING (a `cw` monitor per run, limits) → CLEANING_UP → UPLOADING_RESULTS → FINALIZING
//! (until the server's `mark_finalized`) → FINISHED; or RESTAGED. `step` is called for every
//! run on every pass; whatever may block (starting the container, uploading) runs in a task
//! that writes its result back into the run, so one slow run never holds up the others.

use super::contract::{absolute_dependency_path, child_components, start_container};
use super::deps::{DepStage, Key};
use super::files::{self, Excludes};
use super::images::{image_state, ImageState};
use super::machine::{self, Action};
use super::proto::{size_str, Stage};
use super::record::{now, Run};
use super::upload::uploading;
use super::Ctx;
use cw_runtime::rundir::RunDir;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One pass over one run.
pub fn step(
    ctx: &Arc<Ctx>,
    run: &mut Run,
    running_sets: &(HashSet<usize>, HashSet<String>, usize),
) {
    match run.stage {
        Stage::Preparing => preparing(ctx, run, running_sets),
        Stage::Running => running(ctx, run),
        Stage::CleaningUp => cleaning_up(ctx, run),
        Stage::UploadingResults => uploading(ctx, run),
        Stage::Finalizing => {
            let actions = machine::finalizing(run, ctx.shared_fs);
            perform(ctx, run, None, &actions);
        }
        Stage::Finished | Stage::Restaged => {}
    }
}

/// How long a run may wait in FINALIZING for `mark_finalized` before the worker asks whether
/// the server still has its bundle (its bundle-manager sends the message every pass, ~1 s).
pub const FINALIZE_CHECK: Duration = Duration::from_secs(30);

/// A finalizing run whose bundle the server deleted (`cl rm -f`, an upload over quota then
/// `cl rm`) would never get `mark_finalized`: reported at every checkin for ever, across
/// restarts, its directory kept. Every FINALIZE_CHECK the worker asks; a 404 drops it.
fn check_still_known(ctx: &Arc<Ctx>, run: &mut Run) {
    let since = run
        .bundle_profile_stats
        .get(Stage::Finalizing.key())
        .and_then(|s| s.start)
        .unwrap_or_else(now);
    if now() - since < FINALIZE_CHECK.as_secs_f64() || run.t.gone_check_busy {
        return;
    }
    if run
        .t
        .gone_check_at
        .is_some_and(|t| t.elapsed() < FINALIZE_CHECK)
    {
        return;
    }
    run.t.gone_check_busy = true;
    run.t.gone_check_at = Some(Instant::now());
    let (ctx2, uuid) = (ctx.clone(), run.uuid().to_string());
    tokio::spawn(async move {
        let known = ctx2.server.bundle_exists(&uuid).await;
        if let Some(r) = ctx2.runs.lock().unwrap().get_mut(&uuid) {
            r.t.gone_check_busy = false;
            match known {
                Ok(false) => {
                    tracing::warn!("bundle {uuid}: the server no longer has it; dropping the run and its files");
                    r.finalized = true;
                }
                Ok(true) => {}
                Err(e) => tracing::debug!("bundle {uuid}: asking the server about it: {e}"),
            }
        }
        ctx2.wake_runs.notify_one();
    });
}

fn preparing(ctx: &Arc<Ctx>, run: &mut Run, held: &(HashSet<usize>, HashSet<String>, usize)) {
    if run.t.busy {
        return; // the container is being started
    }
    if run.is_killed || run.is_restaged {
        run.set_stage(Stage::CleaningUp);
        return;
    }
    let uuid = run.uuid().to_string();
    // slots (--slots): at most N containers at once
    if ctx.slots > 0 && held.2 >= ctx.slots {
        run.run_status = format!(
            "Waiting for a free slot ({} runs at once on this worker)",
            ctx.slots
        );
        return;
    }
    // CPUs and GPUs not held by running runs
    let free_cpus: Vec<usize> = ctx
        .cpus
        .iter()
        .copied()
        .filter(|c| !held.0.contains(c))
        .collect();
    let want_cpus = run.resources.cpus.max(1) as usize;
    if want_cpus > free_cpus.len() {
        run.run_status = format!(
            "Unexpectedly unable to assign enough resources to bundle {uuid}: Requested more CPUs ({want_cpus}) than available ({} currently out of {} on the machine)",
            free_cpus.len(),
            ctx.cpus.len()
        );
        return;
    }
    let free_gpus: Vec<&cw_runtime::gpu::Gpu> = ctx
        .gpus
        .iter()
        .filter(|g| !held.1.contains(&g.uuid))
        .collect();
    let want_gpus = run.resources.gpus as usize;
    if want_gpus > free_gpus.len() {
        run.run_status = format!(
            "Unexpectedly unable to assign enough resources to bundle {uuid}: Requested more GPUs ({want_gpus}) than available ({} currently out of {} on the machine)",
            free_gpus.len(),
            ctx.gpus.len()
        );
        return;
    }
    let mut statuses: Vec<String> = vec![];
    // dependencies
    let mut dep_paths: Vec<(String, PathBuf)> = vec![];
    for d in &run.bundle.dependencies {
        let valid = if d.child_path.starts_with('/') && !ctx.shared_fs {
            absolute_dependency_path(&d.child_path).map(|_| ())
        } else {
            child_components(&d.child_path).map(|_| ())
        };
        if let Err(e) = valid {
            run.fail_preparing(format!(
                "Failed to download dependency {}: {e}",
                d.child_path
            ));
            return;
        }
        if ctx.shared_fs {
            let Some(loc) = &d.location else {
                run.fail_preparing(format!(
                    "Dependency {} has no location on the shared file system",
                    d.child_path
                ));
                return;
            };
            let comps = files::normalize(&d.parent_path).unwrap_or_default();
            dep_paths.push((d.child_path.clone(), Path::new(loc).join(comps.join("/"))));
            continue;
        }
        if !super::deps::valid_uuid(&d.parent_uuid) {
            run.fail_preparing(format!(
                "Failed to download dependency {}: {:?} is not a bundle uuid",
                d.child_path, d.parent_uuid
            ));
            return;
        }
        let key: Key = (d.parent_uuid.clone(), d.parent_path.clone());
        let e = ctx.deps.get(&uuid, &key);
        match e.stage {
            DepStage::Downloading => statuses.push(format!(
                "Downloading dependency {}: {} done (archived size)",
                d.child_path,
                size_str(e.size_bytes as f64)
            )),
            DepStage::Failed => {
                run.fail_preparing(format!(
                    "Failed to download dependency {}: {}",
                    d.child_path, e.message
                ));
                return;
            }
            DepStage::Ready => dep_paths.push((d.child_path.clone(), ctx.deps.path_of(&e))),
        }
    }
    // the image
    let image = run.resources.docker_image.clone();
    let image_rec = match image_state(ctx, &image) {
        ImageState::Downloading(p) => {
            statuses.push(
                format!("Pulling docker image {image}. {p}")
                    .trim_end()
                    .to_string(),
            );
            None
        }
        ImageState::Failed(m, _) => {
            run.fail_preparing(format!("Failed to download Docker image: {m}"));
            return;
        }
        ImageState::Ready(rec, digest, _) => Some((rec, digest)),
    };
    if !statuses.is_empty() {
        let n = statuses.len();
        let mut s = statuses.pop().unwrap();
        if n > 1 {
            s.push_str(&format!(
                "(and downloading {} other dependencies and docker images)",
                n - 1
            ));
        }
        run.run_status = s;
        return;
    }
    let (rec, digest) = image_rec.expect("ready");
    if ctx.shared_fs && !run.bundle_path.is_dir() {
        run.bundle_dir_wait_num_tries += 1;
        if run.bundle_dir_wait_num_tries >= 120 {
            run.fail_preparing("Bundle directory cannot be found on the shared filesystem. Please ensure the shared filesystem between the server and your worker is mounted properly or contact your administrators.".into());
        } else {
            run.run_status = "Waiting for bundle directory to be created by the server".into();
        }
        return;
    }
    run.cpuset = free_cpus[..want_cpus].to_vec();
    run.gpuset = free_gpus[..want_gpus]
        .iter()
        .map(|g| g.uuid.clone())
        .collect();
    let gpus: Vec<cw_runtime::gpu::Gpu> = free_gpus[..want_gpus]
        .iter()
        .map(|g| (*g).clone())
        .collect();
    run.t.busy = true;
    run.run_status = "Starting container.".into();
    let (ctx2, snapshot) = (ctx.clone(), run.clone());
    tokio::spawn(async move {
        let ctx3 = ctx2.clone();
        let res = tokio::task::spawn_blocking(move || {
            start_container(&ctx3, &snapshot, &rec, &dep_paths, gpus)
        })
        .await
        .map_err(|e| format!("start task: {e}"))
        .and_then(|r| r);
        let mut runs = ctx2.runs.lock().unwrap();
        if let Some(r) = runs.get_mut(&uuid) {
            r.t.busy = false;
            match res {
                Ok((container, paths)) => {
                    r.container = Some(container);
                    r.paths_to_remove = paths;
                    r.docker_image = Some(digest);
                    r.has_contents = true;
                    r.run_status = "Running job in container.".into();
                    r.set_stage(Stage::Running);
                    tracing::info!("bundle {uuid}: RUN_STAGE.PREPARING -> RUN_STAGE.RUNNING");
                }
                Err(e) => {
                    r.cpuset.clear();
                    r.gpuset.clear();
                    r.fail_preparing(format!("Cannot start Docker container: {e}"));
                }
            }
        }
        drop(runs);
        ctx2.wake_runs.notify_one();
    });
}

fn measure_disk(ctx: &Arc<Ctx>, run: &mut Run) {
    let due = match run.t.disk_at {
        None => true,
        Some(t) => t.elapsed() >= Duration::from_secs(1),
    };
    if !due || run.t.disk_busy {
        return;
    }
    run.t.disk_busy = true;
    let (ctx2, uuid, path) = (ctx.clone(), run.uuid().to_string(), run.bundle_path.clone());
    // what the run wrote outside its bundle directory (its overlay's upper dir) counts toward
    // its disk limit too, or one bundle could fill the store's filesystem through /tmp
    let upper = run.run_dir(ctx).map(|rd| rd.path.join("upper"));
    tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        let used = files::disk_usage(&path);
        let upper_used = match &upper {
            Some(u) if u.exists() => files::disk_usage(u),
            _ => Ok(0),
        };
        let took = t0.elapsed();
        let mut runs = ctx2.runs.lock().unwrap();
        if let Some(r) = runs.get_mut(&uuid) {
            match (used, upper_used) {
                (Ok(b), Ok(u)) => {
                    r.disk_utilization = b;
                    r.t.upper_usage = u;
                    r.t.disk_errors = 0;
                }
                (Err(e), _) | (_, Err(e)) => {
                    // a walk that met a directory being renamed tries again; one that keeps
                    // failing would leave the disk limit unenforced, so it ends the run
                    r.t.disk_errors += 1;
                    tracing::warn!("bundle {uuid}: measuring its disk use: {e}");
                    if r.t.disk_errors >= DISK_ERRORS_FATAL && r.stage == Stage::Running {
                        r.is_killed = true;
                        r.kill_message =
                            Some(format!("Could not measure the bundle's disk use: {e}"));
                    }
                }
            }
            r.t.disk_busy = false;
            // as the official worker: sleep max(10 × the walk, 1 s) between walks
            r.t.disk_at = Some(Instant::now() + (took * 10).saturating_sub(Duration::from_secs(1)));
        }
    });
}

/// Failed disk-use walks in a row that end a run.
const DISK_ERRORS_FATAL: u32 = 5;

/// What the run directory says about the run's container.
fn container_facts(rd: &RunDir, exists: bool) -> machine::Container {
    if !exists {
        return machine::Container::default();
    }
    let exit = rd.exit();
    let stderr = exit.as_ref().and_then(|_| {
        std::fs::read(rd.path.join("container.err"))
            .ok()
            .map(|b| String::from_utf8_lossy(&b[..b.len().min(2000)]).into_owned())
    });
    machine::Container {
        exists,
        uptime: exit
            .is_none()
            .then(|| rd.state().map(|st| now() - st.started_at))
            .flatten(),
        exit,
        monitor_alive: rd.monitor_pid().is_some(),
        monitor_started: rd.monitor_started(),
        cleaned: rd.cleaned(),
        stderr,
    }
}

/// Carry out what the state machine asked for.
fn perform(ctx: &Arc<Ctx>, run: &mut Run, rd: Option<&RunDir>, actions: &[Action]) {
    for a in actions {
        match a {
            Action::Kill => {
                tracing::info!(
                    "bundle {}: stopping the run ({})",
                    run.uuid(),
                    match (&run.kill_message, run.is_restaged) {
                        (_, true) => "restaged",
                        (Some(m), _) => m.as_str(),
                        (None, _) => "killed",
                    }
                );
                if let Some(Err(e)) = rd.map(|rd| rd.kill()) {
                    tracing::warn!("killing {}: {e}", run.uuid());
                }
            }
            Action::Recover => {
                if let Some(rd) = rd {
                    let _ = rd.recover();
                }
            }
            Action::MeasureDisk => measure_disk(ctx, run),
            Action::RemoveRunDir => {
                // unmount + delete the container's upper dir off the run loop
                if let Some(rd) = rd.cloned() {
                    let uuid = run.uuid().to_string();
                    let store = ctx.store.clone();
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = crate::run::remove(&store, &rd) {
                            tracing::warn!("removing the run directory of {uuid}: {e:#}");
                        }
                    });
                }
            }
            Action::ReleaseDependencies => {
                let uuid = run.uuid().to_string();
                if !ctx.shared_fs {
                    for d in &run.bundle.dependencies {
                        ctx.deps
                            .release(&uuid, &(d.parent_uuid.clone(), d.parent_path.clone()));
                    }
                }
                for p in std::mem::take(&mut run.paths_to_remove) {
                    if p.starts_with(&run.bundle_path)
                        || std::fs::canonicalize(&run.bundle_path)
                            .map(|b| p.starts_with(b))
                            .unwrap_or(false)
                    {
                        crate::store::discard(&p);
                    }
                }
            }
            Action::DeleteExcluded => delete_excluded(
                &run.bundle_path,
                &Excludes::new(&run.bundle.exclude_patterns()),
            ),
            Action::DiscardBundle => ctx.discard(&run.bundle_path),
            Action::CheckStillKnown => check_still_known(ctx, run),
        }
    }
}

/// The live accounting of a running container, from its cgroup.
fn account(run: &mut Run, rd: &RunDir) {
    if run.t.cgroup.is_none() {
        run.t.cgroup = rd.request().ok().map(|r| r.cgroup_path());
    }
    if let Some(cg) = &run.t.cgroup {
        let u = cw_runtime::cgroup::read(cg);
        run.container_time_user = u.cpu_user_ns as f64 / 1e9;
        run.container_time_system = u.cpu_system_ns as f64 / 1e9;
        run.max_memory = run.max_memory.max(u.memory_peak).max(u.memory_current);
        if run.resources.memory > 0 {
            run.memory_usage = u.memory_current as f64 / run.resources.memory as f64;
        }
        let cpu = u.cpu_user_ns + u.cpu_system_ns;
        if let Some((prev, t)) = run.t.last_cpu {
            let dt = t.elapsed().as_secs_f64();
            if dt > 0.0 && cpu >= prev {
                run.cpu_usage = (cpu - prev) as f64 / 1e9 / dt;
            }
        }
        run.t.last_cpu = Some((cpu, Instant::now()));
    }
}

fn running(ctx: &Arc<Ctx>, run: &mut Run) {
    let rd = run.run_dir(ctx);
    let c = match &rd {
        Some(rd) => container_facts(rd, rd.path.join("request.json").exists()),
        None => machine::Container::default(),
    };
    if let (Some(rd), true, None) = (&rd, c.exists, &c.exit) {
        account(run, rd);
    }
    let actions = machine::running(run, &c);
    perform(ctx, run, rd.as_ref(), &actions);
}

fn cleaning_up(ctx: &Arc<Ctx>, run: &mut Run) {
    let rd = run.run_dir(ctx);
    let c = match &rd {
        Some(rd) => container_facts(rd, rd.path.exists()),
        None => machine::Container::default(),
    };
    let actions = machine::cleaning_up(run, &c, ctx.shared_fs);
    perform(ctx, run, rd.as_ref(), &actions);
}

/// Shared-FS mode: exclude patterns are deleted in place, never outside the bundle (a walk
/// through fds that never follows a symlink, at any depth).
fn delete_excluded(root: &Path, ex: &Excludes) {
    use cw_runtime::fsx::{self, Entry, Step, Visit};
    struct Del<'a>(&'a Excludes);
    impl Visit for Del<'_> {
        fn entry(&mut self, e: &Entry) -> std::io::Result<Step> {
            if self.0.matches(&String::from_utf8_lossy(e.path)) {
                fsx::remove_all_at(e.dir, e.name)?;
                return Ok(Step::Skip);
            }
            Ok(Step::Descend)
        }
    }
    let r = fsx::open_dir(root)
        .and_then(|d| fsx::walk(std::os::fd::AsRawFd::as_raw_fd(&d), &mut Del(ex)));
    if let Err(e) = r {
        tracing::warn!("{}: deleting excluded files: {e}", root.display());
    }
}
