//! GPU logic without a GPU:
//! - NVML discovery through a STAND-IN libnvidia-ml (tests/fixtures/gpu/standin_nvml.c, built
//!   here with the C compiler; not NVIDIA's library) loaded by path as a site's driver would be:
//!   whole GPUs, MIG devices, driver version, and the no-driver and no-library answers;
//! - the confined ldconfig over a rootfs: a stub libcuda.so.999.88.77 (SONAME libcuda.so.1) bound
//!   in makes `libcuda.so.1` resolve from the rootfs's own ld.so.cache, and a hostile rootfs whose
//!   /usr/local is a symlink to a host directory gets nothing written outside it.
//!
//! Root-only parts skip with a printed reason.

use cw_runtime::gpu;
use cw_runtime::request::BindMount;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gpu")
        .join(name)
}

/// Compile a shared library; None (with the reason printed) where there is no C compiler.
fn cc_shared(src: &Path, out: &Path, extra: &[&str]) -> Option<()> {
    let o = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(out)
        .arg(src)
        .args(extra)
        .output();
    match o {
        Ok(o) if o.status.success() => Some(()),
        Ok(o) => panic!("cc failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            eprintln!("skipped: no C compiler ({e})");
            None
        }
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn discovery_through_a_stand_in_nvml() {
    let d = tempfile::tempdir().unwrap();
    let lib = d.path().join("libnvidia-ml-standin.so");
    if cc_shared(&fixture("standin_nvml.c"), &lib, &[]).is_none() {
        return;
    }
    let inv = gpu::discover_with(lib.as_os_str());
    assert_eq!(inv.note, None);
    assert_eq!(inv.driver_version.as_deref(), Some("999.88.77"));
    let got: Vec<(u32, &str, u32, u64, &str)> = inv
        .gpus
        .iter()
        .map(|g| {
            (
                g.index,
                g.uuid.as_str(),
                g.minor,
                g.memory_bytes >> 30,
                g.name.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                0,
                "GPU-aaaaaaaa-0000-0000-0000-000000000000",
                0,
                80,
                "Stand-in GPU A"
            ),
            (
                1,
                "GPU-bbbbbbbb-0000-0000-0000-000000000000",
                3,
                40,
                "Stand-in GPU B"
            ),
        ]
    );
    assert!(inv.gpus.iter().all(|g| g.mig.is_none()));
    let migs: Vec<(&str, u32, u32, u32, u32, u64)> = inv
        .mig_devices
        .iter()
        .map(|g| {
            let m = g.mig.as_ref().unwrap();
            assert_eq!(m.parent_uuid, "GPU-bbbbbbbb-0000-0000-0000-000000000000");
            (
                g.uuid.as_str(),
                g.index,
                g.minor,
                m.gpu_instance,
                m.compute_instance,
                g.memory_bytes >> 30,
            )
        })
        .collect();
    assert_eq!(
        migs,
        vec![
            ("MIG-11111111-0000-0000-0000-000000000000", 1, 3, 1, 0, 10),
            ("MIG-22222222-0000-0000-0000-000000000000", 1, 3, 2, 0, 20),
        ],
        "MIG slots without an instance are skipped; a MIG device has its parent's minor"
    );
    let all = [inv.gpus.clone(), inv.mig_devices.clone()].concat();
    let picked = gpu::select(&all, &inv.gpus, "MIG-2").unwrap();
    assert_eq!(picked[0].mig.as_ref().unwrap().gpu_instance, 2);
    assert_eq!(gpu::select(&all, &inv.gpus, "2").unwrap().len(), 2);
}

#[test]
fn no_driver_and_no_library_mean_no_gpus_with_the_reason() {
    let d = tempfile::tempdir().unwrap();
    let lib = d.path().join("libnvidia-ml-nodriver.so");
    if cc_shared(&fixture("standin_nvml.c"), &lib, &["-DNO_DRIVER"]).is_none() {
        return;
    }
    let inv = gpu::discover_with(lib.as_os_str());
    assert!(inv.gpus.is_empty());
    let note = inv.note.unwrap();
    assert!(
        note.contains("NVML is not available") && note.contains("driver"),
        "{note}"
    );
    let inv = gpu::discover_with("/nonexistent/libnvidia-ml.so.1".as_ref());
    assert!(inv.gpus.is_empty());
    let note = inv.note.unwrap();
    assert!(note.contains("/nonexistent/libnvidia-ml.so.1"), "{note}");
}

fn mountinfo() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap()
}

/// `ldconfig -p` of a cache file.
fn cache_listing(cache: &Path) -> String {
    let o = Command::new("/sbin/ldconfig")
        .arg("-p")
        .arg("-C")
        .arg(cache)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn ldconfig_in_a_rootfs_resolves_libcuda_and_stays_inside() {
    if !is_root() {
        eprintln!("skipped: the confined ldconfig needs root (namespaces, chroot, mounts)");
        return;
    }
    if let Err(e) = cw_runtime::ldcache::host_ldconfig() {
        eprintln!("skipped: {e}");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("stub.c");
    std::fs::write(&src, "int cuInit(unsigned f) { return 100 + (int)f; }\n").unwrap();
    let host_lib = d.path().join("driver/libcuda.so.999.88.77");
    std::fs::create_dir_all(host_lib.parent().unwrap()).unwrap();
    if cc_shared(&src, &host_lib, &["-Wl,-soname,libcuda.so.1"]).is_none() {
        return;
    }
    let binds = vec![BindMount {
        source: host_lib.clone(),
        destination: format!("{}/libcuda.so.1", gpu::CONTAINER_LIB_DIR),
        readonly: true,
    }];
    let dirs = vec![gpu::CONTAINER_LIB_DIR.to_string()];
    let before = mountinfo();

    // a plain rootfs
    let root = d.path().join("rootfs");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/ld.so.conf"), "").unwrap();
    let log = d.path().join("ldconfig.log");
    cw_runtime::ldcache::update(&root, &binds, &dirs, &log)
        .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
    let listing = cache_listing(&root.join("etc/ld.so.cache"));
    assert!(
        listing.contains("libcuda.so.1 (libc6,x86-64) => /usr/local/nvidia/lib64/libcuda.so.1"),
        "{listing}"
    );
    let target = root.join("usr/local/nvidia/lib64/libcuda.so.1");
    assert_eq!(
        std::fs::metadata(&target).unwrap().len(),
        0,
        "the bind lived only in ldconfig's mount namespace"
    );
    assert_eq!(mountinfo(), before, "no mount left on the host");

    // a hostile rootfs: /usr/local points at a host directory, /etc at another
    let outside = d.path().join("outside");
    let outside_etc = d.path().join("outside-etc");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(&outside_etc).unwrap();
    let evil = d.path().join("evil");
    std::fs::create_dir_all(evil.join("usr")).unwrap();
    std::os::unix::fs::symlink(&outside, evil.join("usr/local")).unwrap();
    std::os::unix::fs::symlink(&outside_etc, evil.join("etc")).unwrap();
    // what those links name, seen from inside the rootfs
    let inside = evil.join(outside.strip_prefix("/").unwrap());
    let inside_etc = evil.join(outside_etc.strip_prefix("/").unwrap());
    std::fs::create_dir_all(&inside).unwrap();
    std::fs::create_dir_all(&inside_etc).unwrap();
    let r = cw_runtime::ldcache::update(&evil, &binds, &dirs, &log);
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing created outside the rootfs ({r:?})"
    );
    assert_eq!(std::fs::read_dir(&outside_etc).unwrap().count(), 0, "{r:?}");
    // the links resolved inside the rootfs, and the cache was written there
    r.unwrap();
    assert!(inside.join("nvidia/lib64/libcuda.so.1").exists());
    assert!(cache_listing(&inside_etc.join("ld.so.cache")).contains("libcuda.so.1"));
    assert_eq!(mountinfo(), before, "no mount left on the host");
}
