#!/usr/bin/env bash
# Set up everything (scripts/setup.sh: packages, build, local registry with fixture images), then
# run a container from a docker.io name served by the local registry as a docker.io mirror.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CW=./target/debug/cw
$CW --registry-mirror http://127.0.0.1:5000 run --image docker.io/library/tiny 'echo hello from $(uname -s) in a cw container'
