//! A finished bundle's results to the server: a tar.gz of its directory (exclude patterns
//! honoured) streamed from a blocking producer, retried while the server is away.

use super::files::{self, Excludes};
use super::proto::{size_str, Stage};
use super::Ctx;
use crate::bridge::ChannelWriter;
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::record::Run;

pub(super) fn uploading(ctx: &Arc<Ctx>, run: &mut Run) {
    if run.is_restaged {
        run.set_stage(Stage::Restaged);
        return;
    }
    if let Some(res) = run.t.upload_result.take() {
        super::machine::uploaded(run, res);
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
