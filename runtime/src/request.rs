//! What a run is: the request `cw run` (or the worker) writes into the run directory and the
//! monitor executes. Everything the runtime needs is here, as plain paths and numbers.

use std::path::PathBuf;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct BindMount {
    pub source: PathBuf,
    pub destination: String,
    pub readonly: bool,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// A new network namespace with only loopback (up).
    #[default]
    None,
    /// The host's network namespace.
    Host,
    /// A new network namespace with outbound access through `pasta` (user-mode NAT, Debian
    /// package passt): the run reaches the network but not the host's loopback services, and
    /// nothing outside can connect in.
    Private,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Default)]
pub struct Limits {
    /// Bytes; also the memory+swap limit (no swap).
    pub memory: Option<u64>,
    /// CPUs as a fraction (1.5 = 150 ms per 100 ms period).
    pub cpus: Option<f64>,
    /// `0-3,7` style list.
    pub cpuset: Option<String>,
    pub pids: Option<i64>,
    /// /dev/shm size in bytes.
    pub shm_size: u64,
}

/// A device node to pass through (GPUs), with its cgroup permission.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Device {
    pub path: String,
    pub major: i64,
    pub minor: i64,
    pub file_mode: u32,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Default)]
pub struct Cleanup {
    /// Mounts to lazily unmount after the container is gone (the rootfs overlay).
    pub unmount: Vec<PathBuf>,
    /// Paths to remove after unmounting (upper/work dirs).
    pub remove: Vec<PathBuf>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RunRequest {
    /// Container id: `[a-zA-Z0-9_.-]{1,64}`.
    pub id: String,
    /// A ready root filesystem (mounted overlay or a copy).
    pub rootfs: PathBuf,
    pub readonly_rootfs: bool,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub hostname: String,
    pub mounts: Vec<BindMount>,
    pub limits: Limits,
    pub network: Network,
    /// Seconds of wall time before the run is killed (SIGTERM, then SIGKILL after the grace).
    pub time_limit: Option<u64>,
    pub kill_grace_secs: u64,
    /// Files for the container's stdout/stderr; None = the monitor's own (inherited from `cw run`).
    pub stdout: Option<PathBuf>,
    pub stderr: Option<PathBuf>,
    /// cgroup parent, absolute (`/cw`); the run's cgroup is `<parent>/<id>`.
    pub cgroup_parent: String,
    pub devices: Vec<Device>,
    /// Extra read-only bind mounts of host files (driver libraries), source → destination.
    pub host_files: Vec<BindMount>,
    pub cleanup: Cleanup,
}

impl RunRequest {
    /// The run's cgroup, within each hierarchy: `<cgroup_parent>/<id>`.
    pub fn cgroup_path(&self) -> String {
        format!("{}/{}", self.cgroup_parent.trim_end_matches('/'), self.id)
    }
}

pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && !id.starts_with('.')
}
