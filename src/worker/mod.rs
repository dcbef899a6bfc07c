//! `cw worker`: a drop-in for CodaLab's `cl-worker` (protocol: `shared/reference/codalab-protocol.md`).
//!
//! Three tasks share one [`Ctx`]: the checkin loop (strictly serial long-polls that carry every
//! run's state out and the server's messages in), the run loop (one [`runs::step`] per run per
//! pass, woken by events), and the websocket listener (a frame means "check in now"). Each run's
//! container belongs to its own `cw` monitor process, so runs go on while the worker restarts;
//! the run table is saved in `<work-dir>/worker-state-<id>.json` after every change.

mod args;
mod checkin;
pub mod client;
mod contract;
pub mod deps;
pub mod files;
mod images;
mod machine;
pub mod proto;
pub mod record;
pub mod runs;
mod serve;
mod upload;

use args::{credentials, default_ws, physical_memory, size_arg};
pub use args::{parse_cpuset, parse_gpuset, WorkerArgs};

use client::Server;
use images::ImageState;
use proto::Stage;
use record::Run;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// cl-worker's flags (same names, same defaults), plus cw's own.
/// What every task of the worker shares.
pub struct Ctx {
    pub id: String,
    pub hostname: String,
    pub server: Arc<Server>,
    pub store: crate::store::Store,
    pub registry: Arc<crate::registry::Client>,
    pub deps: Arc<deps::Cache>,
    pub work_dir: PathBuf,
    pub exe: cw_runtime::launch::SealedMonitor,
    pub shared_fs: bool,
    pub cpus: Vec<usize>,
    pub gpus: Vec<cw_runtime::gpu::Gpu>,
    pub driver_version: String,
    pub memory_bytes: u64,
    pub shm_size: u64,
    pub slots: usize,
    pub cgroup_parent: String,
    /// Runs that ask for network get their own namespace through pasta (else the host's).
    pub private_network: bool,
    pub max_image_size: Option<u64>,
    pub max_image_cache_size: Option<u64>,
    pub args: WorkerArgs,
    pub runs: Mutex<BTreeMap<String, Run>>,
    pub images: Mutex<HashMap<String, ImageState>>,
    pub wake_runs: Arc<Notify>,
    pub wake_checkin: Notify,
    pub terminating: AtomicBool,
    pub accepted: AtomicU64,
    /// A checkin long-poll is open on the server.
    pub in_checkin: AtomicBool,
    /// A run reached FINALIZING (the checkin loop may be waiting to report it).
    pub finalizing: Notify,
    /// The run table as last written (a pass that changes nothing writes nothing).
    last_saved: Mutex<Vec<u8>>,
    state_file: PathBuf,
}

impl Ctx {
    fn save(&self) {
        let runs = self.runs.lock().unwrap();
        let b = serde_json::to_vec(&*runs).unwrap();
        drop(runs);
        let mut last = self.last_saved.lock().unwrap();
        if *last == b {
            return;
        }
        match cw_runtime::rundir::write_atomic(&self.state_file, &b) {
            Ok(()) => *last = b,
            Err(e) => tracing::warn!("saving {}: {e}", self.state_file.display()),
        }
    }

    /// Remove a bundle directory without holding up the run loop (a bundle can be gigabytes):
    /// renamed into `<work-dir>/trash` at once, deleted by a blocking task. Whatever a crash
    /// leaves in the trash is deleted at the next start.
    pub fn discard(&self, path: &Path) {
        let trash = self.work_dir.join("trash");
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target = trash.join(format!("{name}.{}", record::now().to_bits()));
        let victim =
            match std::fs::create_dir_all(&trash).and_then(|_| std::fs::rename(path, &target)) {
                Ok(()) => target,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !path.exists() => return,
                Err(_) => path.to_path_buf(), // another filesystem (shared-fs bundles): in place
            };
        tokio::task::spawn_blocking(move || {
            if let Err(e) = crate::store::remove_tree(&victim) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("removing {}: {e}", victim.display());
                }
            }
        });
    }

    /// A run's container is being started (its start task is in flight).
    fn starting(&self) -> bool {
        self.runs
            .lock()
            .unwrap()
            .values()
            .any(|r| r.stage == Stage::Preparing && r.t.busy)
    }

    /// One pass over every run; drops finished ones. True if any run changed stage.
    fn process_runs(self: &Arc<Self>) -> bool {
        let mut changed = false;
        let mut runs = self.runs.lock().unwrap();
        let mut held_cpus = HashSet::new();
        let mut held_gpus = HashSet::new();
        let mut active = 0;
        for r in runs.values() {
            if r.stage == Stage::Running || (r.stage == Stage::Preparing && r.t.busy) {
                held_cpus.extend(r.cpuset.iter().copied());
                held_gpus.extend(r.gpuset.iter().cloned());
                active += 1;
            }
        }
        let mut held = (held_cpus, held_gpus, active);
        for r in runs.values_mut() {
            let before = (r.stage, r.t.busy);
            runs::step(self, r, &held);
            if r.t.busy && !before.1 && r.stage == Stage::Preparing {
                held.0.extend(r.cpuset.iter().copied());
                held.1.extend(r.gpuset.iter().cloned());
                held.2 += 1;
            }
            if r.stage != before.0 {
                changed = true;
                if r.stage == Stage::Finalizing {
                    self.finalizing.notify_one();
                    self.poke(r.uuid());
                }
                tracing::info!(
                    "bundle {}: {} -> {}",
                    r.uuid(),
                    before.0.key(),
                    r.stage.key()
                );
            }
        }
        runs.retain(|_, r| r.stage != Stage::Finished);
        drop(runs);
        self.save();
        if !self.shared_fs {
            self.deps.evict();
        }
        changed
    }
}

/// The store and registry settings from cw's global flags and config file.
pub struct Setup {
    pub store: crate::store::Store,
    pub registry: crate::registry::config::RegistryConfig,
}

pub fn main(g: Setup, a: WorkerArgs) -> anyhow::Result<i32> {
    if let Some(t) = &a.tag {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            anyhow::bail!("--tag {t:?}: only letters, digits and '-' are allowed");
        }
    }
    let (user, password) = credentials(&a)?;
    let cpus = parse_cpuset(&a.cpuset)?;
    let inv = if a.gpuset.trim().eq_ignore_ascii_case("none") || a.gpuset.trim().is_empty() {
        cw_runtime::gpu::Inventory::default()
    } else {
        cw_runtime::gpu::discover()
    };
    if let Some(n) = &inv.note {
        tracing::info!("GPUs: {n}");
    }
    let gpus = parse_gpuset(&a.gpuset, &inv.gpus)?;
    let ram = physical_memory();
    let memory_bytes = match &a.max_memory {
        Some(m) => size_arg(m, "--max-memory")?.min(ram),
        None => ram,
    };
    if a.bundle_runtime == "kubernetes" {
        anyhow::bail!("--bundle-runtime kubernetes is not supported: cw runs each bundle on this node, in a container of its own, and cannot hand bundles to a Kubernetes cluster (cl-worker does that); leave the flag out or pass --bundle-runtime docker");
    }
    for (flag, v) in [
        ("--kubernetes-cluster-host", &a.kubernetes_cluster_host),
        ("--kubernetes-auth-token", &a.kubernetes_auth_token),
        ("--kubernetes-cert-path", &a.kubernetes_cert_path),
        ("--kubernetes-cert", &a.kubernetes_cert),
    ] {
        if v.is_some() {
            // as cl-worker: only applicable with --bundle-runtime kubernetes
            tracing::warn!("{flag} is ignored: it applies only to --bundle-runtime kubernetes");
        }
    }
    let max_deps = size_arg(&a.max_work_dir_size, "--max-work-dir-size")?;
    let max_image_size = a
        .max_image_size
        .as_deref()
        .map(|s| size_arg(s, "--max-image-size"))
        .transpose()?;
    let max_image_cache_size = a
        .max_image_cache_size
        .as_deref()
        .map(|s| size_arg(s, "--max-image-cache-size"))
        .transpose()?;
    std::fs::create_dir_all(&a.work_dir)
        .map_err(|e| anyhow::anyhow!("--work-dir {}: {e}", a.work_dir.display()))?;
    let work_dir = std::fs::canonicalize(&a.work_dir)?;
    std::fs::create_dir_all(work_dir.join("runs"))?;
    if a.shared_file_system {
        // the server reads bundles from here itself, perhaps as another user
        tracing::warn!("--shared-file-system: {} stays readable by other users (the server reads bundles there); runs' setuid files are reachable by local users who can reach it", work_dir.display());
    } else {
        // a bundle's root can make setuid files in its bundle directory: other local users must
        // not reach them
        crate::store::close_to_others(&work_dir).map_err(|e| {
            anyhow::anyhow!(
                "--work-dir {}: closing it to other users: {e}",
                work_dir.display()
            )
        })?;
    }
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into());
    let id =
        a.id.clone()
            .unwrap_or_else(|| format!("{hostname}({})", std::process::id()));
    let state_file = work_dir.join(format!("worker-state-{}.json", id.replace('/', "_")));
    let ws_url = a.ws_server.clone().unwrap_or_else(|| default_ws(&a.server));
    let server = Arc::new(Server::new(&a.server, user, password)?);
    let rootless = cw_runtime::userns::needed();
    if rootless {
        tracing::info!(
            "running without root: each bundle runs in a user namespace of its own where {}",
            cw_runtime::userns::describe()
        );
        if let Some(why) = cw_runtime::userns::own_cgroup_refusal() {
            tracing::warn!(
                "bundles get no cgroup ({why}): their memory limits are enforced by sampling their processes every {:?}, their CPUs are their affinity only, and their process limit is their RLIMIT_NPROC",
                cw_runtime::sample::INTERVAL
            );
        }
    }
    let private_network = cw_runtime::monitor::pasta_path().is_some();
    if !private_network {
        tracing::warn!("pasta (package passt) not found: runs that request network will share the host's network, loopback services included");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        if let Err(e) = server.login().await {
            tracing::error!("{e}");
            eprintln!("Cannot log into the bundle service. Please check your worker credentials.");
            return Ok(1);
        }
        let deps = Arc::new(deps::Cache::open(
            &work_dir,
            max_deps,
            a.download_dependencies_max_retries,
            server.clone(),
        )?);
        let mut runs: BTreeMap<String, Run> = BTreeMap::new();
        if let Ok(b) = std::fs::read(&state_file) {
            match serde_json::from_slice(&b) {
                Ok(r) => runs = r,
                Err(e) => tracing::warn!(
                    "{}: unreadable run table, starting empty: {e}",
                    state_file.display()
                ),
            }
        }
        if !runs.is_empty() {
            tracing::info!(
                "resuming {} run(s) from {}",
                runs.len(),
                state_file.display()
            );
        }
        // a worker with this --id that did not exit cleanly left its marker: count a strike
        // against each of its runs (a bundle that aborts the worker must not do so for ever)
        let alive = work_dir.join(format!("worker-{}.alive", id.replace('/', "_")));
        let other = std::fs::read_to_string(&alive)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .filter(|&p| p != std::process::id() as i32)
            .filter(|p| Path::new(&format!("/proc/{p}")).exists());
        if let Some(p) = other {
            tracing::warn!("another process ({p}) may be a worker with id {id} on this work dir: two workers must not share an id");
        } else if alive.exists() {
            tracing::warn!("the last worker with id {id} stopped unexpectedly");
            for r in runs.values_mut() {
                if r.note_unclean_restart() {
                    tracing::warn!(
                        "bundle {}: failed after {} unexpected worker stops",
                        r.uuid(),
                        r.crash_strikes
                    );
                }
            }
            let b = serde_json::to_vec(&runs).unwrap();
            if let Err(e) = cw_runtime::rundir::write_atomic(&state_file, &b) {
                tracing::warn!("saving {}: {e}", state_file.display());
            }
        }
        std::fs::write(&alive, format!("{}\n", std::process::id()))
            .map_err(|e| anyhow::anyhow!("{}: {e}", alive.display()))?;
        let ctx = Arc::new(Ctx {
            id,
            hostname,
            server,
            store: g.store,
            registry: crate::registry::Client::new(g.registry),
            deps,
            work_dir: work_dir.clone(),
            exe: cw_runtime::launch::SealedMonitor::new()
                .map_err(|e| anyhow::anyhow!("the runs' monitor: {e}"))?,
            shared_fs: a.shared_file_system,
            cpus,
            gpus,
            driver_version: inv.driver_version.unwrap_or_default(),
            memory_bytes,
            shm_size: a.shared_memory_size_gb << 30,
            slots: a.slots,
            cgroup_parent: a.cgroup_parent.clone(),
            private_network,
            max_image_size,
            max_image_cache_size,
            args: a.clone(),
            runs: Mutex::new(runs),
            images: Mutex::new(HashMap::new()),
            wake_runs: Arc::new(Notify::new()),
            wake_checkin: Notify::new(),
            terminating: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            in_checkin: AtomicBool::new(false),
            finalizing: Notify::new(),
            last_saved: Mutex::new(vec![]),
            state_file,
        });
        // runs on this store whose monitor died (a previous worker's job cancelled under Slurm,
        // with another --id: nobody else would look at them) still hold mounts and cgroups
        {
            let ctx = ctx.clone();
            tokio::task::spawn_blocking(move || crate::run::recover_lost(&ctx.store));
        }
        // bundle directories a previous worker was deleting when it stopped
        if let Ok(rd) = std::fs::read_dir(work_dir.join("trash")) {
            let left: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
            tokio::task::spawn_blocking(move || {
                for p in left {
                    crate::store::discard(&p);
                }
            });
        }
        let res = checkin::run_worker(ctx, ws_url).await;
        // a clean exit (an error return is one too: it is not a crash of a bundle's making)
        let _ = std::fs::remove_file(&alive);
        res
    })
}
