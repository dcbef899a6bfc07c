#!/usr/bin/env bash
# The whole test suite (as root): unit tests, the extraction breakout corpus, pulls against the
# local registries, real containers, the worker against the real CodaLab server, CodaLab's own
# CLI suite (a subset) against cw worker, a smoke run of
# every fuzz target, and a final check that nothing of cw's is left behind. Needs
# scripts/setup.sh to have run once. FUZZ_SECS=0 skips fuzzing.
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE
# on a machine scripts/setup.sh made, every test has what it needs: a skip is a failure
export CW_NO_SKIP=1
bash tests/fixtures/build.sh registry auth >/dev/null 2>&1 || bash tests/fixtures/build.sh
bash tests/fixtures/codalab/server.sh start
# cw starts monitors from the cw-monitor beside it: build it with this tree's cw
cargo build --workspace
# test binaries share the machine's cgroups and loopback registries: a few at a time
cargo test --workspace --no-fail-fast -- --test-threads 4
# CodaLab's own CLI suite against `cw worker` (a subset; `bash tests/codalab-suite.sh` runs every
# module, ~40 min). CI has ../shared; elsewhere it is skipped and says so.
if [ -f ../shared/codalab-cli-tests/tests/cli/test_cli.py ]; then
  bash tests/codalab-suite.sh ci
else
  echo "SKIP: CodaLab's CLI suite: ../shared/codalab-cli-tests is not here"
fi
if [ "${FUZZ_SECS:-60}" != 0 ]; then
  df -h . | sed 's/^/before fuzzing: /'
  bash scripts/fuzz.sh "${FUZZ_SECS:-60}"
fi
bash scripts/leak-check.sh
