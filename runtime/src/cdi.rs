//! Container Device Interface specs (<https://github.com/cncf-tags/container-device-interface>,
//! spec versions up to 1.1.0): what a site's `nvidia-ctk cdi generate` (or any vendor) says a
//! device needs. cw reads the specs of one kind from `/etc/cdi` and `/var/run/cdi` (the latter
//! wins for a name in both), resolves device names, and turns their container edits into the
//! run's device nodes, read-only bind mounts and environment.
//!
//! Differences from the reference library, on purpose:
//! - a bad file is reported and skipped, the others still count (the Go and Rust libraries drop
//!   every device when one file fails to parse);
//! - hooks are not run: cw runs no host program configured by a spec next to a container's
//!   rootfs. The one hook whose effect a run needs, nvidia-ctk's `update-ldcache --folder DIR`,
//!   becomes a confined ldconfig over those folders ([`crate::ldcache`]); others are listed in
//!   the log as not run;
//! - mounts must be bind mounts; they are always `nosuid,nodev`.

use crate::request::{BindMount, Device};
use crate::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const NVIDIA_GPU_KIND: &str = "nvidia.com/gpu";

/// The spec directories, lowest priority first.
pub fn default_dirs() -> Vec<PathBuf> {
    vec!["/etc/cdi".into(), "/var/run/cdi".into()]
}

/// The newest spec version understood.
const MAX_VERSION: (u64, u64, u64) = (1, 1, 0);

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SpecFile {
    cdi_version: String,
    kind: String,
    #[serde(default)]
    #[allow(dead_code)] // accepted, not used
    annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    devices: Vec<DeviceSpec>,
    #[serde(default)]
    container_edits: Option<ContainerEdits>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DeviceSpec {
    name: String,
    #[serde(default)]
    #[allow(dead_code)] // accepted, not used
    annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    container_edits: ContainerEdits,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ContainerEdits {
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    device_nodes: Vec<DeviceNode>,
    #[serde(default)]
    hooks: Vec<Hook>,
    #[serde(default)]
    mounts: Vec<Mount>,
    #[serde(default)]
    intel_rdt: Option<serde_json::Value>,
    #[serde(default)]
    additional_gids: Vec<u32>,
    #[serde(default)]
    net_devices: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DeviceNode {
    path: String,
    #[serde(default)]
    host_path: Option<String>,
    #[serde(default, rename = "type")]
    typ: Option<String>,
    #[serde(default)]
    major: Option<i64>,
    #[serde(default)]
    minor: Option<i64>,
    #[serde(default)]
    file_mode: Option<u32>,
    #[serde(default)]
    permissions: Option<String>,
    #[serde(default)]
    #[allow(dead_code)] // nodes are made root-owned
    uid: Option<u32>,
    #[serde(default)]
    #[allow(dead_code)] // nodes are made root-owned
    gid: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Hook {
    hook_name: String,
    path: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    #[allow(dead_code)] // hooks are not run
    env: Vec<String>,
    #[serde(default)]
    #[allow(dead_code)]
    timeout: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Mount {
    host_path: String,
    container_path: String,
    #[serde(default)]
    options: Vec<String>,
    #[serde(default, rename = "type")]
    typ: Option<String>,
}

/// The resolved edits for a run: the same shape as cw's own GPU plan.
pub use crate::gpu::Injection as Edits;

/// The specs of one kind found in the spec directories.
#[derive(Debug, Default)]
pub struct Specs {
    kind: String,
    /// file, common edits
    files: Vec<(PathBuf, ContainerEdits)>,
    /// device name → (index into files, its edits)
    devices: BTreeMap<String, (usize, ContainerEdits)>,
    /// Files that could not be used, each with its reason.
    pub errors: Vec<String>,
}

fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let mut it = v.trim().trim_start_matches('v').split('.');
    let a = it.next()?.parse().ok()?;
    let b = it.next().unwrap_or("0").parse().ok()?;
    let c = it.next().unwrap_or("0").parse().ok()?;
    it.next().is_none().then_some((a, b, c))
}

fn parse_file(path: &Path) -> Result<SpecFile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let spec: SpecFile = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| e.to_string())?
    } else {
        serde_yaml::from_str(&text).map_err(|e| e.to_string())?
    };
    let v = parse_version(&spec.cdi_version)
        .ok_or_else(|| format!("cdiVersion {:?} is not a version", spec.cdi_version))?;
    if v > MAX_VERSION {
        return Err(format!(
            "cdiVersion {} is newer than cw understands ({}.{}.{})",
            spec.cdi_version, MAX_VERSION.0, MAX_VERSION.1, MAX_VERSION.2
        ));
    }
    Ok(spec)
}

/// Read every `*.yaml`, `*.yml` and `*.json` in `dirs` (later directories win) and keep the specs
/// of `kind`. Unreadable or invalid files land in `errors`; the rest still count.
pub fn load(dirs: &[PathBuf], kind: &str) -> Specs {
    let mut out = Specs {
        kind: kind.to_string(),
        ..Default::default()
    };
    for dir in dirs {
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
            })
            .collect();
        files.sort();
        for f in files {
            let spec = match parse_file(&f) {
                Ok(s) => s,
                Err(e) => {
                    out.errors.push(format!("{}: {e}; skipped", f.display()));
                    continue;
                }
            };
            if spec.kind != kind {
                continue;
            }
            let idx = out.files.len();
            out.files
                .push((f.clone(), spec.container_edits.unwrap_or_default()));
            for d in spec.devices {
                out.devices.insert(d.name, (idx, d.container_edits));
            }
        }
    }
    out
}

impl Specs {
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The CDI name of a GPU: its UUID where a spec uses UUIDs (nvidia-ctk's `uuid` strategy),
    /// else its index (the `index` strategy; whole GPUs only).
    pub fn device_name_for(&self, uuid: &str, index: u32, mig: bool) -> Result<String> {
        if self.devices.contains_key(uuid) {
            return Ok(uuid.to_string());
        }
        let i = index.to_string();
        if !mig && self.devices.contains_key(&i) {
            return Ok(i);
        }
        Err(Error::Gpu(format!(
            "the CDI spec for {} ({}) has no device named {uuid}{}",
            self.kind,
            self.files
                .iter()
                .map(|f| f.0.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            if mig {
                String::new()
            } else {
                format!(" or {index}")
            }
        )))
    }

    /// The edits for `names`: each involved spec's common edits once, then each device's.
    pub fn resolve(&self, names: &[String]) -> Result<Edits> {
        let mut out = Edits::default();
        let mut common_done = vec![false; self.files.len()];
        for n in names {
            let (idx, edits) = self
                .devices
                .get(n)
                .ok_or_else(|| Error::Gpu(format!("unresolvable CDI device {}={n}", self.kind)))?;
            let file = &self.files[*idx].0;
            if !common_done[*idx] {
                common_done[*idx] = true;
                apply(&self.files[*idx].1, file, &mut out).map_err(Error::Gpu)?;
            }
            apply(edits, file, &mut out).map_err(Error::Gpu)?;
        }
        Ok(out)
    }
}

fn apply(e: &ContainerEdits, file: &Path, out: &mut Edits) -> Result<(), String> {
    let ctx = |what: String| format!("CDI spec {}: {what}", file.display());
    for v in &e.env {
        if !v.contains('=') || v.starts_with('=') {
            return Err(ctx(format!("env {v:?} is not NAME=VALUE")));
        }
        out.env.push(v.clone());
    }
    for n in &e.device_nodes {
        let d = device(n).map_err(|e| ctx(e.to_string()))?;
        if !out.devices.iter().any(|x| x.path == d.path) {
            out.devices.push(d);
        }
    }
    for m in &e.mounts {
        if !m.container_path.starts_with('/') || !m.host_path.starts_with('/') {
            return Err(ctx(format!(
                "mount {} -> {}: both paths must be absolute",
                m.host_path, m.container_path
            )));
        }
        let bind = m.options.iter().any(|o| o == "bind" || o == "rbind");
        if !matches!(m.typ.as_deref(), None | Some("bind") | Some("")) && !bind {
            return Err(ctx(format!(
                "mount of type {:?} at {}: only bind mounts are supported",
                m.typ.as_deref().unwrap_or(""),
                m.container_path
            )));
        }
        if !out.files.iter().any(|x| x.destination == m.container_path) {
            out.files.push(BindMount {
                source: PathBuf::from(&m.host_path),
                destination: m.container_path.clone(),
                readonly: m.options.iter().any(|o| o == "ro"),
            });
        }
    }
    for h in &e.hooks {
        if h.args.iter().any(|a| a == "update-ldcache") {
            let mut it = h.args.iter();
            while let Some(a) = it.next() {
                let dir = if a == "--folder" {
                    it.next().cloned()
                } else {
                    a.strip_prefix("--folder=").map(str::to_string)
                };
                if let Some(d) = dir {
                    if !out.ldconfig_dirs.contains(&d) {
                        out.ldconfig_dirs.push(d);
                    }
                }
            }
            continue;
        }
        out.notes.push(format!(
            "{} hook {} {} (from {}) not run: cw runs no host-side hooks",
            h.hook_name,
            h.path,
            h.args.join(" "),
            file.display()
        ));
    }
    if !e.additional_gids.is_empty() || e.intel_rdt.is_some() || !e.net_devices.is_empty() {
        out.notes.push(format!(
            "additionalGids/intelRdt/netDevices from {} not applied",
            file.display()
        ));
    }
    Ok(())
}

fn device(n: &DeviceNode) -> Result<Device> {
    let host = n.host_path.as_deref().unwrap_or(&n.path);
    let typ = n.typ.as_deref().map(|t| if t == "u" { "c" } else { t });
    let access = n.permissions.as_deref().unwrap_or("rwm");
    let d = match (typ, n.major, n.minor) {
        (Some(t), Some(major), Some(minor)) => Device {
            path: n.path.clone(),
            dev_type: t.to_string(),
            major,
            minor,
            file_mode: n.file_mode.unwrap_or(0o666) & 0o7777,
            access: access.to_string(),
        },
        _ => {
            // fill what is missing from the host node, as the reference library does
            let mut d = Device::from_host(host, &n.path, access)
                .map_err(|e| Error::Gpu(format!("device node {}: {e}", n.path)))?;
            if typ.is_some_and(|t| t != d.dev_type) {
                return Err(Error::Gpu(format!(
                    "device node {}: type {} but {host} is a {} device",
                    n.path,
                    typ.unwrap(),
                    d.dev_type
                )));
            }
            d.major = n.major.unwrap_or(d.major);
            d.minor = n.minor.unwrap_or(d.minor);
            d.file_mode = n.file_mode.map(|m| m & 0o7777).unwrap_or(d.file_mode);
            d
        }
    };
    d.validate().map_err(|e| Error::Gpu(format!("CDI {e}")))?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cdi")
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("0.6.0"), Some((0, 6, 0)));
        assert_eq!(parse_version("1.1"), Some((1, 1, 0)));
        assert_eq!(parse_version("x"), None);
        assert!(parse_version("1.2.0").unwrap() > MAX_VERSION);
    }

    #[test]
    fn resolve_by_index_and_uuid_with_common_edits_once() {
        let s = load(&[fixtures().join("etc")], NVIDIA_GPU_KIND);
        assert!(
            s.errors
                .iter()
                .any(|e| e.contains("bad-field.yaml") && e.contains("unknown field")),
            "{:?}",
            s.errors
        );
        assert!(
            s.errors
                .iter()
                .any(|e| e.contains("future.yaml") && e.contains("newer")),
            "{:?}",
            s.errors
        );
        assert!(!s.is_empty(), "a bad file does not hide the good ones");
        let uuid = "GPU-4cf8db2d-06c0-7d70-1a51-e59b25b2c16c";
        assert_eq!(s.device_name_for(uuid, 0, false).unwrap(), uuid);
        assert_eq!(s.device_name_for("GPU-other", 1, false).unwrap(), "1");
        let e = s
            .device_name_for("GPU-other", 7, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no device named GPU-other or 7"), "{e}");
        let e = s.device_name_for("MIG-x", 1, true).unwrap_err().to_string();
        assert!(e.contains("no device named MIG-x"), "{e}");

        let ed = s.resolve(&["0".into(), "1".into()]).unwrap();
        let nodes: Vec<(&str, &str, i64, i64, &str)> = ed
            .devices
            .iter()
            .map(|d| {
                (
                    d.path.as_str(),
                    d.dev_type.as_str(),
                    d.major,
                    d.minor,
                    d.access.as_str(),
                )
            })
            .collect();
        assert_eq!(
            nodes,
            vec![
                ("/dev/nvidiactl", "c", 195, 255, "rwm"),
                ("/dev/nvidia-uvm", "c", 509, 0, "rw"),
                ("/dev/nvidia0", "c", 195, 0, "rwm"),
                ("/dev/nvidia1", "c", 195, 1, "rwm"),
            ],
            "common nodes once, then each device's"
        );
        assert_eq!(
            ed.files,
            vec![
                BindMount {
                    source: "/usr/lib/x86_64-linux-gnu/libcuda.so.999.88.77".into(),
                    destination: "/usr/lib/x86_64-linux-gnu/libcuda.so.999.88.77".into(),
                    readonly: true
                },
                BindMount {
                    source: "/usr/bin/nvidia-smi".into(),
                    destination: "/usr/bin/nvidia-smi".into(),
                    readonly: true
                },
            ]
        );
        assert_eq!(ed.env, vec!["NVIDIA_VISIBLE_DEVICES=void".to_string()]);
        assert_eq!(
            ed.ldconfig_dirs,
            vec!["/usr/lib/x86_64-linux-gnu".to_string()]
        );
        assert_eq!(ed.notes.len(), 1, "{:?}", ed.notes);
        assert!(ed.notes[0].contains("create-symlinks"), "{:?}", ed.notes);
        let e = s.resolve(&["9".into()]).unwrap_err().to_string();
        assert_eq!(e, "unresolvable CDI device nvidia.com/gpu=9");
    }

    #[test]
    fn later_directories_win_and_other_kinds_are_ignored() {
        let s = load(
            &[fixtures().join("etc"), fixtures().join("run")],
            NVIDIA_GPU_KIND,
        );
        let ed = s.resolve(&["0".into()]).unwrap();
        assert!(
            ed.devices
                .iter()
                .any(|d| d.path == "/dev/nvidia0" && d.minor == 7),
            "{:?}",
            ed.devices
        );
        assert!(!ed.devices.iter().any(|d| d.path == "/dev/thing0"));
        let other = load(&[fixtures().join("etc")], "vendor.com/thing");
        let ed = other.resolve(&["0".into()]).unwrap();
        assert_eq!(ed.devices.len(), 1);
        assert_eq!(
            (ed.devices[0].path.as_str(), ed.devices[0].major),
            ("/dev/thing0", 10)
        );
        assert!(load(&[fixtures().join("etc")], "none.example/x").is_empty());
    }

    #[test]
    fn host_nodes_fill_missing_numbers_and_bad_edits_are_errors() {
        let n = |path: &str, host: &str| DeviceNode {
            path: path.into(),
            host_path: Some(host.into()),
            typ: None,
            major: None,
            minor: None,
            file_mode: None,
            permissions: None,
            uid: None,
            gid: None,
        };
        let d = device(&n("/dev/nvidia0", "/dev/null")).unwrap();
        assert_eq!((d.dev_type.as_str(), d.major, d.minor), ("c", 1, 3));
        assert!(device(&n("/dev/x", "/etc/hostname"))
            .unwrap_err()
            .to_string()
            .contains("not a device"));
        assert!(device(&n("/dev/x", "/nonexistent"))
            .unwrap_err()
            .to_string()
            .contains("/nonexistent"));
        assert!(device(&n("/etc/passwd", "/dev/null"))
            .unwrap_err()
            .to_string()
            .contains("under /dev"));
        let mut p = n("/dev/x", "/dev/null");
        p.permissions = Some("rwx".into());
        assert!(device(&p)
            .unwrap_err()
            .to_string()
            .contains("subset of rwm"));
        let s = load(&[fixtures().join("bad-mount")], NVIDIA_GPU_KIND);
        let e = s.resolve(&["all".into()]).unwrap_err().to_string();
        assert!(e.contains("only bind mounts"), "{e}");
    }
}
