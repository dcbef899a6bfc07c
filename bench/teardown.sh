#!/usr/bin/env bash
# A run's teardown while another process on the node has unwritten data on the store's disk.
# Unmounting an overlay syncs the whole filesystem that holds its upper dir (ovl_sync_fs), so
# without overlayfs's `volatile` option (docker's overlay2 and podman's mounts of a container
# that is kept) the end of every run waits for everyone's dirty pages on that disk; cw mounts
# its overlays volatile (the upper dir goes with the run). Interleaved rounds, each after
# DIRTY_MB written (not synced) beside the store: the unmount of the run's layers mounted
# without `volatile`, the same with it, and `cw run --image tiny true` until its teardown has
# ended (it returns before). Medians; root.
#   ROUNDS=5 DIRTY_MB=800 bench/teardown.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
DIRTY_MB=${DIRTY_MB:-800}
W=${BENCH_DIR:-/var/tmp/cw-bench-teardown}
bash tests/fixtures/build.sh registry tiny push >/dev/null
cargo build --release -q
CW=$PWD/target/release/cw
grep -o " $W/[^ ]*" /proc/mounts 2>/dev/null | xargs -r -n1 umount -l 2>/dev/null || true
rm -rf "$W"; mkdir -p "$W"
"$CW" --store "$W/store" pull -q 127.0.0.1:5000/tiny:amd64 >/dev/null
python3 - "$CW" "$W" "$ROUNDS" "$DIRTY_MB" <<'PY'
import json, os, random, statistics, subprocess, sys, time
cw, w, rounds, dirty_mb = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
store = f"{w}/store"
rec = json.loads(subprocess.run([cw, "--store", store, "inspect", "127.0.0.1:5000/tiny:amd64"],
                                capture_output=True, check=True).stdout)
lowers = ":".join(f"{store}/layers/{l.split(':')[1]}" for l in reversed(rec["layers"]))
def dirty():
    with open(f"{w}/dirty", "wb") as f:
        block = b"\0" * (1 << 20)
        for _ in range(dirty_mb):
            f.write(block)
def clean():
    os.remove(f"{w}/dirty")
    os.sync()
def unmount(opts):
    for d in ("u", "wk", "m"):
        subprocess.run(["rm", "-rf", f"{w}/{d}"], check=True)
        os.mkdir(f"{w}/{d}")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lowers},upperdir={w}/u,workdir={w}/wk{opts}", f"{w}/m"], check=True)
    open(f"{w}/m/written-by-the-run", "w").write("x")
    dirty()
    t = time.perf_counter()
    subprocess.run(["umount", f"{w}/m"], check=True)
    return time.perf_counter() - t
def cw_run():
    dirty()
    t = time.perf_counter()
    subprocess.run([cw, "--store", store, "run", "--pull", "never", "--image",
                    "127.0.0.1:5000/tiny:amd64", "true"], check=True)
    while os.listdir(f"{store}/runs"):
        time.sleep(0.0005)
    return time.perf_counter() - t
cases = {"unmount, no volatile": lambda: unmount(""),
         "unmount, volatile": lambda: unmount(",volatile"),
         "cw run + teardown": cw_run}
times = {k: [] for k in cases}
for _ in range(rounds):
    order = list(cases); random.shuffle(order)
    for k in order:
        times[k].append(cases[k]() * 1000)
        clean()
med = {k: statistics.median(v) for k, v in times.items()}
print(f"environment: {os.cpu_count()} CPUs, kernel {os.uname().release}, {rounds} rounds, {dirty_mb} MB dirty beside the store")
for k, v in med.items():
    print(f"{k:22} median {v:8.1f} ms  (min {min(times[k]):.1f}, max {max(times[k]):.1f})")
print(f"ratio unmount volatile / no volatile = {med['unmount, volatile']/med['unmount, no volatile']:.3f}")
PY
rm -rf "$W"
