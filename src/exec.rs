//! `cw exec [-i] [-t] [-e K=V] [-w DIR] [-u USER] ID CMD…`: a process in a running run (see
//! `cw_runtime::exec` for what it gets: the run's namespaces, cgroup, capabilities, seccomp and
//! no_new_privs). Runs in cw's main thread with no other thread alive: libcontainer forks.

use anyhow::{bail, Context, Result};
use cw_runtime::rundir::RunDir;

pub struct ExecArgs {
    pub interactive: bool,
    pub tty: bool,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub command: Vec<String>,
}

/// Start the command and wait for it; its exit code.
pub fn exec(rd: &RunDir, id: &str, a: &ExecArgs) -> Result<i32> {
    if a.command.is_empty() {
        bail!("cw exec {id}: no command given");
    }
    if a.tty && a.interactive && !crate::attach::stdin_is_terminal() {
        bail!("cw exec -it: stdin is not a terminal (-i alone connects a pipe or a file)");
    }
    if rd.exit().is_some() || rd.state().and_then(|s| s.pid).is_none() {
        bail!(
            "run {id} is not running ({}); cw exec needs a running run",
            rd.status()
        );
    }
    let req = rd.request().context("reading the run's request")?;
    let mut env = Vec::new();
    for e in &a.env {
        if let Some((k, v)) =
            crate::run::env_entry(e, "environment variable").map_err(anyhow::Error::msg)?
        {
            env.push(format!("{k}={v}"));
        }
    }
    // the run's root as cw reads it: a user's run has its overlay mounted only in its monitor's
    // namespace, so its upper dir over its layers, merged as overlayfs merges them
    let view = match &req.overlay {
        Some(o) => crate::image_view::View::Layers(
            std::iter::once(o.upper.clone())
                .chain(o.lower.iter().cloned())
                .collect(),
        ),
        None => crate::image_view::View::Dir(req.rootfs.clone()),
    };
    let user = match &a.user {
        Some(u) => {
            let (uid, gid, extra, home) = crate::rootfs::resolve_user(&view, u)
                .map_err(|e| anyhow::anyhow!("-u {u}: {e}"))?;
            if !env.iter().any(|e| e.starts_with("HOME=")) {
                env.insert(0, format!("HOME={home}"));
            }
            Some((uid, gid, extra))
        }
        None => None,
    };
    if a.tty && !env.iter().any(|e| e.starts_with("TERM=")) {
        env.insert(0, "TERM=xterm".into());
    }
    // 127/126 with a message naming the command, as for cw run
    let mounted: Vec<&str> = req
        .mounts
        .iter()
        .chain(&req.host_files)
        .map(|m| m.destination.as_str())
        .collect();
    let image = std::fs::read(rd.path.join("meta.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|m| m["image"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("of run {id}"));
    crate::run::check_executable(
        &view,
        &a.command[0],
        &cw_runtime::exec::merge_env(&req.env, &env),
        a.workdir.as_deref().unwrap_or(&req.cwd),
        &mounted,
        &image,
    )?;
    let sock_path = cw_runtime::exec::console_socket(&rd.path);
    let listener = if a.tty {
        let name = sock_path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        Some(
            cw_runtime::console::listen(&rd.path, &name, libc::SOCK_STREAM)
                .with_context(|| format!("creating {}", sock_path.display()))?,
        )
    } else {
        None
    };
    let opts = cw_runtime::exec::ExecOptions {
        args: a.command.clone(),
        env,
        cwd: a.workdir.clone(),
        user,
        console_socket: a.tty.then(|| sock_path.clone()),
        stdin: a.interactive && !a.tty,
    };
    let started = cw_runtime::exec::exec(rd, &opts);
    let master = match (&listener, &started) {
        (Some(l), Ok(_)) => Some(cw_runtime::console::receive_master(l, 10_000)),
        _ => None,
    };
    drop(listener);
    let _ = std::fs::remove_file(&sock_path);
    let pid = started.map_err(anyhow::Error::msg)?;
    // signals to cw reach the process (docker's sig-proxy)
    crate::attach::proxy_signals(0);
    crate::attach::container_started(pid);
    if let Some(m) = master {
        let m = m.context("the exec's terminal")?;
        let raw = (a.interactive && crate::attach::stdin_is_terminal())
            .then(crate::attach::RawMode::enter)
            .transpose();
        let r = crate::attach::relay_pty(&m, pid, a.interactive);
        drop(raw);
        r?;
    }
    Ok(cw_runtime::exec::wait(pid))
}
