#!/bin/busybox sh
# PID 1 of a User-mode Linux kernel (tests/cgroup_v2.rs boots it over the host's root through
# hostfs): mount what a system needs, a unified cgroup2 hierarchy at /sys/fs/cgroup, overlayfs,
# then run checks.sh and power off. Loopback, and a tap link to the host when one is given; the
# store lives on a tmpfs (overlayfs upper dirs cannot be on hostfs).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t tmpfs tmpfs /run
/bin/busybox mkdir -p /run/lock
/bin/busybox mount -t cgroup2 cgroup2 /sys/fs/cgroup
# the kernel's own device nodes (hostfs shows the host's, which this kernel cannot open), tun
# among them for pasta, a bundle's private network
# (modules of the running kernel: Debian's package, or scripts/uml-kernel.sh's 6.12)
M=/usr/lib/uml/modules/$(/bin/busybox uname -r)
[ -d "$M" ] || M=/opt/cw-uml/modules/$(/bin/busybox uname -r)
/bin/busybox insmod "$M/kernel/drivers/net/tun.ko" 2>/dev/null
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
# open to users, as udev makes it (pasta, for a user's bundle with network, opens it)
/bin/busybox chmod 0666 /dev/net/tun 2>/dev/null
/bin/busybox mkdir -p /dev/pts /dev/shm
/bin/busybox mount -t devpts devpts /dev/pts 2>/dev/null
/bin/busybox insmod "$M/kernel/fs/overlayfs/overlay.ko" 2>/dev/null
/bin/busybox ip link set lo up 2>/dev/null
# the tap link tests/cgroup_v2.rs gives the kernel (vec0), when it does
if /bin/busybox ip link set vec0 up 2>/dev/null; then
  /bin/busybox ip addr add 10.199.0.2/30 dev vec0
  # a default route: pasta (a bundle's private network) needs an external interface
  /bin/busybox ip route add default via 10.199.0.1
fi
/bin/busybox sh "${CW_UML_CHECKS:-$(/bin/busybox dirname "$0")/checks.sh}" "$CW_UML_BIN" "$CW_UML_LAYOUT" 2>&1
echo "CWV2 done"
/bin/busybox poweroff -f
