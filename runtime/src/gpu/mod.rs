//! NVIDIA GPUs: discovery through NVML (the library is loaded at run time; hosts without it have
//! no GPUs), selection by count, index or UUID (MIG devices by their `MIG-` UUID), and the plan
//! of what a run needs to use its GPUs:
//! - device nodes with numbers from the host's `/proc/devices` (never from the image): only the
//!   assigned `/dev/nvidiaN`, `nvidiactl`, `nvidia-uvm(-tools)`, `nvidia-modeset` when the
//!   display/graphics capability is asked for, and the MIG capability nodes of an assigned MIG
//!   device (`/dev/nvidia-caps/nvidia-capN`, minors from `/proc/driver/nvidia-caps/mig-minors`);
//!   each is allowed in the run's device cgroup, every other node stays denied;
//! - the host driver's user-space libraries whose real file carries the running driver's version
//!   (from the host's ld cache, grouped by NVIDIA_DRIVER_CAPABILITIES), bound read-only under
//!   `/usr/local/nvidia/lib64`, and tools under `/usr/local/nvidia/bin`, the persistenced socket
//!   and the GSP firmware;
//! - the library directory for a confined ldconfig over the run's rootfs (`ldcache`), so
//!   `libcuda.so.1` resolves without LD_LIBRARY_PATH too.
//!
//! When a CDI spec for `nvidia.com/gpu` exists (`/etc/cdi`, `/var/run/cdi`), its edits replace
//! this plan ([`crate::cdi`]). Nothing here runs a host program chosen or configured by the image,
//! and the image's environment never reaches a host process (the NVIDIAScape lesson).

mod host;

pub use host::{
    device_nodes, driver_files, parse_ldconfig, parse_mig_minors, proc_major, Host,
    CONTAINER_BIN_DIR, CONTAINER_LIB_DIR, DEFAULT_CAPS,
};

use crate::request::{BindMount, Device};
use crate::{Error, Result};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Gpu {
    /// NVML index (= nvidia-smi's); for a MIG device, its parent's.
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// Minor of `/dev/nvidiaN`; for a MIG device, its parent's.
    pub minor: u32,
    pub memory_bytes: u64,
    /// Set for a MIG device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig: Option<Mig>,
}

/// Where a MIG device sits: its parent GPU and its GPU/compute instance ids.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mig {
    pub parent_uuid: String,
    pub gpu_instance: u32,
    pub compute_instance: u32,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Inventory {
    /// Whole GPUs.
    pub gpus: Vec<Gpu>,
    /// MIG devices of GPUs in MIG mode (selectable by UUID only).
    #[serde(default)]
    pub mig_devices: Vec<Gpu>,
    pub driver_version: Option<String>,
    /// Why there are no GPUs, when there are none.
    pub note: Option<String>,
}

/// Environment variable naming the NVML library to load (a site whose driver lives outside the
/// loader's path; the tests' stand-in library).
pub const NVML_LIBRARY_ENV: &str = "CW_NVML_LIBRARY";

/// Ask NVML (`$CW_NVML_LIBRARY`, else `libnvidia-ml.so.1` from the loader's path). Never fails:
/// no library or no driver means no GPUs, with the reason in `note`.
pub fn discover() -> Inventory {
    let lib = std::env::var_os(NVML_LIBRARY_ENV)
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "libnvidia-ml.so.1".into());
    discover_with(&lib)
}

/// [`discover`] with the NVML library `lib` (a soname or a path).
pub fn discover_with(lib: &OsStr) -> Inventory {
    use nvml_wrapper::Nvml;
    let nvml = match Nvml::builder().lib_path(lib).init() {
        Ok(n) => n,
        Err(e) => {
            return Inventory {
                note: Some(format!(
                    "NVML is not available ({}: {e}): no NVIDIA GPUs on this node",
                    Path::new(lib).display()
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
        let d = match nvml.device_by_index(i) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("NVML: GPU {i}: {e}; skipped");
                continue;
            }
        };
        let (uuid, minor) = match (d.uuid(), d.minor_number()) {
            (Ok(u), Ok(m)) => (u, m),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("NVML: GPU {i}: no UUID or minor number ({e}); skipped");
                continue;
            }
        };
        // MIG: enumerate the instances of a GPU whose current mode is enabled
        if d.mig_mode().map(|m| m.current == 1).unwrap_or(false) {
            let max = d.mig_device_count().unwrap_or(0);
            for m in 0..max {
                let Ok(md) = d.mig_device_by_index(m) else {
                    continue; // a slot without an instance
                };
                let (mut gi, mut ci) = (0u32, 0u32);
                // SAFETY: handles from this NVML instance; out-pointers to locals
                let ok = unsafe {
                    let lib = nvml.lib();
                    lib.nvmlDeviceGetGpuInstanceId(md.handle(), &mut gi) == 0
                        && lib.nvmlDeviceGetComputeInstanceId(md.handle(), &mut ci) == 0
                };
                let Ok(mig_uuid) = md.uuid() else { continue };
                if !ok {
                    tracing::warn!("NVML: MIG device {mig_uuid}: no instance ids; skipped");
                    continue;
                }
                inv.mig_devices.push(Gpu {
                    index: i,
                    uuid: mig_uuid,
                    name: md.name().unwrap_or_default(),
                    minor,
                    memory_bytes: md.memory_info().map(|m| m.total).unwrap_or(0),
                    mig: Some(Mig {
                        parent_uuid: uuid.clone(),
                        gpu_instance: gi,
                        compute_instance: ci,
                    }),
                });
            }
        }
        inv.gpus.push(Gpu {
            index: i,
            uuid,
            name: d.name().unwrap_or_default(),
            minor,
            memory_bytes: d.memory_info().map(|m| m.total).unwrap_or(0),
            mig: None,
        });
    }
    if inv.gpus.is_empty() {
        inv.note = Some("NVML found no GPUs".into());
    }
    inv
}

/// Pick GPUs from a spec: `all`, `none`, a count `N` (the first N of `free`), or a comma list of
/// indexes and/or UUIDs (prefixes accepted; `MIG-…` UUIDs pick MIG devices from `all`).
pub fn select(all: &[Gpu], free: &[Gpu], spec: &str) -> Result<Vec<Gpu>> {
    let s = spec.trim();
    let whole = || all.iter().filter(|g| g.mig.is_none());
    if s.eq_ignore_ascii_case("all") {
        return Ok(whole().cloned().collect());
    }
    if s.eq_ignore_ascii_case("none") || s.is_empty() || s == "0" {
        return Ok(vec![]);
    }
    if let Ok(n) = s.parse::<usize>() {
        let free: Vec<&Gpu> = free.iter().filter(|g| g.mig.is_none()).collect();
        if n > free.len() {
            return Err(Error::Request(format!(
                "{n} GPU(s) requested but {} free (of {})",
                free.len(),
                whole().count()
            )));
        }
        return Ok(free[..n].iter().map(|g| (*g).clone()).collect());
    }
    let mut out: Vec<Gpu> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let g = if let Ok(idx) = part.parse::<u32>() {
            whole().find(|g| g.index == idx)
        } else {
            let m: Vec<&Gpu> = all.iter().filter(|g| g.uuid.starts_with(part)).collect();
            if m.len() > 1 {
                return Err(Error::Request(format!(
                    "GPU {part:?} matches more than one UUID"
                )));
            }
            m.first().copied()
        };
        let g = g.ok_or_else(|| {
            Error::Request(format!("no GPU {part:?} on this node (cw gpus lists them)"))
        })?;
        if !out.contains(g) {
            out.push(g.clone());
        }
    }
    // a MIG device and its whole parent GPU at once would defeat MIG's isolation
    for g in &out {
        if let Some(m) = &g.mig {
            if out.iter().any(|p| p.uuid == m.parent_uuid) {
                return Err(Error::Request(format!(
                    "{} is a MIG device of {}, which is also selected",
                    g.uuid, m.parent_uuid
                )));
            }
        }
    }
    Ok(out)
}

/// Everything a run with GPUs gets (from cw's plan or from a CDI spec).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Injection {
    pub devices: Vec<Device>,
    pub files: Vec<BindMount>,
    pub env: Vec<String>,
    /// Container directories to add to the rootfs's ld cache.
    pub ldconfig_dirs: Vec<String>,
    /// What was asked for and not done, for the log (CDI hooks cw does not run).
    pub notes: Vec<String>,
}

/// The plan for a run with `gpus` (non-empty) from the host facts: device nodes, driver files,
/// environment, ld cache directories.
pub fn plan(gpus: &[Gpu], driver_version: &str, caps: &str, host: &Host) -> Result<Injection> {
    let devices = device_nodes(gpus, caps, host)?;
    let files = driver_files(host, driver_version, caps);
    let ldconfig_dirs = if files
        .iter()
        .any(|f| f.destination.starts_with(CONTAINER_LIB_DIR))
    {
        vec![CONTAINER_LIB_DIR.to_string()]
    } else {
        vec![]
    };
    Ok(Injection {
        devices,
        files,
        env: visible_env(gpus, caps),
        ldconfig_dirs,
        notes: vec![],
    })
}

fn visible_env(gpus: &[Gpu], caps: &str) -> Vec<String> {
    let uuids: Vec<&str> = gpus.iter().map(|g| g.uuid.as_str()).collect();
    vec![
        format!("NVIDIA_VISIBLE_DEVICES={}", uuids.join(",")),
        format!("NVIDIA_DRIVER_CAPABILITIES={caps}"),
    ]
}

/// The injection for a run on this host: the CDI spec's edits for `nvidia.com/gpu` when one
/// exists in `cdi_dirs`, else [`plan`] from [`Host::system`]. No GPUs: only
/// `NVIDIA_VISIBLE_DEVICES=void`.
pub fn injection(
    gpus: &[Gpu],
    driver_version: &str,
    caps: &str,
    cdi_dirs: &[PathBuf],
) -> Result<Injection> {
    if gpus.is_empty() {
        return Ok(Injection {
            env: vec!["NVIDIA_VISIBLE_DEVICES=void".into()],
            ..Default::default()
        });
    }
    let specs = crate::cdi::load(cdi_dirs, crate::cdi::NVIDIA_GPU_KIND);
    for e in &specs.errors {
        tracing::warn!("CDI: {e}");
    }
    if !specs.is_empty() {
        let names: Vec<String> = gpus
            .iter()
            .map(|g| specs.device_name_for(&g.uuid, g.index, g.mig.is_some()))
            .collect::<Result<_, _>>()?;
        let mut inj = specs.resolve(&names)?;
        // the CodaLab contract: runs see their UUIDs whatever the spec sets
        inj.env
            .retain(|e| !e.starts_with("NVIDIA_VISIBLE_DEVICES="));
        inj.env.extend(visible_env(gpus, caps));
        return Ok(inj);
    }
    plan(gpus, driver_version, caps, &Host::system())
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
                mig: None,
            })
            .collect()
    }

    fn mig(parent: &Gpu, gi: u32) -> Gpu {
        Gpu {
            uuid: format!("MIG-{gi}ccc"),
            mig: Some(Mig {
                parent_uuid: parent.uuid.clone(),
                gpu_instance: gi,
                compute_instance: 0,
            }),
            ..parent.clone()
        }
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
        assert!(select(&g, &g[2..], "2")
            .unwrap_err()
            .to_string()
            .contains("1 free"));
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
            .to_string()
            .contains("more than one"));
        assert!(select(&g, &g, "7").is_err());
        assert!(select(&g, &g, "GPU-zzz")
            .unwrap_err()
            .to_string()
            .contains("no GPU"));
    }

    #[test]
    fn mig_selection() {
        let g = gpus();
        let mut all = g.clone();
        all.push(mig(&g[1], 1));
        all.push(mig(&g[1], 2));
        assert_eq!(
            select(&all, &all, "all").unwrap().len(),
            3,
            "all = whole GPUs"
        );
        assert_eq!(
            select(&all, &all, "3").unwrap().len(),
            3,
            "counts take whole GPUs"
        );
        let m = select(&all, &all, "MIG-2").unwrap();
        assert_eq!(m[0].mig.as_ref().unwrap().gpu_instance, 2);
        assert_eq!(select(&all, &all, "1").unwrap()[0].mig, None);
        assert!(select(&all, &all, "MIG-1,GPU-1aaa")
            .unwrap_err()
            .to_string()
            .contains("also selected"));
    }

    #[test]
    fn proc_devices_and_mig_minors() {
        let devices = "Character devices:\n  1 mem\n195 nvidia-frontend\n195 nvidia\n235 nvidia-caps\n509 nvidia-uvm\n\nBlock devices:\n  7 loop\n510 nvidia-uvm-fake\n";
        assert_eq!(proc_major(devices, "nvidia-uvm"), Some(509));
        assert_eq!(proc_major(devices, "nvidia-frontend"), Some(195));
        assert_eq!(proc_major(devices, "nvidia-caps"), Some(235));
        assert_eq!(
            proc_major(devices, "loop"),
            None,
            "block devices are not char majors"
        );
        assert_eq!(proc_major(devices, "nvidia-uvm-fake"), None);
        let m = parse_mig_minors(
            "config 1\nmonitor 2\ngpu0/gi1/access 12\ngpu0/gi1/ci0/access 13\nbad\n",
        );
        assert_eq!(m["gpu0/gi1/ci0/access"], 13);
        assert_eq!(m["config"], 1);
        assert_eq!(m.len(), 4);
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

    /// A fake driver tree: libraries of two driver versions, tools, firmware, /proc text.
    fn fake_host(d: &Path) -> Host {
        let lib = d.join("lib");
        std::fs::create_dir_all(&lib).unwrap();
        for f in [
            "libcuda.so.550.1",
            "libcuda.so.535.9",
            "libnvidia-ml.so.550.1",
            "libnvidia-ptxjitcompiler.so.550.1",
            "libnvidia-encode.so.550.1",
        ] {
            std::fs::write(lib.join(f), "").unwrap();
        }
        let ln = |t: &str, l: &str| std::os::unix::fs::symlink(t, lib.join(l)).unwrap();
        ln("libcuda.so.550.1", "libcuda.so.1");
        ln("libcuda.so.535.9", "old-libcuda.so.1");
        ln("libnvidia-ml.so.550.1", "libnvidia-ml.so.1");
        ln(
            "libnvidia-ptxjitcompiler.so.550.1",
            "libnvidia-ptxjitcompiler.so.1",
        );
        ln("libnvidia-encode.so.550.1", "libnvidia-encode.so.1");
        let l = |n: &str, f: &str| format!("\t{n} (libc6,x86-64) => {}\n", lib.join(f).display());
        let ldcache = l("libcuda.so.1", "old-libcuda.so.1")
            + &l("libcuda.so.1", "libcuda.so.1")
            + &l("libnvidia-ml.so.1", "libnvidia-ml.so.1")
            + &l(
                "libnvidia-ptxjitcompiler.so.1",
                "libnvidia-ptxjitcompiler.so.1",
            )
            + &l("libnvidia-encode.so.1", "libnvidia-encode.so.1")
            + &l("libcuda.so", "libcuda.so.1");
        let bins = d.join("bin");
        std::fs::create_dir(&bins).unwrap();
        std::fs::write(bins.join("nvidia-smi"), "").unwrap();
        let fw = d.join("firmware/nvidia/550.1");
        std::fs::create_dir_all(&fw).unwrap();
        std::fs::write(fw.join("gsp_ga10x.bin"), "").unwrap();
        std::fs::write(fw.join("README"), "").unwrap();
        std::fs::create_dir_all(d.join("firmware/nvidia/535.9")).unwrap();
        std::fs::write(d.join("firmware/nvidia/535.9/gsp_tu10x.bin"), "").unwrap();
        let proc_dir = d.join("proc");
        std::fs::create_dir_all(proc_dir.join("driver/nvidia-caps")).unwrap();
        std::fs::write(
            proc_dir.join("devices"),
            "Character devices:\n  1 mem\n195 nvidia-frontend\n234 nvidia-caps\n509 nvidia-uvm\n\nBlock devices:\n  8 sd\n",
        )
        .unwrap();
        std::fs::write(
            proc_dir.join("driver/nvidia-caps/mig-minors"),
            "config 1\nmonitor 2\ngpu2/gi1/access 21\ngpu2/gi1/ci0/access 22\ngpu2/gi2/access 30\n",
        )
        .unwrap();
        std::fs::create_dir_all(d.join("dev")).unwrap();
        Host {
            dev: d.join("dev"),
            proc_dir,
            firmware: d.join("firmware"),
            persistenced_socket: d.join("no-socket"),
            ldcache,
            bin_dirs: vec![bins],
        }
    }

    #[test]
    fn driver_files_pick_the_running_version_and_caps() {
        let d = tempfile::tempdir().unwrap();
        let host = fake_host(d.path());
        let f = driver_files(&host, "550.1", "compute,utility");
        let dests: Vec<&str> = f.iter().map(|b| b.destination.as_str()).collect();
        assert_eq!(
            dests,
            vec![
                "/usr/local/nvidia/lib64/libcuda.so.1",
                "/usr/local/nvidia/lib64/libnvidia-ml.so.1",
                "/usr/local/nvidia/lib64/libnvidia-ptxjitcompiler.so.1",
                "/usr/local/nvidia/bin/nvidia-smi",
                "/lib/firmware/nvidia/550.1/gsp_ga10x.bin",
            ]
        );
        assert!(
            f[0].source.ends_with("libcuda.so.550.1"),
            "the running driver's libcuda, not the stale one"
        );
        assert!(f.iter().all(|b| b.readonly));
        let only_utility = driver_files(&host, "550.1", "utility");
        assert!(only_utility
            .iter()
            .all(|b| !b.destination.contains("libcuda")));
        let video = driver_files(&host, "550.1", "video");
        assert!(video
            .iter()
            .any(|b| b.destination.ends_with("libnvidia-encode.so.1")));
        assert!(!video.iter().any(|b| b.destination.contains("nvidia-smi")));
        let all = driver_files(&host, "550.1", "all");
        assert_eq!(all.len(), 6);
    }

    fn mknod(dir: &Path, name: &str, maj: u64, min: u64) {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        nix::sys::stat::mknod(
            &p,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(maj, min),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o660)).unwrap();
    }

    #[test]
    fn device_nodes_from_proc_devices_and_a_fake_dev_tree() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mknod needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let host = fake_host(d.path());
        // a real tree of char devices; uvm's node disagrees with /proc/devices: /proc wins
        mknod(&host.dev, "nvidia0", 195, 0);
        mknod(&host.dev, "nvidia2", 195, 2);
        mknod(&host.dev, "nvidiactl", 195, 255);
        mknod(&host.dev, "nvidia-uvm", 511, 0);
        std::fs::write(host.dev.join("nvidia-uvm-tools"), "not a device").unwrap();
        let g = gpus();
        let nodes = device_nodes(&g[1..2], DEFAULT_CAPS, &host).unwrap(); // minor 2
        let got: Vec<(&str, i64, i64, u32)> = nodes
            .iter()
            .map(|n| (n.path.as_str(), n.major, n.minor, n.file_mode))
            .collect();
        assert_eq!(
            got,
            vec![
                ("/dev/nvidia2", 195, 2, 0o660),
                ("/dev/nvidiactl", 195, 255, 0o660),
                ("/dev/nvidia-uvm", 509, 0, 0o660),
                ("/dev/nvidia-uvm-tools", 509, 1, 0o666),
            ],
            "only the assigned GPU (never nvidia0); uvm's major from /proc/devices"
        );
        assert!(device_nodes(&[], DEFAULT_CAPS, &host).unwrap().is_empty());
        let with_display = device_nodes(&g[..1], "compute,display", &host).unwrap();
        assert!(with_display
            .iter()
            .any(|n| n.path == "/dev/nvidia-modeset" && n.minor == 254));
        assert!(!nodes.iter().any(|n| n.path == "/dev/nvidia-modeset"));

        // no nvidia-uvm in /proc/devices: the host node's numbers are used
        std::fs::write(
            host.proc_dir.join("devices"),
            "Character devices:\n195 nvidia\n",
        )
        .unwrap();
        let nodes = device_nodes(&g[..1], DEFAULT_CAPS, &host).unwrap();
        assert!(nodes
            .iter()
            .any(|n| n.path == "/dev/nvidia-uvm" && n.major == 511));
        assert!(!nodes.iter().any(|n| n.path == "/dev/nvidia-uvm-tools"));
    }

    #[test]
    fn mig_device_gets_its_parent_and_its_capability_nodes() {
        let d = tempfile::tempdir().unwrap();
        let host = fake_host(d.path());
        let g = gpus();
        let m = mig(&g[1], 1); // parent minor 2
        let nodes = device_nodes(std::slice::from_ref(&m), DEFAULT_CAPS, &host).unwrap();
        let got: Vec<(&str, i64, i64)> = nodes
            .iter()
            .map(|n| (n.path.as_str(), n.major, n.minor))
            .collect();
        assert_eq!(
            got,
            vec![
                ("/dev/nvidia2", 195, 2),
                ("/dev/nvidiactl", 195, 255),
                ("/dev/nvidia-uvm", 509, 0),
                ("/dev/nvidia-uvm-tools", 509, 1),
                ("/dev/nvidia-caps/nvidia-cap21", 234, 21),
                ("/dev/nvidia-caps/nvidia-cap22", 234, 22),
            ]
        );
        // gi2 has no compute instance listed: a clear error, not a run without its instance
        let e = device_nodes(&[mig(&g[1], 2)], DEFAULT_CAPS, &host)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gpu2/gi2/ci0/access") && e.contains("mig-minors"),
            "{e}"
        );
        std::fs::write(
            host.proc_dir.join("devices"),
            "Character devices:\n195 nvidia\n",
        )
        .unwrap();
        let e = device_nodes(&[m], DEFAULT_CAPS, &host)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nvidia-caps"), "{e}");
    }

    #[test]
    fn plan_puts_it_together() {
        let d = tempfile::tempdir().unwrap();
        let host = fake_host(d.path());
        let g = gpus();
        let p = plan(&g[..2], "550.1", DEFAULT_CAPS, &host).unwrap();
        assert_eq!(p.ldconfig_dirs, vec![CONTAINER_LIB_DIR.to_string()]);
        assert_eq!(
            p.env,
            vec![
                "NVIDIA_VISIBLE_DEVICES=GPU-0aaa-bbbb,GPU-1aaa-bbbb".to_string(),
                "NVIDIA_DRIVER_CAPABILITIES=compute,utility".to_string()
            ]
        );
        assert_eq!(
            p.devices
                .iter()
                .map(|d| d.path.as_str())
                .collect::<Vec<_>>(),
            vec![
                "/dev/nvidia0",
                "/dev/nvidia2",
                "/dev/nvidiactl",
                "/dev/nvidia-uvm",
                "/dev/nvidia-uvm-tools"
            ]
        );
        let none = injection(&[], "550.1", DEFAULT_CAPS, &[]).unwrap();
        assert_eq!(none.env, vec!["NVIDIA_VISIBLE_DEVICES=void".to_string()]);
        assert!(none.devices.is_empty() && none.files.is_empty());
    }
}
