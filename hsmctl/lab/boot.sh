#!/usr/bin/env bash
# Boot one lab appliance. Runs as the first process of the appliance's own mount, UTS and
# PID namespaces, inside its network namespace:
#   ip netns exec NS unshare --mount --uts --pid --fork --propagation private boot.sh ...
# It assembles the appliance's root (an overlay of the golden image with a per-appliance
# upper dir), mounts what a Debian system expects, then becomes the appliance's init
# (hsm-boot) inside that root. Nothing it mounts is visible on the host.
set -euo pipefail

lower=$1 upper=$2 work=$3 root=$4 firmware=$5 name=$6

mkdir -p "$upper" "$work" "$root"
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
mount -t tmpfs -o mode=0755,size=16m tmpfs "$root/run"
mount -t tmpfs -o mode=1777,size=64m tmpfs "$root/tmp"
mount -t tmpfs -o mode=0755,size=1m tmpfs "$root/dev"
for node in null zero full random urandom tty; do
  touch "$root/dev/$node"
  mount --bind "/dev/$node" "$root/dev/$node"
done
mkdir -p "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
ln -s /proc/self/fd "$root/dev/fd"
mount --bind "$firmware" "$root/opt/hsmctl/lib"
mount -o remount,bind,ro "$root/opt/hsmctl/lib"
install -d -m 0755 "$root/run/sshd" "$root/run/hsm"

hostname "$name"
printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$name" > "$root/etc/hosts"
echo "$name" > "$root/etc/hostname"

cd "$root"
exec chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
  SOFTHSM2_CONF=/etc/softhsm/softhsm2.conf LANG=C.UTF-8 /usr/local/sbin/hsm-boot
