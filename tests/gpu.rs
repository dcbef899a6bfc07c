//! GPU passthrough. Without a GPU (and NVML) on the machine, the real-GPU check is skipped with a
//! printed reason; what can be proven without one is: no injection unless asked, a clear error
//! when GPUs are asked for and there are none. The device-node, driver-library and selection
//! logic is unit-tested in runtime/src/gpu.rs against a fake /dev tree and fake driver files.

mod common;
use common::*;

const IMG: &str = "127.0.0.1:5000/gpu-check:latest";

fn gpus_present() -> bool {
    !cw_runtime::gpu::discover().gpus.is_empty()
}

#[test]
fn gpus_command_reports_nvml_state() {
    let cw = Cw::new();
    let o = cw.run(&["gpus", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    if v["gpus"].as_array().unwrap().is_empty() {
        assert!(
            v["note"].as_str().unwrap().contains("NVML")
                || v["note"].as_str().unwrap().contains("GPU"),
            "{v}"
        );
    }
}

#[test]
fn no_gpu_injection_unless_asked() {
    if !is_root() {
        skip("needs root");
        return;
    }
    let cw = Cw::new();
    cw.ok(&["pull", "-q", IMG]);
    let o = cw.run(&[
        "run",
        "--image",
        IMG,
        "ls /dev/nvidia* 2>/dev/null; echo $NVIDIA_VISIBLE_DEVICES; cuda_check",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(
        out.starts_with("void\n") && out.contains("no libcuda.so.1"),
        "{out}"
    );
    if !gpus_present() {
        let err = cw.fails(&["run", "--gpus", "1", "--image", IMG, "true"]);
        assert!(
            err.contains("--gpus 1") && err.contains("requested"),
            "{err}"
        );
        eprintln!("skipped the real-GPU part: no NVIDIA GPU on this machine");
        return;
    }
    // a GPU machine: the program finds exactly the assigned GPU and runs a kernel on it
    let o = cw.run(&[
        "run",
        "--gpus",
        "1",
        "--image",
        IMG,
        "nvidia-smi -L && cuda_check",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("devices: 1") && out.contains("CUDA OK"),
        "{out}"
    );
    let o = cw.run(&["run", "--gpus", "0", "--image", IMG, "cuda_check"]);
    assert_ne!(o.status.code(), Some(0));
}

/// Build the STAND-IN NVML library (runtime/tests/fixtures/gpu/standin_nvml.c: a made-up machine
/// with two GPUs, minors 0 and 3, and two MIG devices on the second; not NVIDIA's library).
fn standin_nvml(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("runtime/tests/fixtures/gpu/standin_nvml.c");
    let lib = dir.join("libnvidia-ml-standin.so");
    match std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .status()
    {
        Ok(s) if s.success() => Some(lib),
        r => {
            skip(&format!("cannot build the stand-in NVML ({r:?})"));
            None
        }
    }
}

/// `cw ARGS` with the stand-in NVML library.
fn with_nvml(cw: &Cw, lib: &std::path::Path, args: &[&str]) -> std::process::Output {
    cw.cmd(args).env("CW_NVML_LIBRARY", lib).output().unwrap()
}

/// Discovery → selection → injection end to end on a machine without GPUs, with the stand-in
/// NVML named by CW_NVML_LIBRARY: the run gets exactly its GPU's node (numbers from this host's
/// /proc/devices, 195 for NVIDIA), the control nodes, and NVIDIA_VISIBLE_DEVICES with its UUID.
#[test]
fn stand_in_nvml_drives_cw_gpus_and_the_nodes_a_run_gets() {
    let d = tempfile::tempdir().unwrap();
    let Some(lib) = standin_nvml(d.path()) else {
        return;
    };
    let cw = Cw::new();
    let with_lib = |args: &[&str]| with_nvml(&cw, &lib, args);
    let o = with_lib(&["gpus", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["driver_version"], "999.88.77", "{v}");
    assert_eq!(v["gpus"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["mig_devices"][1]["mig"]["gpu_instance"], 2, "{v}");
    let table = String::from_utf8_lossy(&with_lib(&["gpus"]).stdout).into_owned();
    assert!(
        table.contains("GPU-bbbbbbbb-0000-0000-0000-000000000000") && table.contains("1:2/0"),
        "{table}"
    );
    if !is_root() {
        skip("the run part needs root");
        return;
    }
    if std::fs::read_to_string("/proc/devices")
        .unwrap_or_default()
        .contains(" nvidia")
    {
        eprintln!("skipped the run part: a real NVIDIA driver is loaded here");
        return;
    }
    cw.ok(&["pull", "-q", IMG]);
    let script =
        "ls -l /dev/ | grep nvidia | tr -s ' ' | cut -d' ' -f5,6,10; echo $NVIDIA_VISIBLE_DEVICES";
    let o = with_lib(&["run", "--gpus", "GPU-bbbb", "--image", IMG, script]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        out, "195, 3 nvidia3\n195, 255 nvidiactl\nGPU-bbbbbbbb-0000-0000-0000-000000000000\n",
        "only the selected GPU's node"
    );
    let o = with_lib(&["run", "--gpus", "1", "--image", IMG, script]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with("195, 0 nvidia0\n") && out.contains("GPU-aaaaaaaa"),
        "{out}"
    );
    // a MIG device needs the nvidia-caps driver, which this host does not have
    let o = with_lib(&["run", "--gpus", "MIG-2222", "--image", IMG, "true"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("nvidia-caps"), "{err}");
}

/// A site's CDI spec (here in a directory given by --cdi-spec-dir) replaces cw's own plan: its
/// device node, its bind of the driver library into a directory the loader does not search by
/// default, its env; its `update-ldcache` hook becomes cw's confined ldconfig, so the image's
/// own ld.so.cache resolves `libcuda.so.1` (a stub whose cuInit answers "no device") with
/// LD_LIBRARY_PATH unset; its other hooks are reported as not run.
#[test]
fn cdi_spec_edits_and_ldconfig_in_the_rootfs() {
    if !is_root() {
        skip("needs root");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let Some(nvml) = standin_nvml(d.path()) else {
        return;
    };
    let stub = d.path().join("stub.c");
    std::fs::write(&stub, "int cuInit(unsigned f) { (void)f; return 100; }\n").unwrap();
    let libcuda = d.path().join("driver/libcuda.so.999.88.77");
    std::fs::create_dir_all(libcuda.parent().unwrap()).unwrap();
    let ok = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(&libcuda)
        .arg(&stub)
        .status()
        .unwrap();
    assert!(ok.success());
    let cdi = d.path().join("cdi");
    std::fs::create_dir_all(&cdi).unwrap();
    std::fs::write(
        cdi.join("nvidia.yaml"),
        format!(
            r#"cdiVersion: 0.6.0
kind: nvidia.com/gpu
devices:
- name: GPU-aaaaaaaa-0000-0000-0000-000000000000
  containerEdits:
    deviceNodes:
    - {{path: /dev/nvidia0, type: c, major: 42, minor: 0}}
containerEdits:
  env: [SPEC_ENV=from-cdi]
  mounts:
  - {{hostPath: {lib}, containerPath: /opt/driver/lib/libcuda.so.999.88.77, options: [ro, nosuid, nodev, bind]}}
  hooks:
  - {{hookName: createContainer, path: /usr/bin/nvidia-cdi-hook, args: [nvidia-cdi-hook, create-symlinks, --link, "libcuda.so.1::/opt/driver/lib/libcuda.so"]}}
  - {{hookName: createContainer, path: /usr/bin/nvidia-cdi-hook, args: [nvidia-cdi-hook, update-ldcache, --folder, /opt/driver/lib]}}
"#,
            lib = libcuda.display()
        ),
    )
    .unwrap();
    let cw = Cw::new();
    cw.ok(&["pull", "-q", IMG]);
    let cdi_s = cdi.display().to_string();
    let o = with_nvml(
        &cw,
        &nvml,
        &[
            "run",
            "--cdi-spec-dir",
            &cdi_s,
            "--gpus",
            "1",
            "--image",
            IMG,
            "ls -l /dev/ | grep nvidia | tr -s ' ' | cut -d' ' -f5,6,10; echo $SPEC_ENV $NVIDIA_VISIBLE_DEVICES; unset LD_LIBRARY_PATH; cuda_check",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        out, "42, 0 nvidia0\nfrom-cdi GPU-aaaaaaaa-0000-0000-0000-000000000000\ndevices: 0\n",
        "{err}"
    );
    assert_eq!(
        o.status.code(),
        Some(4),
        "cuda_check: the stub's cuInit said no device"
    );
    assert!(
        err.contains("create-symlinks") && err.contains("not run"),
        "{err}"
    );
    // a GPU the spec does not name: a clear error, no run
    let o = with_nvml(
        &cw,
        &nvml,
        &[
            "run",
            "--cdi-spec-dir",
            &cdi_s,
            "--gpus",
            "GPU-b",
            "--image",
            IMG,
            "true",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no device named GPU-bbbbbbbb"),
        "{err}"
    );
}
