#!/usr/bin/env bash
# Cold pull + unpack of the ubuntu-like image (6 layers, ~412 MB gzip, ~1 GB unpacked) from the
# local registry: cw against (a) skopeo copy + umoci unpack and (b) sequential `tar -xzf` of the
# same layer blobs (the gzip+filesystem floor, no whiteout handling), each timed in two states of
# the disk (below). Runs are interleaved (in a shuffled order each round); the medians and the
# ratios are printed for each state. Root; builds the image on first use (a few minutes).
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
# Two states of the disk before each timed run, both after removing every tree of the round
# before and a sync:
#  deleted: right away. This VM's root ext4 has no journal, and ext4 without one does not reuse
#           an inode freed in the last minute (five while its inode table block is unwritten)
#           while that block is cached: each new inode in a group where a tree was just deleted
#           scans past every such inode (recently_deleted() in fs/ext4/ialloc.c). A tool whose
#           tree lands there spends seconds of kernel CPU in that scan.
#  settled: after dropping the page cache (which holds those inode table blocks), then reading
#           the blobs back into it (tar's copies and the registry's), so that no tool meets that
#           scan and none reads a blob from the disk.
settle() {
  echo 3 >/proc/sys/vm/drop_caches
  cat "$W"/blobs/* >/dev/null
  find "${CW_FIXTURES:-/var/tmp/cw-fixtures}/registry-data" -type f -exec cat {} + >/dev/null 2>&1 || true
}
declare -A T
for i in $(seq "$RUNS"); do
  for state in deleted settled; do
    # a new order each round: the disk's state after one tool's gigabyte (writeback, discards of
    # the tree removed before) is what the next one meets, so no tool always follows the same one
    for tool in $(printf '%s\n' cw umoci tar | shuf); do
      rm -rf "$W/store" "$W/oci" "$W/bundle" "$W/tar"; sync
      [ "$state" = settled ] && settle
      t0=$(now)
      case $tool in
        cw) "$CW" --store "$W/store" pull -q "$IMG" >/dev/null ;;
        umoci) skopeo copy -q --insecure-policy --src-tls-verify=false "docker://$IMG" "oci:$W/oci:x" && umoci unpack --image "$W/oci:x" "$W/bundle" >/dev/null ;;
        tar) mkdir -p "$W/tar"; for l in $layers; do tar -xzf "$W/blobs/$l" -C "$W/tar" 2>/dev/null; done ;;
      esac
      t1=$(now)
      T[$state-$tool]+="$(echo "$t1 - $t0" | bc) "
      echo "run $i $state $tool: $(echo "$t1 - $t0" | bc) s" >&2
    done
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
echo "environment: $(nproc) CPUs, $(free -g | awk '/Mem/{print $2}') GiB, $(uname -r), store on $(df -T "$W" | awk 'NR==2{print $2}'), $RUNS interleaved runs"
for state in deleted settled; do
  cw=$(echo "${T[$state-cw]}" | median); um=$(echo "${T[$state-umoci]}" | median); tr=$(echo "${T[$state-tar]}" | median)
  case $state in
    deleted) echo "-- right after deleting the trees of the run before (deleted):" ;;
    settled) echo "-- with the page cache dropped after that delete (settled):" ;;
  esac
  printf '%-40s %8s s\n' "cw pull (cold, pull+verify+unpack)" "$cw" "skopeo copy + umoci unpack" "$um" "tar -xzf of each layer" "$tr"
  printf 'ratio cw / (skopeo+umoci), %s = %.2f   (goal <= 0.30)\n' "$state" "$(echo "$cw / $um" | bc -l)"
  printf 'ratio cw / tar -xzf, %s       = %.2f   (goal <= 0.35)\n' "$state" "$(echo "$cw / $tr" | bc -l)"
done
printf '%-40s %8s s\n' "cw pull (warm: tag unchanged)" "$warm" "cw pull (warm, right after a 1 GB delete)" "$warm_del"
printf 'warm pull after a delete  = %.0f ms (goal <= 50)\n' "$(echo "$warm_del * 1000" | bc -l)"
rm -rf "$W/store" "$W/oci" "$W/bundle" "$W/tar"
