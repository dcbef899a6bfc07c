//! The checkin loop: strictly serial long-polls that carry every run's state to the server and
//! bring its messages back, termination (`--pass-down-termination` restages), idleness and the
//! run count that end the worker, and the poke that makes the server hear a run's end at once.

use super::args::free_disk;
use super::proto::{self, Checkin, Stage};
use super::serve::{handle_message, ws_listener};
use super::Ctx;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Ctx {
    pub(super) fn checkin_body(&self) -> Checkin {
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

    /// A run just finished: the server should hear it now, not when the checkin that is open
    /// returns (up to 5 s later; checkins must stay serial). Asking the server for the bundle's
    /// info makes it send us a `read` on that open checkin, which then returns at once and the
    /// next checkin carries the news. Costs one small request; harmless if nothing is open.
    pub(super) fn poke(self: &Arc<Self>, uuid: &str) {
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

pub(super) async fn run_worker(ctx: Arc<Ctx>, ws_url: String) -> anyhow::Result<i32> {
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
