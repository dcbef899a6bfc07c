#!/usr/bin/env bash
# `cl run 'echo hi'` from submission to ready, and idle worker RSS: cw worker against the official
# cl-worker (codalab 1.7.5, with Debian's dockerd) on the same real CodaLab server, interleaved.
# Both run the same image (tests/fixtures' bash+busybox image: cw pulls it from the local
# registry as the docker.io mirror; dockerd gets it by skopeo into docker-daemon:). Each worker
# serves its own tag (--tag-exclusive), so runs go where they are meant to. Root.
#   RUNS=5 bench/worker.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
W=${BENCH_DIR:-/var/tmp/cw-bench-worker}
FIX=${CW_FIXTURES:-/var/tmp/cw-fixtures}
bash tests/fixtures/build.sh registry codalab push >/dev/null
bash tests/fixtures/codalab/server.sh start
eval "$(bash tests/fixtures/codalab/server.sh env)"
MYCNF=$(dirname "$CODALAB_HOME")/my.cnf
VENV=$(dirname "$(dirname "$CL")")
cargo build --release -q
CW=$PWD/target/release/cw
dpkg-query -W -f='${Status}' docker.io 2>/dev/null | grep -q 'install ok installed' || \
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends docker.io >/dev/null
rm -rf "$W"; mkdir -p "$W/run" "$W/docker" "$W/cw" "$W/cl"
SOCK=$W/run/docker.sock
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 2
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for r in $(ls "$W/cw/store/runs" 2>/dev/null); do "$CW" --store "$W/cw/store" rm -f "$r" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
# dockerd: private data root and socket, no iptables/bridge; pulls fail fast through a dead proxy
HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY=127.0.0.1,localhost \
  dockerd --data-root "$W/docker" --exec-root "$W/run/exec" --pidfile "$W/run/dockerd.pid" -H "unix://$SOCK" \
    --bridge=none --iptables=false --ip-masq=false --ip-forward=false --userland-proxy=false >"$W/dockerd.log" 2>&1 &
PIDS+=($!)
export DOCKER_HOST=unix://$SOCK
for _ in $(seq 1 60); do docker version >/dev/null 2>&1 && break; sleep 0.5; done
skopeo copy -q --insecure-policy "oci:$FIX/work/oci-codalab:latest" "docker-daemon:codalab/ubuntu:1.9" --dest-daemon-host "unix://$SOCK"
T_CW=bench-cw-$$; T_CL=bench-cl-$$
CODALAB_USERNAME=codalab CODALAB_PASSWORD=codalab setsid "$CW" --store "$W/cw/store" --registry-mirror http://127.0.0.1:5000 worker \
  --server "$CL_URL" --ws-server "$CL_WS" --work-dir "$W/cw/work" --id "$T_CW" --tag "$T_CW" --tag-exclusive >"$W/cw.log" 2>&1 &
PIDS+=($!); CWPID=$!
( export CODALAB_HOME=$W/cl/home CODALAB_USERNAME=codalab CODALAB_PASSWORD=codalab
  exec setsid "$VENV/bin/python" tests/fixtures/codalab/cl_local.py worker --server "$CL_URL" --ws-server "$CL_WS" \
    --work-dir "$W/cl/work" --id "$T_CL" --tag "$T_CL" --tag-exclusive --network-prefix "cl_bench_$$" ) >"$W/cl.log" 2>&1 &
PIDS+=($!); CLPID=$!
for _ in $(seq 1 120); do grep -q "Worker started" "$W/cw.log" && grep -q "Worker started" "$W/cl.log" && break; sleep 0.5; done
sleep 10
rss() { ps -o rss= -p "$1" | awk '{printf "%.1f", $1/1024}'; }
IDLE_CW=$(rss $CWPID); IDLE_CL=$(rss $CLPID)
DOCKERD_RSS=$(ps -o rss= -C dockerd,containerd | awk '{s+=$1} END {printf "%.1f", s/1024}')
sql() { mariadb --defaults-file="$MYCNF" -uroot codalab_bundles -N -B -e "$1"; }
one() { # one TAG -> seconds from the bundle's creation (cl run returned) to ready
  local t0 u st
  u=$("$CL" run --request-queue "$1" --request-docker-image codalab/ubuntu:1.9 'echo hi')
  t0=$(date +%s.%N)   # (cl itself spends 3-5 s importing; not the worker's time)
  for _ in $(seq 1 1200); do
    st=$(sql "select state from bundle where uuid='$u'")
    case $st in ready|failed|killed) break ;; esac
    sleep 0.1
  done
  [ "$st" = ready ] || { echo "bundle $u on $1 ended $st" >&2; exit 1; }
  [ "$("$CL" cat "$u/stdout")" = hi ] || { echo "bundle $u: wrong stdout" >&2; exit 1; }
  echo "$(date +%s.%N) - $t0" | bc
}
declare -A T
for i in $(seq "$RUNS"); do
  for w in cw cl; do
    [ $w = cw ] && tag=$T_CW || tag=$T_CL
    s=$(one "$tag"); T[$w]+="$s "
    echo "run $i $w: $s s" >&2
  done
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
cw=$(echo "${T[cw]}" | median); cl=$(echo "${T[cl]}" | median)
echo "environment: $(nproc) CPUs, $(free -g | awk '/Mem/{print $2}') GiB, $(uname -r), codalab 1.7.5 on 127.0.0.1, $RUNS interleaved runs each"
printf '%-52s %8s s\n' "cw worker: 'echo hi' created -> ready (median)" "$cw" "cl-worker + dockerd: created -> ready (median)" "$cl"
printf '%-52s %8s MB\n' "cw worker idle RSS" "$IDLE_CW" "cl-worker idle RSS (dockerd+containerd not counted)" "$IDLE_CL" "dockerd + containerd RSS" "$DOCKERD_RSS"
printf 'ratio time cw / cl-worker = %.2f   (goal <= 0.5)\n' "$(echo "$cw / $cl" | bc -l)"
printf 'cw worker idle RSS = %s MB       (goal <= 30 MB)\n' "$IDLE_CW"
