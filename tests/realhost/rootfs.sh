#!/usr/bin/env bash
# Builds (once) the Debian bookworm root file system that the real-host tests
# boot with systemd-nspawn and qemu, and prints the folder that holds it:
#
#   <cache>/hosts-<key>/rootfs/        the root (booted read-only under an overlay)
#   <cache>/hosts-<key>/id_ed25519     the SSH key root and `ci` accept
#   <cache>/hosts-<key>/vmlinuz, initrd.img   the kernel, for qemu -kernel
#   <cache>/hosts-<key>/base.qcow2     with `rootfs.sh qemu` only: the VM disk
#
# <cache> is $WEFT_CI_CACHE or /var/cache/weft-ci: outside the clone, so that
# `git clean` keeps it and CI can cache it. <key> hashes this script (which
# holds the package list and the configuration), so any change rebuilds.
# Concurrent callers (tests under nextest) wait on a lock; the root is built
# in a temporary folder and renamed into place, so a killed build leaves no
# half-made root behind. Needs root, debootstrap and network access to the
# Debian mirror ($WEFT_CI_MIRROR, default http://deb.debian.org/debian).
set -euo pipefail

SUITE=bookworm
# systemd as PID 1 and what Ansible needs (python3, python3-apt for its apt
# module, sudo, sftp); nftables for the agent's capture; curl, procps and
# iproute2 for the checks; adduser for packages' maintainer scripts;
# linux-image-amd64 and udev only for the qemu image (nspawn ignores them).
PACKAGES=systemd-sysv,dbus,udev,openssh-server,openssh-sftp-server,python3,python3-apt,iproute2,nftables,sudo,curl,procps,adduser,netbase,linux-image-amd64

CACHE=${WEFT_CI_CACHE:-/var/cache/weft-ci}
MIRROR=${WEFT_CI_MIRROR:-http://deb.debian.org/debian}
KEY=$( { echo "$SUITE $PACKAGES"; cat "$0"; } | sha256sum | cut -c1-16)
DIR=$CACHE/hosts-$KEY

mkdir -p "$CACHE"
exec 9>"$CACHE/hosts-$KEY.lock"
flock 9

configure() {
  local root=$1 pub=$2
  echo weft-host >"$root/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 weft-host\n::1 localhost\n' >"$root/etc/hosts"
  # No fstab entry for /: qemu mounts it rw from the kernel command line,
  # and in a container systemd-remount-fs fails on any root entry.
  : >"$root/etc/fstab"
  # systemd-networkd: DHCP on the VM's eth0 (slirp); a container gets a
  # static host0 file bound over 10-host0.network at boot.
  mkdir -p "$root/etc/systemd/network" "$root/etc/systemd/system/multi-user.target.wants"
  printf '[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n' >"$root/etc/systemd/network/20-eth0.network"
  ln -sf /lib/systemd/system/systemd-networkd.service \
    "$root/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
  # Nothing waits for a network the hosts may not have (no DHCP server).
  ln -sf /dev/null "$root/etc/systemd/system/systemd-networkd-wait-online.service"
  # Every boot is a fresh machine: systemd makes a new id (each host must
  # differ: journald, DHCP client ids).
  : >"$root/etc/machine-id"
  rm -f "$root/var/lib/dbus/machine-id"
  # No background apt runs holding the dpkg lock while a test installs.
  for t in apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$t"
  done
  # Root logs in with the generated key (the tests and Ansible's default);
  # `ci` is an unprivileged user with passwordless sudo for `become`.
  install -d -m 700 "$root/root/.ssh"
  install -m 600 "$pub" "$root/root/.ssh/authorized_keys"
  chroot "$root" useradd -m -s /bin/bash ci
  install -d -m 700 -o 1000 -g 1000 "$root/home/ci/.ssh"
  install -m 600 -o 1000 -g 1000 "$pub" "$root/home/ci/.ssh/authorized_keys"
  echo 'ci ALL=(ALL) NOPASSWD:ALL' >"$root/etc/sudoers.d/ci"
  chmod 440 "$root/etc/sudoers.d/ci"
  # The SSH host keys openssh-server made at install are shared by every
  # host booted from this root: none generates its own at boot, and the
  # tests do not pin them.
  # No DNS server is reachable from a host; the tests bind their own.
  : >"$root/etc/resolv.conf"
  # sshd answers at once: no reverse DNS of the client.
  echo 'UseDNS no' >"$root/etc/ssh/sshd_config.d/weft-ci.conf"
  # Space: apt lists and caches, docs, man pages (~120 MB).
  rm -rf "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
}

if [ ! -f "$DIR/done" ]; then
  command -v debootstrap >/dev/null || { echo "rootfs.sh: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
  start=$(date +%s)
  # A build killed half-way may have left debootstrap's /proc and /sys
  # mounted in its folder: unmount them before removing it.
  { grep -o " $DIR.tmp/[^ ]*" /proc/mounts || true; } | sort -r | xargs -r umount -l
  rm -rf --one-file-system "$DIR" "$DIR.tmp"
  mkdir -p "$DIR.tmp"
  ssh-keygen -q -t ed25519 -N '' -C weft-ci -f "$DIR.tmp/id_ed25519"
  # Downloaded .debs are kept apart from the root, so that editing this
  # script rebuilds without downloading again.
  mkdir -p "$CACHE/debs"
  debootstrap --variant=minbase --cache-dir="$CACHE/debs" --include="$PACKAGES" \
    "$SUITE" "$DIR.tmp/rootfs" "$MIRROR" \
    >"$DIR.tmp/debootstrap.log" 2>&1 || { tail -30 "$DIR.tmp/debootstrap.log" >&2; exit 1; }
  configure "$DIR.tmp/rootfs" "$DIR.tmp/id_ed25519.pub"
  cp "$DIR.tmp"/rootfs/boot/vmlinuz-* "$DIR.tmp/vmlinuz"
  cp "$DIR.tmp"/rootfs/boot/initrd.img-* "$DIR.tmp/initrd.img"
  echo "$(($(date +%s) - start))" >"$DIR.tmp/build-seconds"
  touch "$DIR.tmp/done"
  mv "$DIR.tmp" "$DIR"
  echo "rootfs.sh: built $DIR in $(cat "$DIR/build-seconds") s" >&2
fi

if [ "${1:-}" = qemu ] && [ ! -f "$DIR/base.qcow2" ]; then
  # A disk image without loop mounts: mkfs.ext4 -d copies the folder in.
  mkfs.ext4 -q -F -L vmroot -d "$DIR/rootfs" "$DIR/base.raw" 2G
  qemu-img convert -O qcow2 "$DIR/base.raw" "$DIR/base.qcow2.tmp"
  rm -f "$DIR/base.raw"
  mv "$DIR/base.qcow2.tmp" "$DIR/base.qcow2"
fi

echo "$DIR"
