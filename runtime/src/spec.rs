//! The OCI runtime spec for a run, with safe defaults: docker's default capabilities for root
//! (less MKNOD), none for other users, no_new_privs, masked and read-only /proc paths, a private
//! /dev with only the standard nodes, read-only /sys and no cgroupfs inside (libcontainer 0.7
//! would mount it writable on cgroup v1). The seccomp filter is not in the spec: it was compiled
//! when cw was built, and the init's executor loads it ([`crate::seccomp`]).

use crate::request::{Network, RunRequest};
use crate::Result;
use serde_json::{json, Value};

/// Docker's default capability set, without CAP_MKNOD (runs never need to make device nodes).
pub const ROOT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

const MASKED: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

const READONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Build the spec, as the JSON the bundle's `config.json` holds (libcontainer reads it into its
/// types when it creates the container; this crate's tests check that every variant reads).
/// Kept as JSON, the monitor carries no second copy of oci-spec's deserialisation (from a
/// `Value`) beside libcontainer's (from the file). `cgroups_path` is absolute.
pub fn build(req: &RunRequest) -> Result<Value> {
    build_json(req)
}

/// The spec of a run without root on the host ([`crate::userns`]): the monitor is root only in
/// a user namespace of its own, where the caller's uid and gid are the only ids.
/// - devpts cannot be given group 5 (it has no id here);
/// - sysfs can be mounted only in a network namespace that namespace owns (`none`, `private`);
///   with the host's network it is the host's /sys, bound read-only, as rootless runc does;
/// - no device cgroup (its eBPF program needs the host's CAP_SYS_ADMIN): the container's /dev
///   holds only the nodes libcontainer binds from the host, which the user could open anyway;
/// - without a cgroup the run may write (`cgroup` false), no resources at all: the caller has
///   checked that none was asked for.
pub fn build_rootless(req: &RunRequest, cgroup: bool) -> Result<Value> {
    let mut v = build_json(req)?;
    for m in v["mounts"].as_array_mut().unwrap() {
        if m["type"] == "devpts" {
            if let Some(o) = m["options"].as_array_mut() {
                o.retain(|x| x != "gid=5");
            }
        }
        if m["type"] == "sysfs" && req.network == Network::Host {
            *m = json!({"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]});
        }
    }
    if !cgroup {
        // no pids controller: the process limit is RLIMIT_NPROC (per user namespace, so per
        // run, from Linux 5.14; userns::check keeps it only where it means that or was asked)
        if let Some(n) = req.limits.pids.filter(|n| *n > 0) {
            v["process"]["rlimits"] = json!([{"type": "RLIMIT_NPROC", "hard": n, "soft": n}]);
        }
    }
    // no resources for libcontainer: with a cgroup (a delegated v2 subtree) the monitor writes
    // the limits itself (`cgroup::write_v2_limits`), since libcontainer would also load the
    // device cgroup's eBPF program, which needs the host's CAP_SYS_ADMIN
    v["linux"].as_object_mut().unwrap().remove("resources");
    Ok(v)
}

fn build_json(req: &RunRequest) -> Result<Value> {
    let root = req.uid == 0;
    let caps: Vec<&str> = if root { ROOT_CAPS.to_vec() } else { vec![] };
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", format!("size={}", req.limits.shm_size.max(4096))]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ];
    for m in req.host_files.iter().chain(req.mounts.iter()) {
        let mut opts = vec!["rbind", "nosuid", "nodev"];
        if m.readonly {
            opts.push("ro");
        }
        mounts.push(json!({"destination": m.destination, "type": "bind", "source": m.source, "options": opts}));
    }
    // No network namespace here: for Network::None/Private the monitor made a fresh one
    // (loopback up, pasta for Private) that the container inherits; Host shares the host's.
    let _: Network = req.network;
    let namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
        json!({"type": "cgroup"}),
    ];

    let mut resources = json!({
        "devices": [{"allow": false, "access": "rwm"}],
    });
    let mut allowed: Vec<(&str, i64, i64, &str)> =
        [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2)]
            .iter()
            .map(|&(a, b)| ("c", a, b, "rwm"))
            .collect();
    let mut devices = vec![];
    for d in &req.devices {
        d.validate()?;
        allowed.push((d.dev_type.as_str(), d.major, d.minor, d.access.as_str()));
        devices.push(json!({"path": d.path, "type": d.dev_type, "major": d.major, "minor": d.minor, "fileMode": d.file_mode, "uid": 0, "gid": 0}));
    }
    let dev_rules = resources["devices"].as_array_mut().unwrap();
    for (ty, maj, min, access) in allowed {
        dev_rules
            .push(json!({"allow": true, "type": ty, "major": maj, "minor": min, "access": access}));
    }
    dev_rules.push(json!({"allow": true, "type": "c", "major": 136, "access": "rwm"})); // /dev/pts/*
    if let Some(m) = req.limits.memory {
        let swap = req
            .limits
            .memory_swap
            .unwrap_or_else(|| (m as i64).saturating_mul(2));
        resources["memory"] = json!({"limit": m, "swap": swap});
    }
    let mut cpu = serde_json::Map::new();
    if let Some(c) = req.limits.cpus {
        let period = 100_000u64;
        cpu.insert("period".into(), json!(period));
        cpu.insert(
            "quota".into(),
            json!(((c * period as f64).round() as i64).max(1000)),
        );
    }
    if let Some(s) = &req.limits.cpuset {
        cpu.insert("cpus".into(), json!(s));
    }
    if !cpu.is_empty() {
        resources["cpu"] = Value::Object(cpu);
    }
    if let Some(p) = req.limits.pids {
        resources["pids"] = json!({"limit": p});
    }

    let spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": req.tty.is_some(),
            "user": {"uid": req.uid, "gid": req.gid, "additionalGids": req.additional_gids},
            "args": req.args,
            "env": req.env,
            "cwd": if req.cwd.is_empty() { "/" } else { req.cwd.as_str() },
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": true,
        },
        "root": {"path": req.rootfs, "readonly": req.readonly_rootfs},
        "hostname": req.hostname,
        "mounts": mounts,
        "linux": {
            "cgroupsPath": req.cgroup_path(),
            "namespaces": namespaces,
            "resources": resources,
            "devices": devices,
            "maskedPaths": MASKED,
            "readonlyPaths": READONLY,
        }
    });
    Ok(spec)
}

#[cfg(test)]
pub(crate) mod tests {
    /// The spec as libcontainer reads it (its types), back as JSON: a spec that does not read
    /// fails here.
    fn typed(v: Result<Value>) -> Value {
        let spec: oci_spec::runtime::Spec = serde_json::from_value(v.unwrap()).unwrap();
        serde_json::to_value(spec).unwrap()
    }

    use super::*;
    use crate::request::*;

    pub(crate) fn req(uid: u32) -> RunRequest {
        RunRequest {
            id: "t1".into(),
            rootfs: "/r".into(),
            overlay: None,
            readonly_rootfs: false,
            args: vec!["true".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "".into(),
            uid,
            gid: uid,
            additional_gids: vec![],
            hostname: "h".into(),
            mounts: vec![BindMount {
                source: "/data".into(),
                destination: "/data".into(),
                readonly: true,
            }],
            limits: Limits {
                memory: Some(64 << 20),
                memory_swap: None,
                cpus: Some(1.5),
                cpuset: Some("0".into()),
                pids: Some(100),
                shm_size: 1 << 20,
                without_cgroup_ok: false,
            },
            network: Network::None,
            time_limit: None,
            kill_grace_secs: 2,
            stdout: None,
            stderr: None,
            cgroup_parent: "/cw".into(),
            devices: vec![],
            host_files: vec![],
            ldconfig_dirs: vec![],
            cleanup: Cleanup::default(),
            stdin: false,
            tty: None,
            exit_pipe: None,
            net_ns: None,
            remove_when_done: false,
        }
    }

    #[test]
    fn root_gets_default_caps_without_mknod_and_others_none() {
        let s = typed(build(&req(0)));
        let caps = s["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert!(caps.iter().any(|c| c == "CAP_CHOWN"));
        assert!(!caps
            .iter()
            .any(|c| c == "CAP_MKNOD" || c == "CAP_SYS_ADMIN"));
        let s = typed(build(&req(1000)));
        assert!(s["process"]["capabilities"]["bounding"]
            .as_array()
            .is_none_or(|a| a.is_empty()));
        assert_eq!(s["process"]["noNewPrivileges"], true);
    }

    #[test]
    fn limits_cgroup_and_no_cgroupfs() {
        let s = typed(build(&req(0)));
        assert_eq!(s["linux"]["resources"]["memory"]["limit"], 64 << 20);
        // docker's default: as much swap again as memory
        assert_eq!(s["linux"]["resources"]["memory"]["swap"], 128 << 20);
        assert_eq!(s["linux"]["resources"]["cpu"]["quota"], 150000);
        assert_eq!(s["linux"]["resources"]["pids"]["limit"], 100);
        assert_eq!(s["linux"]["cgroupsPath"], "/cw/t1");
        let mounts = s["mounts"].as_array().unwrap();
        assert!(!mounts.iter().any(|m| m["type"] == "cgroup"));
        let sys = mounts.iter().find(|m| m["destination"] == "/sys").unwrap();
        assert!(sys["options"].as_array().unwrap().iter().any(|o| o == "ro"));
        let data = mounts.iter().find(|m| m["destination"] == "/data").unwrap();
        assert!(data["options"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "ro"));
        // the filter is loaded by the init's executor (crate::seccomp), not compiled from here
        assert!(s["linux"].get("seccomp").is_none());
        // no netns entry: the container inherits the monitor's private one
        assert!(!s["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["type"] == "network"));
    }

    #[test]
    fn a_rootless_spec_asks_only_for_what_a_user_namespace_can_give() {
        let mut r = req(0);
        let s = typed(build_rootless(&r, false));
        let mounts = s["mounts"].as_array().unwrap();
        let devpts = mounts.iter().find(|m| m["type"] == "devpts").unwrap();
        assert!(!devpts["options"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "gid=5"));
        assert!(mounts.iter().any(|m| m["type"] == "sysfs"));
        assert!(s["linux"].get("resources").is_none(), "{}", s["linux"]);
        // without a cgroup the process limit is RLIMIT_NPROC
        r.limits.pids = Some(30);
        let s = typed(build_rootless(&r, false));
        assert_eq!(
            s["process"]["rlimits"],
            serde_json::json!([{"type": "RLIMIT_NPROC", "hard": 30, "soft": 30}])
        );
        // with a cgroup: the pids controller, no rlimit; no resources for libcontainer (the
        // monitor writes the limits: libcontainer would load a device eBPF program too)
        let s = typed(build_rootless(&r, true));
        assert!(s["process"].get("rlimits").is_none(), "{}", s["process"]);
        assert!(s["linux"].get("resources").is_none(), "{}", s["linux"]);
        // the host's network: no sysfs of its own, the host's /sys read-only
        r.network = Network::Host;
        let s = typed(build_rootless(&r, false));
        let sys = s["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/sys")
            .unwrap()
            .clone();
        assert_eq!(sys["type"], "bind");
        assert!(sys["options"].as_array().unwrap().iter().any(|o| o == "ro"));
        // a root run keeps all of it
        let s = typed(build(&req(0)));
        assert!(s["linux"]["resources"]["devices"].is_array());
    }
}
