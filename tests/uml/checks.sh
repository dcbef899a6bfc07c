#!/bin/busybox sh
# cw on cgroup v2, run inside the UML kernel by init.sh. Prints `CWV2 <check> <facts>` lines;
# tests/cgroup_v2.rs asserts on them (so a missing line fails as much as a wrong one).
CWB=$1 LAYOUT=$2
S=/run/store
mkdir -p $S && mount -t tmpfs tmpfs $S
cw() { "$CWB" --store $S/s --config /dev/null "$@"; }
out() { echo "CWV2 $*" | tr '\n' ' '; echo; }
# a foreground `cw run` returns at its run's end and its monitor tears the run down after: what
# is checked after runs is checked once a store's runs (all removed at their end) are gone
settle() { i=0; while [ -n "$(ls -A $1/runs 2>/dev/null)" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; }
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
settle $S/s
out job_after "$(find $G/job -mindepth 1 -maxdepth 1 -type d | tr '\n' ' ')"
echo $$ > $G/cgroup.procs

# a user's runs on a delegated subtree, as systemd's Delegate=yes makes one (the directory and
# its cgroup.procs, cgroup.subtree_control and cgroup.threads are the user's) with cw started in
# a scope below it, as `systemd-run --user --scope cw …` starts it: the runs get cgroups of their
# own below the delegated one, with their limits. Twice: uid 64133 has no name, so no
# subordinate ids (a single-id mapping; prefix user_), and $CW_UML_SUBUSER has a name and a
# range in /etc/subuid and /etc/subgid (the host's, through hostfs; prefix sub_). Each in a
# delegated cgroup of its own ($D) with its own store ($H).
# the image with a USER, a workdir and an env, from the host's registry through the tap link
REG=10.199.0.1:5000
CONF=$REG/tiny:config
# ucw ARGS…: the user's cw, started in the user's delegated scope
ucw() { ( echo 0 > $D/scope/cgroup.procs &&
  exec /usr/bin/setpriv --reuid $U --regid $U --clear-groups env HOME=$H \
    "$CWB" --store $H/store --config /dev/null --insecure-registry $REG "$@" ); }
user_checks() {
  P=$1 U=$2 D=$G/$3 H=$S/$1
  mkdir -p $D/scope $H
  echo "+memory +pids +cpu" > $G/cgroup.subtree_control
  for d in $D $D/scope; do
    chown $U:$U $d $d/cgroup.procs $d/cgroup.subtree_control $d/cgroup.threads
  done
  chown $U:$U $H
  # the user's own copy of the layout (umoci writes index.json 0600, root's)
  cp -a "$LAYOUT" $H/layout && chown -R $U:$U $H/layout
  UL=$(ucw --log info load -i $H/layout 2>&1)
  UIMG=$(echo "$UL" | sed -n 's/^Loaded image \(sha256:[0-9a-f]*\).*/\1/p' | head -1)
  out ${P}_load "$UL"
  UR="run --pull never --image $UIMG"
  e=$(ucw $UR -m 20m 'head -c 60m /dev/zero | tail' 2>&1 >/dev/null); out ${P}_oom "rc=$? $e"
  id=$(ucw $UR -d --pids-limit 10 --cpus 0.5 -m 64m sleep 30)
  sleep 2
  out ${P}_files "pids.max=$(cat $D/cw/$id/pids.max) cpu.max=$(tr " " / < $D/cw/$id/cpu.max) memory.max=$(cat $D/cw/$id/memory.max) owner=$(stat -c %u $D/cw/$id)"
  out ${P}_live "$(ucw stats $id | tr -d '\n ')"
  ucw rm -f $id >/dev/null
  out ${P}_forks "$(ucw $UR --pids-limit 10 sh -c 'for i in $(seq 30); do sleep 3 & echo started $i; done' 2>/dev/null | tail -1)"
  ucw $UR --keep --name upeak -m 100m sh -c 'dd if=/dev/zero of=/dev/shm/x bs=1M count=30 2>/dev/null'
  out ${P}_peak "$(ucw stats upeak | tr -d '\n ')"
  ucw rm upeak >/dev/null
  # the image's config: its user (65534, an id only subordinate ids give), workdir, env, and
  # the command's exit code; as the run's root too
  e=$(ucw pull -q $CONF 2>&1); out ${P}_pull "rc=$? $e"
  e=$(ucw run --pull never --image $CONF 'id -u; id -g; pwd; echo $CW_IMAGE_ENV; exit 7' 2>&1)
  out ${P}_config "rc=$? $e"
  e=$(ucw run --pull never -u 0:0 --image $CONF 'id -u; pwd; echo $CW_IMAGE_ENV; exit 7' 2>&1)
  out ${P}_config_root "rc=$? $e"
  # a bind mount: who owns on the host what the image's user and the run's root wrote there
  mkdir -m 777 $H/vol
  ucw run --pull never -v $H/vol:/v --image $CONF 'echo a > /v/by-image-user' >/dev/null 2>&1
  ucw run --pull never -u 0:0 -v $H/vol:/v --image $CONF 'echo b > /v/by-root' >/dev/null 2>&1
  out ${P}_bind "image=$(stat -c %u $H/vol/by-image-user 2>/dev/null || echo none) root=$(stat -c %u $H/vol/by-root 2>/dev/null || echo none) text=$(cat $H/vol/by-root 2>/dev/null)"
  # the time limit
  e=$(ucw $UR --time-limit 1s --stop-timeout 1s sleep 60 2>&1); out ${P}_time "rc=$? $e"
  # killed from another process of the user's; sleep, pid 1, ignores SIGTERM: the SIGKILL
  # after the grace ends it
  ucw $UR -d --name k --stop-timeout 1s sh -c 'echo hello; exec sleep 100' >/dev/null
  sleep 0.5
  out ${P}_logs "$(ucw logs k 2>&1)"
  ucw kill k >/dev/null
  i=0
  while ! ucw stats k 2>/dev/null | grep -q exit_code && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done
  out ${P}_kill "$(ucw stats k | tr -d '\n ')"
  ucw rm k >/dev/null
  # a run whose monitor died (its processes die with it): the user's next cw records it lost
  # and removes its cgroup, which only the monitor's mount namespace had a path to
  id=$(ucw $UR -d --name lost -m 64m sleep 100)
  sleep 1
  kill -9 $(cut -d" " -f1 $H/store/runs/$id/monitor.pid)
  sleep 0.5
  out ${P}_lost_during "$(test -d $D/cw/$id && echo cgroup) $(wc -l < $D/cw/$id/cgroup.procs)"
  ucw kill lost >/dev/null 2>&1
  out ${P}_lost "$(ucw stats lost | tr -d '\n ')"
  out ${P}_lost_after "$(test -d $D/cw/$id && echo left || echo gone)"
  ucw rm lost >/dev/null
  # nothing left: no cgroup but the top /cw, no run, no mount of the user's store
  settle $H/store
  out ${P}_after "$(find $D -mindepth 1 -type d | sort | tr '\n' ' ')"
  out ${P}_left "runs=$(ls $H/store/runs | wc -l) mounts=$(grep -c " $H/" /proc/mounts)"
}
user_checks user 64133 deleg
[ -n "${CW_UML_SUBUSER:-}" ] && user_checks sub "$CW_UML_SUBUSER" sub

# cw worker on v2: against the host's CodaLab server and registry through the tap link
# (tests/cgroup_v2.rs forwards 10.199.0.1's ports to the host's loopback). The host submits the
# bundles, watches them end, then creates $CW_UML_SHARED/stop.
if [ -n "${CW_UML_SHARED:-}" ] && ip addr show vec0 2>/dev/null | grep -q 10.199.0.2; then
  "$CWB" --store $S/ws --config /dev/null --registry-mirror http://10.199.0.1:5000 \
    --insecure-registry 10.199.0.1:5000 worker --server http://10.199.0.1:2900 \
    --ws-server ws://10.199.0.1:2901 --work-dir $S/work --id "uml-$CW_UML_TAG" \
    --tag "$CW_UML_TAG" --tag-exclusive --verbose >"$CW_UML_SHARED/worker.log" 2>&1 &
  wpid=$!
  # and each user's worker, started in its delegated scope as its cw was above, on a tag of its
  # own: its bundles' cgroups below its delegated cgroup
  # (started with &: the subshell it runs in becomes the worker, whose pid $! is)
  uworker() { U=$1 D=$G/$2 H=$S/$3
    echo 0 > $D/scope/cgroup.procs &&
    exec /usr/bin/setpriv --reuid $U --regid $U --clear-groups env HOME=$H \
    "$CWB" --store $H/ws --config /dev/null --registry-mirror http://10.199.0.1:5000 \
    --insecure-registry 10.199.0.1:5000 worker --server http://10.199.0.1:2900 \
    --ws-server ws://10.199.0.1:2901 --work-dir $H/work --id "uml-$3-$CW_UML_TAG" \
    --tag "$CW_UML_TAG-$3" --tag-exclusive --verbose >"$CW_UML_SHARED/$3-worker.log" 2>&1; }
  uworker 64133 deleg user &
  uwpid=$!
  swpid=
  if [ -n "${CW_UML_SUBUSER:-}" ]; then uworker "$CW_UML_SUBUSER" sub sub & swpid=$!; fi
  i=0
  while [ ! -e "$CW_UML_SHARED/stop" ] && [ $i -lt 400 ]; do sleep 1; i=$((i+1)); done
  kill -TERM $wpid; wait $wpid; out worker_exit "rc=$?"
  kill -TERM $uwpid; wait $uwpid; out user_worker_exit "rc=$?"
  if [ -n "$swpid" ]; then kill -TERM $swpid; wait $swpid; out sub_worker_exit "rc=$?"; fi
  out worker_cgroups "$(find $G/cw -mindepth 1 -maxdepth 1 -type d 2>/dev/null | wc -l)"
  out user_worker_cgroups "$(find $G/deleg/cw -mindepth 1 -maxdepth 1 -type d 2>/dev/null | wc -l)"
  out sub_worker_cgroups "$(find $G/sub/cw -mindepth 1 -maxdepth 1 -type d 2>/dev/null | wc -l)"
fi
