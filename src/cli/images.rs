//! `cw pull` and `cw images`.

use super::{auto_gc, platform, Ctx};
use anyhow::{Context, Result};
use clap::Args;
use cw::image::reference::Reference;
use cw::progress::{human, Progress};
use cw::pull::{self, PullOptions};
use cw::registry::Client;

#[derive(Args)]
pub(crate) struct PullArgs {
    /// Image reference, e.g. ubuntu, codalab/ubuntu:1.9, host:5000/ns/name@sha256:…
    pub(crate) image: String,
    /// Platform os/arch[/variant] to choose from a multi-platform image [default: this host]
    #[arg(long)]
    pub(crate) platform: Option<String>,
    /// Registry credentials user:password (else ~/.docker/config.json)
    #[arg(long, env = "CW_REGISTRY_CREDS", hide_env_values = true)]
    pub(crate) creds: Option<String>,
    /// Layers downloaded at once
    #[arg(long, default_value_t = pull::DEFAULT_PARALLEL)]
    pub(crate) parallel: usize,
    /// No progress output
    #[arg(short, long)]
    pub(crate) quiet: bool,
}

pub(crate) fn cmd_pull(ctx: Ctx, a: PullArgs) -> Result<()> {
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

pub(crate) fn cmd_images(ctx: Ctx, quiet: bool) -> Result<()> {
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
