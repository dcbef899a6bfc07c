#!/usr/bin/env bash
# P6: N runs started at once (`cw run -d`, default 50) must all finish, and cw's per-run
# accounting must match what each run did. Each run fills a tmpfs file of a known size (memory
# charged to its cgroup, held to the end) and spins the CPU in its shell, then prints its own
# /proc/$$/stat (utime+stime+cutime+cstime: the shell and the child it waited for). cw's numbers
# are the ones `cw stats` reports from the run's exit record. Printed: the largest relative
# difference over all runs, for CPU and for peak memory (goal <= 5 %). Root.
#   N=50 bench/concurrent.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-50}
SPIN=${SPIN:-150000}   # shell loop iterations (~0.5-1 s of CPU on a 2-core VM)
FILL_MB=${FILL_MB:-96}
W=${BENCH_DIR:-/var/tmp/cw-bench-concurrent}
bash tests/fixtures/build.sh registry tiny push >/dev/null
cargo build --release -q --workspace --bins
CW=$PWD/target/release/cw
grep -o " $W/[^ ]*" /proc/mounts 2>/dev/null | xargs -r -n1 umount -l 2>/dev/null || true
rm -rf "$W"; mkdir -p "$W"
cwr() { "$CW" --store "$W/store" "$@"; }
cwr pull -q 127.0.0.1:5000/tiny:amd64 >/dev/null
script="head -c ${FILL_MB}m /dev/zero > /dev/shm/fill; i=0; while [ \$i -lt $SPIN ]; do i=\$((i+1)); done; read -r l < /proc/\$\$/stat; echo \"\$l\""
t0=$(date +%s.%N)
for i in $(seq "$N"); do
  cwr run -d --name "p6-$i" --pull never --shm-size $((FILL_MB * 2))m --image 127.0.0.1:5000/tiny:amd64 -- sh -c "$script" >/dev/null &
done
wait
t_started=$(date +%s.%N)
for i in $(seq "$N"); do cwr logs -f "p6-$i" >"$W/p6-$i.out" 2>"$W/p6-$i.err" || true; done
t_done=$(date +%s.%N)
for i in $(seq "$N"); do cwr stats "p6-$i" >"$W/p6-$i.json"; done
python3 - "$W" "$N" "$FILL_MB" <<'PY'
import json, os, sys
w, n, fill_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hz = os.sysconf("SC_CLK_TCK")
fill = fill_mb << 20
bad, cpu_err, mem_err, cpu_tot = [], [], [], 0.0
for i in range(1, n + 1):
    st = json.load(open(f"{w}/p6-{i}.json"))
    out = open(f"{w}/p6-{i}.out").read().split()
    ex = st.get("exit") or {}
    if ex.get("exit_code") != 0 or not out:
        bad.append((i, st.get("status"), open(f"{w}/p6-{i}.err").read()[-300:]))
        continue
    # /proc/PID/stat: comm may hold spaces; fields after the ')' start at field 3
    rest = " ".join(out).rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    did = (utime + stime + cutime + cstime) / hz
    u = st["usage"]
    acc = (u["cpu_user_ns"] + u["cpu_system_ns"]) / 1e9
    cpu_err.append(abs(acc - did) / did)
    mem_err.append(abs(u["memory_peak"] - fill) / fill)
    cpu_tot += did
print(f"runs: {n} started at once, {n - len(bad)} ended with exit 0 and their output")
for b in bad:
    print("  failed:", b)
if cpu_err:
    cpu_err.sort(); mem_err.sort()
    print(f"cpu per run {cpu_tot / len(cpu_err):.2f} s (self-measured, {hz} Hz ticks); memory per run {fill_mb} MiB (tmpfs file)")
    print(f"cpu accounting vs self-measured: median {100*cpu_err[len(cpu_err)//2]:.1f} %, max {100*cpu_err[-1]:.1f} %")
    print(f"peak memory vs the file's size: median {100*mem_err[len(mem_err)//2]:.1f} %, max {100*mem_err[-1]:.1f} %")
    print(f"ratio max accounting error cpu = {cpu_err[-1]:.3f}   (goal <= 0.05)")
    print(f"ratio max accounting error memory = {mem_err[-1]:.3f}   (goal <= 0.05)")
sys.exit(1 if bad else 0)
PY
rc=$?
printf 'wall: %.1f s to start all, %.1f s until all ended\n' "$(echo "$t_started - $t0" | bc)" "$(echo "$t_done - $t0" | bc)"
for i in $(seq "$N"); do cwr rm -f "p6-$i" >/dev/null 2>&1 || true; done
exit $rc
