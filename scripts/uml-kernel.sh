#!/usr/bin/env bash
# A User-mode Linux kernel that boots on this CPU, for tests/cgroup_v2.rs: Debian unstable's
# user-mode-linux (7.2) with the same suite's glibc beside it, in /opt/cw-uml.
#
# Why: Debian 12's UML (6.1, the package setup.sh installs) dies at init on a CPU with AMX
# ("userspace - ptrace set fp regs failed, errno = 14": it hands ptrace a fixed-size XSTATE
# buffer), and so does Debian 13's 6.12 (tried); 7.2 boots. Its binary needs a newer glibc than
# bookworm's 2.36, so that suite's loader and libc go beside it and the binary is pointed at
# them (patchelf); running it through the loader instead moves its text and UML then refuses its
# memory layout. CW_UML_SUITE picks another suite.
#
# Everything downloaded is verified the way apt verifies it: InRelease against Debian's archive
# keyring, Packages.xz against InRelease's SHA256, each .deb against Packages' SHA256.
set -euo pipefail
DEST=${CW_UML_DIR:-/opt/cw-uml}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${CW_UML_SUITE:-sid}
[ -x "$DEST/linux.uml" ] && [ -f "$DEST/ok" ] && { echo "uml-kernel: $DEST ready"; exit 0; }
command -v patchelf >/dev/null || bash "$(dirname "$0")/apt-install.sh" patchelf
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
get() { curl -fsSL --retry 3 -o "$2" "$MIRROR/$1"; }
get "dists/$SUITE/InRelease" "$W/InRelease"
gpgv --keyring /usr/share/keyrings/debian-archive-keyring.gpg "$W/InRelease" 2>/dev/null \
  || { echo "uml-kernel: $SUITE's InRelease does not verify against Debian's archive keyring" >&2; exit 1; }
want=$(awk '/^SHA256:/{s=1;next} /^[A-Za-z]/{s=0} s && $3=="main/binary-amd64/Packages.xz"{print $1}' "$W/InRelease")
get "dists/$SUITE/main/binary-amd64/Packages.xz" "$W/Packages.xz"
echo "$want  $W/Packages.xz" | sha256sum -c --quiet
xz -d "$W/Packages.xz"
deb() { # package name -> verified .deb path
  local f sum
  read -r f sum < <(awk -v p="$1" '$1=="Package:"{x=($2==p)} x&&$1=="Filename:"{f=$2} x&&$1=="SHA256:"{s=$2} x&&/^$/{print f, s; exit}' "$W/Packages")
  get "$f" "$W/$1.deb"
  echo "$sum  $W/$1.deb" | sha256sum -c --quiet
  echo "$W/$1.deb"
}
dpkg-deb -x "$(deb user-mode-linux)" "$W/uml"
dpkg-deb -x "$(deb libc6)" "$W/libc"
rm -rf "$DEST.new" && mkdir -p "$DEST.new/lib" "$DEST.new/modules"
cp "$W/libc/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" "$W/libc/usr/lib/x86_64-linux-gnu/libc.so.6" "$DEST.new/lib/"
cp "$W/uml/usr/bin/linux.uml" "$DEST.new/linux.uml"
cp -a "$W/uml/usr/lib/uml/modules/." "$DEST.new/modules/"
patchelf --set-interpreter "$DEST/lib/ld-linux-x86-64.so.2" --set-rpath "$DEST/lib" "$DEST.new/linux.uml"
rm -rf "$DEST" && mv "$DEST.new" "$DEST"
"$DEST/linux.uml" --version >/dev/null
touch "$DEST/ok"
echo "uml-kernel: $DEST/linux.uml $("$DEST/linux.uml" --version)"
