# What each node's dockerd is started through (`cargo xtask cluster up`, run by bash -c
# with the node number and the dockerd command line): in a fresh mount and UTS namespace
# (unshare) inside the node's network namespace (nsenter), a sysfs of the node's network
# namespace with the host's cgroup hierarchies and bpffs bound back in (`ip netns exec`
# would lose them and dockerd would die), and a private tmpfs on /run/containerd
# (containerd's shim socket directory is hard-coded). The engine's bin directory is first
# on PATH (set by the caller): dockerd finds its containerd, shim, runc there.
set -e
n=$1; shift
hostname "mc-n$n"
old=/run/mesh-swarm$n/.oldsys
mkdir -p "$old"
mount --rbind /sys "$old"
mount -t sysfs sysfs /sys
for sub in fs/cgroup fs/bpf kernel/debug kernel/tracing; do
  if [ -d "$old/$sub" ] && mountpoint -q "$old/$sub"; then mount --rbind "$old/$sub" "/sys/$sub"; fi
done
mountpoint -q /sys/fs/cgroup || { echo "no /sys/fs/cgroup in node $n" >&2; exit 1; }
umount -l "$old"; rmdir "$old"
mkdir -p /run/containerd
mount -t tmpfs -o mode=0711,size=16m "mesh-swarm$n-containerd" /run/containerd
# A shared mount at the exec-root, as / is on a systemd host: the agent's container
# mounts Docker's netns directory with rslave propagation, which Docker refuses on a
# private mount.
mount --bind "/run/mesh-swarm$n" "/run/mesh-swarm$n"
mount --make-rshared "/run/mesh-swarm$n"
exec "$@"
