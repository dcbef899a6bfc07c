//! One bundle's life on this worker (spec §7): PREPARING (cpus/gpus, dependencies, image) →
//! RUNNING (a `cw` monitor per run, limits) → CLEANING_UP → UPLOADING_RESULTS → FINALIZING
//! (until the server's `mark_finalized`) → FINISHED; or RESTAGED. `step` is called for every
//! run on every pass; whatever may block (starting the container, uploading) runs in a task
//! that writes its result back into the run, so one slow run never holds up the others.

use super::deps::{DepStage, Key};
use super::files::{self, Excludes};
use super::proto::{duration_str, size_str, BundleInfo, CheckinRun, Resources, Stage, StageStat};
use super::Ctx;
use crate::image::reference::Reference;
use crate::store::ImageRecord;
use cw_runtime::monitor::{Reason, RunDir};
use cw_runtime::request::{BindMount, Limits, Network};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

    fn set_stage(&mut self, s: Stage) {
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

    fn add_failure(&mut self, msg: &str) {
        self.failure_message = Some(match self.failure_message.take() {
            Some(f) if !f.is_empty() => format!("{f}. {msg}"),
            _ => msg.to_string(),
        });
    }

    /// The `finalize` helper: fold the kill message in, move to FINALIZING.
    fn finalize(&mut self) {
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

    fn fail_preparing(&mut self, msg: String) {
        self.failure_message = Some(msg);
        self.set_stage(Stage::CleaningUp);
    }

    pub fn run_dir(&self, ctx: &Ctx) -> Option<RunDir> {
        self.container
            .as_ref()
            .map(|c| RunDir::new(crate::run::runs_dir(&ctx.store).join(c)))
    }
}

/// An image being pulled for runs, shared by every run that asks for the same name.
#[derive(Debug, Clone)]
pub enum ImageState {
    Downloading(String),
    Ready(Box<ImageRecord>, String, Instant),
    Failed(String, Instant),
}

/// The image's state, starting a pull if none is current (as the official worker, each new run
/// re-checks the registry: a HEAD, no GET, when the tag did not move).
fn image_state(ctx: &Arc<Ctx>, image: &str) -> ImageState {
    let mut m = ctx.images.lock().unwrap();
    match m.get(image) {
        Some(ImageState::Ready(_, _, t)) if t.elapsed() > Duration::from_secs(60) => {}
        Some(ImageState::Failed(_, t)) if t.elapsed() > Duration::from_secs(10) => {}
        Some(s) => return s.clone(),
        None => {}
    }
    m.insert(image.to_string(), ImageState::Downloading(String::new()));
    let (ctx2, image2) = (ctx.clone(), image.to_string());
    tokio::spawn(async move {
        let res = pull_image(&ctx2, &image2).await;
        ctx2.images.lock().unwrap().insert(image2, res);
        ctx2.wake_runs.notify_one();
    });
    ImageState::Downloading(String::new())
}

async fn pull_image(ctx: &Arc<Ctx>, image: &str) -> ImageState {
    let r = match Reference::parse(image) {
        Ok(r) => r,
        Err(e) => return ImageState::Failed(e.to_string(), Instant::now()),
    };
    let (ctx2, name) = (ctx.clone(), image.to_string());
    let progress = crate::progress::Progress::quiet().with_status(Arc::new(move |s: String| {
        let mut m = ctx2.images.lock().unwrap();
        if let Some(ImageState::Downloading(cur)) = m.get_mut(&name) {
            *cur = s;
        }
    }));
    let opts = crate::pull::PullOptions {
        progress,
        // --max-image-size bounds what the pull may unpack, not only what it left
        max_unpacked: ctx.max_image_size,
        ..Default::default()
    };
    let digest_name = |rec: &ImageRecord| {
        let d = rec.index.clone().unwrap_or_else(|| rec.manifest.clone());
        Reference {
            tag: None,
            digest: Some(d),
            ..r.clone()
        }
        .familiar()
    };
    let res = crate::pull::pull(&ctx.registry, &ctx.store, &r, &opts).await;
    let rec = match res {
        Ok(p) => p.image,
        Err(e) => match ctx.store.lookup(image) {
            Ok(rec) if ctx.store.image_complete(&rec.manifest).is_some() => {
                tracing::warn!("{image} cannot be pulled ({e}); using the copy in the store");
                rec
            }
            _ => return ImageState::Failed(e.to_string(), Instant::now()),
        },
    };
    if let Some(max) = ctx.max_image_size {
        if rec.size > max {
            return ImageState::Failed(
                format!(
                    "The size of {image}: {} exceeds the maximum image size allowed {}.",
                    size_str(rec.size as f64),
                    size_str(max as f64)
                ),
                Instant::now(),
            );
        }
    }
    if let Some(cap) = ctx.max_image_cache_size {
        if ctx.store.size() > cap {
            if let Err(e) = ctx.store.prune(Some(cap)) {
                tracing::warn!("image cache cleanup: {e}");
            }
        }
    }
    let d = digest_name(&rec);
    ImageState::Ready(Box::new(rec), d, Instant::now())
}

/// A dependency's child path as given by the server, checked: relative, no `..`, not empty
/// (`.` means "each top-level entry").
/// Where a dependency with an absolute key goes in the container: the key, normalised; not the
/// root and not inside the kernel's own trees (/proc, /sys, /dev).
fn absolute_dependency_path(child: &str) -> Result<String, String> {
    let c = files::normalize(child)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| format!("dependency path {child:?} is not a path in the container"))?;
    if matches!(c[0].as_str(), "proc" | "sys" | "dev") {
        return Err(format!(
            "dependency path {child:?} would cover the container's /{}",
            c[0]
        ));
    }
    Ok(format!("/{}", c.join("/")))
}

fn child_components(child: &str) -> Result<Vec<String>, String> {
    if child == "." {
        return Ok(vec![]);
    }
    let c = files::normalize(child)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| format!("dependency path {child:?} is not a path inside the bundle"))?;
    Ok(c)
}

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
            if run.is_restaged {
                run.set_stage(Stage::Restaged);
            } else if run.finalized {
                if !ctx.shared_fs {
                    ctx.discard(&run.bundle_path);
                }
                run.run_status = "Finished".into();
                run.set_stage(Stage::Finished);
            } else {
                check_still_known(ctx, run);
            }
        }
        Stage::Finished | Stage::Restaged => {}
    }
}

/// Unexpected worker stops in one stage of a run that fail it.
pub const CRASH_STRIKES: u32 = 3;

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

/// The container contract (spec §8): `/bin/bash -c "( cmd ) >stdout 2>stderr"` in `/<uuid>`
/// (rw bind of the bundle dir, HOME there), dependencies read-only under `/<uuid>_dependencies`
/// with symlinks from the bundle dir, CODALAB=true, memory limit, assigned cpuset and GPUs,
/// shm size, no network unless asked for.
fn start_container(
    ctx: &Ctx,
    run: &Run,
    image: &ImageRecord,
    deps: &[(String, PathBuf)],
    gpus: Vec<cw_runtime::gpu::Gpu>,
) -> Result<(String, Vec<PathBuf>), String> {
    let uuid = run.uuid();
    let bp = &run.bundle_path;
    std::fs::create_dir_all(bp).map_err(|e| format!("creating {}: {e}", bp.display()))?;
    let bp = std::fs::canonicalize(bp).map_err(|e| format!("{}: {e}", bp.display()))?;
    let mut mounts = vec![BindMount {
        source: bp.clone(),
        destination: format!("/{uuid}"),
        readonly: false,
    }];
    let mut to_remove: Vec<PathBuf> = vec![];
    let bundle_dir = std::fs::File::open(&bp).map_err(|e| format!("{}: {e}", bp.display()))?;
    for (child, src) in deps {
        if child.starts_with('/') && !ctx.shared_fs {
            // an absolute key names a path in the container, as cl-worker's
            // os.path.join("/<uuid>_dependencies", key) does: mounted there, read-only; nothing
            // is made on the host (cl-worker would make its symlink at that host path)
            mounts.push(BindMount {
                source: src.clone(),
                destination: absolute_dependency_path(child)?,
                readonly: true,
            });
            continue;
        }
        let entries: Vec<(Vec<String>, PathBuf)> = if child == "." {
            std::fs::read_dir(src)
                .map_err(|e| format!("dependency {}: {e}", src.display()))?
                .flatten()
                .map(|e| (vec![e.file_name().to_string_lossy().into_owned()], e.path()))
                .collect()
        } else {
            vec![(child_components(child)?, src.clone())]
        };
        for (comps, src) in entries {
            let rel = comps.join("/");
            if ctx.shared_fs {
                mounts.push(BindMount {
                    source: src,
                    destination: format!("/{uuid}/{rel}"),
                    readonly: true,
                });
                to_remove.push(bp.join(&comps[0]));
                continue;
            }
            let target = format!("/{uuid}_dependencies/{rel}");
            mounts.push(BindMount {
                source: src,
                destination: target.clone(),
                readonly: true,
            });
            // the symlink <bundle>/<child> → /<uuid>_dependencies/<child>: made through fds,
            // parents created, nothing followed (the directory may hold a previous attempt's files)
            let (name, parents) = comps.split_last().unwrap();
            let parent = if parents.is_empty() {
                bundle_dir.try_clone().map_err(|e| e.to_string())?.into()
            } else {
                let mut tree = crate::store::unpack::Tree::open(&bp).map_err(|e| e.to_string())?;
                let p: Vec<&[u8]> = parents.iter().map(|s| s.as_bytes()).collect();
                tree.resolve_dir(&p, true)
                    .map_err(|e| format!("{}: {e}", parents.join("/")))?
            };
            use std::os::fd::AsRawFd;
            let _ = cw_runtime::fsx::remove_all_at(parent.as_raw_fd(), name.as_bytes());
            nix::unistd::symlinkat(target.as_str(), Some(parent.as_raw_fd()), name.as_str())
                .map_err(|e| format!("linking {rel}: {e}"))?;
            to_remove.push(bp.join(&comps[0]));
        }
    }
    let mut cmd = run.bundle.command.trim_end().to_string();
    if !cmd.ends_with(';') {
        cmd.push(';');
    }
    let mut img = image.clone();
    img.run.entrypoint.clear();
    let name = format!("codalab_run_{uuid}");
    if !cw_runtime::request::valid_id(&name) {
        return Err(format!("bundle uuid {uuid:?} cannot name a run"));
    }
    // a previous attempt's run directory (worker restarted before cleaning up): remove it
    let old = RunDir::new(crate::run::runs_dir(&ctx.store).join(&name));
    if old.path.exists() {
        let _ = old.kill();
        let _ = crate::run::remove(&ctx.store, &old);
    }
    let mut env = vec![format!("HOME=/{uuid}"), "CODALAB=true".to_string()];
    if !gpus.is_empty() {
        env.push(format!(
            "NVIDIA_VISIBLE_DEVICES={}",
            gpus.iter()
                .map(|g| g.uuid.as_str())
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    let opts = crate::run::RunOptions {
        name: Some(name.clone()),
        args: vec![
            "/bin/bash".into(),
            "-c".into(),
            format!("( {cmd} ) >stdout 2>stderr"),
        ],
        env,
        mounts,
        workdir: Some(format!("/{uuid}")),
        user: Some(format!(
            "{}:{}",
            nix::unistd::getuid(),
            nix::unistd::getgid()
        )),
        limits: Limits {
            memory: (run.resources.memory > 0).then_some(run.resources.memory),
            // docker's default, so cl-worker's: memory+swap = 2 × memory
            memory_swap: None,
            cpus: None,
            cpuset: Some(
                run.cpuset
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .filter(|s| !s.is_empty()),
            pids: Some(cw_runtime::request::DEFAULT_PIDS_LIMIT),
            shm_size: ctx.shm_size,
        },
        network: match (run.resources.network, ctx.private_network) {
            (false, _) => Network::None,
            (true, true) => Network::Private,
            (true, false) => Network::Host,
        },
        // the monitor enforces the time limit too, so it holds while the worker is down
        time_limit: (run.resources.time > 0).then_some(run.resources.time + 1),
        kill_grace_secs: 1,
        stdout: None,
        stderr: None,
        cgroup_parent: ctx.cgroup_parent.clone(),
        readonly_rootfs: false,
        force_copy: false,
        hostname: None,
        gpus,
        driver_version: ctx.driver_version.clone(),
        devices: vec![],
        cdi_dirs: ctx.args.cdi_spec_dirs.clone(),
    };
    let (rd, mut req) =
        crate::run::prepare(&ctx.store, &img, &opts).map_err(|e| format!("{e:#}"))?;
    req.stdout = Some(rd.path.join("container.out"));
    req.stderr = Some(rd.path.join("container.err"));
    rd.write_request(&req).map_err(|e| e.to_string())?;
    let meta = serde_json::json!({"image": run.resources.docker_image, "manifest": image.manifest, "created": crate::store::now(), "codalab_bundle": uuid});
    let _ = crate::store::replace_file(&rd.path.join("meta.json"), meta.to_string().as_bytes());
    let child = cw_runtime::monitor::spawn(
        &ctx.exe,
        &rd.path,
        std::process::Stdio::null(),
        std::process::Stdio::null(),
    )
    .map_err(|e| format!("starting the monitor: {e}"))?;
    let wake = ctx.wake_runs.clone();
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
        wake.notify_one();
    });
    Ok((name, to_remove))
}

fn limit_messages(run: &Run, oom: bool, time_limit_hit: bool) -> Vec<String> {
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

fn apply_exit(run: &mut Run, ex: &cw_runtime::monitor::ExitStatus, container_err: Option<String>) {
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

fn running(ctx: &Arc<Ctx>, run: &mut Run) {
    let Some(rd) = run.run_dir(ctx) else {
        run.failure_message = Some("Docker container not found".into());
        run.set_stage(Stage::CleaningUp);
        return;
    };
    if !rd.path.join("request.json").exists() {
        run.failure_message = Some("Docker container not found".into());
        run.set_stage(Stage::CleaningUp);
        return;
    }
    if let Some(ex) = rd.exit() {
        let err = std::fs::read(rd.path.join("container.err"))
            .ok()
            .map(|b| String::from_utf8_lossy(&b[..b.len().min(2000)]).into_owned());
        apply_exit(run, &ex, err);
        measure_disk(ctx, run);
        run.run_status = "Uploading results.".into();
        run.set_stage(Stage::CleaningUp);
        return;
    }
    // live accounting
    if let Some(st) = rd.state() {
        run.container_time_total = (now() - st.started_at).max(0.0);
    }
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
    measure_disk(ctx, run);
    let msgs = limit_messages(run, false, false);
    if !msgs.is_empty() {
        run.is_killed = true;
        run.kill_message = Some(msgs.join(" "));
    }
    if run.is_killed || run.is_restaged {
        if !run.t.kill_sent {
            run.t.kill_sent = true;
            tracing::info!(
                "bundle {}: stopping the run ({})",
                run.uuid(),
                match (&run.kill_message, run.is_restaged) {
                    (_, true) => "restaged",
                    (Some(m), _) => m.as_str(),
                    (None, _) => "killed",
                }
            );
            if let Err(e) = rd.kill() {
                tracing::warn!("killing {}: {e}", run.uuid());
            }
        }
        run.set_stage(Stage::CleaningUp);
    }
}

fn cleaning_up(ctx: &Arc<Ctx>, run: &mut Run) {
    if let Some(rd) = run.run_dir(ctx) {
        if rd.path.exists() {
            match rd.exit() {
                None => {
                    if rd.monitor_pid().is_some() {
                        if (run.is_killed || run.is_restaged) && !run.t.kill_sent {
                            run.t.kill_sent = true;
                            let _ = rd.kill();
                        }
                        return; // still stopping
                    }
                    if rd.monitor_started() {
                        let _ = rd.recover();
                    } else {
                        return; // the monitor has not written its pid yet
                    }
                    return;
                }
                Some(ex) => {
                    if !rd.cleaned() && rd.monitor_pid().is_some() {
                        return; // the monitor is unmounting
                    }
                    if run.exitcode.is_none() {
                        apply_exit(run, &ex, None);
                    }
                    // unmount + delete the container's upper dir off the run loop
                    let uuid = run.uuid().to_string();
                    let store = ctx.store.clone();
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = crate::run::remove(&store, &rd) {
                            tracing::warn!("removing the run directory of {uuid}: {e:#}");
                        }
                    });
                }
            }
        }
    }
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
    if run.is_restaged {
        run.set_stage(Stage::Restaged);
        return;
    }
    if !ctx.shared_fs && run.has_contents {
        run.run_status = "Uploading results.".into();
        run.set_stage(Stage::UploadingResults);
        return;
    }
    if ctx.shared_fs && run.has_contents {
        delete_excluded(
            &run.bundle_path,
            &Excludes::new(&run.bundle.exclude_patterns()),
        );
    }
    run.finalize();
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

fn uploading(ctx: &Arc<Ctx>, run: &mut Run) {
    if run.is_restaged {
        run.set_stage(Stage::Restaged);
        return;
    }
    if let Some(res) = run.t.upload_result.take() {
        if let Err(e) = res {
            run.add_failure(&format!("Error while uploading: {e}"));
        }
        run.finalize();
        return;
    }
    if run.t.busy {
        run.run_status = format!(
            "Uploading results: {} uploaded (archived size).",
            size_str(run.t.upload_progress.load(Ordering::Relaxed) as f64)
        );
        return;
    }
    run.t.busy = true;
    run.run_status = "Upload started.".into();
    let (ctx2, uuid) = (ctx.clone(), run.uuid().to_string());
    let (path, ex, store, progress) = (
        run.bundle_path.clone(),
        Excludes::new(&run.bundle.exclude_patterns()),
        run.bundle.store(),
        run.t.upload_progress.clone(),
    );
    tokio::spawn(async move {
        let res = upload_with_retry(&ctx2, &uuid, &path, &ex, &store, &progress).await;
        if let Some(r) = ctx2.runs.lock().unwrap().get_mut(&uuid) {
            r.t.busy = false;
            r.t.upload_result = Some(res);
        }
        ctx2.wake_runs.notify_one();
    });
}

/// Bytes written by a blocking producer, sent as a stream body (and counted).
pub struct ChannelWriter {
    pub tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    pub counter: Arc<AtomicU64>,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tx
            .blocking_send(bytes::Bytes::copy_from_slice(buf))
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the upload stopped")
            })?;
        self.counter.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A body streamed from a blocking producer through a bounded channel.
pub fn stream_body<F>(
    counter: Arc<AtomicU64>,
    produce: F,
) -> (reqwest::Body, tokio::task::JoinHandle<std::io::Result<()>>)
where
    F: FnOnce(std::io::BufWriter<ChannelWriter>) -> std::io::Result<()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
    let h = tokio::task::spawn_blocking(move || {
        produce(std::io::BufWriter::with_capacity(
            1 << 16,
            ChannelWriter { tx, counter },
        ))
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    (reqwest::Body::wrap_stream(stream), h)
}

async fn upload_with_retry(
    ctx: &Arc<Ctx>,
    uuid: &str,
    path: &Path,
    ex: &Excludes,
    store: &str,
    progress: &Arc<AtomicU64>,
) -> Result<(), String> {
    let mut attempt = 0u32;
    loop {
        progress.store(0, Ordering::Relaxed);
        let dir = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let ex2 = ex.clone();
        let (body, producer) = stream_body(progress.clone(), move |w| {
            use std::os::fd::AsRawFd;
            let mut w = files::tar_gz_dir(dir.as_raw_fd(), &HashSet::new(), &ex2, w)?;
            w.flush()
        });
        let res = ctx.server.upload(uuid, store, body).await;
        let produced = producer.await;
        match (res, produced) {
            (Ok(()), Ok(Ok(()))) => return Ok(()),
            // the archive failed: the server saw a cut body, and this is why
            (_, Ok(Err(e))) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(format!("archiving the results: {e}"))
            }
            (Ok(()), Ok(Err(e))) => return Err(format!("archiving the results: {e}")),
            (_, Err(e)) => return Err(format!("archiving the results: {e}")),
            (Err(e), _) if e.retriable() && attempt < 720 => {
                attempt += 1;
                let wait = Duration::from_secs((1u64 << attempt.min(5)).min(30));
                tracing::warn!("uploading {uuid} (attempt {attempt}): {e}; again in {wait:?}");
                tokio::time::sleep(wait).await;
            }
            (Err(e), _) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(time: u64, memory: u64, disk: u64) -> Run {
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
    fn absolute_dependency_keys_name_container_paths() {
        assert_eq!(absolute_dependency_path("/foo/bar").unwrap(), "/foo/bar");
        assert_eq!(
            absolute_dependency_path("/foo/./x/../bar/").unwrap(),
            "/foo/bar"
        );
        assert!(absolute_dependency_path("/").is_err());
        assert!(absolute_dependency_path("/../..").is_err());
        assert!(absolute_dependency_path("/proc/self").is_err());
        assert!(absolute_dependency_path("/dev").is_err());
        assert_eq!(absolute_dependency_path("/devices").unwrap(), "/devices");
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

    #[test]
    fn child_paths() {
        assert_eq!(child_components("a/b").unwrap(), vec!["a", "b"]);
        assert!(child_components("../x").is_err());
        assert!(child_components("").is_err());
        assert_eq!(child_components(".").unwrap(), Vec::<String>::new());
        assert_eq!(child_components("/abs").unwrap(), vec!["abs"]);
    }
}
