#!/usr/bin/env bash
# Smoke-run every cargo-fuzz target for N seconds each (default 60), seeded from fuzz/seeds/<t>
# (real data: registry manifests, crafted layers, CodaLab messages). Findings stop the script
# (libFuzzer exits non-zero) and land in fuzz/artifacts/<t>/. Long runs: see README "Fuzzing".
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS=${1:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1   # cargo fuzz needs nightly flags; the stable toolchain takes them this way
targets=$(cargo fuzz list)
cargo fuzz build
for t in $targets; do
  mkdir -p "corpus/$t" artifacts
  echo "=== fuzz $t for ${SECS}s"
  if ! cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$SECS" -rss_limit_mb=4096 \
       -print_final_stats=1 >"artifacts/$t.log" 2>&1; then
    tail -40 "artifacts/$t.log" >&2
    echo "fuzz target $t failed; the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "artifacts/$t.log" || true
done
