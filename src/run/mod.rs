//! `cw run` and the commands on runs (`ps`, `kill`, `rm`, `stats`): image config + flags →
//! rootfs → [`cw_runtime::request::RunRequest`] → a monitor process.
//!
//! This file turns flags and an image's config into [`RunOptions`] (command, environment,
//! volumes, devices); [`prepare`](prepare/index.html) checks them against the image and writes
//! the run directory; [`manage`](manage/index.html) finds, lists, removes and reads the runs
//! already in the store.

mod manage;
mod prepare;

pub use manage::{describe_exit, find, last_log_error, list, logs, recover_lost, remove, settle};
pub use prepare::{check_executable, prepare, ExecError};

use crate::image::manifest::RunConfig;
use crate::store::Store;
use cw_runtime::request::{BindMount, Limits, Network};
use std::path::PathBuf;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub name: Option<String>,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub mounts: Vec<BindMount>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub limits: Limits,
    pub network: Network,
    pub time_limit: Option<u64>,
    pub kill_grace_secs: u64,
    pub stdout: Option<PathBuf>,
    pub stderr: Option<PathBuf>,
    pub cgroup_parent: String,
    pub readonly_rootfs: bool,
    pub force_copy: bool,
    pub hostname: Option<String>,
    /// GPUs assigned to the run (empty: none) and the driver version their libraries must have.
    pub gpus: Vec<cw_runtime::gpu::Gpu>,
    pub driver_version: String,
    /// Host device nodes passed through (`--device`).
    pub devices: Vec<cw_runtime::request::Device>,
    /// CDI spec directories for GPU runs (empty: /etc/cdi and /var/run/cdi).
    pub cdi_dirs: Vec<PathBuf>,
    /// Connect the container's stdin (`-i`) and give it a terminal (`-t`).
    pub stdin: bool,
    pub tty: Option<cw_runtime::console::Size>,
}

pub fn runs_dir(store: &Store) -> PathBuf {
    store.root().join("runs")
}

/// Parse `--device HOST[:CONTAINER[:PERMS]]`: a host character or block device node, created at
/// CONTAINER (default: the same path) and allowed with PERMS (default `rwm`) in the device cgroup.
pub fn parse_device(s: &str) -> Result<cw_runtime::request::Device, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (host, dst, perms) = match parts.as_slice() {
        [h] => (*h, *h, "rwm"),
        [h, d] => (*h, *d, "rwm"),
        [h, d, p] => (*h, *d, *p),
        _ => return Err(format!("device {s:?} is not HOST[:CONTAINER[:PERMS]]")),
    };
    cw_runtime::request::Device::from_host(host, dst, perms)
        .map_err(|e| format!("--device {s:?}: {e}"))
}

/// Parse `-v SRC:DST[:ro|rw]`.
pub fn parse_volume(s: &str) -> Result<BindMount, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (src, dst, ro) = match parts.as_slice() {
        [s, d] => (*s, *d, false),
        [s, d, "ro"] => (*s, *d, true),
        [s, d, "rw"] => (*s, *d, false),
        _ => return Err(format!("volume {s:?} is not SRC:DST[:ro|rw]")),
    };
    if !dst.starts_with('/') {
        return Err(format!(
            "volume {s:?}: the destination must be an absolute path"
        ));
    }
    let source =
        std::fs::canonicalize(src).map_err(|e| format!("volume {s:?}: source {src:?}: {e}"))?;
    Ok(BindMount {
        source,
        destination: dst.to_string(),
        readonly: ro,
    })
}

/// Docker's rules: user args replace Cmd; Entrypoint stays in front. A single argument that
/// contains whitespace or shell syntax is a shell command (`/bin/sh -c`).
pub fn command(cfg: &RunConfig, args: &[String]) -> Vec<String> {
    let user: Vec<String> = if args.len() == 1
        && args[0]
            .chars()
            .any(|c| c.is_whitespace() || "|&;<>()$`\\\"'*?[#~=%".contains(c))
    {
        vec!["/bin/sh".into(), "-c".into(), args[0].clone()]
    } else {
        args.to_vec()
    };
    let mut out = cfg.entrypoint.clone();
    if user.is_empty() {
        out.extend(cfg.cmd.iter().cloned());
    } else {
        out.extend(user);
    }
    out
}

/// Image env, then defaults, then the user's `-e` (a bare `-e NAME` copies the host's value).
pub fn environment(
    cfg: &RunConfig,
    user_env: &[String],
    home: &str,
    hostname: &str,
) -> Result<Vec<String>, String> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |kv: &str, whose: &str| -> Result<(), String> {
        if let Some((k, v)) = env_entry(kv, whose)? {
            env.retain(|(ek, _)| *ek != k);
            env.push((k, v));
        }
        Ok(())
    };
    set(
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "",
    )?;
    set(&format!("HOSTNAME={hostname}"), "")?;
    set(&format!("HOME={home}"), "")?;
    for e in &cfg.env {
        set(e, "the image's Env entry")?;
    }
    for e in user_env {
        set(e, "environment variable")?;
    }
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

/// One `-e` entry: NAME=VALUE, or NAME alone copied from our environment (None when it is not
/// set here).
pub fn env_entry(kv: &str, whose: &str) -> Result<Option<(String, String)>, String> {
    let (k, v) = match kv.split_once('=') {
        Some((k, v)) => (k.to_string(), v.to_string()),
        None => match std::env::var(kv) {
            Ok(v) => (kv.to_string(), v),
            Err(_) => return Ok(None),
        },
    };
    // an empty name or a NUL cannot be passed to execve (the container's init would fail)
    if k.is_empty() || kv.contains('\0') {
        return Err(format!(
            "{whose} {kv:?}: a variable needs a name and no NUL byte"
        ));
    }
    Ok(Some((k, v)))
}

pub fn new_id() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_rules() {
        let cfg = RunConfig {
            cmd: vec!["/bin/sh".into()],
            ..Default::default()
        };
        assert_eq!(command(&cfg, &[]), vec!["/bin/sh"]);
        assert_eq!(command(&cfg, &["true".into()]), vec!["true"]);
        assert_eq!(
            command(&cfg, &["echo hi".into()]),
            vec!["/bin/sh", "-c", "echo hi"]
        );
        assert_eq!(command(&cfg, &["ls".into(), "-l".into()]), vec!["ls", "-l"]);
        let ep = RunConfig {
            entrypoint: vec!["/ep".into()],
            cmd: vec!["x".into()],
            ..Default::default()
        };
        assert_eq!(command(&ep, &[]), vec!["/ep", "x"]);
        assert_eq!(command(&ep, &["y".into()]), vec!["/ep", "y"]);
    }

    #[test]
    fn env_precedence() {
        let cfg = RunConfig {
            env: vec!["PATH=/img".into(), "A=1".into()],
            ..Default::default()
        };
        let e = environment(&cfg, &["A=2".into(), "B=3".into()], "/root", "h").unwrap();
        assert!(e.contains(&"PATH=/img".to_string()));
        assert!(e.contains(&"A=2".to_string()) && !e.contains(&"A=1".to_string()));
        assert!(e.contains(&"HOME=/root".to_string()) && e.contains(&"B=3".to_string()));
    }

    #[test]
    fn env_names_must_be_nonempty_and_nul_free() {
        let cfg = RunConfig::default();
        let e = environment(&cfg, &["=x".into()], "/", "h").unwrap_err();
        assert!(e.contains("\"=x\"") && e.contains("needs a name"), "{e}");
        assert!(environment(&cfg, &["A=a\0b".into()], "/", "h").is_err());
        let bad = RunConfig {
            env: vec!["=y".into()],
            ..Default::default()
        };
        let e = environment(&bad, &[], "/", "h").unwrap_err();
        assert!(e.contains("the image's Env entry"), "{e}");
    }

    #[test]
    fn volumes() {
        assert!(parse_volume("/tmp:/x:ro").unwrap().readonly);
        assert!(parse_volume("/tmp:x").is_err());
        assert!(parse_volume("/nonexistent-cw:/x").is_err());
        assert!(parse_volume("/tmp:/x:bad").is_err());
    }
}
