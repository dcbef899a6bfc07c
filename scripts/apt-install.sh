#!/usr/bin/env bash
# apt-install.sh PKG...: install those of the Debian packages that are missing (as root), without
# starting the services they ship: docker-registry's would listen on every address, and the
# suite starts its own registry, Slurm and munge on 127.0.0.1.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
made_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1; fi
apt-get -o DPkg::Lock::Timeout=600 update -q
apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
[ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
if [ -d /run/systemd/system ]; then
  systemctl disable --now docker-registry.service slurmctld.service slurmd.service munge.service 2>/dev/null || true
fi
