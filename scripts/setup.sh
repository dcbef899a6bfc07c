#!/usr/bin/env bash
# Install cw's build and test dependencies (Debian 12, root), build cw, and bring up the local
# registries with their fixture images (tests/fixtures/build.sh). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
[ "$(id -u)" = 0 ] || { echo "setup.sh: run as root (cw creates containers, mounts, cgroups)" >&2; exit 1; }

pkgs=(libseccomp-dev pkg-config docker-registry skopeo umoci busybox-static zstd pigz curl jq attr
      apache2-utils openssl hyperfine libcap2-bin file debootstrap ca-certificates debian-archive-keyring
      iproute2 python3 bc runc crun passt uidmap patchelf fuse-overlayfs libelf-dev zlib1g-dev libc6-dev user-mode-linux slurm-wlm munge
      strace socat)
bash scripts/apt-install.sh "${pkgs[@]}"

# runs without root reach the network through pasta, which opens /dev/net/tun as that user:
# udev makes it 0666 on a Debian host (50-udev-default.rules); this sandbox's /dev has it 0600
[ -c /dev/net/tun ] && chmod 0666 /dev/net/tun
# and fuse-overlayfs (a user's rootfs where the kernel mounts no overlayfs in a user namespace)
# opens /dev/fuse, 0666 on Debian too
[ -c /dev/fuse ] && chmod 0666 /dev/fuse

# a User-mode Linux kernel that boots on any x86-64 CPU (Debian 12's cannot on one with AMX),
# for the cgroup v2 tests
bash scripts/uml-kernel.sh

cargo build --workspace --all-targets
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
bash tests/fixtures/build.sh
# the real CodaLab server (PyPI codalab 1.7.5 + MariaDB) on 127.0.0.1 for the worker tests
bash tests/fixtures/codalab/server.sh start
