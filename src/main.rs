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
    #[arg(long = "registry-mirror", global = true, env = "CW_REGISTRY_MIRROR", value_delimiter = ',')]
    registry_mirror: Vec<String>,
    /// Registry (host[:port]) spoken to over plain http; loopback registries always are
    #[arg(long = "insecure-registry", global = true, env = "CW_INSECURE_REGISTRY", value_delimiter = ',')]
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
}

fn context(g: &Global) -> Result<Ctx> {
    let (path, explicit) = match &g.config {
        Some(p) => (p.clone(), true),
        None => (config::default_path(), false),
    };
    let file = config::load(&path, explicit)?;
    let mut registry = file.registry_config();
    for m in &g.registry_mirror {
        registry.add_mirror_arg(m)?;
    }
    for h in &g.insecure_registry {
        registry.add_insecure(h);
    }
    let root = g.store.clone().or(file.store.clone()).unwrap_or_else(cw::store::default_root);
    let store = Store::open(&root).with_context(|| format!("opening the store at {}", root.display()))?;
    let max_store_size = file.max_store_size.as_deref().map(config::parse_size).transpose().map_err(anyhow::Error::msg)?;
    Ok(Ctx { store, registry, max_store_size })
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
                Ok((removed, freed)) => tracing::info!("store above {}: freed {} ({} items)", human(max), human(freed), removed.len()),
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
    let opts = PullOptions { platform: platform(&a.platform)?, parallel: a.parallel, progress: Progress::auto(a.quiet), only_if_missing: false };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let client = Client::new(reg);
    let res = rt.block_on(pull::pull(&client, &ctx.store, &r, &opts))?;
    if !a.quiet {
        if res.up_to_date {
            eprintln!("{}: image is up to date", r.familiar());
        } else {
            eprintln!("{}: pulled {} layer(s), {} already present", r.familiar(), res.fetched_layers, res.reused_layers);
        }
    }
    println!("{}", res.image.manifest);
    auto_gc(&ctx);
    Ok(())
}

fn cmd_images(ctx: Ctx, quiet: bool) -> Result<()> {
    let images = ctx.store.images();
    if quiet {
        for i in images {
            println!("{}", i.manifest.short());
        }
        return Ok(());
    }
    println!("{:<50} {:<14} {:<12} {:>10}", "REPOSITORY:TAG", "IMAGE ID", "PLATFORM", "SIZE");
    for i in images {
        let names = if i.names.is_empty() { vec!["<none>".to_string()] } else { i.names.clone() };
        for n in names {
            let shown = Reference::parse(&n).map(|r| r.familiar()).unwrap_or(n);
            println!("{:<50} {:<14} {:<12} {:>10}", shown, i.manifest.short(), i.platform, human(i.size));
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
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.global.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    if let Err(e) = run(cli) {
        eprintln!("cw: error: {}", chain(&e));
        std::process::exit(125);
    }
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
            let mut failed = false;
            for i in images {
                match ctx.store.remove_image(&i, force) {
                    Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
                    Err(e) => {
                        eprintln!("cw: error: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                bail!("some images were not removed");
            }
            Ok(())
        }
        Cmd::Prune { max_size } => {
            let ctx = context(&cli.global)?;
            let target = max_size.as_deref().map(config::parse_size).transpose().map_err(anyhow::Error::msg)?;
            let (removed, freed) = ctx.store.prune(target)?;
            for r in &removed {
                println!("removed {r}");
            }
            println!("freed {}; store now {}", human(freed), human(ctx.store.size()));
            Ok(())
        }
        Cmd::Inspect { image } => {
            let ctx = context(&cli.global)?;
            let img = ctx.store.lookup(&image)?;
            println!("{}", serde_json::to_string_pretty(&img)?);
            Ok(())
        }
        Cmd::Load { input, platform: p } => {
            let ctx = context(&cli.global)?;
            let imgs = cw::load::load(&ctx.store, &input, &platform(&p)?)?;
            for i in imgs {
                let names = if i.names.is_empty() { "<none>".to_string() } else { i.names.join(", ") };
                println!("Loaded image {} ({names})", i.manifest);
            }
            auto_gc(&ctx);
            Ok(())
        }
    }
}
