#!/usr/bin/env bash
# Start-to-exit latency of `cw run --image tiny true` (image cached; cw also mounts the overlay,
# spawns its monitor and cleans up) against crun and runc running a ready bundle of the same
# rootfs, and against what users would pick instead: `podman run --rm` of the same image (pulled
# into a podman store of its own) and Charliecloud's `ch-run` of the same rootfs as a directory.
# One interleaved run (shuffled order each round); medians and ratios printed. Root.
#   ROUNDS=100 bench/start.sh
# PHASES=N then traces N more starts of cw, crun and runc (bench/phases.py) and prints when each
# step of a start happens in each.
# CW_BEFORE=DIR adds the cw in DIR (with its cw-monitor beside it: an earlier build) to the same
# interleaving as "cw-before", for a change's effect measured against the peers' noise.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-60}
W=${BENCH_DIR:-/var/tmp/cw-bench-start}
bash tests/fixtures/build.sh registry tiny push reference >/dev/null
bash scripts/apt-install.sh podman charliecloud-runtime >/dev/null
cargo build --release -q
CW=$PWD/target/release/cw
grep -o " $W/[^ ]*" /proc/mounts 2>/dev/null | xargs -r -n1 umount -l 2>/dev/null || true
rm -rf "$W"; mkdir -p "$W/bundle"
"$CW" --store "$W/store" pull -q 127.0.0.1:5000/tiny:amd64 >/dev/null
cp -a "${CW_FIXTURES:-/var/tmp/cw-fixtures}/ref/tiny/rootfs" "$W/bundle/rootfs"
# podman: its own store; rlimits below this sandbox's hard ones (podman asks for more than root
# without CAP_SYS_RESOURCE may set)
PODMAN="podman --root $W/podman --runroot $W/podman-run --storage-driver overlay"
$PODMAN pull -q --tls-verify=false 127.0.0.1:5000/tiny:amd64 >/dev/null
# ch-run: a directory image with the mount points Charliecloud binds
cp -a "$W/bundle/rootfs" "$W/ch"
mkdir -p "$W/ch"/{dev,proc,sys,tmp,home,etc,mnt}
touch "$W/ch"/etc/{passwd,group,hosts,resolv.conf}
( cd "$W/bundle" && runc spec && python3 - <<'PY'
import json
c = json.load(open("config.json"))
c["process"]["terminal"] = False
c["process"]["args"] = ["/bin/true"]
c["root"]["readonly"] = True
c["linux"]["cgroupsPath"] = "/cw-bench"
json.dump(c, open("config.json", "w"))
PY
)
# crun 1.8 refuses the hybrid layout while cgroup2 holds a controller (this VM: hugetlb); moving
# hugetlb to a v1 hierarchy for the benchmark fixes that (undone at the end).
mounted_hugetlb=0
if [ -n "$(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null)" ] && [ ! -d /sys/fs/cgroup/hugetlb ]; then
  mkdir /sys/fs/cgroup/hugetlb && mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb && mounted_hugetlb=1
fi
trap '[ $mounted_hugetlb = 1 ] && umount /sys/fs/cgroup/hugetlb && rmdir /sys/fs/cgroup/hugetlb' EXIT
python3 - "$CW" "$W" "$ROUNDS" "$PODMAN" "${CW_BEFORE:-}" <<'PY'
import os, random, statistics, subprocess, sys, time
cw, w, rounds, podman, before = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(), sys.argv[5]
null = subprocess.DEVNULL
cmds = {
    "cw":   lambda i: [cw, "--store", f"{w}/store", "run", "--pull", "never", "--image", "127.0.0.1:5000/tiny:amd64", "--", "/bin/true"],
    "crun": lambda i: ["crun", "run", "--bundle", f"{w}/bundle", f"cwb-crun-{i}"],
    "runc": lambda i: ["runc", "run", "--bundle", f"{w}/bundle", f"cwb-runc-{i}"],
    "podman": lambda i: podman + ["run", "--rm", "--network", "none", "--pull", "never",
                                  "--ulimit", "nofile=1024:4096", "--ulimit", "nproc=1024:1024",
                                  "127.0.0.1:5000/tiny:amd64", "/bin/true"],
    "ch-run": lambda i: ["ch-run", f"{w}/ch", "--", "/bin/true"],
}
if before:
    cmds["cw-before"] = lambda i: [f"{before}/cw"] + cmds["cw"](i)[1:]
times = {k: [] for k in cmds}
# cw returns when the run has ended; its monitor then tears it down (unmount, cgroups, the run's
# directory). Not timed, but waited for before the next command, so that it never runs beside
# a peer's measurement; how long it took is printed apart.
teardown = []
def settle_cw(record):
    t = time.perf_counter()
    while os.listdir(f"{w}/store/runs"):
        if time.perf_counter() - t > 10:
            sys.exit("cw's teardown did not end within 10 s")
        time.sleep(0.0005)
    if record:
        teardown.append((time.perf_counter() - t) * 1000)
env = dict(os.environ); env.pop("RUST_BACKTRACE", None); env.setdefault("USER", "root")
for i in range(rounds):
    order = list(cmds); random.shuffle(order)
    for k in order:
        t = time.perf_counter()
        r = subprocess.run(cmds[k](i), stdout=null, stderr=subprocess.PIPE, env=env)
        dt = time.perf_counter() - t
        if r.returncode != 0:
            sys.exit(f"{k} failed: {r.stderr.decode()[-500:]}")
        times[k].append(dt * 1000)
        if k.startswith("cw"):
            settle_cw(k == "cw")
med = {k: statistics.median(v) for k, v in times.items()}
print(f"environment: {os.cpu_count()} CPUs, kernel {os.uname().release}, {rounds} interleaved rounds")
for k, v in med.items():
    print(f"{k:9} median {v:7.1f} ms  (min {min(times[k]):.1f}, p90 {sorted(times[k])[int(0.9*len(times[k]))-1]:.1f})")
print(f"cw's teardown after it returned (not in its time): median {statistics.median(teardown):.1f} ms")
print(f"ratio cw / crun = {med['cw']/med['crun']:.2f}   (goal <= 1.5)")
print(f"ratio cw / runc = {med['cw']/med['runc']:.2f}   (goal <= 0.7)")
print(f"ratio cw / podman = {med['cw']/med['podman']:.2f}   (goal <= 0.2)")
print(f"ratio cw / ch-run = {med['cw']/med['ch-run']:.2f}   (ch-run makes no cgroup, pid namespace or overlay)")
if before:
    print(f"ratio cw / cw-before = {med['cw']/med['cw-before']:.2f}   ({before})")
PY
if [ -n "${PHASES:-}" ]; then python3 bench/phases.py "$PHASES" "$CW" "$W"; fi
