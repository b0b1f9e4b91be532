#!/usr/bin/env bash
# Install the Debian packages hsmctl, its lab and its tests need. Quiet and fast when
# everything is already there: apt is only touched when a package is missing.
set -euo pipefail

# --vm: also what the Vagrant tier needs (libvirt, QEMU, vagrant-libvirt; issue 16).
# libvirt-daemon-system-sysv: the lab hosts run no systemd as PID 1.
vm=0
if [[ ${1:-} == --vm ]]; then vm=1; fi

packages=(
  openssh-server openssh-client sshpass netcat-openbsd
  softhsm2 opensc p11-kit libp11-kit-dev libengine-pkcs11-openssl
  gcc libc6-dev libssl-dev iproute2 util-linux procps
  debootstrap debian-archive-keyring
  python3 python3-venv python3-dev
  shellcheck vagrant systemd strace logrotate
  postgresql
)

if ((vm)); then
  packages+=(vagrant-libvirt libvirt-daemon-system libvirt-daemon-system-sysv libvirt-clients
             dnsmasq-base ebtables iptables qemu-system-x86 qemu-utils e2fsprogs)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: missing Debian packages (${missing[*]}); run as root" >&2
    exit 2
  fi
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
