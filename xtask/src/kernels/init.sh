#!/bin/busybox sh
# PID 1 of a kernel-matrix guest (xtask/src/kernels): loads the modules the tests need,
# puts the host's root (9p, read-only) together with tmpfs where tests write, and runs
# the steps xtask wrote into the per-run share (9p, writable) inside that root, as
# virtme-ng does. Powers off whatever happens; the host reads the results from the share.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "mesh-kernels: $*"; }
fail() {
	say "FAIL boot: $*"
	poweroff -f
}
say "boot: kernel $(uname -r) up after $(cut -d' ' -f1 /proc/uptime) s"
for m in /modules/*.ko; do
	insmod "$m" || fail "insmod $m"
done
R=/newroot
P9=trans=virtio,version=9p2000.L,msize=512000
# The host's files do not change under a run: let the guest cache them.
mount -t 9p -o "$P9,ro,cache=loose" hostroot $R || fail "mounting the host's root (9p)"
mount -t proc proc $R/proc || fail "proc"
mount -t sysfs sysfs $R/sys || fail "sysfs"
mount -t devtmpfs devtmpfs $R/dev || fail "devtmpfs"
mount -t bpf bpf $R/sys/fs/bpf || fail "bpffs"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || fail "cgroup2"
mkdir -p $R/dev/shm
for d in tmp run var/tmp dev/shm; do
	mount -t tmpfs tmpfs "$R/$d" || fail "tmpfs on /$d"
done
# The checkout, at its own path (under /tmp it would be hidden by the tmpfs above).
SRC=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^mesh\.src=//p')
[ -n "$SRC" ] || fail "no mesh.src= on the kernel command line"
mkdir -p "$R$SRC" 2>/dev/null
mount -t 9p -o "$P9,ro,cache=loose" meshsrc "$R$SRC" || fail "mounting the checkout (9p)"
mkdir -p $R/run/mesh-kernels
mount -t 9p -o "$P9" meshrun $R/run/mesh-kernels || fail "mounting the run's share (9p)"
say "boot: root ready after $(cut -d' ' -f1 /proc/uptime) s"
chroot $R /bin/sh /run/mesh-kernels/steps.sh
say "done after $(cut -d' ' -f1 /proc/uptime) s"
sync
umount $R/run/mesh-kernels
poweroff -f
