#!/usr/bin/env bash
# All benchmarks in one go, then one table of ratios against the peers (root).
#   bench/run-all.sh | tee bench/last-run.txt
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
echo "== bench/pull.sh";   RUNS=${RUNS:-3}    bash bench/pull.sh   | tee "$out/pull"
echo "== bench/start.sh";  ROUNDS=${ROUNDS:-40} bash bench/start.sh  | tee "$out/start"
echo "== bench/worker.sh"; RUNS=${WRUNS:-5}   bash bench/worker.sh | tee "$out/worker"
echo "== bench/teardown.sh"; ROUNDS=${TROUNDS:-5} bash bench/teardown.sh | tee "$out/teardown"
echo
echo "environment: $(nproc) CPUs, $(free -g | awk '/Mem/{print $2}') GiB RAM, kernel $(uname -r), $(. /etc/os-release; echo "$PRETTY_NAME"), $(date -u +%Y-%m-%dT%H:%MZ)"
printf '%-44s %-10s %s\n' "measure" "value" "goal"
grep -h '^ratio\|RSS =' "$out"/pull "$out"/start "$out"/worker "$out"/teardown | sed 's/   (goal/|(goal/' | awk -F'|' '{printf "%-55s %s\n", $1, $2}'
rm -rf "$out"
