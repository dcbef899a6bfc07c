//! GPU passthrough. Without a GPU (and NVML) on the machine, the real-GPU check is skipped with a
//! printed reason; what can be proven without one is: no injection unless asked, a clear error
//! when GPUs are asked for and there are none. The device-node, driver-library and selection
//! logic is unit-tested in runtime/src/gpu.rs against a fake /dev tree and fake driver files.

mod common;
use common::*;

const IMG: &str = "127.0.0.1:5000/gpu-check:latest";

fn gpus_present() -> bool {
    cw_runtime::gpu::discover().gpus.len() > 0
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
        eprintln!("skipped: needs root");
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
