//! Pulls from real registries (Debian's docker-registry on 127.0.0.1, see tests/fixtures), compared
//! with what umoci unpacks for the same images; auth, mirrors, platforms, hostile registries.

mod common;
use common::*;
use std::process::Command;

fn reference_rootfs(name: &str) -> std::path::PathBuf {
    fixtures_root().join("ref").join(name).join("rootfs")
}

fn pull_and_compare(tag: &str, reference: &str) {
    let cw = Cw::new();
    let name = format!("{REG}/{tag}");
    cw.ok(&["pull", "-q", &name]);
    let m = cw.mount_image(&name);
    let r = std::panic::catch_unwind(|| assert_same_tree(&m, &reference_rootfs(reference)));
    umount(&m);
    r.unwrap();
}

#[test]
fn docker_v2s2_matches_umoci() {
    pull_and_compare("edge:latest", "edge");
}

#[test]
fn oci_manifest_matches_umoci() {
    pull_and_compare("edge:oci", "edge");
}

#[test]
fn zstd_layers_match_umoci() {
    pull_and_compare("edge:zstd", "edge");
}

#[test]
fn oci_index_picks_host_platform() {
    pull_and_compare("tiny:latest", "tiny");
}

#[test]
fn docker_manifest_list_picks_host_platform() {
    pull_and_compare("tiny:list", "tiny");
}

#[test]
fn tiny_oci_and_zstd_match_umoci() {
    pull_and_compare("tiny:amd64-oci", "tiny");
    pull_and_compare("tiny:zstd", "tiny");
}

#[test]
fn platform_flag_selects_arm64() {
    let cw = Cw::new();
    let name = format!("{REG}/tiny:latest");
    cw.ok(&["pull", "-q", "--platform", "linux/arm64", &name]);
    let img = cw.image_json(&name);
    assert_eq!(img["platform"], "linux/arm64");
    let err = cw.fails(&["pull", "-q", "--platform", "linux/s390x", &name]);
    assert!(
        err.contains("linux/s390x") && err.contains("linux/amd64") && err.contains("linux/arm64"),
        "{err}"
    );
}

#[test]
fn warm_repull_is_one_head_and_no_get() {
    let cw = Cw::new();
    let p = Proxy::start(REG, Fault::None);
    let name = format!("{}/edge:latest", p.addr);
    cw.ok(&["pull", "-q", &name]);
    let cold_blob_gets = p.count("GET", "/blobs/");
    assert_eq!(cold_blob_gets, 5, "4 layers + config: {:#?}", p.requests());
    p.log.lock().unwrap().clear();
    cw.ok(&["pull", "-q", &name]);
    let reqs = p.requests();
    assert_eq!(p.count("HEAD", "/manifests/latest"), 1, "{reqs:#?}");
    assert_eq!(p.count("GET", ""), 0, "a warm re-pull made GETs: {reqs:#?}");

    // and no fsync: nothing it does needs durability (the LRU time is the record's mtime), so
    // it never waits on a disk busy with writeback (issue 18's P2)
    let used_before = cw.image_json(&name)["last_used"].as_u64().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let syncs = strace_of(
        &cw,
        &["pull", "-q", &name],
        "trace=fsync,fdatasync,syncfs,sync,sync_file_range,msync",
    );
    assert!(syncs.trim().is_empty(), "a warm re-pull synced:\n{syncs}");
    let used_after = cw.image_json(&name)["last_used"].as_u64().unwrap();
    assert!(
        used_after > used_before,
        "last_used {used_before} -> {used_after}"
    );
}

#[test]
fn shared_layers_are_fetched_once_across_images() {
    let cw = Cw::new();
    let p = Proxy::start(REG, Fault::None);
    cw.ok(&["pull", "-q", &format!("{}/tiny:amd64", p.addr)]);
    p.log.lock().unwrap().clear();
    // edge's base layer is tiny's busybox layer
    cw.ok(&["pull", "-q", &format!("{}/edge:latest", p.addr)]);
    assert_eq!(p.count("GET", "/blobs/"), 4, "{:#?}", p.requests());
    assert_eq!(
        cw.entries("layers")
            .iter()
            .filter(|e| !e.ends_with(".json"))
            .count(),
        4
    );
}

/// `lsattr -d`'s flags of `p`.
fn chattr_flags(p: &std::path::Path) -> String {
    let out = Command::new("lsattr").arg("-d").arg(p).output().unwrap();
    assert!(out.status.success(), "lsattr -d {}: {:?}", p.display(), out);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn layers_are_unpacked_as_trees_of_their_own_on_ext4() {
    // ext4's Orlov allocator places each directory made in a "top of hierarchies" directory
    // (chattr +T) in a block group of its own: a layer does not take its inodes where a tree was
    // just deleted (seconds of kernel CPU without a journal: BENCHMARKS.md, pull)
    let cw = Cw::new();
    cw.ok(&["pull", "-q", &format!("{REG}/edge:latest")]);
    let fs = nix::sys::statfs::statfs(&cw.store())
        .unwrap()
        .filesystem_type();
    if fs != nix::sys::statfs::EXT4_SUPER_MAGIC {
        eprintln!("SKIP: the test store is not on ext4 ({fs:?}): the flag is ext4's");
        return;
    }
    let tmp = chattr_flags(&cw.store().join("tmp"));
    assert!(tmp.contains('T'), "store's tmp/ is not +T: {tmp}");
    // the flag is not inherited: within a layer, ext4 keeps a tree's directories together
    for l in cw
        .entries("layers")
        .iter()
        .filter(|e| !e.ends_with(".json"))
    {
        let f = chattr_flags(&cw.store().join("layers").join(l));
        assert!(!f.contains('T'), "layer {l} is +T: {f}");
    }
}

#[test]
fn a_layer_not_synced_before_a_restart_is_pulled_again() {
    // a pull does not wait for the disk: its layers are synced in the background after it
    // (`cw __settle-store`). A record from an earlier boot that was never synced may name files
    // a power cut left without their data: refused by name, and fetched again by the next pull
    let cw = Cw::new();
    let p = Proxy::start(REG, Fault::None);
    let name = format!("{}/edge:latest", p.addr);
    cw.ok(&["pull", "-q", &name]);
    let records = || -> Vec<(std::path::PathBuf, serde_json::Value)> {
        cw.entries("layers")
            .iter()
            .filter(|e| e.ends_with(".json"))
            .map(|e| {
                let p = cw.store().join("layers").join(e);
                let v = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
                (p, v)
            })
            .collect()
    };
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let t = std::time::Instant::now();
    while !records().iter().all(|(_, v)| v["synced"] == true) {
        assert!(t.elapsed().as_secs() < 30, "not synced: {:#?}", records());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(records().len(), 4);
    assert!(records().iter().all(|(_, v)| v["boot"] == boot.trim()));
    cw.ok(&["run", "--pull", "never", "--image", &name, "--", "true"]);

    // one layer as a restart before its sync would have left it
    let (path, mut torn) = records().into_iter().next().unwrap();
    let diff = torn["diff_id"].as_str().unwrap().to_string();
    torn["boot"] = "an-earlier-boot".into();
    torn["synced"] = false.into();
    std::fs::write(&path, torn.to_string()).unwrap();
    let err = cw.fails(&["run", "--pull", "never", "--image", &name, "--", "true"]);
    assert!(
        err.contains(&diff) && err.contains("before this machine restarted"),
        "{err}"
    );
    p.log.lock().unwrap().clear();
    cw.ok(&["pull", "-q", &name]);
    assert_eq!(p.count("GET", "/blobs/"), 1, "{:#?}", p.requests());
    let (_, again) = records()
        .into_iter()
        .find(|(_, v)| v["diff_id"] == diff.as_str())
        .unwrap();
    assert_eq!(again["boot"], boot.trim());
    cw.ok(&["run", "--pull", "never", "--image", &name, "--", "true"]);
}

#[test]
fn docker_hub_names_through_a_mirror() {
    let cw = Cw::new();
    // a dead mirror first: cw must fall through to the next
    let out = cw.ok(&[
        "--registry-mirror",
        "http://127.0.0.1:9",
        "--registry-mirror",
        &format!("http://{REG}"),
        "pull",
        "-q",
        "tiny",
    ]);
    assert!(out.starts_with("sha256:"), "{out}");
    let img = cw.image_json("docker.io/library/tiny:latest");
    assert_eq!(img["names"][0], "docker.io/library/tiny:latest");
    // the same through the config file
    let cw2 = Cw::new();
    let cfg = cw2.dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!("[registry.\"docker.io\"]\nmirrors = [\"http://{REG}\"]\n"),
    )
    .unwrap();
    let mut c = cw2.cmd(&["pull", "-q", "edge"]);
    c.arg("--config").arg(&cfg);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(cw2.ok(&["images"]).contains("edge:latest"));
}

#[test]
fn basic_auth_with_creds_and_docker_config() {
    let cw = Cw::new();
    let name = format!("{REG_BASIC}/tiny:amd64");
    let err = cw.fails(&["pull", "-q", &name]);
    assert!(
        err.contains("user name and password") && err.contains(REG_BASIC),
        "{err}"
    );
    cw.assert_store_empty();
    let err = cw.fails(&["pull", "-q", "--creds", "testuser:wrong", &name]);
    assert!(err.contains("401") || err.contains("denied"), "{err}");
    cw.ok(&["pull", "-q", "--creds", "testuser:testpass", &name]);
    // ~/.docker/config.json
    let cw2 = Cw::new();
    std::fs::create_dir_all(cw2.dir.path().join("docker")).unwrap();
    std::fs::write(
        cw2.dir.path().join("docker/config.json"),
        format!(r#"{{"auths":{{"{REG_BASIC}":{{"auth":"dGVzdHVzZXI6dGVzdHBhc3M="}}}}}}"#),
    )
    .unwrap();
    cw2.ok(&["pull", "-q", &name]);
}

#[test]
fn bearer_token_auth_anonymous_and_with_creds() {
    let cw = Cw::new();
    let name = format!("{REG_TOKEN}/tiny:amd64");
    cw.ok(&["pull", "-q", &name]);
    let cw2 = Cw::new();
    cw2.ok(&["pull", "-q", "--creds", "testuser:testpass", &name]);
    let cw3 = Cw::new();
    let err = cw3.fails(&["pull", "-q", "--creds", "testuser:nope", &name]);
    assert!(
        err.contains("token server") && err.contains("refused"),
        "{err}"
    );
}

#[test]
fn pinned_digest_pull_and_mismatch() {
    let cw = Cw::new();
    let d = cw
        .ok(&["pull", "-q", &format!("{REG}/tiny:amd64")])
        .trim()
        .to_string();
    let cw2 = Cw::new();
    assert_eq!(
        cw2.ok(&["pull", "-q", &format!("{REG}/tiny@{d}")]).trim(),
        d
    );
    let bogus = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let err = cw2.fails(&["pull", "-q", &format!("{REG}/edge@{bogus}")]);
    assert!(err.contains("not found") || err.contains("404"), "{err}");
}

#[test]
fn hostile_corrupt_blob_leaves_nothing() {
    let cw = Cw::new();
    let p = Proxy::start(REG, Fault::CorruptBlobs);
    let err = cw.fails(&["pull", "-q", &format!("{}/tiny:amd64", p.addr)]);
    assert!(
        err.contains("layer sha256:") || err.contains("blob sha256:"),
        "{err}"
    );
    cw.assert_store_empty();
}

#[test]
fn hostile_truncated_blob_leaves_nothing() {
    let cw = Cw::new();
    let p = Proxy::start(
        REG,
        Fault::TruncateBlobs {
            after: 1000,
            times: usize::MAX,
        },
    );
    let err = cw.fails(&["pull", "-q", &format!("{}/tiny:amd64", p.addr)]);
    assert!(err.contains("layer sha256:"), "{err}");
    cw.assert_store_empty();
}

#[test]
fn interrupted_blob_resumes_with_range() {
    let cw = Cw::new();
    let p = Proxy::start(
        REG,
        Fault::TruncateBlobs {
            after: 300_000,
            times: 1,
        },
    );
    cw.ok(&["pull", "-q", &format!("{}/tiny:amd64", p.addr)]);
    let reqs = p.requests();
    assert!(
        reqs.iter()
            .any(|r| r.contains("Range: bytes=300000-") || r.contains("range: bytes=300000-")),
        "no resume: {reqs:#?}"
    );
    let m = cw.mount_image(&format!("{}/tiny:amd64", p.addr));
    let r = std::panic::catch_unwind(|| assert_same_tree(&m, &reference_rootfs("tiny")));
    umount(&m);
    r.unwrap();
}

#[test]
fn hostile_bad_manifest_json() {
    let cw = Cw::new();
    let p = Proxy::start(REG, Fault::BadManifest);
    let err = cw.fails(&["pull", "-q", &format!("{}/tiny:amd64", p.addr)]);
    assert!(err.contains("not valid JSON"), "{err}");
    cw.assert_store_empty();
}

#[test]
fn hostile_oversized_manifest() {
    let cw = Cw::new();
    let p = Proxy::start(REG, Fault::HugeManifest);
    let err = cw.fails(&["pull", "-q", &format!("{}/tiny:amd64", p.addr)]);
    assert!(
        err.contains("larger than") && err.contains("limit"),
        "{err}"
    );
    cw.assert_store_empty();
}

#[test]
fn hostile_wrong_config_digest() {
    let cw = Cw::new();
    let p = Proxy::start(REG, Fault::WrongConfig);
    let err = cw.fails(&["pull", "-q", &format!("{}/tiny:amd64", p.addr)]);
    assert!(err.contains("digest mismatch"), "{err}");
    cw.assert_store_empty();
}

#[test]
fn server_errors_are_retried_then_named() {
    let cw = Cw::new();
    let p = Proxy::start(REG, Fault::Status(503));
    let err = cw.fails(&["pull", "-q", &format!("{}/tiny:amd64", p.addr)]);
    assert!(
        err.contains("503") && err.contains("gave up after retries"),
        "{err}"
    );
    assert!(p.requests().len() >= 3, "not retried: {:#?}", p.requests());
}

#[test]
fn two_processes_pull_the_same_image_at_once() {
    let cw = Cw::new();
    let name = format!("{REG}/edge:latest");
    let a = cw.cmd(&["pull", "-q", &name]).spawn().unwrap();
    let b = cw.cmd(&["pull", "-q", &name]).spawn().unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(
        a.status.success() && b.status.success(),
        "{} / {}",
        String::from_utf8_lossy(&a.stderr),
        String::from_utf8_lossy(&b.stderr)
    );
    assert_eq!(
        cw.entries("layers")
            .iter()
            .filter(|e| e.ends_with(".json"))
            .count(),
        4
    );
    assert!(cw.entries("tmp").is_empty());
    let m = cw.mount_image(&name);
    let r = std::panic::catch_unwind(|| assert_same_tree(&m, &reference_rootfs("edge")));
    umount(&m);
    r.unwrap();
}

#[test]
fn rmi_keeps_shared_layers_and_prune_evicts_lru() {
    let cw = Cw::new();
    let tiny = format!("{REG}/tiny:amd64");
    let edge = format!("{REG}/edge:latest");
    cw.ok(&["pull", "-q", &tiny]);
    cw.ok(&["pull", "-q", &edge]);
    let layers = |cw: &Cw| {
        cw.entries("layers")
            .iter()
            .filter(|e| e.ends_with(".json"))
            .count()
    };
    assert_eq!(layers(&cw), 4);
    let out = cw.ok(&["rmi", &edge]);
    assert!(out.contains("Deleted"), "{out}");
    assert_eq!(
        layers(&cw),
        1,
        "the busybox layer tiny still uses must stay"
    );
    assert!(cw.fails(&["inspect", &edge]).contains("no image"));
    cw.ok(&["inspect", &tiny]);
    // a second name only untags
    cw.ok(&["pull", "-q", &format!("{REG}/tiny:amd64-oci")]);
    cw.ok(&["pull", "-q", &edge]);
    cw.ok(&["pull", "-q", &tiny]); // tiny used last
    let out = cw.ok(&["prune", "--max-size", "3m"]);
    assert!(out.contains("edge") || out.contains("image"), "{out}");
    assert!(
        cw.run(&["inspect", &edge]).status.code() != Some(0),
        "LRU image edge should be gone"
    );
    cw.ok(&["inspect", &tiny]);
    let err = cw.fails(&["rmi", "nonexistent:tag"]);
    assert!(err.contains("no image"), "{err}");
}

#[test]
fn bad_references_are_named() {
    let cw = Cw::new();
    let err = cw.fails(&["pull", "Ubuntu"]);
    assert!(
        err.contains("\"Ubuntu\"") && err.contains("lower case"),
        "{err}"
    );
    let err = cw.fails(&["pull", &format!("{REG}/nosuchrepo:latest")]);
    assert!(
        err.contains("not found") && err.contains("nosuchrepo"),
        "{err}"
    );
}

/// What `strace -f -e <filter>` saw of `cw args…` and its children, one line a call; `cw`
/// must succeed.
fn strace_of(cw: &Cw, args: &[&str], filter: &str) -> String {
    let trace = cw.dir.path().join("cw.strace");
    let c = cw.cmd(args);
    let o = Command::new("strace")
        .args(["-f", "-qq", "-e", filter, "-o"])
        .arg(&trace)
        .arg(c.get_program())
        .args(c.get_args())
        .envs(c.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .output()
        .expect("strace (package strace)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read_to_string(&trace).unwrap()
}

/// `skopeo --insecure-policy args…`, which must succeed.
fn skopeo(args: &[&str]) {
    let o = std::process::Command::new("skopeo")
        .args(["--insecure-policy"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_load_of_layers_the_store_has_starts_no_sync() {
    let cw = Cw::new();
    let archive = cw.dir.path().join("tiny-docker.tar");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{REG}/tiny:amd64"),
        &format!(
            "docker-archive:{}:example.org/tiny:saved",
            archive.display()
        ),
    ]);
    let load = ["load", "-i", archive.to_str().unwrap()];
    // the first load unpacks the layers and starts their background sync
    let first = strace_of(&cw, &load, "trace=execve");
    assert!(
        first.contains("__settle-store"),
        "no sync after a load:\n{first}"
    );
    cw.settle_store();
    // the same archive again: nothing new, nothing to sync
    let again = strace_of(&cw, &load, "trace=execve");
    assert!(
        !again.contains("__settle-store"),
        "a load of nothing new synced:\n{again}"
    );
}

#[test]
fn load_docker_archive_and_oci_layout() {
    let cw = Cw::new();
    let d = cw.dir.path();
    let src = format!("docker://{REG}/edge:latest");
    let archive = d.join("edge-docker.tar");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &src,
        &format!(
            "docker-archive:{}:example.org/edge:saved",
            archive.display()
        ),
    ]);
    let out = cw.ok(&["load", "-i", archive.to_str().unwrap()]);
    assert!(out.contains("example.org/edge:saved"), "{out}");
    let m = cw.mount_image("example.org/edge:saved");
    let r = std::panic::catch_unwind(|| assert_same_tree(&m, &reference_rootfs("edge")));
    umount(&m);
    r.unwrap();

    let cw2 = Cw::new();
    let layout = d.join("layout");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &src,
        &format!("oci:{}:example.org/edge:oci", layout.display()),
    ]);
    let out = cw2.ok(&["load", "-i", layout.to_str().unwrap()]);
    assert!(out.contains("example.org/edge:oci"), "{out}");
    let oci_archive = d.join("edge-oci.tar");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &src,
        &format!(
            "oci-archive:{}:example.org/edge:ociar",
            oci_archive.display()
        ),
    ]);
    let cw3 = Cw::new();
    cw3.ok(&["load", "-i", oci_archive.to_str().unwrap()]);
    let m = cw3.mount_image("example.org/edge:ociar");
    let r = std::panic::catch_unwind(|| assert_same_tree(&m, &reference_rootfs("edge")));
    umount(&m);
    r.unwrap();

    // a layer that does not match its digest is refused, and nothing is stored
    let cw4 = Cw::new();
    let blobs = layout.join("blobs/sha256");
    let biggest = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path();
    let mut data = std::fs::read(&biggest).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 1;
    std::fs::write(&biggest, data).unwrap();
    let err = cw4.fails(&["load", "-i", layout.to_str().unwrap()]);
    assert!(err.contains("digest") || err.contains("layer"), "{err}");
    assert!(cw4.entries("images").is_empty());
}

#[test]
fn disk_full_during_unpack_is_named_and_the_store_stays_consistent() {
    if !is_root() {
        skip("mounting a small tmpfs needs root");
        return;
    }
    let cw = Cw::new();
    // a 1 MiB tmpfs as the store: the busybox layer (2 MB unpacked) cannot fit
    std::fs::create_dir_all(cw.store()).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &cw.store(),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    let err = cw.fails(&["pull", "-q", &format!("{REG}/tiny:amd64")]);
    let listing = |sub: &str| -> Vec<String> {
        std::fs::read_dir(cw.store().join(sub))
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let (tmp, layers, images) = (listing("tmp"), listing("layers"), listing("images"));
    let _ = nix::mount::umount(&cw.store());
    // refused before the disk fills (the unpack budget knows the free space), or ENOSPC named
    assert!(
        err.contains("No space left on device") || err.contains("its filesystem can spare"),
        "{err}"
    );
    assert!(
        err.contains("layer sha256:") || err.contains("blob sha256:"),
        "the error names the layer: {err}"
    );
    assert!(tmp.is_empty(), "temporary files left: {tmp:?}");
    assert!(
        layers.is_empty() && images.is_empty(),
        "half a pull published: {layers:?} {images:?}"
    );
}

#[test]
fn sigkill_mid_layer_then_a_second_pull_succeeds() {
    let cw = Cw::new();
    let p = Proxy::start(REG, Fault::SlowBlobs);
    let image = format!("{}/tiny:amd64", p.addr);
    let mut child = cw
        .cmd(&["pull", "-q", &image])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // wait until the layer is on its way, then kill the pull
    let t = std::time::Instant::now();
    while p.count("GET", "/blobs/sha256:") < 2 {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "the pull never reached the layer (config + layer GETs)"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    // the killed pull's leftovers are swept and the image arrives whole
    *p.fault.lock().unwrap() = Fault::None;
    cw.ok(&["pull", "-q", &image]);
    let tmp: Vec<_> = std::fs::read_dir(cw.store().join("tmp"))
        .map(|r| r.flatten().collect())
        .unwrap_or_default();
    assert!(tmp.is_empty(), "leftovers of the killed pull: {tmp:?}");
    let m = cw.mount_image(&image);
    let r = std::panic::catch_unwind(|| assert_same_tree(&m, &reference_rootfs("tiny")));
    umount(&m);
    r.unwrap();
}
