//! What the server asks of the worker: its messages (run, kill, restage, write, read,
//! netcat, mark_finalized), the five read verbs, netcat into a run's network namespace, and
//! the websocket whose frames mean "check in now".

use super::proto::{self, Message, Stage};
use super::record::Run;
use super::{deps, files, upload, Ctx};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub(super) async fn handle_message(ctx: &Arc<Ctx>, m: Message) {
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

pub(super) async fn read(
    ctx: &Arc<Ctx>,
    socket_id: i64,
    uuid: &str,
    path: &str,
    args: proto::ReadArgs,
) {
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

pub(super) async fn read_inner(
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
            let (body, producer) = upload::stream_body(Arc::new(AtomicU64::new(0)), move |w| {
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
pub(super) async fn netcat(ctx: &Arc<Ctx>, socket_id: i64, uuid: &str, port: u16, message: &str) {
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
pub(super) fn netcat_in_netns(pid: i32, port: u16, msg: &[u8]) -> Result<Vec<u8>, String> {
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
pub(super) async fn ws_listener(ctx: Arc<Ctx>, url: String) {
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
