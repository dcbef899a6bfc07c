#!/usr/bin/env bash
# Cold pull + unpack of the ubuntu-like image (6 layers, ~412 MB gzip, ~1 GB unpacked) from the
# local registry: cw against (a) skopeo copy + umoci unpack and (b) sequential `tar -xzf` of the
# same layer blobs (the gzip+filesystem floor, no whiteout handling). Runs are interleaved (in a
# shuffled order each round); the
# medians and the ratios are printed. Root; builds the image on first use (a few minutes).
#   RUNS=5 bench/pull.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
W=${BENCH_DIR:-/var/tmp/cw-bench}
IMG=127.0.0.1:5000/ubuntu-like:latest
bash tests/fixtures/build.sh registry base ubuntu push >/dev/null
cargo build --release -q
CW=$PWD/target/release/cw
mkdir -p "$W"
rm -rf "$W/blobs"
skopeo copy -q --insecure-policy --src-tls-verify=false "docker://$IMG" "dir:$W/blobs"
layers=$(jq -r '.layers[].digest | sub("sha256:"; "")' "$W/blobs/manifest.json")

now() { date +%s.%N; }
declare -A T
for i in $(seq "$RUNS"); do
  # a new order each round: the disk's state after one tool's gigabyte (writeback, discards of
  # the tree removed before) is what the next one meets, so no tool always follows the same one
  for tool in $(printf '%s\n' cw umoci tar | shuf); do
    rm -rf "$W/store" "$W/oci" "$W/bundle" "$W/tar"; sync
    t0=$(now)
    case $tool in
      cw) "$CW" --store "$W/store" pull -q "$IMG" >/dev/null ;;
      umoci) skopeo copy -q --insecure-policy --src-tls-verify=false "docker://$IMG" "oci:$W/oci:x" && umoci unpack --image "$W/oci:x" "$W/bundle" >/dev/null ;;
      tar) mkdir -p "$W/tar"; for l in $layers; do tar -xzf "$W/blobs/$l" -C "$W/tar"; done ;;
    esac
    t1=$(now)
    T[$tool]+="$(echo "$t1 - $t0" | bc) "
    echo "run $i $tool: $(echo "$t1 - $t0" | bc) s" >&2
  done
done
# a cached tag (one HEAD, no GET, no fsync), on a quiet disk and right after a large delete (a
# copy of the store's unpacked layers, ~1 GB: writeback an fsync would have to wait for)
# (each cold run above starts from an empty store, the last one too: fill it first, untimed)
"$CW" --store "$W/store" pull -q "$IMG" >/dev/null
sync; t0=$(now); "$CW" --store "$W/store" pull -q "$IMG" >/dev/null; warm=$(echo "$(now) - $t0" | bc)
cp -a "$W/store/layers" "$W/big"; sync; rm -rf "$W/big"
t0=$(now); "$CW" --store "$W/store" pull -q "$IMG" >/dev/null; warm_del=$(echo "$(now) - $t0" | bc)
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
cw=$(echo "${T[cw]}" | median); um=$(echo "${T[umoci]}" | median); tr=$(echo "${T[tar]}" | median)
echo "environment: $(nproc) CPUs, $(free -g | awk '/Mem/{print $2}') GiB, $(uname -r), store on $(df -T "$W" | awk 'NR==2{print $2}'), $RUNS interleaved runs"
printf '%-40s %8s s\n' "cw pull (cold, pull+verify+unpack)" "$cw" "skopeo copy + umoci unpack" "$um" "tar -xzf of each layer" "$tr" "cw pull (warm: tag unchanged)" "$warm" "cw pull (warm, right after a 1 GB delete)" "$warm_del"
printf 'ratio cw / (skopeo+umoci) = %.2f   (goal <= 0.30)\n' "$(echo "$cw / $um" | bc -l)"
printf 'ratio cw / tar -xzf       = %.2f   (goal <= 0.35)\n' "$(echo "$cw / $tr" | bc -l)"
printf 'warm pull after a delete  = %.0f ms (goal <= 50)\n' "$(echo "$warm_del * 1000" | bc -l)"
rm -rf "$W/store" "$W/oci" "$W/bundle" "$W/tar"
