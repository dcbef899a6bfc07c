#!/usr/bin/env bash
# After the test suite: nothing of cw's may be left running or mounted. Checks for monitor and
# pasta processes, mounts under the test stores and run directories, run cgroups under /cw, and
# network namespaces bound by runs. Exit 1 with a list when something is left.
set -uo pipefail
cd "$(dirname "$0")/.."
left=()
while read -r pid args; do left+=("process $pid: $args"); done < <(pgrep -af '__monitor|pasta .*runs/' | grep -v pgrep)
while read -r m; do left+=("mount $m"); done < <(awk '{print $5}' /proc/self/mountinfo | grep -E 'target/test-stores|/runs/[^/]+/(rootfs|netns)' || true)
for d in /sys/fs/cgroup/*/cw /sys/fs/cgroup/cw /sys/fs/cgroup/unified/cw; do
  [ -d "$d" ] || continue
  while read -r c; do left+=("cgroup $c"); done < <(find "$d" -mindepth 1 -maxdepth 1 -type d)
done
if [ ${#left[@]} -gt 0 ]; then
  echo "leak check: cw left these behind:" >&2
  printf '  %s\n' "${left[@]}" >&2
  exit 1
fi
echo "leak check: no processes, mounts, cgroups or network namespaces left by cw"
