//! The verbs of the `cw` binary that need more than a line: the shared context (store,
//! registry settings, size limits from the config file), `cw run`, `cw pull`, `cw images`.

pub mod images;
pub mod run;

use crate::Global;
use anyhow::{Context, Result};
use cw::config;
use cw::image::manifest::Platform;
use cw::progress::human;
use cw::registry::config::RegistryConfig;
use cw::store::Store;

pub(crate) struct Ctx {
    pub(crate) store: Store,
    pub(crate) registry: RegistryConfig,
    pub(crate) max_store_size: Option<u64>,
    pub(crate) max_image_size: Option<u64>,
}

pub(crate) fn context(g: &Global) -> Result<Ctx> {
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

pub(crate) fn platform(p: &Option<String>) -> Result<Platform> {
    match p {
        Some(s) => Platform::parse(s).map_err(anyhow::Error::msg),
        None => Ok(Platform::host()),
    }
}

/// After a pull: keep the store under its configured size (high watermark, down to 80 %).
pub(crate) fn auto_gc(ctx: &Ctx) {
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
