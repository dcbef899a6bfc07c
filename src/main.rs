//! The `cw` command line.

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use cw::config;
use cw::progress::human;
use std::path::PathBuf;

mod cli;
use cli::images::{cmd_images, cmd_pull, PullArgs};
use cli::run::{cmd_run, RunArgs};
use cli::{auto_gc, context, platform};

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
    /// Run a command inside a running run (its namespaces, cgroup, capabilities and seccomp)
    Exec {
        /// Connect stdin
        #[arg(short, long)]
        interactive: bool,
        /// Give the command a terminal
        #[arg(short, long)]
        tty: bool,
        /// Environment variable NAME=VALUE (NAME alone copies it from here); repeatable
        #[arg(short = 'e', long = "env")]
        env: Vec<String>,
        /// Working directory inside the run [default: the run's]
        #[arg(short = 'w', long)]
        workdir: Option<String>,
        /// USER[:GROUP] or UID[:GID], resolved in the run's /etc/passwd [default: the run's]
        #[arg(short = 'u', long)]
        user: Option<String>,
        id: String,
        /// Command and arguments
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Connect to a running run's terminal (a run started with -t); the detach keys leave it
    Attach {
        /// Keys that detach, leaving the run running
        #[arg(long, default_value = "ctrl-p,ctrl-q")]
        detach_keys: String,
        id: String,
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
    /// Internal: sync the layers this boot unpacked and mark them so (after a pull or load)
    #[command(name = "__settle-store", hide = true)]
    SettleStore,
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

/// The command line, where cw installed as `cl-worker` (a link named so) is `cw worker`: CodaLab's
/// worker managers (slurm-batch, aws-batch) start the executable of that name with cl-worker's
/// flags, which `cw worker` takes.
fn argv() -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let name = a.first().and_then(|p| std::path::Path::new(p).file_name());
    if name.is_some_and(|n| n == "cl-worker") {
        a.insert(1, "worker".into());
    }
    a
}

/// The subcommand of a cw command line: its first word that is neither an option nor the value
/// of one of the global options that take one. A guess made before the command line is parsed,
/// for what may start early; clap has the last word.
fn subcommand(args: &[std::ffi::OsString]) -> Option<&std::ffi::OsStr> {
    const VALUED: [&str; 5] = [
        "--store",
        "--config",
        "--registry-mirror",
        "--insecure-registry",
        "--log",
    ];
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if VALUED.iter().any(|v| a == *v) {
            it.next();
        } else if !a.as_encoded_bytes().starts_with(b"-") {
            return Some(a);
        }
    }
    None
}

fn main() {
    let args = argv();
    // `cw run`: what its critical path waits for starts before anything else (the command
    // line's parsing, the configuration, the store): the monitor's sealed copy and the cgroup
    // lock's grace period, in threads. Only where no user namespace is entered below, which
    // must happen before any thread exists; cmd_run starts them itself otherwise.
    if subcommand(&args).is_some_and(|c| c == "run") && !cw_runtime::userns::enters_subordinate() {
        cli::run::start_early();
    }
    let cli = Cli::parse_from(args);
    // CVE-2019-5736: a process that forks into a container runs from a sealed memfd copy of
    // itself, so the container can never overwrite the binary on the host. The monitor does
    // (normally from cw-monitor, whose copy is small; `cw __monitor` where that is not
    // installed), and so does `cw exec`; every other command stays outside every container.
    if matches!(cli.cmd, Cmd::Monitor { .. } | Cmd::Exec { .. }) {
        if let Err(e) = pentacle::ensure_sealed() {
            eprintln!("cw: sealing the binary against CVE-2019-5736 failed: {e}");
            std::process::exit(125);
        }
    }
    if let Cmd::Monitor { dir } = &cli.cmd {
        std::process::exit(cw_runtime::monitor::process_main(dir));
    }
    // the worker logs its progress (info, or debug with --verbose) unless --log/CW_LOG says
    // otherwise. By default libcgroups only speaks of errors: it warns of every v1 controller
    // the host has not mounted (hugetlb, net_cls...) each time it looks at a run's cgroups.
    let level = if cli.global.log == "warn" && std::env::var_os("CW_LOG").is_none() {
        let base = match &cli.cmd {
            Cmd::Worker(w) if w.verbose => "info,cw=debug",
            Cmd::Worker(_) => "info",
            // what libcontainer's forked process logs is in the error cw exec prints
            Cmd::Exec { .. } => "warn,libcontainer=off",
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
    // a user with subordinate ids: the commands that write or remove the store's trees, or
    // start runs, do it inside a user namespace holding those ids (layers keep the image's
    // owners, and only there can the user remove them again); before any thread exists
    if matches!(
        cli.cmd,
        Cmd::Pull(_)
            | Cmd::Load { .. }
            | Cmd::Run(_)
            | Cmd::Rm { .. }
            | Cmd::Rmi { .. }
            | Cmd::Prune { .. }
            | Cmd::Kill { .. }
            | Cmd::Worker(_)
    ) {
        if let Err(e) = cw_runtime::userns::enter_subordinate() {
            eprintln!("cw: error: {e}");
            std::process::exit(125);
        }
    }
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
            // a run that has just ended still holds its layers until its teardown is done
            cw::run::settle(&ctx.store);
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
            cw::run::settle(&ctx.store);
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
                    rd.status(),
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
                if force && rd.status().can_be_stopped() {
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
            let st = rd.status();
            let v = match &st {
                cw_runtime::rundir::Status::Ended(e) => {
                    serde_json::json!({"status": st.to_string(), "usage": e.usage, "exit": e})
                }
                _ => {
                    let req = rd.request()?;
                    let pid = rd.state().and_then(|s| s.pid);
                    let mut u = match pid.and_then(cw_runtime::cgroup::v2_dir_of) {
                        // a user's run below a delegated cgroup: where its init is, when that is
                        // the run's own (without one, the init is in its monitor's, the user's)
                        Some(d)
                            if cw_runtime::userns::needed()
                                && d.ends_with(req.cgroup_path().trim_start_matches('/')) =>
                        {
                            cw_runtime::cgroup::read_v2(&d)
                        }
                        _ => cw_runtime::cgroup::read(&req.cgroup_path()),
                    };
                    if cw_runtime::userns::needed() && u == Default::default() {
                        // a run without a cgroup: its processes' memory, as its monitor samples it
                        if let Some(pid) = pid {
                            u.memory_current = cw_runtime::sample::Sampler::new(pid).sample(None);
                        }
                    }
                    serde_json::json!({"status": st.to_string(), "usage": u})
                }
            };
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Cmd::Exec {
            interactive,
            tty,
            env,
            workdir,
            user,
            id,
            command,
        } => {
            let ctx = context(&cli.global)?;
            let rd = cw::run::find(&ctx.store, &id)?;
            let a = cw::exec::ExecArgs {
                interactive,
                tty,
                env,
                workdir,
                user,
                command,
            };
            let code = cw::exec::exec(&rd, &id, &a)?;
            std::process::exit(code);
        }
        Cmd::Attach { detach_keys, id } => {
            let ctx = context(&cli.global)?;
            let rd = cw::run::find(&ctx.store, &id)?;
            let keys = cw::attach::parse_detach_keys(&detach_keys).map_err(anyhow::Error::msg)?;
            let code = cw::attach::attach(&rd, &id, keys)?;
            std::process::exit(code);
        }
        Cmd::Logs { follow, tail, id } => {
            let ctx = context(&cli.global)?;
            let rd = cw::run::find(&ctx.store, &id)?;
            cw::run::logs(&rd, follow, tail)
        }
        Cmd::Monitor { .. } => unreachable!("handled in main"),
        Cmd::SettleStore => {
            // started with the store's path: no configuration to read (or fail on)
            let root = cli
                .global
                .store
                .clone()
                .context("__settle-store needs --store")?;
            let store = cw::store::Store::open(&root)?;
            let n = store.settle_layers()?;
            tracing::debug!("{n} layer(s) synced");
            Ok(())
        }
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

#[cfg(test)]
mod tests {
    use super::subcommand;

    fn sub(line: &str) -> Option<String> {
        let args: Vec<std::ffi::OsString> = line.split(' ').map(Into::into).collect();
        subcommand(&args).map(|s| s.to_string_lossy().into_owned())
    }

    #[test]
    fn the_subcommand_is_found_past_global_options_and_their_values() {
        assert_eq!(sub("cw run --image x true").as_deref(), Some("run"));
        assert_eq!(sub("cw --store run ps").as_deref(), Some("ps"));
        assert_eq!(sub("cw --store=/s --log debug run").as_deref(), Some("run"));
        assert_eq!(
            sub("cw --config c --registry-mirror m --insecure-registry r images").as_deref(),
            Some("images")
        );
        assert_eq!(sub("cw -q pull run").as_deref(), Some("pull"));
        assert_eq!(sub("cw --store /s").as_deref(), None);
        assert_eq!(sub("cw").as_deref(), None);
    }
}
