//! What a run is: the request `cw run` (or the worker) writes into the run directory and the
//! monitor executes. Everything the runtime needs is here, as plain paths and numbers.

use crate::{Error, Result};
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
    /// Bytes of memory.
    pub memory: Option<u64>,
    /// Memory plus swap, in bytes; None: twice `memory` (docker's default, so cl-worker's: as
    /// much swap again as memory, where the host has swap); -1: swap without limit.
    #[serde(default)]
    pub memory_swap: Option<i64>,
    /// CPUs as a fraction (1.5 = 150 ms per 100 ms period).
    pub cpus: Option<f64>,
    /// `0-3,7` style list.
    pub cpuset: Option<String>,
    pub pids: Option<i64>,
    /// /dev/shm size in bytes.
    pub shm_size: u64,
    /// Where the run can have no cgroup (a run without root on cgroup v1, or on v2 without a
    /// delegated subtree), run it anyway: the memory limit is enforced by the monitor sampling
    /// the run's processes (`crate::sample`), the cpuset becomes their CPU affinity, `cpus` and
    /// `pids` are not applied (the run's log says so). Otherwise such limits fail the run.
    #[serde(default)]
    pub without_cgroup_ok: bool,
}

/// A device node to create in the container's /dev (GPUs, `--device`), allowed in its device
/// cgroup with `access`; every other node stays denied.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Device {
    /// Path in the container (`/dev/...`).
    pub path: String,
    /// `c` (character) or `b` (block).
    #[serde(default = "char_device")]
    pub dev_type: String,
    pub major: i64,
    pub minor: i64,
    pub file_mode: u32,
    /// cgroup access: a subset of `rwm`.
    #[serde(default = "rwm")]
    pub access: String,
}

fn char_device() -> String {
    "c".into()
}

fn rwm() -> String {
    "rwm".into()
}

impl Device {
    /// The node at `host` (a character or block device) as `path` in the container.
    pub fn from_host(host: &str, path: &str, access: &str) -> Result<Device> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let m = std::fs::metadata(host).map_err(|e| Error::Request(format!("{host}: {e}")))?;
        let ty = if m.file_type().is_char_device() {
            "c"
        } else if m.file_type().is_block_device() {
            "b"
        } else {
            return Err(Error::Request(format!("{host} is not a device node")));
        };
        let d = Device {
            path: path.to_string(),
            dev_type: ty.into(),
            major: libc::major(m.rdev()) as i64,
            minor: libc::minor(m.rdev()) as i64,
            file_mode: m.mode() & 0o777,
            access: access.to_string(),
        };
        d.validate()?;
        Ok(d)
    }

    /// Err unless the type is `c`/`b`, the access a non-empty subset of `rwm` and the path
    /// under `/dev` without `..`.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.dev_type.as_str(), "c" | "b") {
            return Err(Error::Request(format!(
                "device {}: type {:?} is neither c nor b",
                self.path, self.dev_type
            )));
        }
        if self.access.is_empty() || !self.access.chars().all(|c| "rwm".contains(c)) {
            return Err(Error::Request(format!(
                "device {}: permissions {:?} are not a subset of rwm",
                self.path, self.access
            )));
        }
        if !self.path.starts_with("/dev/") || self.path.split('/').any(|c| c == "..") {
            return Err(Error::Request(format!(
                "device {}: the container path must be under /dev",
                self.path
            )));
        }
        Ok(())
    }

    /// A character device with full access.
    pub fn char(path: impl Into<String>, major: i64, minor: i64, file_mode: u32) -> Device {
        Device {
            path: path.into(),
            dev_type: char_device(),
            major,
            minor,
            file_mode,
            access: rwm(),
        }
    }
}

/// An overlay the monitor mounts at the run's `rootfs` itself: a run without root, whose mount
/// can only be made inside its user namespace.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Overlay {
    /// Layer dirs, top first.
    pub lower: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// Mounted by fuse-overlayfs, not the kernel's overlayfs (a kernel before 5.11, or
    /// `CW_USER_OVERLAY=fuse`).
    #[serde(default)]
    pub fuse: bool,
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
    /// A ready root filesystem (mounted overlay or a copy), or where [`RunRequest::overlay`] is
    /// mounted.
    pub rootfs: PathBuf,
    /// Mounted at `rootfs` by the monitor inside the run's user namespace (runs without root);
    /// the working directory is made there if the image lacks it.
    #[serde(default)]
    pub overlay: Option<Overlay>,
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
    /// Directories (container paths) to add to the rootfs's ld.so.cache before the container
    /// starts (GPU driver libraries), by a confined host ldconfig (see `ldcache`).
    #[serde(default)]
    pub ldconfig_dirs: Vec<String>,
    pub cleanup: Cleanup,
    /// Connect the container's stdin to the monitor's (inherited from `cw run -i`); without a
    /// terminal only.
    #[serde(default)]
    pub stdin: bool,
    /// Give the container a terminal of this size (`cw run -t`), relayed by the monitor.
    #[serde(default)]
    pub tty: Option<crate::console::Size>,
    /// The write end of a pipe the monitor inherits (`cw run` in the foreground): the exit
    /// record goes to it, one JSON line, as soon as exit.json is written and before the
    /// teardown, so that `cw run` returns without waiting for the unmount and the removals.
    #[serde(default)]
    pub exit_pipe: Option<i32>,
    /// A network namespace the monitor inherits under this descriptor (`cw run` as root, with
    /// network `none` or `private`): made by `cw run` (loopback up) while the monitor's sealed
    /// copy is made, it is joined instead of made on the run's critical path. The monitor makes
    /// its own where this is not a network namespace other than its own.
    #[serde(default)]
    pub net_ns: Option<i32>,
    /// The monitor removes the run's directory at the end of its teardown (`cw run` without
    /// `--keep`); a cw that finds the teardown cut short finishes it and removes the directory.
    #[serde(default)]
    pub remove_when_done: bool,
}

impl RunRequest {
    /// The run's cgroup, within each hierarchy: `<cgroup_parent>/<id>`.
    pub fn cgroup_path(&self) -> String {
        format!("{}/{}", self.cgroup_parent.trim_end_matches('/'), self.id)
    }
}

/// Processes and threads a run may have unless told otherwise: a fork bomb in one run must not
/// exhaust the node's pids (docker has no default; podman's is 2048).
pub const DEFAULT_PIDS_LIMIT: i64 = 4096;

pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && !id.starts_with('.')
        // a name that reads as an option (`cw rm -x`) cannot be given back to cw
        && !id.starts_with('-')
}
