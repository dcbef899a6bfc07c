#!/usr/bin/env bash
# Install cw's build and test dependencies (Debian 12, root), build cw, and bring up the local
# registries with their fixture images (tests/fixtures/build.sh). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
[ "$(id -u)" = 0 ] || { echo "setup.sh: run as root (cw creates containers, mounts, cgroups)" >&2; exit 1; }

pkgs=(libseccomp-dev pkg-config docker-registry skopeo umoci busybox-static zstd pigz curl jq attr
      apache2-utils openssl hyperfine libcap2-bin file debootstrap ca-certificates debian-archive-keyring
      iproute2 python3 bc runc crun passt libelf-dev zlib1g-dev libc6-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  # docker-registry's own service would listen on every address: keep the postinst from starting it
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1; fi
  apt-get -o DPkg::Lock::Timeout=600 update -q
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
  [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  if [ -d /run/systemd/system ]; then systemctl disable --now docker-registry.service 2>/dev/null || true; fi
fi

cargo build --workspace --all-targets
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
bash tests/fixtures/build.sh
# the real CodaLab server (PyPI codalab 1.7.5 + MariaDB) on 127.0.0.1 for the worker tests
bash tests/fixtures/codalab/server.sh start
