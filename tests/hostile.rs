//! Hostile inputs on a shared node: images, containers and names from people cw must not trust,
//! and local users who share the node (root runs cw; the attacker is uid 65534 where a local
//! user is the attacker). Each test names the finding it covers; `CW_BIN=<older cw>` runs them
//! against another build.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tar::EntryType as E;

const TINY: &str = "127.0.0.1:5000/tiny:amd64";
const NOBODY: u32 = 65534;

fn root() -> bool {
    if !is_root() {
        skip("these tests run containers and act as another user: they need root");
        return false;
    }
    true
}

/// A cw whose store's parents other users can traverse, as /var/lib: only the store's own
/// modes stand between them and its contents.
fn reachable_cw() -> Cw {
    let cw = Cw::new();
    std::fs::set_permissions(cw.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    cw
}

fn layout_dir(cw: &Cw, what: &str) -> PathBuf {
    cw.dir.path().join(format!("layout-{what}"))
}

/// Load an image made of the host's busybox plus `extra` layers, as `name`.
fn load_image(cw: &Cw, name: &str, extra: &[Vec<u8>], config: serde_json::Value) {
    let d = layout_dir(cw, &rand_suffix());
    let mut layers = vec![busybox_layer()];
    layers.extend(extra.iter().cloned());
    oci_layout(&d, name, &layers, config, false);
    cw.ok(&["load", "-i", d.to_str().unwrap()]);
}

fn out(o: &Output) -> String {
    format!(
        "rc {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `cmd` must finish within `secs` (it is killed and the test fails otherwise).
fn within(mut cmd: Command, secs: u64) -> Output {
    let mut c = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while c.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(secs) {
            let _ = c.kill();
            let o = c.wait_with_output().unwrap();
            panic!("still running after {secs}s (killed):\n{}", out(&o));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    c.wait_with_output().unwrap()
}

fn mounts_under(p: &Path) -> Vec<String> {
    let p = p.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&p))
        .map(String::from)
        .collect()
}

/// What uid 65534 gets from executing `p`: Err when it cannot (the only right answer here).
fn nobody_runs(p: &Path) -> Result<String, std::io::Error> {
    as_user(NOBODY, p, &[]).map(|o| out(&o))
}

// ---- 1. the store is closed to other local users

#[test]
fn store_layers_and_runs_are_closed_to_other_users() {
    if !root() {
        return;
    }
    let cw = reachable_cw();
    cw.ok(&["images"]);
    // a store an older cw left open (0711) is closed when it is opened
    std::fs::set_permissions(cw.store(), std::fs::Permissions::from_mode(0o711)).unwrap();
    // an image shipping a setuid-root copy of id(1)
    let id = std::fs::read("/usr/bin/id").unwrap();
    load_image(
        &cw,
        "example.org/hostile/suid:1",
        &[layer_tar(&[("suid-id", E::Regular, "", &id, 0o4755)])],
        serde_json::json!({}),
    );
    let mode = std::fs::metadata(cw.store()).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode & 0o077, 0, "store mode {mode:o}: open to other users");
    let suid = std::fs::read_dir(cw.store().join("layers"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("suid-id"))
        .find(|p| p.exists())
        .expect("the setuid file is in a layer");
    if let Ok(o) = nobody_runs(&suid) {
        panic!("uid {NOBODY} ran {} from the store:\n{o}", suid.display());
    }
    // what a container's root makes in its own /tmp: reached through upper/ and rootfs/
    cw.ok(&[
        "run",
        "-d",
        "--name",
        "suidrun",
        "--image",
        "example.org/hostile/suid:1",
        "sh",
        "-c",
        "cp /bin/busybox /tmp/x && chmod 4755 /tmp/x && sleep 60",
    ]);
    let run = cw.store().join("runs/suidrun");
    let t = Instant::now();
    while !run.join("upper/tmp/x").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the run made no /tmp/x"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300)); // its chmod
    for p in [run.join("upper/tmp/x"), run.join("rootfs/tmp/x")] {
        if let Ok(o) = nobody_runs(&p) {
            panic!("uid {NOBODY} ran {}:\n{o}", p.display());
        }
    }
    cw.ok(&["rm", "-f", "suidrun"]);
}

// ---- 2. one image name cannot crash cw (a deep layer with a wrong diff id)

#[test]
fn a_deep_layer_is_refused_by_name_and_nothing_is_left() {
    if !root() {
        return;
    }
    let cw = Cw::new();
    let tag = rand_suffix();
    let d = layout_dir(&cw, "deep");
    oci_layout(
        &d,
        "deep",
        &[chain_layer(15_000)],
        serde_json::json!({}),
        true,
    );
    push_layout(&d, "deep", &format!("hostile/deep:{tag}"));
    let mut c = cw.cmd(&["pull", "-q", &format!("{REG}/hostile/deep:{tag}")]);
    c.env("RUST_BACKTRACE", "0");
    let o = within(c, 120);
    // cw's own error (docker's 125), not an abort
    assert_eq!(o.status.code(), Some(125), "{}", out(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("deeper than 512 directories"), "{err}");
    assert!(
        err.len() < 2000,
        "the error is not readable: {} bytes",
        err.len()
    );
    assert!(cw.entries("tmp").is_empty(), "tmp: {:?}", cw.entries("tmp"));
    assert!(cw.entries("layers").is_empty());

    // within the limit, the wrong diff id is named and the 500 levels are removed
    let d = layout_dir(&cw, "deep500");
    oci_layout(
        &d,
        "deep500",
        &[chain_layer(500)],
        serde_json::json!({}),
        true,
    );
    push_layout(&d, "deep500", &format!("hostile/deep:{tag}-500"));
    let err = cw.fails(&["pull", "-q", &format!("{REG}/hostile/deep:{tag}-500")]);
    assert!(err.contains("but the image config says"), "{err}");
    assert!(cw.entries("tmp").is_empty(), "tmp: {:?}", cw.entries("tmp"));
}

// ---- 4. a container's own deep tree does not defeat its cleanup

#[test]
fn a_tree_deeper_than_the_fd_limit_made_by_a_container_is_removed_with_its_run() {
    if !root() {
        return;
    }
    let cw = Cw::new();
    cw.ok(&["pull", "-q", TINY]);
    // 3000 levels in the container's /tmp (its overlay upper), made with paths under PATH_MAX
    let script = "p=d; i=1; while [ $i -lt 500 ]; do p=$p/d; i=$((i+1)); done; \
                  cd /tmp && for k in 1 2 3 4 5 6; do mkdir -p $p && cd -P $p || exit 1; done; \
                  echo deep";
    let mut c = cw.cmd(&[
        "run", "--name", "deeprun", "--image", TINY, "sh", "-c", script,
    ]);
    // as under systemd's default: the monitor's cleanup must not need an fd per level
    unsafe {
        c.pre_exec(|| {
            let l = libc::rlimit {
                rlim_cur: 1024,
                rlim_max: 1024,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = within(c, 180);
    cw.settle();
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "deep");
    assert!(
        !cw.store().join("runs/deeprun").exists(),
        "the run's directory is left:\n{}",
        out(&o)
    );
    assert!(mounts_under(&cw.store()).is_empty());
    assert!(cw.entries("inuse").is_empty());
}

// ---- 5. files of the image read on the host cannot block cw

#[test]
fn a_fifo_in_place_of_etc_passwd_fails_the_run_at_once() {
    if !root() {
        return;
    }
    let cw = Cw::new();
    load_image(
        &cw,
        "example.org/hostile/fifo:1",
        &[layer_tar(&[("etc/passwd", E::Fifo, "", b"", 0o644)])],
        serde_json::json!({}),
    );
    let o = within(
        cw.cmd(&[
            "run",
            "--name",
            "fifo",
            "-u",
            "nobody",
            "--image",
            "example.org/hostile/fifo:1",
            "true",
        ]),
        30,
    );
    assert_eq!(o.status.code(), Some(125), "{}", out(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/etc/passwd") && err.contains("not a regular file"),
        "{err}"
    );
    assert!(cw.entries("runs").is_empty(), "{:?}", cw.entries("runs"));
    assert!(mounts_under(&cw.store()).is_empty());
}

#[test]
fn a_run_whose_preparing_cw_died_is_listed_removed_and_released() {
    if !root() {
        return;
    }
    let cw = Cw::new();
    cw.ok(&["pull", "-q", TINY]);
    // what a cw killed while it prepared a run leaves: its dir, a mounted rootfs, no request
    let dead = Command::new("true").spawn().unwrap();
    let pid = dead.id();
    let mut dead = dead;
    dead.wait().unwrap();
    let run = cw.store().join("runs/halfway");
    let leave_half_a_run = || {
        std::fs::create_dir_all(run.join("rootfs")).unwrap();
        std::fs::write(run.join("creator"), format!("{pid} 1\n")).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &run.join("rootfs"),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )
        .unwrap();
    };
    leave_half_a_run();
    let ps = cw.ok(&["ps"]);
    assert!(
        ps.lines()
            .any(|l| l.contains("halfway") && l.contains("abandoned")),
        "{ps}"
    );
    cw.ok(&["rm", "halfway"]);
    assert!(!run.exists());
    assert!(mounts_under(&cw.store()).is_empty());
    // the next cw run releases such runs by itself
    leave_half_a_run();
    cw.ok(&["run", "--image", TINY, "true"]);
    assert!(!run.exists(), "the next cw run left the abandoned run");
    assert!(mounts_under(&cw.store()).is_empty());
}

// ---- 6. default bounds

fn pids_max(cw: &Cw, extra: &[&str]) -> String {
    let name = format!("pids{}", rand_suffix());
    let mut args = vec!["run", "-d", "--name", &name];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--image", TINY, "sleep", "30"]);
    cw.ok(&args);
    let (v, _) = run_cgroup_file(&name, "pids", "pids.max", "pids.max");
    cw.ok(&["rm", "-f", &name]);
    v
}

#[test]
fn runs_have_a_pids_limit_unless_told_otherwise() {
    if !root() {
        return;
    }
    let cw = Cw::new();
    cw.ok(&["pull", "-q", TINY]);
    assert_eq!(pids_max(&cw, &[]), "4096");
    assert_eq!(pids_max(&cw, &["--pids-limit", "100"]), "100");
    assert_eq!(pids_max(&cw, &["--pids-limit", "-1"]), "max");
}

#[test]
fn what_an_image_unpacks_to_is_bounded() {
    if !root() {
        return;
    }
    let cw = Cw::new();
    let conf = cw.dir.path().join("bounded.toml");
    std::fs::write(&conf, "max_image_size = \"1m\"\n").unwrap();
    let cmd = |args: &[&str]| {
        let mut c = Command::new(cw_bin());
        c.arg("--store")
            .arg(cw.store())
            .arg("--config")
            .arg(&conf)
            .args(args)
            .env("DOCKER_CONFIG", cw.dir.path().join("docker"));
        c
    };
    // 3 MiB of zeros: a layer of a few KB once compressed (a bomb in small)
    let zeros = vec![0u8; 3 << 20];
    let d = layout_dir(&cw, "big");
    oci_layout(
        &d,
        "example.org/hostile/big:1",
        &[layer_tar(&[("zeros", E::Regular, "", &zeros, 0o644)])],
        serde_json::json!({}),
        false,
    );
    let o = cmd(&["load", "-i", d.to_str().unwrap()]).output().unwrap();
    assert!(!o.status.success(), "{}", out(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("unpacks to more than 1048576 bytes"), "{err}");
    let tag = rand_suffix();
    push_layout(
        &d,
        "example.org/hostile/big:1",
        &format!("hostile/big:{tag}"),
    );
    let o = cmd(&["pull", "-q", &format!("{REG}/hostile/big:{tag}")])
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", out(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "image {REG}/hostile/big:{tag} unpacks to more than 1048576 bytes"
        )),
        "{err}"
    );
    assert!(cw.entries("tmp").is_empty() && cw.entries("layers").is_empty());
    // without the setting, it loads
    cw.ok(&["load", "-i", d.to_str().unwrap()]);
}

// ---- 8. the smaller ones

#[test]
fn io_uring_is_refused_inside_a_run() {
    if !root() {
        return;
    }
    let cw = Cw::new();
    cw.ok(&["pull", "-q", TINY]);
    let probe = cw.dir.path().join("io_uring_probe");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/io_uring_probe.c");
    let o = Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(&probe)
        .arg(&src)
        .output()
        .unwrap();
    assert!(o.status.success(), "cc: {}", out(&o));
    // on the host the call is allowed (or the kernel lacks it): the probe works
    let host = Command::new(&probe).output().unwrap();
    let host = String::from_utf8_lossy(&host.stdout).trim().to_string();
    let v = format!("{}:/probe:ro", probe.display());
    let (rc, inside) = {
        let o = cw.run(&["run", "-v", &v, "--image", TINY, "/probe"]);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).trim().to_string(),
        )
    };
    assert_eq!(rc, Some(0));
    assert_eq!(inside, "io_uring_setup: EPERM", "host: {host}");
}

#[test]
fn ids_names_and_variables_that_cannot_be_honoured_are_refused() {
    if !root() {
        return;
    }
    let cw = Cw::new();
    cw.ok(&["pull", "-q", TINY]);
    for u in ["4294967295", "0:4294967295", "4294967296"] {
        let err = cw.fails(&["run", "-u", u, "--image", TINY, "id"]);
        assert!(err.contains("out of range"), "-u {u}: {err}");
    }
    load_image(
        &cw,
        "example.org/hostile/user:1",
        &[],
        serde_json::json!({"User": "4294967295"}),
    );
    let err = cw.fails(&["run", "--image", "example.org/hostile/user:1", "id"]);
    assert!(err.contains("uid 4294967295 is out of range"), "{err}");
    let o = cw.run(&["run", "-e", "=x", "--image", TINY, "true"]);
    assert_eq!(o.status.code(), Some(125), "{}", out(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("\"=x\"") && err.contains("needs a name"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let err = cw.fails(&["run", "--name=-x", "--image", TINY, "true"]);
    assert!(err.contains("not a valid run id"), "{err}");
    // what libcontainer's init reports as "failed to unix syscall" / "failed to prepare rootfs"
    let err = cw.fails(&["run", "-w", "/etc/passwd", "--image", TINY, "true"]);
    assert!(
        err.contains(
            "working directory /etc/passwd: the image has a file where it needs a directory"
        ),
        "{err}"
    );
    let err = cw.fails(&["run", "-v", "/tmp:/etc/passwd/x", "--image", TINY, "true"]);
    assert!(err.contains("mount destination /etc/passwd/x"), "{err}");
    // a missing working directory is made, as docker makes it
    assert_eq!(
        cw.ok(&["run", "-w", "/made/here", "--image", TINY, "pwd"])
            .trim(),
        "/made/here"
    );
    // a PAX uid past 32 bits would be truncated into another owner
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("uid", &b"4294968296"[..])])
        .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_path("owned").unwrap();
    h.set_size(0);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &b""[..]).unwrap();
    let d = layout_dir(&cw, "paxuid");
    oci_layout(
        &d,
        "example.org/hostile/paxuid:1",
        &[b.into_inner().unwrap()],
        serde_json::json!({}),
        false,
    );
    let err = cw.fails(&["load", "-i", d.to_str().unwrap()]);
    assert!(
        err.contains("\"owned\"") && err.contains("PAX uid \"4294968296\""),
        "{err}"
    );
}

// ---- 7. a slow or lying registry

#[test]
fn a_registry_that_drips_or_claims_what_it_lacks_fails_the_pull_in_time() {
    let cw = Cw::new();
    for (fault, what) in [
        (Fault::Drip { min_blob: 0 }, "a manifest"),
        (Fault::Drip { min_blob: 10_000 }, "a layer"),
    ] {
        let p = Proxy::start(REG, fault);
        let mut c = cw.cmd(&["pull", "-q", &format!("{}/tiny:amd64", p.addr)]);
        c.env("CW_REGISTRY_TIMEOUT", "3s");
        let t = Instant::now();
        let o = within(c, 60);
        assert!(!o.status.success(), "{what}: {}", out(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("within 3s") || err.contains("in time") || err.contains("in 3s"),
            "{what}: {err}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(45),
            "{what}: took {:?}",
            t.elapsed()
        );
        assert!(cw.entries("images").is_empty() && cw.entries("tmp").is_empty());
    }
    // an image in the store from one registry; another registry's HEAD names its digest
    cw.ok(&["pull", "-q", "127.0.0.1:5000/tiny:amd64"]);
    let d = cw.image_json("127.0.0.1:5000/tiny:amd64")["manifest"]
        .as_str()
        .unwrap()
        .to_string();
    let p = Proxy::start(REG, Fault::HeadClaims(d));
    let name = format!("{}/claims/tiny:latest", p.addr);
    let err = cw.fails(&["pull", "-q", &name]);
    assert!(err.contains("not found") || err.contains("404"), "{err}");
    let images = cw.ok(&["images"]);
    assert!(
        !images.contains("claims/tiny"),
        "bound without proof:\n{images}"
    );
    assert_eq!(p.count("GET", "/manifests/"), 1, "{:?}", p.requests());
}

/// Finding 8's last part: an error inside libcontainer's init arrived as "failed to prepare
/// rootfs", without the path or the operation.
#[test]
fn failures_inside_the_containers_init_name_the_path_and_the_operation() {
    if !root() {
        return;
    }
    let cw = Cw::new();
    cw.ok(&["pull", "-q", TINY]);
    let src = cw.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let s = src.to_str().unwrap();
    for (dest, want) in [
        ("/proc/foo", "No such file or directory"),
        ("/sys/kernel/cw-x", "Read-only file system"),
    ] {
        let o = cw.run(&["run", "-v", &format!("{s}:{dest}"), "--image", TINY, "true"]);
        assert_eq!(o.status.code(), Some(125), "{}", out(&o));
        let e = String::from_utf8_lossy(&o.stderr);
        for part in [
            "preparing its root filesystem",
            "failed to mount",
            &format!("{s} on {dest}"),
            want,
        ] {
            assert!(e.contains(part), "no {part:?} in: {e}");
        }
        assert!(!e.contains("error in executing process"), "{e}");
    }
    // a device node the spec asks for, where the mount above made a directory
    let o = cw.run(&[
        "run",
        "-v",
        &format!("{s}:/dev/null/x"),
        "--image",
        TINY,
        "true",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("mknod") && e.contains("path=/dev/null") && e.contains("EEXIST"),
        "{e}"
    );
    assert!(cw.entries("runs").is_empty(), "{:?}", cw.entries("runs"));
}

// ---- another local user cannot stall root's runs

#[test]
fn a_lock_another_user_holds_in_run_lock_does_not_stall_root_runs_that_nest_their_cgroup() {
    if !root() {
        return;
    }
    let cw = reachable_cw();
    cw.ok(&["pull", "-q", TINY]);
    // /run/lock is world-writable: a user makes the file cw once locked there and holds it
    let lock = Path::new("/run/lock/cw-cgroup-parents.lock");
    let _ = std::fs::remove_file(lock);
    // in a process group of its own: its sleep, which holds the lock too, goes with it
    let mut holder = Command::new("flock")
        .args([lock.to_str().unwrap(), "sleep", "120"])
        .uid(NOBODY)
        .gid(NOBODY)
        .process_group(0)
        .spawn()
        .expect("flock (util-linux)");
    let t = Instant::now();
    while !lock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "flock made no lock file"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let parent = format!("/cwhostile-{}/nested", rand_suffix());
    let o = within(
        cw.cmd(&[
            "run",
            "--cgroup-parent",
            &parent,
            "--image",
            TINY,
            "echo ran",
        ]),
        60,
    );
    unsafe { libc::kill(-(holder.id() as i32), libc::SIGKILL) };
    let _ = holder.wait();
    let _ = std::fs::remove_file(lock);
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "ran\n");
    // root's lock is in root's own directory
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata("/run/cw").unwrap();
    assert!(
        m.is_dir() && m.uid() == 0 && m.mode() & 0o777 == 0o700,
        "{m:?}"
    );
    // the nested parent the run made went with it (a top-level one stays, as /cw does): the
    // monitor removes it in its teardown, after `cw run` has the exit record and has returned
    let top = parent.split('/').nth(1).unwrap();
    let hierarchies: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .chain([PathBuf::from("/sys/fs/cgroup")])
        .filter(|h| h.join("cgroup.procs").exists())
        .collect();
    let t = Instant::now();
    for h in &hierarchies {
        let p = h.join(&parent[1..]);
        let within = Duration::from_secs(20).saturating_sub(t.elapsed());
        assert!(
            eventually(within, || !p.exists()),
            "{} left behind",
            p.display()
        );
        let _ = std::fs::remove_dir(h.join(top));
    }
}
