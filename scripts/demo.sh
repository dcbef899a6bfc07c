#!/usr/bin/env bash
# The main job, on a fresh Debian 12 machine as root: build cw, bring up the real CodaLab server
# (PyPI codalab 1.7.5 + MariaDB) and a registry on 127.0.0.1, attach `cw worker` to the server,
# and have a `cl run` bundle executed by it; then one `cw run`. Only what that needs is
# installed; the test tools (fuzzers, benchmarks, the fixture corpus) are scripts/setup.sh's,
# on the test command's path.
#
# The image is a stand-in: the registry serves a small bash + busybox image under the name
# codalab/ubuntu:1.9 (Docker Hub is not reachable here), and cw reaches it as docker.io's
# through --registry-mirror, as a site would reach its own mirror.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (cw creates containers, mounts, cgroups)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
T0=$(date +%s)
say() { printf '\n[demo %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }

say "packages"
pkgs=(libseccomp-dev pkg-config libc6-dev gcc docker-registry skopeo umoci busybox-static curl
      ca-certificates debian-archive-keyring passt)
bash scripts/apt-install.sh "${pkgs[@]}"

say "building cw"
cargo build --workspace --bins
say "registry on 127.0.0.1:5000 with codalab/ubuntu:1.9"
bash tests/fixtures/build.sh demo
say "CodaLab server on 127.0.0.1:2900"
bash tests/fixtures/codalab/server.sh start
eval "$(bash tests/fixtures/codalab/server.sh env)"

D=/var/tmp/cw-demo
mkdir -p "$D"
CW=("$PWD/target/debug/cw" --store "$D/store" --registry-mirror http://127.0.0.1:5000)
say "cw worker --server $CL_URL (log: $D/worker.log)"
CODALAB_USERNAME=codalab CODALAB_PASSWORD=codalab \
  "${CW[@]}" worker --server "$CL_URL" --ws-server "$CL_WS" --work-dir "$D/work" --id demo \
  --tag demo --tag-exclusive >"$D/worker.log" 2>&1 &
WORKER=$!
trap 'kill $WORKER 2>/dev/null || true; wait $WORKER 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do grep -q "Worker started!" "$D/worker.log" && break; sleep 0.1; done
grep -q "Worker started!" "$D/worker.log" || { cat "$D/worker.log"; exit 1; }

say "cl run (executed by cw worker)"
UUID=$($CL run --request-queue demo --request-docker-image codalab/ubuntu:1.9 --request-memory 200m \
  'echo "hello from a CodaLab bundle: $(id -un)@$(hostname) in $PWD"; ls /')
echo "bundle $UUID"
$CL wait "$UUID" >/dev/null
$CL info -f state,exitcode,time,memory_max "$UUID" 2>/dev/null || $CL info -f state "$UUID"
$CL cat "$UUID/stdout"

say "cw run"
"${CW[@]}" run codalab/ubuntu:1.9 'echo "hello from $(uname -s) in a cw container"'

kill "$WORKER"; wait "$WORKER" 2>/dev/null || true
trap - EXIT
say "done; the server keeps running (tests/fixtures/codalab/server.sh stop ends it)"
