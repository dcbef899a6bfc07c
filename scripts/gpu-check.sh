#!/usr/bin/env bash
# The GPU check of issue #5, for a machine with an NVIDIA GPU and driver (as root). It needs no
# network and no Rust toolchain there: a release cw and the gpu-check image as an OCI layout
# (glibc + busybox + cuda_check, built by tests/fixtures/build.sh), both prepared elsewhere:
#
#   cargo build --release && mkdir -p .cw-test && cp target/release/cw .cw-test/ \
#     && cp -r /var/tmp/cw-fixtures/work/oci-gpu .cw-test/
#   scripts/gpu-check.sh .cw-test/cw .cw-test/oci-gpu        # on the GPU machine
#
# Checks: cw gpus agrees with nvidia-smi; `--gpus 1` runs nvidia-smi and a CUDA kernel
# (cuda_check) with exactly one device visible; `--gpus 0` (none) sees no GPU and no node; the
# libraries resolve through the rootfs's ld cache with LD_LIBRARY_PATH unset; a node of a GPU not
# assigned cannot be opened from the run's cgroup. Prints PASS/FAIL lines; exits non-zero on a FAIL.
set -u
CW=$(readlink -f "${1:-.cw-test/cw}")
OCI=$(readlink -f "${2:-.cw-test/oci-gpu}")
[ -x "$CW" ] && [ -f "$OCI/index.json" ] || { echo "usage: $0 CW_BINARY OCI_LAYOUT" >&2; exit 2; }
command -v nvidia-smi >/dev/null || { echo "skipped: no nvidia-smi (no NVIDIA driver here)"; exit 0; }
store=$(mktemp -d /var/tmp/cw-gpu-check.XXXXXX)
export CW_STORE=$store
trap 'rm -rf "$store"' EXIT
fails=0
check() { # name, then a command that must succeed
  local name=$1; shift
  if "$@"; then echo "PASS $name"; else echo "FAIL $name"; fails=$((fails + 1)); fi
}
echo "== host"; nvidia-smi -L; uname -r; head -1 /proc/driver/nvidia/version
echo "== cw gpus"; "$CW" gpus
img=$("$CW" load -i "$OCI" | sed -n 's/^Loaded image sha256:\([0-9a-f]\{12\}\).*/\1/p' | head -1)
[ -n "$img" ] || { echo "FAIL loading $OCI"; exit 1; }
n_smi=$(nvidia-smi -L | grep -c '^GPU ')
n_cw=$("$CW" gpus --json | grep -c '"uuid": "GPU-')
check "cw gpus finds the $n_smi GPU(s) nvidia-smi lists ($n_cw)" [ "$n_smi" = "$n_cw" ]

echo "== cw run --gpus 1: nvidia-smi and cuda_check"
out=$("$CW" run --pull never --gpus 1 --image "$img" 'nvidia-smi -L; echo VIS=$NVIDIA_VISIBLE_DEVICES; ls -l /dev/nvidia*; cuda_check' 2>&1); rc=$?
echo "$out"
check "--gpus 1 exits 0" [ "$rc" = 0 ]
check "--gpus 1: CUDA kernel ran" grep -q "CUDA OK" <<<"$out"
check "--gpus 1: one device visible to CUDA" grep -q "devices: 1" <<<"$out"
check "--gpus 1: nvidia-smi lists one GPU" [ "$(grep -c '^GPU ' <<<"$out")" = 1 ]

echo "== LD_LIBRARY_PATH unset: libcuda.so.1 from the rootfs's ld cache"
out=$("$CW" run --pull never --gpus 1 --image "$img" 'unset LD_LIBRARY_PATH; cuda_check' 2>&1); rc=$?
echo "$out"
check "ld cache alone finds libcuda.so.1 and runs the kernel" grep -q "CUDA OK" <<<"$out"

echo "== cw run --gpus 0: no GPU"
out=$("$CW" run --pull never --gpus 0 --image "$img" 'ls /dev/nvidia* 2>&1; echo VIS=$NVIDIA_VISIBLE_DEVICES; cuda_check' 2>&1); rc=$?
echo "$out"
check "--gpus 0: no /dev/nvidia* node" grep -q "No such file" <<<"$out"
check "--gpus 0: NVIDIA_VISIBLE_DEVICES=void" grep -q "VIS=void" <<<"$out"
check "--gpus 0: cuda_check fails" [ "$rc" != 0 ]

echo "== the device cgroup of a run without GPUs denies the GPU node"
id=$("$CW" run -d --pull never --image "$img" -- sleep 600)
sleep 1
if [ -d /sys/fs/cgroup/devices ]; then cg=/sys/fs/cgroup/devices/cw/$id; else cg=/sys/fs/cgroup/cw/$id; fi
err=$(sh -c "echo \$\$ > $cg/cgroup.procs && exec head -c 1 /dev/nvidia0" 2>&1 >/dev/null)
echo "$err"
check "open /dev/nvidia0 from a GPU-less run's cgroup: EPERM" grep -q "Operation not permitted" <<<"$err"
"$CW" kill "$id" >/dev/null; sleep 2; "$CW" rm "$id" >/dev/null 2>&1
echo "== $fails failure(s)"
[ "$fails" = 0 ]
