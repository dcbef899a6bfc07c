//! The host side of a GPU run: the facts read off the host (device numbers, MIG minors, the
//! driver's libraries and tools) and the device nodes and read-only driver files made from them.

use super::Gpu;
use crate::request::{BindMount, Device};
use crate::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The host facts a plan is made from. [`Host::system`] reads the real ones; tests point the
/// directories at fake trees.
#[derive(Debug, Clone)]
pub struct Host {
    /// The host's /dev (a node's mode, and its numbers where /proc/devices lacks its driver).
    pub dev: PathBuf,
    /// The host's /proc (`devices`, `driver/nvidia-caps/mig-minors`).
    pub proc_dir: PathBuf,
    /// Firmware root (`/lib/firmware`): GSP firmware is `nvidia/<version>/*.bin`.
    pub firmware: PathBuf,
    /// The persistenced socket.
    pub persistenced_socket: PathBuf,
    /// `ldconfig -p` output of the host.
    pub ldcache: String,
    /// Where to look for the driver's tools.
    pub bin_dirs: Vec<PathBuf>,
}

impl Host {
    pub fn system() -> Host {
        let ldcache = std::process::Command::new("/sbin/ldconfig")
            .arg("-p")
            .env_clear()
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        Host {
            dev: "/dev".into(),
            proc_dir: "/proc".into(),
            firmware: "/lib/firmware".into(),
            persistenced_socket: "/run/nvidia-persistenced/socket".into(),
            ldcache,
            bin_dirs: [
                "/usr/bin",
                "/usr/local/bin",
                "/usr/local/nvidia/bin",
                "/opt/nvidia/bin",
            ]
            .map(PathBuf::from)
            .to_vec(),
        }
    }
}

/// The major of a character device driver from `/proc/devices` text.
pub fn proc_major(devices: &str, driver: &str) -> Option<i64> {
    let mut in_char = false;
    for l in devices.lines() {
        let l = l.trim();
        if l.ends_with(':') {
            in_char = l == "Character devices:";
            continue;
        }
        if in_char {
            let mut f = l.split_whitespace();
            if let (Some(n), Some(name)) = (f.next(), f.next()) {
                if name == driver {
                    return n.parse().ok();
                }
            }
        }
    }
    None
}

/// `/proc/driver/nvidia-caps/mig-minors`: `gpu0/gi1/access 12` → ("gpu0/gi1/access", 12).
pub fn parse_mig_minors(text: &str) -> HashMap<String, i64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Libraries of the driver's user-space part, by NVIDIA_DRIVER_CAPABILITIES group.
const COMPUTE_LIBS: &[&str] = &[
    "libcuda.so",
    "libcudadebugger.so",
    "libnvidia-ptxjitcompiler.so",
    "libnvidia-nvvm.so",
    "libnvidia-gpucomp.so",
    "libnvidia-opencl.so",
];
const UTILITY_LIBS: &[&str] = &["libnvidia-ml.so", "libnvidia-cfg.so"];
const VIDEO_LIBS: &[&str] = &[
    "libvdpau_nvidia.so",
    "libnvidia-encode.so",
    "libnvidia-opticalflow.so",
    "libnvcuvid.so",
];
const GRAPHICS_LIBS: &[&str] = &[
    "libnvidia-eglcore.so",
    "libnvidia-glcore.so",
    "libnvidia-tls.so",
    "libnvidia-glsi.so",
    "libnvidia-fbc.so",
    "libnvidia-rtcore.so",
    "libnvoptix.so",
    "libGLX_nvidia.so",
    "libEGL_nvidia.so",
    "libGLESv2_nvidia.so",
    "libGLESv1_CM_nvidia.so",
    "libnvidia-glvkspirv.so",
];
const UTILITY_BINS: &[&str] = &["nvidia-smi", "nvidia-debugdump", "nvidia-persistenced"];
const COMPUTE_BINS: &[&str] = &["nvidia-cuda-mps-control", "nvidia-cuda-mps-server"];

pub const CONTAINER_LIB_DIR: &str = "/usr/local/nvidia/lib64";
pub const CONTAINER_BIN_DIR: &str = "/usr/local/nvidia/bin";
/// The default NVIDIA_DRIVER_CAPABILITIES.
pub const DEFAULT_CAPS: &str = "compute,utility";

/// `(soname, path)` of 64-bit libraries from `ldconfig -p` output.
pub fn parse_ldconfig(out: &str) -> Vec<(String, PathBuf)> {
    out.lines()
        .filter_map(|l| {
            let (left, path) = l.trim().split_once(" => ")?;
            let (name, flags) = left.split_once(" (")?;
            (flags.contains("x86-64") || flags.contains("AArch64"))
                .then(|| (name.trim().to_string(), PathBuf::from(path.trim())))
        })
        .collect()
}

/// Parsed NVIDIA_DRIVER_CAPABILITIES.
struct Caps(HashSet<String>);

impl Caps {
    fn new(caps: &str) -> Caps {
        Caps(
            caps.split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .collect(),
        )
    }
    fn has(&self, c: &str) -> bool {
        self.0.contains("all") || self.0.contains(c)
    }
}

/// Host files to bind into a GPU run: driver libraries whose real file carries the running
/// driver's version (so a stale library from an older driver is never picked), tools, the
/// persistenced socket and GSP firmware. `caps` is NVIDIA_DRIVER_CAPABILITIES.
pub fn driver_files(host: &Host, driver_version: &str, caps: &str) -> Vec<BindMount> {
    let caps = Caps::new(caps);
    let mut wanted: Vec<&str> = Vec::new();
    for (c, libs) in [
        ("compute", COMPUTE_LIBS),
        ("utility", UTILITY_LIBS),
        ("video", VIDEO_LIBS),
        ("graphics", GRAPHICS_LIBS),
    ] {
        if caps.has(c) {
            wanted.extend(libs);
        }
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (soname, path) in parse_ldconfig(&host.ldcache) {
        // versioned sonames only (libcuda.so.1, not the libcuda.so development link)
        if !wanted.iter().any(|w| soname.starts_with(&format!("{w}."))) || seen.contains(&soname) {
            continue;
        }
        let Ok(real) = std::fs::canonicalize(&path) else {
            continue;
        };
        let real_name = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !real_name.ends_with(&format!(".so.{driver_version}")) {
            tracing::debug!(
                "skipping {} ({real_name} is not of driver {driver_version})",
                path.display()
            );
            continue;
        }
        seen.insert(soname.clone());
        out.push(BindMount {
            source: real,
            destination: format!("{CONTAINER_LIB_DIR}/{soname}"),
            readonly: true,
        });
    }
    let mut bins: Vec<&str> = vec![];
    if caps.has("utility") {
        bins.extend(UTILITY_BINS);
    }
    if caps.has("compute") {
        bins.extend(COMPUTE_BINS);
    }
    for b in bins {
        if let Some(p) = host
            .bin_dirs
            .iter()
            .map(|d| d.join(b))
            .find(|p| p.is_file())
        {
            out.push(BindMount {
                source: p,
                destination: format!("{CONTAINER_BIN_DIR}/{b}"),
                readonly: true,
            });
        }
    }
    if std::fs::metadata(&host.persistenced_socket)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
    {
        out.push(BindMount {
            source: host.persistenced_socket.clone(),
            destination: "/run/nvidia-persistenced/socket".into(),
            readonly: true,
        });
    }
    // GSP firmware of the running driver (read by the driver stack through the container's view)
    let fw = host.firmware.join("nvidia").join(driver_version);
    if let Ok(rd) = std::fs::read_dir(&fw) {
        let mut names: Vec<String> = rd
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("gsp") && n.ends_with(".bin"))
            .collect();
        names.sort();
        for n in names {
            out.push(BindMount {
                source: fw.join(&n),
                destination: format!("/lib/firmware/nvidia/{driver_version}/{n}"),
                readonly: true,
            });
        }
    }
    out
}

/// A node on the host: (major, minor, mode) when `path` is a character device.
fn host_char(path: &Path) -> Option<(i64, i64, u32)> {
    let m = std::fs::metadata(path).ok()?;
    if !m.file_type().is_char_device() {
        return None;
    }
    let rdev = m.rdev();
    Some((
        libc::major(rdev) as i64,
        libc::minor(rdev) as i64,
        m.mode() & 0o777,
    ))
}

/// Device nodes for `gpus`: their `/dev/nvidiaN` and the shared control nodes, with numbers from
/// the host's /proc/devices (the node on the host is consulted for its mode, and for its numbers
/// only where /proc/devices does not list the driver).
pub fn device_nodes(gpus: &[Gpu], caps: &str, host: &Host) -> Result<Vec<Device>> {
    if gpus.is_empty() {
        return Ok(vec![]);
    }
    let caps = Caps::new(caps);
    let devices = std::fs::read_to_string(host.proc_dir.join("devices")).unwrap_or_default();
    let nvidia = proc_major(&devices, "nvidia-frontend")
        .or_else(|| proc_major(&devices, "nvidia"))
        .unwrap_or(195);
    let mut out: Vec<Device> = Vec::new();
    let mut add = |name: &str, numbers: Option<(i64, i64)>| {
        let host_node = host_char(&host.dev.join(name));
        let (major, minor, mode) = match (numbers, host_node) {
            (Some((a, b)), Some((_, _, mode))) => (a, b, mode),
            (Some((a, b)), None) => (a, b, 0o666),
            (None, Some(n)) => n,
            (None, None) => return false,
        };
        let path = format!("/dev/{name}");
        if !out.iter().any(|d| d.path == path) {
            out.push(Device::char(path, major, minor, mode));
        }
        true
    };
    for g in gpus {
        add(
            &format!("nvidia{}", g.minor),
            Some((nvidia, g.minor as i64)),
        );
    }
    add("nvidiactl", Some((nvidia, 255)));
    let uvm = proc_major(&devices, "nvidia-uvm");
    if !add("nvidia-uvm", uvm.map(|m| (m, 0))) {
        tracing::warn!(
            "no nvidia-uvm in {}/devices nor a /dev/nvidia-uvm: CUDA will not work (is the nvidia-uvm module loaded?)",
            host.proc_dir.display()
        );
    }
    add("nvidia-uvm-tools", uvm.map(|m| (m, 1)));
    if caps.has("display") || caps.has("graphics") {
        add("nvidia-modeset", Some((nvidia, 254)));
    }
    let migs: Vec<&Gpu> = gpus.iter().filter(|g| g.mig.is_some()).collect();
    if !migs.is_empty() {
        let caps_major = proc_major(&devices, "nvidia-caps").ok_or_else(|| {
            Error::Gpu(format!(
                "MIG device {} requested but {}/devices lists no nvidia-caps driver",
                migs[0].uuid,
                host.proc_dir.display()
            ))
        })?;
        let minors_path = host.proc_dir.join("driver/nvidia-caps/mig-minors");
        let minors = parse_mig_minors(&std::fs::read_to_string(&minors_path).map_err(|e| {
            Error::Gpu(format!(
                "MIG device {} requested: {}: {e}",
                migs[0].uuid,
                minors_path.display()
            ))
        })?);
        for g in migs {
            let m = g.mig.as_ref().unwrap();
            for key in [
                format!("gpu{}/gi{}/access", g.minor, m.gpu_instance),
                format!(
                    "gpu{}/gi{}/ci{}/access",
                    g.minor, m.gpu_instance, m.compute_instance
                ),
            ] {
                let minor = *minors.get(&key).ok_or_else(|| {
                    Error::Gpu(format!(
                        "MIG device {}: {key} is not in {}",
                        g.uuid,
                        minors_path.display()
                    ))
                })?;
                let name = format!("nvidia-caps/nvidia-cap{minor}");
                add(&name, Some((caps_major, minor)));
            }
        }
    }
    Ok(out)
}
