//! The `cw` command line.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use cw::config;
use cw::image::manifest::Platform;
use cw::image::reference::Reference;
use cw::progress::{human, Progress};
use cw::pull::{self, PullOptions};
use cw::registry::config::RegistryConfig;
use cw::registry::Client;
use cw::store::Store;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "cw", version, about = "Daemonless container runner and CodaLab Worksheets worker", long_about = None)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Global {
    /// Image store and run state directory [default: /var/lib/cw for root, $XDG_DATA_HOME/cw otherwise]
    #[arg(long, global = true, env = "CW_STORE")]
    store: Option<PathBuf>,
    /// Config file [default: /etc/cw/config.toml for root, ~/.config/cw/config.toml otherwise]
    #[arg(long, global = true, env = "CW_CONFIG")]
    config: Option<PathBuf>,
    /// Registry mirror: URL (for docker.io) or REGISTRY=URL; repeatable, tried in order
    #[arg(
        long = "registry-mirror",
        global = true,
        env = "CW_REGISTRY_MIRROR",
        value_delimiter = ','
    )]
    registry_mirror: Vec<String>,
    /// Registry (host[:port]) spoken to over plain http; loopback registries always are
    #[arg(
        long = "insecure-registry",
        global = true,
        env = "CW_INSECURE_REGISTRY",
        value_delimiter = ','
    )]
    insecure_registry: Vec<String>,
    /// Log level (error, warn, info, debug, trace) or a tracing filter
    #[arg(long, global = true, env = "CW_LOG", default_value = "warn")]
    log: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pull an image from a registry into the store
    Pull(PullArgs),
    /// List images in the store
    Images {
        /// Only print image ids
        #[arg(short, long)]
        quiet: bool,
    },
    /// Remove images (a name untags; the last name or an id deletes the image)
    Rmi {
        #[arg(required = true)]
        images: Vec<String>,
        /// Remove even if a running container uses it
        #[arg(short, long)]
        force: bool,
    },
    /// Remove unused layers; with --max-size, also least-recently-used images until the store fits
    Prune {
        /// Target size for the store, e.g. 20g
        #[arg(long)]
        max_size: Option<String>,
    },
    /// Show an image's record (JSON)
    Inspect { image: String },
    /// List the NVIDIA GPUs of this node (through NVML)
    Gpus {
        /// JSON output
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a new container
    Run(Box<RunArgs>),
    /// List runs
    Ps,
    /// Stop a run (SIGTERM, then SIGKILL after its grace period)
    Kill { id: String },
    /// Remove finished runs
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
        /// Kill it first if it is running
        #[arg(short, long)]
        force: bool,
    },
    /// Show a run's resource usage (JSON): live from its cgroup, or final
    Stats { id: String },
    /// Print a run's output (its stdout, and its stderr to stderr) when it went to files (`-d`,
    /// `--stdout`, `--stderr`)
    Logs {
        /// Keep printing what the run writes until it ends
        #[arg(short, long)]
        follow: bool,
        /// Start with only the last N lines of each
        #[arg(long)]
        tail: Option<usize>,
        id: String,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff); `cw man | man -l -`
    Man,
    /// Run as a CodaLab Worksheets worker (a drop-in for cl-worker)
    Worker(Box<cw::worker::WorkerArgs>),
    /// Internal: the per-run monitor process
    #[command(name = "__monitor", hide = true)]
    Monitor { dir: PathBuf },
    /// Load images from a `docker save` archive or an OCI layout (directory or tar)
    Load {
        /// Archive or directory
        #[arg(short, long)]
        input: PathBuf,
        /// Platform to pick from multi-platform OCI indexes
        #[arg(long)]
        platform: Option<String>,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Image to run (pulled if missing, see --pull)
    #[arg(long)]
    image: String,
    /// Environment variable NAME=VALUE (NAME alone copies it from here); repeatable
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Bind mount SRC:DST[:ro|rw]; repeatable
    #[arg(short = 'v', long = "volume")]
    volume: Vec<String>,
    /// Working directory inside the container [default: the image's, else /]
    #[arg(short = 'w', long)]
    workdir: Option<String>,
    /// UID[:GID] or NAME[:GROUP] from the image's /etc/passwd [default: the image's user]
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// Memory limit, e.g. 512m, 2g
    #[arg(short = 'm', long)]
    memory: Option<String>,
    /// Memory plus swap (docker's --memory-swap): default twice --memory; equal to it for no
    /// swap; -1 for unlimited swap
    #[arg(long, allow_negative_numbers = true)]
    memory_swap: Option<String>,
    /// CPU quota in CPUs, e.g. 1.5
    #[arg(long)]
    cpus: Option<f64>,
    /// CPUs the run may use, e.g. 0-3,7
    #[arg(long)]
    cpuset: Option<String>,
    /// Maximum number of processes and threads (0 or -1: no limit)
    #[arg(long, default_value_t = cw_runtime::request::DEFAULT_PIDS_LIMIT, allow_negative_numbers = true)]
    pids_limit: i64,
    /// Size of /dev/shm
    #[arg(long, default_value = "64m")]
    shm_size: String,
    /// none: a network namespace with only loopback; private: its own namespace with outbound
    /// access through pasta (no host loopback, no inbound); host: the host's network
    #[arg(long, default_value = "none", value_parser = ["none", "private", "host"])]
    network: String,
    /// Kill the run after this long, e.g. 30s, 30m, 2h
    #[arg(long)]
    time_limit: Option<String>,
    /// Time between SIGTERM and SIGKILL when a run is stopped
    #[arg(long, default_value = "10s")]
    stop_timeout: String,
    /// Run name (id) [default: random]
    #[arg(long)]
    name: Option<String>,
    /// Write the container's stdout to this file
    #[arg(long)]
    stdout: Option<PathBuf>,
    /// Write the container's stderr to this file
    #[arg(long)]
    stderr: Option<PathBuf>,
    /// Start and print the run id; output goes to files in the run directory unless given
    #[arg(short, long)]
    detach: bool,
    /// Keep the run directory after the run ends (cw rm removes it)
    #[arg(long)]
    keep: bool,
    /// When to pull the image: missing, always, never
    #[arg(long, default_value = "missing", value_parser = ["missing", "always", "never"])]
    pull: String,
    /// Platform os/arch[/variant] when pulling
    #[arg(long)]
    platform: Option<String>,
    /// cgroup under which the run's cgroup is made
    #[arg(long, default_value = "/cw")]
    cgroup_parent: String,
    /// Mount the root filesystem read-only
    #[arg(long)]
    read_only: bool,
    /// Copy the layers instead of mounting overlayfs
    #[arg(long)]
    no_overlay: bool,
    /// GPUs: a count (N free ones), all, none, or indexes/UUIDs (0,2 or GPU-3bb1…, MIG-…)
    #[arg(long)]
    gpus: Option<String>,
    /// Pass a host device node through: HOST[:CONTAINER[:PERMS]] (PERMS ⊆ rwm); repeatable
    #[arg(long = "device", value_parser = parse_device_arg)]
    devices: Vec<cw_runtime::request::Device>,
    /// CDI spec directory for --gpus; repeatable (default: /etc/cdi, /var/run/cdi)
    #[arg(long = "cdi-spec-dir")]
    cdi_spec_dirs: Vec<PathBuf>,
    /// Command and arguments; one argument with spaces or shell syntax runs under /bin/sh -c
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Args)]
struct PullArgs {
    /// Image reference, e.g. ubuntu, codalab/ubuntu:1.9, host:5000/ns/name@sha256:…
    image: String,
    /// Platform os/arch[/variant] to choose from a multi-platform image [default: this host]
    #[arg(long)]
    platform: Option<String>,
    /// Registry credentials user:password (else ~/.docker/config.json)
    #[arg(long, env = "CW_REGISTRY_CREDS", hide_env_values = true)]
    creds: Option<String>,
    /// Layers downloaded at once
    #[arg(long, default_value_t = pull::DEFAULT_PARALLEL)]
    parallel: usize,
    /// No progress output
    #[arg(short, long)]
    quiet: bool,
}

struct Ctx {
    store: Store,
    registry: RegistryConfig,
    max_store_size: Option<u64>,
    max_image_size: Option<u64>,
}

fn context(g: &Global) -> Result<Ctx> {
    let (path, explicit) = match &g.config {
        Some(p) => (p.clone(), true),
        None => (config::default_path(), false),
    };
    let file = config::load(&path, explicit)?;
    let mut registry = file.registry_config();
    let timeout = std::env::var("CW_REGISTRY_TIMEOUT")
        .ok()
        .or(file.registry_timeout.clone());
    if let Some(t) = timeout {
        registry.timeout = Some(
            humantime::parse_duration(&t)
                .ok()
                .or_else(|| t.parse::<u64>().ok().map(std::time::Duration::from_secs))
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    anyhow::anyhow!("registry timeout {t:?}: not a duration like 60s")
                })?,
        );
    }
    for m in &g.registry_mirror {
        registry.add_mirror_arg(m)?;
    }
    for h in &g.insecure_registry {
        registry.add_insecure(h);
    }
    let root = g
        .store
        .clone()
        .or(file.store.clone())
        .unwrap_or_else(cw::store::default_root);
    let store =
        Store::open(&root).with_context(|| format!("opening the store at {}", root.display()))?;
    let size = |v: &Option<String>| {
        v.as_deref()
            .map(config::parse_size)
            .transpose()
            .map_err(anyhow::Error::msg)
    };
    let max_store_size = size(&file.max_store_size)?;
    let max_image_size = size(&file.max_image_size)?;
    Ok(Ctx {
        store,
        registry,
        max_store_size,
        max_image_size,
    })
}

fn platform(p: &Option<String>) -> Result<Platform> {
    match p {
        Some(s) => Platform::parse(s).map_err(anyhow::Error::msg),
        None => Ok(Platform::host()),
    }
}

/// After a pull: keep the store under its configured size (high watermark, down to 80 %).
fn auto_gc(ctx: &Ctx) {
    if let Some(max) = ctx.max_store_size {
        if ctx.store.size() > max {
            match ctx.store.prune(Some(max / 10 * 8)) {
                Ok((removed, freed)) => tracing::info!(
                    "store above {}: freed {} ({} items)",
                    human(max),
                    human(freed),
                    removed.len()
                ),
                Err(e) => tracing::warn!("automatic garbage collection: {e}"),
            }
        }
    }
}

fn cmd_pull(ctx: Ctx, a: PullArgs) -> Result<()> {
    let r = Reference::parse(&a.image)?;
    let mut reg = ctx.registry.clone();
    if let Some(c) = &a.creds {
        let (u, p) = c.split_once(':').context("--creds must be user:password")?;
        reg.creds = Some((u.to_string(), p.to_string()));
    }
    let opts = PullOptions {
        platform: platform(&a.platform)?,
        parallel: a.parallel,
        progress: Progress::auto(a.quiet),
        only_if_missing: false,
        max_unpacked: ctx.max_image_size,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = Client::new(reg);
    let res = rt.block_on(pull::pull(&client, &ctx.store, &r, &opts))?;
    if !a.quiet {
        if res.up_to_date {
            eprintln!("{}: image is up to date", r.familiar());
        } else {
            eprintln!(
                "{}: pulled {} layer(s), {} already present",
                r.familiar(),
                res.fetched_layers,
                res.reused_layers
            );
        }
    }
    println!("{}", res.image.manifest);
    auto_gc(&ctx);
    Ok(())
}

static MONITOR_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward_to_monitor(_: libc::c_int) {
    let pid = MONITOR_PID.load(std::sync::atomic::Ordering::Relaxed);
    if pid > 0 {
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

fn duration(s: &str, what: &str) -> Result<u64> {
    let t = s.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    humantime::parse_duration(t)
        .map(|d| d.as_secs())
        .with_context(|| format!("{what} {s:?} is not a duration like 30s, 5m, 2h"))
}

fn cmd_run(ctx: Ctx, a: RunArgs) -> Result<()> {
    let r = Reference::parse(&a.image)?;
    cw::run::recover_lost(&ctx.store);
    let image = match (a.pull.as_str(), ctx.store.lookup(&a.image)) {
        ("never", Ok(i)) => i,
        ("never", Err(e)) => return Err(e.into()),
        ("missing", Ok(i)) if ctx.store.image_complete(&i.manifest).is_some() => i,
        _ => {
            let opts = PullOptions {
                platform: platform(&a.platform)?,
                progress: Progress::auto(false),
                max_unpacked: ctx.max_image_size,
                ..Default::default()
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let client = Client::new(ctx.registry.clone());
            let res = rt.block_on(pull::pull(&client, &ctx.store, &r, &opts))?;
            drop(rt);
            auto_gc(&ctx);
            res.image
        }
    };
    ctx.store.touch(&image.manifest);
    let mounts = a
        .volume
        .iter()
        .map(|v| cw::run::parse_volume(v))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let memory = a
        .memory
        .as_deref()
        .map(config::parse_size)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let memory_swap = match a.memory_swap.as_deref() {
        None => None,
        Some("-1") => Some(-1),
        Some(v) => {
            let total = config::parse_size(v).map_err(anyhow::Error::msg)?;
            match memory {
                Some(m) if total >= m => Some(total as i64),
                Some(_) => bail!("--memory-swap {v} must be at least --memory"),
                None => bail!("--memory-swap needs --memory"),
            }
        }
    };
    if let Some(c) = a.cpus {
        if !(c > 0.0 && c.is_finite()) {
            bail!("--cpus {c} must be a positive number");
        }
    }
    let opts = cw::run::RunOptions {
        name: a.name.clone(),
        args: a.command.clone(),
        env: a.env.clone(),
        mounts,
        workdir: a.workdir.clone(),
        user: a.user.clone(),
        limits: cw_runtime::request::Limits {
            memory,
            memory_swap,
            cpus: a.cpus,
            cpuset: a.cpuset.clone(),
            pids: (a.pids_limit > 0).then_some(a.pids_limit),
            shm_size: config::parse_size(&a.shm_size).map_err(anyhow::Error::msg)?,
        },
        network: match a.network.as_str() {
            "host" => cw_runtime::request::Network::Host,
            "private" => cw_runtime::request::Network::Private,
            _ => cw_runtime::request::Network::None,
        },
        time_limit: a
            .time_limit
            .as_deref()
            .map(|t| duration(t, "--time-limit"))
            .transpose()?,
        kill_grace_secs: duration(&a.stop_timeout, "--stop-timeout")?,
        stdout: a.stdout.clone(),
        stderr: a.stderr.clone(),
        cgroup_parent: a.cgroup_parent.clone(),
        readonly_rootfs: a.read_only,
        force_copy: a.no_overlay,
        hostname: None,
        gpus: vec![],
        driver_version: String::new(),
        devices: a.devices.clone(),
        cdi_dirs: a.cdi_spec_dirs.clone(),
    };
    let mut opts = opts;
    if let Some(spec) = &a.gpus {
        let inv = cw_runtime::gpu::discover();
        let all = [inv.gpus.clone(), inv.mig_devices.clone()].concat();
        opts.gpus = cw_runtime::gpu::select(&all, &inv.gpus, spec).map_err(|e| {
            anyhow::anyhow!(
                "--gpus {spec}: {e}{}",
                inv.note
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            )
        })?;
        opts.driver_version = inv.driver_version.unwrap_or_default();
    }
    let (rd, mut req) = cw::run::prepare(&ctx.store, &image, &opts)?;
    let meta = serde_json::json!({"image": r.familiar(), "manifest": image.manifest, "created": cw::store::now()});
    cw::store::replace_file(&rd.path.join("meta.json"), meta.to_string().as_bytes())?;
    if a.detach {
        if req.stdout.is_none() {
            req.stdout = Some(rd.path.join("stdout"));
        }
        if req.stderr.is_none() {
            req.stderr = Some(rd.path.join("stderr"));
        }
        rd.write_request(&req)?;
    }
    let exe = std::path::Path::new("/proc/self/exe");
    // detached: the monitor must not hold our stdout/stderr open (a `$(cw run -d …)` would hang)
    let stdio = || {
        if a.detach {
            std::process::Stdio::null()
        } else {
            std::process::Stdio::inherit()
        }
    };
    let mut child = cw_runtime::monitor::spawn(exe, &rd.path, stdio(), stdio())
        .with_context(|| "starting the run's monitor process")?;
    if a.detach {
        println!("{}", req.id);
        return Ok(());
    }
    MONITOR_PID.store(child.id() as i32, std::sync::atomic::Ordering::Relaxed);
    let act = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(forward_to_monitor),
        nix::sys::signal::SaFlags::SA_RESTART,
        nix::sys::signal::SigSet::empty(),
    );
    for s in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        unsafe { nix::sys::signal::sigaction(s, &act) }.ok();
    }
    let _ = child.wait();
    let ex = rd.wait(std::time::Duration::from_millis(20))?;
    if let Some(msg) = cw::run::describe_exit(&ex, memory) {
        eprintln!("cw: {msg}");
    }
    if !a.keep {
        let _ = cw::run::remove(&ctx.store, &rd);
    }
    std::process::exit(ex.exit_code);
}

fn cmd_images(ctx: Ctx, quiet: bool) -> Result<()> {
    let images = ctx.store.images();
    if quiet {
        for i in images {
            println!("{}", i.manifest.short());
        }
        return Ok(());
    }
    println!(
        "{:<50} {:<14} {:<12} {:>10}",
        "REPOSITORY:TAG", "IMAGE ID", "PLATFORM", "SIZE"
    );
    for i in images {
        let names = if i.names.is_empty() {
            vec!["<none>".to_string()]
        } else {
            i.names.clone()
        };
        for n in names {
            let shown = Reference::parse(&n).map(|r| r.familiar()).unwrap_or(n);
            println!(
                "{:<50} {:<14} {:<12} {:>10}",
                shown,
                i.manifest.short(),
                i.platform,
                human(i.size)
            );
        }
    }
    Ok(())
}

fn main() {
    // CVE-2019-5736: run from a sealed memfd copy so a container can never overwrite this binary.
    if let Err(e) = pentacle::ensure_sealed() {
        eprintln!("cw: sealing the binary against CVE-2019-5736 failed: {e}");
        std::process::exit(125);
    }
    let cli = Cli::parse();
    if let Cmd::Monitor { dir } = &cli.cmd {
        // single-threaded from here on: no runtime, no helper threads
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("monitor.log"));
        if let Ok(f) = log {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
                .with_writer(std::sync::Mutex::new(f))
                .with_ansi(false)
                .init();
        }
        std::process::exit(cw_runtime::monitor::main(dir));
    }
    // the worker logs its progress (info, or debug with --verbose) unless --log/CW_LOG says
    // otherwise. By default libcgroups only speaks of errors: it warns of every v1 controller
    // the host has not mounted (hugetlb, net_cls...) each time it looks at a run's cgroups.
    let level = if cli.global.log == "warn" && std::env::var_os("CW_LOG").is_none() {
        let base = match &cli.cmd {
            Cmd::Worker(w) if w.verbose => "info,cw=debug",
            Cmd::Worker(_) => "info",
            _ => "warn",
        };
        format!("{base},libcgroups=error")
    } else {
        cli.global.log.clone()
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // colour only for a person at a terminal: a worker under systemd or Slurm logs to a file
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .init();
    if let Err(e) = run(cli) {
        eprintln!("cw: error: {}", chain(&e));
        // docker's codes: 126/127 when the command cannot run, 125 for cw's own errors
        let code = e
            .downcast_ref::<cw::run::ExecError>()
            .map_or(125, |x| x.code);
        std::process::exit(code);
    }
}

/// Do `f` for every item, reporting each failure; fail at the end if any did.
fn each<T>(items: Vec<T>, summary: &str, mut f: impl FnMut(T) -> Result<()>) -> Result<()> {
    let mut failed = false;
    for i in items {
        if let Err(e) = f(i) {
            eprintln!("cw: error: {}", chain(&e));
            failed = true;
        }
    }
    if failed {
        bail!("{summary}");
    }
    Ok(())
}

fn chain(e: &anyhow::Error) -> String {
    let mut s = String::new();
    for (i, c) in e.chain().enumerate() {
        let t = c.to_string();
        if i > 0 {
            if s.contains(&t) {
                continue;
            }
            s.push_str(": ");
        }
        s.push_str(&t);
    }
    s
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Pull(a) => cmd_pull(context(&cli.global)?, a),
        Cmd::Images { quiet } => cmd_images(context(&cli.global)?, quiet),
        Cmd::Rmi { images, force } => {
            let ctx = context(&cli.global)?;
            each(images, "some images were not removed", |i| {
                let lines = ctx.store.remove_image(&i, force)?;
                lines.iter().for_each(|l| println!("{l}"));
                Ok(())
            })
        }
        Cmd::Prune { max_size } => {
            let ctx = context(&cli.global)?;
            let target = max_size
                .as_deref()
                .map(config::parse_size)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let (removed, freed) = ctx.store.prune(target)?;
            for r in &removed {
                println!("removed {r}");
            }
            println!(
                "freed {}; store now {}",
                human(freed),
                human(ctx.store.size())
            );
            Ok(())
        }
        Cmd::Inspect { image } => {
            let ctx = context(&cli.global)?;
            let img = ctx.store.lookup(&image)?;
            println!("{}", serde_json::to_string_pretty(&img)?);
            Ok(())
        }
        Cmd::Run(a) => cmd_run(context(&cli.global)?, *a),
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "cw", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(())
        }
        Cmd::Gpus { json } => {
            let inv = cw_runtime::gpu::discover();
            if json {
                println!("{}", serde_json::to_string_pretty(&inv)?);
                return Ok(());
            }
            if let Some(n) = &inv.note {
                eprintln!("cw: {n}");
            }
            if !inv.gpus.is_empty() {
                println!("driver {}", inv.driver_version.as_deref().unwrap_or("?"));
                println!(
                    "{:<6} {:<42} {:<6} {:>10}  NAME",
                    "INDEX", "UUID", "MINOR", "MEMORY"
                );
                for g in inv.gpus.iter().chain(&inv.mig_devices) {
                    let index = match &g.mig {
                        Some(m) => format!("{}:{}/{}", g.index, m.gpu_instance, m.compute_instance),
                        None => g.index.to_string(),
                    };
                    println!(
                        "{:<6} {:<42} {:<6} {:>10}  {}",
                        index,
                        g.uuid,
                        g.minor,
                        human(g.memory_bytes),
                        g.name
                    );
                }
            }
            Ok(())
        }
        Cmd::Ps => {
            let ctx = context(&cli.global)?;
            println!("{:<20} {:<14} {:<40} COMMAND", "RUN ID", "STATUS", "IMAGE");
            for (id, rd) in cw::run::list(&ctx.store) {
                let meta: serde_json::Value = std::fs::read(rd.path.join("meta.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default();
                let cmd = rd.request().map(|r| r.args.join(" ")).unwrap_or_default();
                println!(
                    "{:<20} {:<14} {:<40} {}",
                    id,
                    cw::run::status_word(&rd),
                    meta["image"].as_str().unwrap_or("?"),
                    cmd
                );
            }
            Ok(())
        }
        Cmd::Kill { id } => {
            let ctx = context(&cli.global)?;
            let rd = cw::run::find(&ctx.store, &id)?;
            if !rd.kill()? {
                eprintln!("run {id} had already ended");
            }
            Ok(())
        }
        Cmd::Rm { ids, force } => {
            let ctx = context(&cli.global)?;
            each(ids, "some runs were not removed", |id| {
                let rd = cw::run::find(&ctx.store, &id)?;
                if force && rd.exit().is_none() && !rd.abandoned() {
                    rd.kill()?;
                    rd.wait(std::time::Duration::from_millis(50))?;
                }
                cw::run::remove(&ctx.store, &rd)?;
                println!("{id}");
                Ok(())
            })
        }
        Cmd::Stats { id } => {
            let ctx = context(&cli.global)?;
            let rd = cw::run::find(&ctx.store, &id)?;
            let v = match rd.exit() {
                Some(e) => {
                    serde_json::json!({"status": cw::run::status_word(&rd), "usage": e.usage, "exit": e})
                }
                None => {
                    let req = rd.request()?;
                    let u = cw_runtime::cgroup::read(&req.cgroup_path());
                    serde_json::json!({"status": cw::run::status_word(&rd), "usage": u})
                }
            };
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Cmd::Logs { follow, tail, id } => {
            let ctx = context(&cli.global)?;
            let rd = cw::run::find(&ctx.store, &id)?;
            cw::run::logs(&rd, follow, tail)
        }
        Cmd::Monitor { .. } => unreachable!("handled in main"),
        Cmd::Worker(w) => {
            let ctx = context(&cli.global)?;
            let setup = cw::worker::Setup {
                store: ctx.store,
                registry: ctx.registry,
            };
            let code = cw::worker::main(setup, *w)?;
            std::process::exit(code);
        }
        Cmd::Load { input, platform: p } => {
            let ctx = context(&cli.global)?;
            let imgs = cw::load::load(&ctx.store, &input, &platform(&p)?, ctx.max_image_size)?;
            for i in imgs {
                let names = if i.names.is_empty() {
                    "<none>".to_string()
                } else {
                    i.names.join(", ")
                };
                println!("Loaded image {} ({names})", i.manifest);
            }
            auto_gc(&ctx);
            Ok(())
        }
    }
}

fn parse_device_arg(s: &str) -> Result<cw_runtime::request::Device, String> {
    cw::run::parse_device(s)
}
