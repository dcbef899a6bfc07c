//! `cw worker`'s flags: cl-worker's (same names, same defaults) plus cw's own, and how they
//! are read (sizes, CPU and GPU sets, credentials, the websocket URL).

use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// CodaLab server root; the worker adds /rest
    #[arg(long, default_value = "https://worksheets.codalab.org")]
    pub server: String,
    /// Websocket server root [default: --server with ws(s):// and /ws]
    #[arg(long)]
    pub ws_server: Option<String>,
    /// Scratch directory: runs, dependency cache, state
    #[arg(long, default_value = "codalab-worker-scratch")]
    pub work_dir: PathBuf,
    /// Scheduling tag (letters, digits, '-'); bundles pick it with --request-queue
    #[arg(long, visible_alias = "request-queue")]
    pub tag: Option<String>,
    /// Share the worker with this group
    #[arg(long)]
    pub group: Option<String>,
    /// Only run bundles whose queue matches --tag
    #[arg(long)]
    pub tag_exclusive: bool,
    /// CPUs to use: ALL or a list such as 0,1,4-7 (honoured, unlike cl-worker)
    #[arg(long, default_value = "ALL")]
    pub cpuset: String,
    /// GPUs to use: ALL, NONE, or indexes / UUIDs
    #[arg(long, default_value = "ALL")]
    pub gpuset: String,
    /// CDI spec directory for GPU runs' edits; repeatable (default: /etc/cdi, /var/run/cdi)
    #[arg(long = "cdi-spec-dir")]
    pub cdi_spec_dirs: Vec<PathBuf>,
    /// Cap on the dependency cache (archived bytes)
    #[arg(long, default_value = "10g")]
    pub max_work_dir_size: String,
    /// Cap on the image store; least recently used images go first
    #[arg(long)]
    pub max_image_cache_size: Option<String>,
    /// Refuse images bigger than this
    #[arg(long)]
    pub max_image_size: Option<String>,
    /// Memory to advertise [default: physical memory]
    #[arg(long)]
    pub max_memory: Option<String>,
    /// File with the username on line 1 and the password on line 2 (mode 600)
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Debug logging
    #[arg(long)]
    pub verbose: bool,
    /// Exit when no run has existed for --idle-seconds
    #[arg(long)]
    pub exit_when_idle: bool,
    #[arg(long, default_value_t = 0)]
    pub idle_seconds: u64,
    /// Accepted for compatibility; cw keeps a checkin open at all times
    #[arg(long, default_value_t = 5)]
    pub checkin_frequency_seconds: u64,
    /// Worker id [default: HOSTNAME(PID), as cl-worker; give a fixed one to resume runs after a restart]
    #[arg(long)]
    pub id: Option<String>,
    /// The server's bundle store is mounted here at the same paths: no downloads, no upload
    #[arg(long)]
    pub shared_file_system: bool,
    /// Exit after accepting this many runs (once they finish)
    #[arg(long, default_value_t = 999_999_999)]
    pub exit_after_num_runs: u64,
    /// On SIGTERM/SIGINT/SIGHUP, stop the runs and hand them back to the server (staged)
    #[arg(long)]
    pub pass_down_termination: bool,
    /// Remove the work directory on exit
    #[arg(long)]
    pub delete_work_dir_on_exit: bool,
    /// Exit (after 5 minutes) on an unexpected error instead of carrying on
    #[arg(long)]
    pub exit_on_exception: bool,
    /// Attempts per dependency download
    #[arg(long, default_value_t = 3)]
    pub download_dependencies_max_retries: u32,
    /// /dev/shm size of runs, GiB
    #[arg(long, default_value_t = 1)]
    pub shared_memory_size_gb: u64,
    /// Advertise the worker as preemptible
    #[arg(long)]
    pub preemptible: bool,
    /// Accepted for compatibility (cw makes no Docker networks)
    #[arg(long, default_value = "codalab_worker_network")]
    pub network_prefix: String,
    /// cl-worker's runtime choice: `docker` (cw stands in for it); `kubernetes` is refused
    #[arg(long, default_value = "docker", value_parser = ["docker", "kubernetes"])]
    pub bundle_runtime: String,
    #[arg(long, hide = true)]
    pub kubernetes_cluster_host: Option<String>,
    #[arg(long, hide = true)]
    pub kubernetes_auth_token: Option<String>,
    #[arg(long, hide = true)]
    pub kubernetes_cert_path: Option<String>,
    #[arg(long, hide = true)]
    pub kubernetes_cert: Option<String>,
    /// At most N runs at once (older cl-worker flag); 0 = as many as resources allow
    #[arg(long, default_value_t = 0)]
    pub slots: usize,
    /// cgroup under which runs' cgroups are made (e.g. the Slurm job's own cgroup)
    #[arg(long, default_value = "/cw")]
    pub cgroup_parent: String,
}

pub(super) fn size_arg(s: &str, what: &str) -> anyhow::Result<u64> {
    crate::config::parse_size(s).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

/// `--cpuset`: ALL (this process's affinity) or a list/ranges, which must be a subset of it.
pub fn parse_cpuset(spec: &str) -> anyhow::Result<Vec<usize>> {
    let allowed: Vec<usize> = {
        let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
        (0..nix::sched::CpuSet::count())
            .filter(|&i| set.is_set(i).unwrap_or(false))
            .collect()
    };
    if spec.trim().eq_ignore_ascii_case("all") {
        return Ok(allowed);
    }
    let mut out = vec![];
    for c in cw_runtime::cgroup::cpu_list(spec) {
        let c = c.map_err(|e| anyhow::anyhow!("--cpuset {spec:?}: {e}"))?;
        if !allowed.contains(&c) {
            anyhow::bail!("--cpuset {spec:?}: CPU {c} is not available to this process (allowed: {allowed:?})");
        }
        if !out.contains(&c) {
            out.push(c);
        }
    }
    if out.is_empty() {
        anyhow::bail!("--cpuset {spec:?} names no CPU");
    }
    Ok(out)
}

/// `--gpuset`: ALL, NONE/'' or a list of indexes and UUIDs of the GPUs NVML found.
pub fn parse_gpuset(
    spec: &str,
    all: &[cw_runtime::gpu::Gpu],
) -> anyhow::Result<Vec<cw_runtime::gpu::Gpu>> {
    let s = spec.trim();
    if s.eq_ignore_ascii_case("all") {
        return Ok(all.to_vec());
    }
    if s.is_empty() || s.eq_ignore_ascii_case("none") {
        return Ok(vec![]);
    }
    let mut out: Vec<cw_runtime::gpu::Gpu> = vec![];
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let g = all
            .iter()
            .find(|g| g.uuid == p || p.parse::<u32>().map(|i| i == g.index).unwrap_or(false))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--gpuset {spec:?}: no GPU {p:?} on this node ({} found)",
                    all.len()
                )
            })?;
        if !out.iter().any(|o| o.uuid == g.uuid) {
            out.push(g.clone());
        }
    }
    Ok(out)
}

pub(super) fn credentials(a: &WorkerArgs) -> anyhow::Result<(String, String)> {
    if let Some(p) = &a.password_file {
        use std::os::unix::fs::PermissionsExt;
        let md = std::fs::metadata(p)
            .map_err(|e| anyhow::anyhow!("--password-file {}: {e}", p.display()))?;
        if md.permissions().mode() & 0o077 != 0 {
            anyhow::bail!(
                "--password-file {}: permissions {:o} give group or others access; chmod 600 it",
                p.display(),
                md.permissions().mode() & 0o777
            );
        }
        let text = std::fs::read_to_string(p)?;
        let mut lines = text.lines();
        let u = lines.next().unwrap_or("").trim().to_string();
        let pw = lines
            .next()
            .unwrap_or("")
            .trim_end_matches(['\r', '\n'])
            .to_string();
        if u.is_empty() {
            anyhow::bail!(
                "--password-file {}: line 1 must be the username",
                p.display()
            );
        }
        return Ok((u, pw));
    }
    let ask = |what: &str| -> anyhow::Result<String> {
        eprint!("{what}: ");
        let mut s = String::new();
        std::io::stdin().read_line(&mut s)?;
        Ok(s.trim_end_matches(['\r', '\n']).to_string())
    };
    let u = match std::env::var("CODALAB_USERNAME") {
        Ok(u) => u,
        Err(_) => ask("Username")?,
    };
    let p = match std::env::var("CODALAB_PASSWORD") {
        Ok(p) => p,
        Err(_) => ask("Password")?,
    };
    Ok((u, p))
}

pub(super) fn physical_memory() -> u64 {
    nix::sys::sysinfo::sysinfo()
        .map(|s| s.ram_total())
        .unwrap_or(0)
}

// fsblkcnt_t is u64 here but not on every target
#[allow(clippy::useless_conversion)]
pub(super) fn free_disk(p: &Path) -> u64 {
    nix::sys::statvfs::statvfs(p)
        .map(|s| u64::from(s.blocks_available()) * u64::from(s.fragment_size()))
        .unwrap_or(0)
}

pub(super) fn default_ws(server: &str) -> String {
    let s = server.trim_end_matches('/');
    let s = if let Some(r) = s.strip_prefix("https://") {
        format!("wss://{r}")
    } else if let Some(r) = s.strip_prefix("http://") {
        format!("ws://{r}")
    } else {
        s.to_string()
    };
    format!("{s}/ws")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_url() {
        assert_eq!(
            default_ws("https://worksheets.codalab.org"),
            "wss://worksheets.codalab.org/ws"
        );
        assert_eq!(
            default_ws("http://127.0.0.1:2900/"),
            "ws://127.0.0.1:2900/ws"
        );
    }

    #[test]
    fn cpusets() {
        let all = parse_cpuset("ALL").unwrap();
        assert!(!all.is_empty());
        assert_eq!(parse_cpuset(&all[0].to_string()).unwrap(), vec![all[0]]);
        assert!(parse_cpuset("100000").is_err());
        assert!(parse_cpuset("x").is_err());
    }
}
