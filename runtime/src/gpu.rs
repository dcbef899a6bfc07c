//! NVIDIA GPUs: discovery through NVML (the library is loaded at run time; hosts without it have
//! no GPUs), assignment by index/UUID, and what a run needs to use its GPUs: only the assigned
//! `/dev/nvidiaN` plus the control nodes, and the host driver's user-space libraries and tools
//! bind-mounted read-only under `/usr/local/nvidia`. Nothing on the host side ever reads the
//! image (no hooks, no ldconfig over the rootfs): the image cannot steer a host process
//! (the NVIDIAScape lesson). Libraries are found through `LD_LIBRARY_PATH`.

use crate::request::{BindMount, Device};
use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub minor: u32,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Inventory {
    pub gpus: Vec<Gpu>,
    pub driver_version: Option<String>,
    /// Why there are no GPUs, when there are none.
    pub note: Option<String>,
}

/// Ask NVML. Never fails: no library or no driver means no GPUs, with the reason in `note`.
pub fn discover() -> Inventory {
    use nvml_wrapper::Nvml;
    let nvml = Nvml::builder()
        .lib_path(std::ffi::OsStr::new("libnvidia-ml.so.1"))
        .init()
        .or_else(|_| Nvml::init());
    let nvml = match nvml {
        Ok(n) => n,
        Err(e) => {
            return Inventory {
                note: Some(format!(
                    "NVML is not available ({e}): no NVIDIA GPUs on this node"
                )),
                ..Default::default()
            };
        }
    };
    let mut inv = Inventory {
        driver_version: nvml.sys_driver_version().ok(),
        ..Default::default()
    };
    let n = match nvml.device_count() {
        Ok(n) => n,
        Err(e) => {
            inv.note = Some(format!("NVML could not count devices: {e}"));
            return inv;
        }
    };
    for i in 0..n {
        let Ok(d) = nvml.device_by_index(i) else {
            continue;
        };
        let (Ok(uuid), Ok(minor)) = (d.uuid(), d.minor_number()) else {
            continue;
        };
        inv.gpus.push(Gpu {
            index: i,
            uuid,
            name: d.name().unwrap_or_default(),
            minor,
            memory_bytes: d.memory_info().map(|m| m.total).unwrap_or(0),
        });
    }
    if inv.gpus.is_empty() {
        inv.note = Some("NVML found no GPUs".into());
    }
    inv
}

/// Pick GPUs from a spec: `all`, `none`, a count `N` (the first N of `free`), or a comma list of
/// indexes and/or UUIDs (UUID prefixes accepted).
pub fn select(all: &[Gpu], free: &[Gpu], spec: &str) -> Result<Vec<Gpu>, String> {
    let s = spec.trim();
    if s.eq_ignore_ascii_case("all") {
        return Ok(all.to_vec());
    }
    if s.eq_ignore_ascii_case("none") || s.is_empty() || s == "0" {
        return Ok(vec![]);
    }
    if let Ok(n) = s.parse::<usize>() {
        if n > free.len() {
            return Err(format!(
                "{n} GPU(s) requested but {} free (of {})",
                free.len(),
                all.len()
            ));
        }
        return Ok(free[..n].to_vec());
    }
    let mut out: Vec<Gpu> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let g = if let Some(idx) = part
            .strip_prefix('#')
            .unwrap_or(part)
            .parse::<u32>()
            .ok()
            .filter(|_| !part.starts_with("GPU-"))
        {
            all.iter().find(|g| g.index == idx)
        } else {
            let m: Vec<&Gpu> = all.iter().filter(|g| g.uuid.starts_with(part)).collect();
            if m.len() > 1 {
                return Err(format!("GPU {part:?} matches more than one UUID"));
            }
            m.first().copied()
        };
        let g = g.ok_or_else(|| format!("no GPU {part:?} on this node (cw gpus lists them)"))?;
        if !out.contains(g) {
            out.push(g.clone());
        }
    }
    Ok(out)
}

/// A device node as it is on the host (path must be a char device).
fn host_node(path: &str) -> Option<Device> {
    let m = std::fs::metadata(path).ok()?;
    if !m.file_type().is_char_device() {
        return None;
    }
    let rdev = m.rdev();
    Some(Device {
        path: path.to_string(),
        major: libc::major(rdev) as i64,
        minor: libc::minor(rdev) as i64,
        file_mode: m.mode() & 0o777,
    })
}

/// Device nodes for `gpus`: their `/dev/nvidiaN` and the shared control nodes. `dev` is the
/// host's /dev (tests pass a fake tree).
pub fn device_nodes(gpus: &[Gpu], dev: &Path) -> Vec<Device> {
    if gpus.is_empty() {
        return vec![];
    }
    let mut out = Vec::new();
    let node = |name: &str| {
        let p = dev.join(name);
        host_node(&p.display().to_string()).map(|mut d| {
            d.path = format!("/dev/{name}");
            d
        })
    };
    for g in gpus {
        out.extend(node(&format!("nvidia{}", g.minor)));
    }
    for n in ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"] {
        out.extend(node(n));
    }
    out
}

/// Libraries of the driver's user-space part, by NVIDIA_DRIVER_CAPABILITIES group.
const COMPUTE_LIBS: &[&str] = &[
    "libcuda.so",
    "libnvidia-ptxjitcompiler.so",
    "libnvidia-nvvm.so",
    "libcudadebugger.so",
    "libnvidia-gpucomp.so",
    "libnvidia-opencl.so",
];
const UTILITY_LIBS: &[&str] = &["libnvidia-ml.so", "libnvidia-cfg.so"];
const UTILITY_BINS: &[&str] = &["nvidia-smi", "nvidia-debugdump", "nvidia-persistenced"];

pub const CONTAINER_LIB_DIR: &str = "/usr/local/nvidia/lib64";
pub const CONTAINER_BIN_DIR: &str = "/usr/local/nvidia/bin";

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

/// Host files to bind into a GPU run: driver libraries whose real file carries the running
/// driver's version (so a stale library from an older driver is never picked), and tools.
/// `caps` is NVIDIA_DRIVER_CAPABILITIES (`compute,utility` by default; `all`).
pub fn driver_files(
    ldconfig_out: &str,
    driver_version: &str,
    caps: &str,
    bin_dirs: &[PathBuf],
) -> Vec<BindMount> {
    let caps: HashSet<&str> = caps.split(',').map(str::trim).collect();
    let all = caps.contains("all");
    let mut wanted: Vec<&str> = Vec::new();
    if all || caps.contains("compute") {
        wanted.extend(COMPUTE_LIBS);
    }
    if all || caps.contains("utility") {
        wanted.extend(UTILITY_LIBS);
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (soname, path) in parse_ldconfig(ldconfig_out) {
        // versioned sonames only (libcuda.so.1, not the libcuda.so development link)
        let Some(base) = wanted.iter().find(|w| soname.starts_with(&format!("{w}."))) else {
            continue;
        };
        let _ = base;
        if seen.contains(&soname) {
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
    if all || caps.contains("utility") {
        for b in UTILITY_BINS {
            if let Some(p) = bin_dirs.iter().map(|d| d.join(b)).find(|p| p.is_file()) {
                out.push(BindMount {
                    source: p,
                    destination: format!("{CONTAINER_BIN_DIR}/{b}"),
                    readonly: true,
                });
            }
        }
    }
    let sock = Path::new("/run/nvidia-persistenced/socket");
    if sock.exists() {
        out.push(BindMount {
            source: sock.into(),
            destination: "/run/nvidia-persistenced/socket".into(),
            readonly: true,
        });
    }
    out
}

/// Everything a run with `gpus` needs: device nodes, host files, environment.
pub fn injection(
    gpus: &[Gpu],
    driver_version: &str,
    caps: &str,
) -> (Vec<Device>, Vec<BindMount>, Vec<String>) {
    if gpus.is_empty() {
        return (vec![], vec![], vec!["NVIDIA_VISIBLE_DEVICES=void".into()]);
    }
    let devices = device_nodes(gpus, Path::new("/dev"));
    let ldc = std::process::Command::new("/sbin/ldconfig")
        .arg("-p")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut bins: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    bins.extend(["/usr/bin", "/usr/local/nvidia/bin"].map(PathBuf::from));
    let files = driver_files(&ldc, driver_version, caps, &bins);
    let uuids: Vec<&str> = gpus.iter().map(|g| g.uuid.as_str()).collect();
    let env = vec![
        format!("NVIDIA_VISIBLE_DEVICES={}", uuids.join(",")),
        format!("NVIDIA_DRIVER_CAPABILITIES={caps}"),
    ];
    (devices, files, env)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpus() -> Vec<Gpu> {
        (0..3)
            .map(|i| Gpu {
                index: i,
                uuid: format!("GPU-{i}aaa-bbbb"),
                name: "X".into(),
                minor: i * 2,
                memory_bytes: 1,
            })
            .collect()
    }

    #[test]
    fn selection() {
        let g = gpus();
        assert_eq!(select(&g, &g, "all").unwrap().len(), 3);
        assert!(select(&g, &g, "none").unwrap().is_empty());
        assert_eq!(
            select(&g, &g[1..], "1").unwrap()[0].index,
            1,
            "a count takes free GPUs"
        );
        assert!(select(&g, &g[2..], "2").unwrap_err().contains("1 free"));
        assert_eq!(
            select(&g, &g, "2,0")
                .unwrap()
                .iter()
                .map(|x| x.index)
                .collect::<Vec<_>>(),
            vec![2, 0]
        );
        assert_eq!(select(&g, &g, "GPU-1aaa").unwrap()[0].index, 1);
        assert!(select(&g, &g, "GPU-")
            .unwrap_err()
            .contains("more than one"));
        assert!(select(&g, &g, "7").is_err());
        assert!(select(&g, &g, "GPU-zzz").unwrap_err().contains("no GPU"));
    }

    #[test]
    fn ldconfig_parsing() {
        let out = "1234 libs found in cache `/etc/ld.so.cache'\n\tlibcuda.so.1 (libc6,x86-64) => /lib/libcuda.so.1\n\tlibcuda.so.1 (libc6) => /lib32/libcuda.so.1\n\tlibcuda.so (libc6,x86-64) => /lib/libcuda.so\n";
        let p = parse_ldconfig(out);
        assert_eq!(
            p,
            vec![
                (
                    "libcuda.so.1".to_string(),
                    PathBuf::from("/lib/libcuda.so.1")
                ),
                ("libcuda.so".to_string(), PathBuf::from("/lib/libcuda.so"))
            ]
        );
    }

    #[test]
    fn driver_files_pick_the_running_version_and_caps() {
        let d = tempfile::tempdir().unwrap();
        let lib = d.path();
        for f in [
            "libcuda.so.550.1",
            "libcuda.so.535.9",
            "libnvidia-ml.so.550.1",
            "libnvidia-ptxjitcompiler.so.550.1",
        ] {
            std::fs::write(lib.join(f), "").unwrap();
        }
        std::os::unix::fs::symlink("libcuda.so.550.1", lib.join("libcuda.so.1")).unwrap();
        std::os::unix::fs::symlink("libcuda.so.535.9", lib.join("old-libcuda.so.1")).unwrap();
        std::os::unix::fs::symlink("libnvidia-ml.so.550.1", lib.join("libnvidia-ml.so.1")).unwrap();
        std::os::unix::fs::symlink(
            "libnvidia-ptxjitcompiler.so.550.1",
            lib.join("libnvidia-ptxjitcompiler.so.1"),
        )
        .unwrap();
        let l = |n: &str, f: &str| format!("\t{n} (libc6,x86-64) => {}\n", lib.join(f).display());
        let out = l("libcuda.so.1", "old-libcuda.so.1")
            + &l("libcuda.so.1", "libcuda.so.1")
            + &l("libnvidia-ml.so.1", "libnvidia-ml.so.1")
            + &l(
                "libnvidia-ptxjitcompiler.so.1",
                "libnvidia-ptxjitcompiler.so.1",
            )
            + &l("libcuda.so", "libcuda.so.1");
        let bins = d.path().join("bin");
        std::fs::create_dir(&bins).unwrap();
        std::fs::write(bins.join("nvidia-smi"), "").unwrap();
        let f = driver_files(&out, "550.1", "compute,utility", &[bins.clone()]);
        let dests: Vec<&str> = f.iter().map(|b| b.destination.as_str()).collect();
        assert_eq!(
            dests,
            vec![
                "/usr/local/nvidia/lib64/libcuda.so.1",
                "/usr/local/nvidia/lib64/libnvidia-ml.so.1",
                "/usr/local/nvidia/lib64/libnvidia-ptxjitcompiler.so.1",
                "/usr/local/nvidia/bin/nvidia-smi"
            ]
        );
        assert!(
            f[0].source.ends_with("libcuda.so.550.1"),
            "the running driver's libcuda, not the stale one"
        );
        assert!(f.iter().all(|b| b.readonly));
        let only_utility = driver_files(&out, "550.1", "utility", &[bins]);
        assert!(only_utility
            .iter()
            .all(|b| !b.destination.contains("libcuda")));
    }

    #[test]
    fn device_nodes_from_a_fake_dev_tree() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mknod needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let mk = |name: &str, maj: u64, min: u64| {
            nix::sys::stat::mknod(
                &d.path().join(name),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(maj, min),
            )
            .unwrap();
        };
        mk("nvidia0", 195, 0);
        mk("nvidia2", 195, 2);
        mk("nvidiactl", 195, 255);
        mk("nvidia-uvm", 511, 0);
        std::fs::write(d.path().join("nvidia-uvm-tools"), "not a device").unwrap();
        let g = gpus();
        let nodes = device_nodes(&g[1..2], d.path()); // minor 2
        let paths: Vec<&str> = nodes.iter().map(|n| n.path.as_str()).collect();
        assert_eq!(
            paths,
            vec!["/dev/nvidia2", "/dev/nvidiactl", "/dev/nvidia-uvm"],
            "only the assigned GPU, never nvidia0"
        );
        assert_eq!(
            (nodes[2].major, nodes[2].minor),
            (511, 0),
            "uvm's major is read from the node"
        );
        assert!(device_nodes(&[], d.path()).is_empty());
    }
}
