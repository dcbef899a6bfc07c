//! The images runs ask for: one pull per name at a time, shared by every run that waits for it,
//! re-checked against the registry for new runs (a HEAD when the tag did not move).

use super::proto::size_str;
use super::Ctx;
use crate::image::reference::Reference;
use crate::store::ImageRecord;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An image being pulled for runs, shared by every run that asks for the same name.
#[derive(Debug, Clone)]
pub enum ImageState {
    Downloading(String),
    Ready(Box<ImageRecord>, String, Instant),
    Failed(String, Instant),
}

/// The image's state, starting a pull if none is current (as the official worker, each new run
/// re-checks the registry: a HEAD, no GET, when the tag did not move).
pub(super) fn image_state(ctx: &Arc<Ctx>, image: &str) -> ImageState {
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
