//! What went wrong inside libcontainer's container init, from the monitor's log.
//!
//! A failure in the init (mounts, device nodes, the root switch) crosses libcontainer's process
//! boundary as its top-level message only ("failed to prepare rootfs"); the path and the
//! operation are in what the init logged just before (it inherits the monitor's log file). The
//! monitor reads the lines the attempt wrote and names them in the run's error.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Targets whose errors only wrap the init's (the process plumbing around it).
const WRAPPERS: &[&str] = &[
    "libcontainer::process::container_intermediate_process",
    "libcontainer::process::container_main_process",
    "libcontainer::container::builder_impl",
    "libcontainer::container::state",
    "libcontainer::container::container_delete",
];

/// Read `log` from byte `from` (at most 256 KiB) and explain the init's failure.
pub fn detail_since(log: &Path, from: u64, rootfs: &Path) -> Option<String> {
    let mut f = std::fs::File::open(log).ok()?;
    f.seek(SeekFrom::Start(from)).ok()?;
    let mut s = String::new();
    f.take(256 << 10).read_to_string(&mut s).ok()?;
    detail(&s, rootfs)
}

/// The first error the init logged, made readable: host rootfs paths shown as the container's,
/// `Mount { … }` as "SOURCE on DESTINATION", and the OS's message from the lines that follow.
pub fn detail(log: &str, rootfs: &Path) -> Option<String> {
    let errors: Vec<(&str, &str)> = log
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(" ERROR ")? + 7..];
            let (target, msg) = rest.split_once(": ")?;
            target.starts_with("libcontainer").then_some((target, msg))
        })
        .filter(|(t, _)| !WRAPPERS.contains(t))
        .collect();
    let (_, first) = errors.first()?;
    let mut d = readable(first, rootfs);
    // the OS's own words, from this line or the ones after it (`message: "…"` or `Nix(EXXX)`)
    if !d.contains("os error") {
        if let Some(m) = errors.iter().find_map(|(_, m)| os_message(m)) {
            if !d.contains(&m) {
                d.push_str(": ");
                d.push_str(&m);
            }
        }
    }
    Some(d)
}

fn os_message(m: &str) -> Option<String> {
    if let Some(i) = m.find("message: \"") {
        let rest = &m[i + 10..];
        return Some(rest[..rest.find('"')?].to_string());
    }
    let i = m.find("Nix(E")?;
    let rest = &m[i + 4..];
    let name = &rest[..rest.find(')')?];
    name.chars()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        .then(|| name.to_string())
}

fn readable(msg: &str, rootfs: &Path) -> String {
    let root = rootfs.to_string_lossy();
    let root = root.trim_end_matches('/');
    let mut s = msg.replace(&format!("{root}/"), "/").replace(root, "/");
    // Mount { destination: "/d", typ: Some("bind"), source: Some("/s"), options: … }
    while let Some(i) = s.find("Mount { destination: ") {
        let Some(len) = s[i..].find(" }") else { break };
        let body = &s[i..i + len];
        let field = |name: &str| {
            let j = body.find(name)? + name.len();
            let rest = &body[j..];
            let rest = rest.strip_prefix("Some(").unwrap_or(rest);
            let rest = rest.strip_prefix('"')?;
            Some(rest[..rest.find('"')?].to_string())
        };
        let dest = field("destination: ").unwrap_or_default();
        let what = match (field("source: "), field("typ: ")) {
            (Some(src), Some(t)) => format!("{src} on {dest} ({t})"),
            (Some(src), None) => format!("{src} on {dest}"),
            (None, _) => dest,
        };
        s.replace_range(i..i + len + 2, &what);
    }
    // tracing's fields, `err=Nix(EEXIST) path="/dev/null"`: keep them, without the Debug quoting
    s.replace('"', "")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNT: &str = r#"2026-12-02T04:40:51.856600Z  INFO cw_runtime::monitor: the monitor keeps oom_score_adj 0
2026-12-02T04:40:51.862407Z  WARN libcgroups::v1::manager: cgroup net_cls not supported on this system
2026-12-02T04:40:51.880251Z ERROR libcontainer::rootfs::mount: failed to mount Mount { destination: "/proc/foo", typ: Some("bind"), source: Some("/tmp/vsrc"), options: Some(["rbind", "nosuid", "nodev"]), uid_mappings: None, gid_mappings: None }: create next directory component failed
2026-12-02T04:40:51.880360Z ERROR libcontainer::process::init::process: failed to prepare rootfs err=Mount(Pathrs(Error(RawOsError { operation: "create next directory component", source: Mkdirat { dirfd: FrozenFd(8, Some("/s/runs/9903/rootfs/proc")), path: "foo", mode: 493, source: Os { code: 2, kind: NotFound, message: "No such file or directory" } } })))
2026-12-02T04:40:51.884701Z ERROR libcontainer::process::container_intermediate_process: failed to initialize container process: failed to prepare rootfs
2026-12-02T04:40:51.885191Z ERROR libcontainer::process::container_main_process: failed to wait for init ready: exec process failed with error error in executing process : failed to prepare rootfs
2026-12-02T04:40:51.897561Z ERROR libcontainer::container::state: failed to open container state file state_file_path="/s/runs/9903/lc/9903/state.json" err=No such file or directory (os error 2)
"#;

    const MKNOD: &str = r#"2026-12-02T04:40:53.539965Z ERROR libcontainer::rootfs::device: failed to mknod device err=Nix(EEXIST) path="/s/runs/3533/rootfs/dev/null" major=1 minor=3
2026-12-02T04:40:53.540050Z ERROR libcontainer::process::init::process: failed to prepare rootfs err=Device(Syscall(Nix(EEXIST)))
2026-12-02T04:40:53.540058Z ERROR libcontainer::process::container_intermediate_process: failed to initialize container process: failed to prepare rootfs
"#;

    #[test]
    fn a_failed_mount_names_source_destination_and_the_os_error() {
        let d = detail(MOUNT, Path::new("/s/runs/9903/rootfs")).unwrap();
        assert_eq!(
            d,
            "failed to mount /tmp/vsrc on /proc/foo (bind): create next directory component failed: No such file or directory"
        );
    }

    #[test]
    fn a_failed_device_node_names_the_container_path() {
        let d = detail(MKNOD, Path::new("/s/runs/3533/rootfs/")).unwrap();
        assert_eq!(
            d,
            "failed to mknod device err=Nix(EEXIST) path=/dev/null major=1 minor=3"
        );
        assert!(d.contains("EEXIST"));
    }

    #[test]
    fn nothing_from_the_init_is_none() {
        assert_eq!(detail("", Path::new("/r")), None);
        let wrappers_only =
            "2026 ERROR libcontainer::container::builder_impl: failed to run container process x\n";
        assert_eq!(detail(wrappers_only, Path::new("/r")), None);
        assert_eq!(
            detail("2026 ERROR cw_runtime::monitor: ours\n", Path::new("/r")),
            None
        );
    }
}
