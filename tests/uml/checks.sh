#!/bin/busybox sh
# cw on cgroup v2, run inside the UML kernel by init.sh. Prints `CWV2 <check> <facts>` lines;
# tests/cgroup_v2.rs asserts on them (so a missing line fails as much as a wrong one).
CWB=$1 LAYOUT=$2
S=/run/store
mkdir -p $S && mount -t tmpfs tmpfs $S
cw() { "$CWB" --store $S/s --config /dev/null "$@"; }
out() { echo "CWV2 $*" | tr '\n' ' '; echo; }
G=/sys/fs/cgroup
out controllers "$(cat $G/cgroup.controllers)"
IMG=$(cw load -i "$LAYOUT" 2>&1 | sed -n 's/^Loaded image \(sha256:[0-9a-f]*\).*/\1/p' | head -1)
out image "$IMG"
R="run --pull never --image $IMG"

# memory: a run over its limit, and a child over it while the parent exits 0
e=$(cw $R -m 20m 'head -c 60m /dev/zero | tail' 2>&1 >/dev/null); out oom "rc=$? $e"
e=$(cw $R -m 20m '(head -c 60m /dev/zero | tail) 2>/dev/null; exit 0' 2>&1 >/dev/null); out oom_child "rc=$? $e"

# accounting: cpu from cpu.stat against the shell's own times (busybox time), memory peak
cw $R --keep --name peak -m 100m sh -c 'dd if=/dev/zero of=/dev/shm/x bs=1M count=30 2>/dev/null'
out peak "$(cw stats peak | tr -d '\n ')"
cw rm peak >/dev/null
cw $R --keep --name acct sh -c 'time sh -c "i=0; while [ \$i -lt 4000000 ]; do i=\$((i+1)); done"' 2>$S/time.txt
out time "$(cat $S/time.txt)"
out stats "$(cw stats acct | tr -d '\n ')"
cw rm acct >/dev/null

# pids and cpu quota as the kernel has them, and the pids limit holding
id=$(cw $R -d --pids-limit 10 --cpus 0.5 -m 64m sleep 30)
sleep 2
out files "pids.max=$(cat $G/cw/$id/pids.max) cpu.max=$(tr ' ' / < $G/cw/$id/cpu.max) memory.max=$(cat $G/cw/$id/memory.max)"
cw rm -f $id >/dev/null
out forks "$(cw $R --pids-limit 10 sh -c 'for i in $(seq 30); do sleep 3 & echo started $i; done' 2>/dev/null | tail -1)"

# devices (the eBPF program): a passed node works; one passed read-only cannot be opened for
# writing (/dev/kmsg: not among the nodes every run gets)
out device_passed "$(cw $R --device /dev/full head -c 3 /dev/full 2>&1 | wc -c)"
out device_rwm "$(cw $R --device /dev/kmsg sh -c 'echo cw-v2 > /dev/kmsg; echo rc=$?' 2>&1)"
out device_r "$(cw $R --device /dev/kmsg:/dev/kmsg:r sh -c 'echo cw-v2 > /dev/kmsg; echo rc=$?' 2>&1)"

# nesting: a run under --cgroup-parent, its parents gone after; a "worker" in a leaf with its
# runs beside it (cgroup v2's no-internal-processes rule)
id=$(cw $R -d --cgroup-parent /cwtest/a/b sleep 20)
sleep 2
out nested_during "procs=$(wc -l < $G/cwtest/a/b/$id/cgroup.procs)"
cw rm -f $id >/dev/null
out nested_after "$(find $G/cwtest -type d | tr '\n' ' ')"
mkdir -p $G/job/worker
echo "+memory +pids +cpu" > $G/cgroup.subtree_control
echo $$ > $G/job/worker/cgroup.procs
e=$(cw $R --cgroup-parent /job -m 30m 'cat /proc/self/cgroup' 2>&1); out beside "rc=$? $e"
out job_after "$(find $G/job -mindepth 1 -maxdepth 1 -type d | tr '\n' ' ')"
echo $$ > $G/cgroup.procs

# a user's runs on a delegated subtree, as systemd's Delegate=yes makes one (the directory and
# its cgroup.procs, cgroup.subtree_control and cgroup.threads are the user's) with cw started in
# a scope below it, as `systemd-run --user --scope cw …` starts it: the runs get cgroups of their
# own below the delegated one, with their limits
U=64133
mkdir -p $G/deleg/scope $S/u
echo "+memory +pids +cpu" > $G/cgroup.subtree_control
for d in $G/deleg $G/deleg/scope; do
  chown $U:$U $d $d/cgroup.procs $d/cgroup.subtree_control $d/cgroup.threads
done
chown $U:$U $S/u
# the user's own copy of the layout (umoci writes index.json 0600, root's)
cp -a "$LAYOUT" $S/u/layout && chown -R $U:$U $S/u/layout
ucw() { ( echo 0 > $G/deleg/scope/cgroup.procs &&
  exec /usr/bin/setpriv --reuid $U --regid $U --clear-groups env HOME=$S/u \
    "$CWB" --store $S/u/store --config /dev/null "$@" ); }
UL=$(ucw load -i $S/u/layout 2>&1)
UIMG=$(echo "$UL" | sed -n 's/^Loaded image \(sha256:[0-9a-f]*\).*/\1/p' | head -1)
out user_load "$UL"
UR="run --pull never --image $UIMG"
e=$(ucw $UR -m 20m 'head -c 60m /dev/zero | tail' 2>&1 >/dev/null); out user_oom "rc=$? $e"
id=$(ucw $UR -d --pids-limit 10 --cpus 0.5 -m 64m sleep 30)
sleep 2
out user_files "pids.max=$(cat $G/deleg/cw/$id/pids.max) cpu.max=$(tr " " / < $G/deleg/cw/$id/cpu.max) memory.max=$(cat $G/deleg/cw/$id/memory.max) owner=$(stat -c %u $G/deleg/cw/$id)"
out user_live "$(ucw stats $id | tr -d '\n ')"
ucw rm -f $id >/dev/null
out user_forks "$(ucw $UR --pids-limit 10 sh -c 'for i in $(seq 30); do sleep 3 & echo started $i; done' 2>/dev/null | tail -1)"
ucw $UR --keep --name upeak -m 100m sh -c 'dd if=/dev/zero of=/dev/shm/x bs=1M count=30 2>/dev/null'
out user_peak "$(ucw stats upeak | tr -d '\n ')"
ucw rm upeak >/dev/null
out user_after "$(find $G/deleg -mindepth 1 -type d | sort | tr '\n' ' ')"

# cw worker on v2: against the host's CodaLab server and registry through the tap link
# (tests/cgroup_v2.rs forwards 10.199.0.1's ports to the host's loopback). The host submits the
# bundles, watches them end, then creates $CW_UML_SHARED/stop.
if [ -n "${CW_UML_SHARED:-}" ] && ip addr show vec0 2>/dev/null | grep -q 10.199.0.2; then
  "$CWB" --store $S/ws --config /dev/null --registry-mirror http://10.199.0.1:5000 \
    --insecure-registry 10.199.0.1:5000 worker --server http://10.199.0.1:2900 \
    --ws-server ws://10.199.0.1:2901 --work-dir $S/work --id "uml-$CW_UML_TAG" \
    --tag "$CW_UML_TAG" --tag-exclusive --verbose >"$CW_UML_SHARED/worker.log" 2>&1 &
  wpid=$!
  # and the user's worker, started in the delegated scope as the user's cw was above, on a tag
  # of its own: its bundles' cgroups below the delegated cgroup
  ( echo 0 > $G/deleg/scope/cgroup.procs &&
    exec /usr/bin/setpriv --reuid $U --regid $U --clear-groups env HOME=$S/u \
    "$CWB" --store $S/u/ws --config /dev/null --registry-mirror http://10.199.0.1:5000 \
    --insecure-registry 10.199.0.1:5000 worker --server http://10.199.0.1:2900 \
    --ws-server ws://10.199.0.1:2901 --work-dir $S/u/work --id "uml-user-$CW_UML_TAG" \
    --tag "$CW_UML_TAG-user" --tag-exclusive --verbose ) >"$CW_UML_SHARED/user-worker.log" 2>&1 &
  uwpid=$!
  i=0
  while [ ! -e "$CW_UML_SHARED/stop" ] && [ $i -lt 400 ]; do sleep 1; i=$((i+1)); done
  kill -TERM $wpid; wait $wpid; out worker_exit "rc=$?"
  kill -TERM $uwpid; wait $uwpid; out user_worker_exit "rc=$?"
  out worker_cgroups "$(find $G/cw -mindepth 1 -maxdepth 1 -type d 2>/dev/null | wc -l)"
  out user_worker_cgroups "$(find $G/deleg/cw -mindepth 1 -maxdepth 1 -type d 2>/dev/null | wc -l)"
fi
