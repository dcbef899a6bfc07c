#!/usr/bin/env bash
# The whole test suite (as root): unit tests, the extraction breakout corpus, pulls against the
# local registries, and real containers. Needs scripts/setup.sh to have run once.
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE
bash tests/fixtures/build.sh registry auth >/dev/null 2>&1 || bash tests/fixtures/build.sh
# test binaries share the machine's cgroups and loopback registries: a few at a time
cargo test --workspace -- --test-threads 4
