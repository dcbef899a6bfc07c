//! `cw worker`: a drop-in for CodaLab's `cl-worker` (protocol: `shared/reference/codalab-protocol.md`).
//!
//! Three tasks share one [`Ctx`]: the checkin loop (strictly serial long-polls that carry every
//! run's state out and the server's messages in), the run loop (one [`runs::step`] per run per
//! pass, woken by events), and the websocket listener (a frame means "check in now"). Each run's
//! container belongs to its own `cw` monitor process, so runs go on while the worker restarts;
//! the run table is saved in `<work-dir>/worker-state-<id>.json` after every change.

pub mod client;
pub mod deps;
pub mod files;
pub mod proto;
pub mod runs;

use client::Server;
use proto::{Checkin, Message, Stage};
use runs::{ImageState, Run};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// cl-worker's flags (same names, same defaults), plus cw's own.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// CodaLab server root; the worker adds /rest
    #[arg(long, default_value = "https://worksheets.codalab.org")]
    pub server: String,
    /// Websocket server root [default: --server with ws(s):// and /ws]
    #[arg(long)]
    pub ws_server: Option<String>,
    /// Scratch directory: runs, dependency cache, state
    #[arg(long, default_value = "codalab-worker-scratch")]
    pub work_dir: PathBuf,
    /// Scheduling tag (letters, digits, '-'); bundles pick it with --request-queue
    #[arg(long, visible_alias = "request-queue")]
    pub tag: Option<String>,
    /// Share the worker with this group
    #[arg(long)]
    pub group: Option<String>,
    /// Only run bundles whose queue matches --tag
    #[arg(long)]
    pub tag_exclusive: bool,
    /// CPUs to use: ALL or a list such as 0,1,4-7 (honoured, unlike cl-worker)
    #[arg(long, default_value = "ALL")]
    pub cpuset: String,
    /// GPUs to use: ALL, NONE, or indexes / UUIDs
    #[arg(long, default_value = "ALL")]
    pub gpuset: String,
    /// CDI spec directory for GPU runs' edits; repeatable (default: /etc/cdi, /var/run/cdi)
    #[arg(long = "cdi-spec-dir")]
    pub cdi_spec_dirs: Vec<PathBuf>,
    /// Cap on the dependency cache (archived bytes)
    #[arg(long, default_value = "10g")]
    pub max_work_dir_size: String,
    /// Cap on the image store; least recently used images go first
    #[arg(long)]
    pub max_image_cache_size: Option<String>,
    /// Refuse images bigger than this
    #[arg(long)]
    pub max_image_size: Option<String>,
    /// Memory to advertise [default: physical memory]
    #[arg(long)]
    pub max_memory: Option<String>,
    /// File with the username on line 1 and the password on line 2 (mode 600)
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Debug logging
    #[arg(long)]
    pub verbose: bool,
    /// Exit when no run has existed for --idle-seconds
    #[arg(long)]
    pub exit_when_idle: bool,
    #[arg(long, default_value_t = 0)]
    pub idle_seconds: u64,
    /// Accepted for compatibility; cw keeps a checkin open at all times
    #[arg(long, default_value_t = 5)]
    pub checkin_frequency_seconds: u64,
    /// Worker id [default: HOSTNAME(PID), as cl-worker; give a fixed one to resume runs after a restart]
    #[arg(long)]
    pub id: Option<String>,
    /// The server's bundle store is mounted here at the same paths: no downloads, no upload
    #[arg(long)]
    pub shared_file_system: bool,
    /// Exit after accepting this many runs (once they finish)
    #[arg(long, default_value_t = 999_999_999)]
    pub exit_after_num_runs: u64,
    /// On SIGTERM/SIGINT/SIGHUP, stop the runs and hand them back to the server (staged)
    #[arg(long)]
    pub pass_down_termination: bool,
    /// Remove the work directory on exit
    #[arg(long)]
    pub delete_work_dir_on_exit: bool,
    /// Exit (after 5 minutes) on an unexpected error instead of carrying on
    #[arg(long)]
    pub exit_on_exception: bool,
    /// Attempts per dependency download
    #[arg(long, default_value_t = 3)]
    pub download_dependencies_max_retries: u32,
    /// /dev/shm size of runs, GiB
    #[arg(long, default_value_t = 1)]
    pub shared_memory_size_gb: u64,
    /// Advertise the worker as preemptible
    #[arg(long)]
    pub preemptible: bool,
    /// Accepted for compatibility (cw makes no Docker networks)
    #[arg(long, default_value = "codalab_worker_network")]
    pub network_prefix: String,
    /// cl-worker's runtime choice: `docker` (cw stands in for it); `kubernetes` is refused
    #[arg(long, default_value = "docker", value_parser = ["docker", "kubernetes"])]
    pub bundle_runtime: String,
    #[arg(long, hide = true)]
    pub kubernetes_cluster_host: Option<String>,
    #[arg(long, hide = true)]
    pub kubernetes_auth_token: Option<String>,
    #[arg(long, hide = true)]
    pub kubernetes_cert_path: Option<String>,
    #[arg(long, hide = true)]
    pub kubernetes_cert: Option<String>,
    /// At most N runs at once (older cl-worker flag); 0 = as many as resources allow
    #[arg(long, default_value_t = 0)]
    pub slots: usize,
    /// cgroup under which runs' cgroups are made (e.g. the Slurm job's own cgroup)
    #[arg(long, default_value = "/cw")]
    pub cgroup_parent: String,
}

/// What every task of the worker shares.
pub struct Ctx {
    pub id: String,
    pub hostname: String,
    pub server: Arc<Server>,
    pub store: crate::store::Store,
    pub registry: Arc<crate::registry::Client>,
    pub deps: Arc<deps::Cache>,
    pub work_dir: PathBuf,
    pub exe: PathBuf,
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

fn size_arg(s: &str, what: &str) -> anyhow::Result<u64> {
    crate::config::parse_size(s).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

/// `--cpuset`: ALL (this process's affinity) or a list/ranges, which must be a subset of it.
pub fn parse_cpuset(spec: &str) -> anyhow::Result<Vec<usize>> {
    let allowed: Vec<usize> = {
        let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
        (0..nix::sched::CpuSet::count())
            .filter(|&i| set.is_set(i).unwrap_or(false))
            .collect()
    };
    if spec.trim().eq_ignore_ascii_case("all") {
        return Ok(allowed);
    }
    let mut out = vec![];
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || anyhow::anyhow!("--cpuset {spec:?}: {part:?} is not a CPU number or range");
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (
                a.parse::<usize>().map_err(|_| bad())?,
                b.parse::<usize>().map_err(|_| bad())?,
            ),
            None => {
                let n = part.parse::<usize>().map_err(|_| bad())?;
                (n, n)
            }
        };
        for c in a..=b {
            if !allowed.contains(&c) {
                anyhow::bail!("--cpuset {spec:?}: CPU {c} is not available to this process (allowed: {allowed:?})");
            }
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    if out.is_empty() {
        anyhow::bail!("--cpuset {spec:?} names no CPU");
    }
    Ok(out)
}

/// `--gpuset`: ALL, NONE/'' or a list of indexes and UUIDs of the GPUs NVML found.
pub fn parse_gpuset(
    spec: &str,
    all: &[cw_runtime::gpu::Gpu],
) -> anyhow::Result<Vec<cw_runtime::gpu::Gpu>> {
    let s = spec.trim();
    if s.eq_ignore_ascii_case("all") {
        return Ok(all.to_vec());
    }
    if s.is_empty() || s.eq_ignore_ascii_case("none") {
        return Ok(vec![]);
    }
    let mut out: Vec<cw_runtime::gpu::Gpu> = vec![];
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let g = all
            .iter()
            .find(|g| g.uuid == p || p.parse::<u32>().map(|i| i == g.index).unwrap_or(false))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--gpuset {spec:?}: no GPU {p:?} on this node ({} found)",
                    all.len()
                )
            })?;
        if !out.iter().any(|o| o.uuid == g.uuid) {
            out.push(g.clone());
        }
    }
    Ok(out)
}

fn credentials(a: &WorkerArgs) -> anyhow::Result<(String, String)> {
    if let Some(p) = &a.password_file {
        use std::os::unix::fs::PermissionsExt;
        let md = std::fs::metadata(p)
            .map_err(|e| anyhow::anyhow!("--password-file {}: {e}", p.display()))?;
        if md.permissions().mode() & 0o077 != 0 {
            anyhow::bail!(
                "--password-file {}: permissions {:o} give group or others access; chmod 600 it",
                p.display(),
                md.permissions().mode() & 0o777
            );
        }
        let text = std::fs::read_to_string(p)?;
        let mut lines = text.lines();
        let u = lines.next().unwrap_or("").trim().to_string();
        let pw = lines
            .next()
            .unwrap_or("")
            .trim_end_matches(['\r', '\n'])
            .to_string();
        if u.is_empty() {
            anyhow::bail!(
                "--password-file {}: line 1 must be the username",
                p.display()
            );
        }
        return Ok((u, pw));
    }
    let ask = |what: &str| -> anyhow::Result<String> {
        eprint!("{what}: ");
        let mut s = String::new();
        std::io::stdin().read_line(&mut s)?;
        Ok(s.trim_end_matches(['\r', '\n']).to_string())
    };
    let u = match std::env::var("CODALAB_USERNAME") {
        Ok(u) => u,
        Err(_) => ask("Username")?,
    };
    let p = match std::env::var("CODALAB_PASSWORD") {
        Ok(p) => p,
        Err(_) => ask("Password")?,
    };
    Ok((u, p))
}

fn physical_memory() -> u64 {
    nix::sys::sysinfo::sysinfo()
        .map(|s| s.ram_total())
        .unwrap_or(0)
}

// fsblkcnt_t is u64 here but not on every target
#[allow(clippy::useless_conversion)]
fn free_disk(p: &Path) -> u64 {
    nix::sys::statvfs::statvfs(p)
        .map(|s| u64::from(s.blocks_available()) * u64::from(s.fragment_size()))
        .unwrap_or(0)
}

fn default_ws(server: &str) -> String {
    let s = server.trim_end_matches('/');
    let s = if let Some(r) = s.strip_prefix("https://") {
        format!("wss://{r}")
    } else if let Some(r) = s.strip_prefix("http://") {
        format!("ws://{r}")
    } else {
        s.to_string()
    };
    format!("{s}/ws")
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
        match cw_runtime::monitor::write_atomic(&self.state_file, &b) {
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
        let target = trash.join(format!("{name}.{}", runs::now().to_bits()));
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

    fn checkin_body(&self) -> Checkin {
        let runs = self.runs.lock().unwrap();
        let entries: Vec<_> = runs
            .values()
            // a finalized run is the server's business now: reporting it again would move the
            // bundle back from ready to finalizing
            .filter(|r| r.stage != Stage::Finished && !r.finalized)
            .map(|r| r.checkin_entry(&self.id))
            .collect();
        // --slots: with N runs held, advertise no free CPU (the server subtracts its runs' CPUs)
        let held_cpus: u64 = runs.values().map(|r| r.resources.cpus.max(1)).sum();
        let full = self.slots > 0 && runs.len() >= self.slots;
        drop(runs);
        let cpus = if full {
            held_cpus.min(self.cpus.len() as u64)
        } else {
            self.cpus.len() as u64
        };
        let left = self
            .args
            .exit_after_num_runs
            .saturating_sub(self.accepted.load(Ordering::Relaxed));
        Checkin {
            tag: self.args.tag.clone(),
            group_name: self.args.group.clone(),
            cpus,
            gpus: self.gpus.len() as u64,
            memory_bytes: self.memory_bytes,
            free_disk_bytes: free_disk(&self.work_dir),
            dependencies: if self.shared_fs {
                vec![]
            } else {
                self.deps.keys()
            },
            hostname: self.hostname.clone(),
            runs: entries,
            shared_file_system: self.shared_fs,
            tag_exclusive: self.args.tag_exclusive && self.args.tag.is_some(),
            exit_after_num_runs: left,
            is_terminating: self.terminating.load(Ordering::Relaxed),
            preemptible: self.args.preemptible,
        }
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

impl Ctx {
    /// A run just finished: the server should hear it now, not when the checkin that is open
    /// returns (up to 5 s later; checkins must stay serial). Asking the server for the bundle's
    /// info makes it send us a `read` on that open checkin, which then returns at once and the
    /// next checkin carries the news. Costs one small request; harmless if nothing is open.
    fn poke(self: &Arc<Self>, uuid: &str) {
        if !self.in_checkin.load(Ordering::Relaxed) || self.shared_fs {
            return;
        }
        let (server, uuid) = (self.server.clone(), uuid.to_string());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), server.contents_info(&uuid, ""))
                .await;
        });
    }
}

async fn handle_message(ctx: &Arc<Ctx>, m: Message) {
    match m {
        Message::Run { bundle, resources } => {
            let uuid = bundle.uuid.clone();
            if ctx.accepted.load(Ordering::Relaxed) >= ctx.args.exit_after_num_runs {
                tracing::info!("bundle {uuid}: not accepted, --exit-after-num-runs reached");
                return;
            }
            if !deps::valid_uuid(&uuid) {
                tracing::warn!("run message with an invalid uuid {uuid:?} ignored");
                return;
            }
            if let Some(r) = ctx.runs.lock().unwrap().get(&uuid) {
                if r.stage != Stage::Preparing || r.t.busy {
                    tracing::warn!(
                        "bundle {uuid}: run message for a run already in {}; ignored",
                        r.stage.key()
                    );
                    return;
                }
            }
            match ctx.server.start_bundle(&ctx.id, &uuid, &ctx.hostname).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!("Bundle {uuid} no longer assigned to this worker");
                    return;
                }
                Err(e) => {
                    tracing::warn!("start_bundle {uuid}: {e}");
                    return;
                }
            }
            let path = match (&bundle.location, ctx.shared_fs) {
                (Some(loc), true) => PathBuf::from(loc),
                _ => ctx.work_dir.join("runs").join(&uuid),
            };
            tracing::info!("bundle {uuid}: accepted ({})", resources.docker_image);
            ctx.runs
                .lock()
                .unwrap()
                .insert(uuid, Run::new(bundle, resources, path));
            ctx.accepted.fetch_add(1, Ordering::Relaxed);
            ctx.save();
            ctx.wake_runs.notify_one();
        }
        Message::Kill { uuid, kill_message } => {
            if let Some(r) = ctx.runs.lock().unwrap().get_mut(&uuid) {
                r.is_killed = true;
                r.kill_message = Some(kill_message.unwrap_or_else(|| "Kill requested".into()));
            }
            ctx.wake_runs.notify_one();
        }
        Message::MarkFinalized { uuid } => {
            if let Some(r) = ctx.runs.lock().unwrap().get_mut(&uuid) {
                r.finalized = true;
            }
            ctx.wake_runs.notify_one();
        }
        Message::Write {
            uuid,
            subpath,
            string,
        } => {
            let found = ctx
                .runs
                .lock()
                .unwrap()
                .get(&uuid)
                .map(|r| (r.bundle_path.clone(), r.dep_child_paths()));
            let Some((path, deps)) = found else { return };
            let norm = files::normalize(&subpath)
                .map(|c| c.join("/"))
                .unwrap_or_default();
            if deps.contains(&norm) {
                return;
            }
            tokio::task::spawn_blocking(move || {
                if let Err(e) = files::write_file(&path, &uuid, &subpath, &string) {
                    tracing::warn!("write to {uuid}/{subpath}: {}", e.message);
                }
            });
        }
        Message::Read {
            socket_id,
            uuid,
            path,
            read_args,
        } => {
            let ctx = ctx.clone();
            tokio::spawn(async move { read(&ctx, socket_id, &uuid, &path, read_args).await });
        }
        Message::Netcat {
            socket_id,
            uuid,
            port,
            message,
        } => {
            let ctx = ctx.clone();
            tokio::spawn(async move { netcat(&ctx, socket_id, &uuid, port, &message).await });
        }
    }
}

async fn read(ctx: &Arc<Ctx>, socket_id: i64, uuid: &str, path: &str, args: proto::ReadArgs) {
    let found = ctx
        .runs
        .lock()
        .unwrap()
        .get(uuid)
        .map(|r| (r.bundle_path.clone(), r.dep_child_paths()));
    let res = match found {
        None => Err(files::ReadError {
            code: 500,
            message: "Bundle no longer running".into(),
        }),
        Some((bundle, deps)) => read_inner(ctx, socket_id, uuid, path, args, bundle, deps).await,
    };
    if let Err(e) = res {
        if let Err(err) = ctx
            .server
            .reply_error(&ctx.id, socket_id, e.code, &e.message)
            .await
        {
            tracing::warn!("replying to read {socket_id}: {err}");
        }
    }
}

async fn read_inner(
    ctx: &Arc<Ctx>,
    socket_id: i64,
    uuid: &str,
    path: &str,
    args: proto::ReadArgs,
    bundle: PathBuf,
    deps: HashSet<String>,
) -> Result<(), files::ReadError> {
    let internal = |e: String| files::ReadError {
        code: 500,
        message: e,
    };
    let (u, p) = (uuid.to_string(), path.to_string());
    let resolve = move || files::resolve(&bundle, &u, &p);
    let data: Vec<u8> = match args.kind.as_str() {
        "get_target_info" => {
            let norm = files::normalize(path)
                .map(|c| c.join("/"))
                .unwrap_or_default();
            if !path.is_empty() && deps.contains(&norm) {
                return Err(files::ReadError {
                    code: 404,
                    message: format!("{path} not found in bundle {uuid}"),
                });
            }
            let depth = args.depth.unwrap_or(0);
            let (uuid2, path2) = (uuid.to_string(), path.to_string());
            let mut info = tokio::task::spawn_blocking(move || {
                resolve().map(|t| files::target_info(&t, depth))
            })
            .await
            .map_err(|e| internal(e.to_string()))??;
            if path.is_empty() && depth > 0 {
                if let Some(c) = info.get_mut("contents").and_then(|c| c.as_array_mut()) {
                    c.retain(|e| !deps.contains(e["name"].as_str().unwrap_or("")));
                }
            }
            info["resolved_target"] = serde_json::json!({"bundle_uuid": uuid2, "subpath": path2});
            return ctx
                .server
                .reply(
                    &ctx.id,
                    socket_id,
                    &serde_json::json!({ "target_info": info }),
                )
                .await
                .map_err(|e| internal(e.to_string()));
        }
        "stream_directory" | "stream_file" => {
            let (uuid2, path2) = (uuid.to_string(), path.to_string());
            let is_dir = args.kind == "stream_directory";
            let t = tokio::task::spawn_blocking(resolve)
                .await
                .map_err(|e| internal(e.to_string()))??;
            let fd = t.open(&uuid2, &path2)?;
            if is_dir != t.is_dir() {
                return Err(files::ReadError {
                    code: 400,
                    message: format!(
                        "{uuid2}/{path2} is not a {}",
                        if is_dir { "directory" } else { "file" }
                    ),
                });
            }
            let skip: HashSet<String> = if path.is_empty() {
                deps
            } else {
                HashSet::new()
            };
            let (body, producer) = runs::stream_body(Arc::new(AtomicU64::new(0)), move |w| {
                use std::io::Write;
                use std::os::fd::AsRawFd;
                if is_dir {
                    let ex = vec![
                        ".git".to_string(),
                        "._*".to_string(),
                        "__MACOSX".to_string(),
                    ];
                    let mut w =
                        files::tar_gz_dir(fd.as_raw_fd(), &skip, &files::Excludes::new(&ex), w)?;
                    w.flush()
                } else {
                    let mut e = flate2::write::GzEncoder::new(w, flate2::Compression::fast());
                    std::io::copy(&mut std::fs::File::from(fd), &mut e)?;
                    e.finish()?.flush()
                }
            });
            let r = ctx.server.reply_data(&ctx.id, socket_id, body).await;
            let _ = producer.await;
            return r.map_err(|e| internal(e.to_string()));
        }
        "read_file_section" | "summarize_file" => {
            let (uuid2, path2) = (uuid.to_string(), path.to_string());
            let a = args.clone();
            tokio::task::spawn_blocking(move || -> Result<Vec<u8>, files::ReadError> {
                let t = resolve()?;
                let mut f = std::fs::File::from(t.open(&uuid2, &path2)?);
                let ioe = |e: std::io::Error| files::ReadError {
                    code: 500,
                    message: e.to_string(),
                };
                let raw = if a.kind == "read_file_section" {
                    files::read_section(&mut f, a.offset.unwrap_or(0), a.length.unwrap_or(0))
                        .map_err(ioe)?
                } else {
                    files::summarize(
                        &mut f,
                        a.num_head_lines.unwrap_or(0),
                        a.num_tail_lines.unwrap_or(0),
                        a.max_line_length.unwrap_or(128).max(1),
                        a.truncation_text.as_deref().unwrap_or(""),
                    )
                    .map_err(ioe)?
                    .into_bytes()
                };
                Ok(files::gzip_bytes(&raw))
            })
            .await
            .map_err(|e| internal(e.to_string()))??
        }
        other => {
            return Err(files::ReadError {
                code: 400,
                message: format!("Unsupported read_type for read: {other}"),
            })
        }
    };
    ctx.server
        .reply_data(&ctx.id, socket_id, reqwest::Body::from(data))
        .await
        .map_err(|e| internal(e.to_string()))
}

/// `netcat`: connect to the port inside the run's network namespace (so it works for runs with
/// no network at all), send the message, return everything read until EOF.
async fn netcat(ctx: &Arc<Ctx>, socket_id: i64, uuid: &str, port: u16, message: &str) {
    let pid = {
        let runs = ctx.runs.lock().unwrap();
        runs.get(uuid)
            .and_then(|r| r.run_dir(ctx))
            .and_then(|rd| rd.state())
            .and_then(|s| s.pid)
    };
    let Some(pid) = pid else {
        let _ = ctx
            .server
            .reply_error(&ctx.id, socket_id, 500, "Bundle no longer running")
            .await;
        return;
    };
    let msg = message.as_bytes().to_vec();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(netcat_in_netns(pid, port, &msg));
    });
    let res = rx
        .await
        .unwrap_or_else(|_| Err("netcat thread died".into()));
    let r = match res {
        Ok(data) => {
            ctx.server
                .reply_data(&ctx.id, socket_id, reqwest::Body::from(data))
                .await
        }
        Err(e) => ctx.server.reply_error(&ctx.id, socket_id, 500, &e).await,
    };
    if let Err(e) = r {
        tracing::warn!("netcat reply {socket_id}: {e}");
    }
}

/// Runs on a dedicated thread: `setns` changes only the calling thread's namespace.
fn netcat_in_netns(pid: i32, port: u16, msg: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::{Read, Write};
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|e| format!("the run's network: {e}"))?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("entering the run's network: {e}"))?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connecting to port {port} of the run: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    s.write_all(msg).map_err(|e| e.to_string())?;
    let mut out = vec![];
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if out.is_empty() => return Err(format!("reading from port {port}: {e}")),
            Err(_) => break,
        }
    }
    Ok(out)
}

/// The websocket wake-up: any frame means "check in now". Reconnects forever.
async fn ws_listener(ctx: Arc<Ctx>, url: String) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as W;
    let full = format!("{}/worker/{}", url.trim_end_matches('/'), ctx.id);
    let mut logged = false;
    loop {
        match tokio_tungstenite::connect_async(full.as_str()).await {
            Ok((mut ws, _)) => {
                tracing::debug!("websocket connected: {full}");
                logged = false;
                loop {
                    if ws.send(W::Text("a".into())).await.is_err() {
                        break;
                    }
                    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                        Err(_) => continue,
                        Ok(None) | Ok(Some(Err(_))) => break,
                        Ok(Some(Ok(W::Close(_)))) => break,
                        Ok(Some(Ok(_))) => ctx.wake_checkin.notify_one(),
                    }
                }
            }
            Err(e) => {
                if !logged {
                    tracing::warn!("websocket {full}: {e}; checkins go on without it");
                    logged = true;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
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
            if let Err(e) = cw_runtime::monitor::write_atomic(&state_file, &b) {
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
            exe: PathBuf::from("/proc/self/exe"),
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
        let res = run_worker(ctx, ws_url).await;
        // a clean exit (an error return is one too: it is not a crash of a bundle's making)
        let _ = std::fs::remove_file(&alive);
        res
    })
}

async fn run_worker(ctx: Arc<Ctx>, ws_url: String) -> anyhow::Result<i32> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let restage = ctx.args.pass_down_termination;
    // run loop
    let rl = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut passes = 0;
            loop {
                // a stage change may enable the next one at once (cleaning up → uploading)
                if ctx.process_runs() && passes < 20 {
                    passes += 1;
                    tokio::task::yield_now().await;
                    continue;
                }
                passes = 0;
                let _ = tokio::time::timeout(Duration::from_millis(1000), ctx.wake_runs.notified())
                    .await;
            }
        })
    };
    tokio::spawn(ws_listener(ctx.clone(), ws_url));
    eprintln!("Worker started!");
    tracing::info!(
        "worker {} at {} ({} cpus, {} gpus, {} memory)",
        ctx.id,
        ctx.server.base(),
        ctx.cpus.len(),
        ctx.gpus.len(),
        crate::progress::human(ctx.memory_bytes)
    );
    let mut failures = 0u32;
    let mut idle_since = Instant::now();
    let mut last_ok = false;
    loop {
        // termination, idleness, run count
        if ctx.terminating.load(Ordering::Relaxed) {
            let left = ctx
                .runs
                .lock()
                .unwrap()
                .values()
                .filter(|r| !matches!(r.stage, Stage::Finished | Stage::Restaged))
                .count();
            if !restage || left == 0 {
                break;
            }
        } else {
            let n = ctx.runs.lock().unwrap().len();
            if n > 0 {
                idle_since = Instant::now();
            }
            if ctx.args.exit_when_idle
                && n == 0
                && last_ok
                && idle_since.elapsed() > Duration::from_secs(ctx.args.idle_seconds)
            {
                tracing::info!("idle for {}s: exiting", ctx.args.idle_seconds);
                break;
            }
            if n == 0 && ctx.accepted.load(Ordering::Relaxed) >= ctx.args.exit_after_num_runs {
                tracing::info!("{} runs done: exiting", ctx.args.exit_after_num_runs);
                break;
            }
        }
        let body = ctx.checkin_body();
        ctx.in_checkin.store(true, Ordering::Relaxed);
        let res = tokio::select! {
            r = ctx.server.checkin(&ctx.id, &body) => Some(r),
            _ = term.recv() => None,
            _ = int.recv() => None,
            _ = hup.recv() => None,
        };
        ctx.in_checkin.store(false, Ordering::Relaxed);
        let Some(res) = res else {
            tracing::info!(
                "termination signal: {}",
                if restage {
                    "handing runs back to the server"
                } else {
                    "exiting; runs keep going"
                }
            );
            ctx.terminating.store(true, Ordering::Relaxed);
            if restage {
                for r in ctx.runs.lock().unwrap().values_mut() {
                    if !matches!(r.stage, Stage::Finished | Stage::Restaged) {
                        r.is_restaged = true;
                    }
                }
                ctx.wake_runs.notify_one();
            }
            continue;
        };
        match res {
            Ok(bytes) => {
                failures = 0;
                last_ok = true;
                if ctx.terminating.load(Ordering::Relaxed) {
                    continue; // every message is ignored while terminating
                }
                let before = ctx.accepted.load(Ordering::Relaxed);
                match proto::parse_messages(&bytes) {
                    Ok(msgs) => {
                        for m in msgs {
                            match m {
                                Ok(m) => handle_message(&ctx, m).await,
                                Err(e) => tracing::warn!("checkin: {e}"),
                            }
                        }
                    }
                    Err(e) => tracing::warn!("checkin: {e}"),
                }
                // as cl-worker: one pass over the runs before the next checkin reports them
                ctx.process_runs();
                if ctx.accepted.load(Ordering::Relaxed) > before {
                    // A run was just accepted. The server applies a checkin's report when it
                    // arrives and then holds it 5 s: the next checkin must carry the container's
                    // start (a short run reported `preparing` stays so on the server for 5 s,
                    // and `cl write`/`netcat`/`cat` are refused meanwhile), so wait for the
                    // starts in flight (≤ 5 s; an image still downloading is not waited for).
                    let t0 = Instant::now();
                    while ctx.starting() && t0.elapsed() < Duration::from_secs(5) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        ctx.process_runs();
                    }
                    // Then give a short run a moment to finish, so that its end is not held
                    // 5 s either. (cl-worker leaves ~5 s between its long-polls all the time;
                    // this gap is one of at most 1.5 s, only here.) A permit an earlier run's
                    // end left would end the wait at once: drained first.
                    let _ = tokio::time::timeout(Duration::ZERO, ctx.finalizing.notified()).await;
                    ctx.process_runs();
                    let _ = tokio::time::timeout(
                        Duration::from_millis(1500),
                        ctx.finalizing.notified(),
                    )
                    .await;
                    ctx.process_runs();
                }
            }
            Err(e) => {
                failures += 1;
                last_ok = false;
                tracing::warn!("Disconnected from server! Failed check in: {e}");
                if failures >= 2 {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), ctx.wake_checkin.notified())
                            .await;
                }
            }
        }
    }
    if restage {
        // one last report so the server restages at once instead of after 60 s offline
        ctx.process_runs();
        let body = ctx.checkin_body();
        let _ =
            tokio::time::timeout(Duration::from_secs(20), ctx.server.checkin(&ctx.id, &body)).await;
        ctx.runs
            .lock()
            .unwrap()
            .retain(|_, r| !matches!(r.stage, Stage::Finished | Stage::Restaged));
    }
    rl.abort();
    ctx.save();
    if ctx.args.delete_work_dir_on_exit {
        crate::store::discard(&ctx.work_dir);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_url() {
        assert_eq!(
            default_ws("https://worksheets.codalab.org"),
            "wss://worksheets.codalab.org/ws"
        );
        assert_eq!(
            default_ws("http://127.0.0.1:2900/"),
            "ws://127.0.0.1:2900/ws"
        );
    }

    #[test]
    fn cpusets() {
        let all = parse_cpuset("ALL").unwrap();
        assert!(!all.is_empty());
        assert_eq!(parse_cpuset(&all[0].to_string()).unwrap(), vec![all[0]]);
        assert!(parse_cpuset("100000").is_err());
        assert!(parse_cpuset("x").is_err());
    }
}
