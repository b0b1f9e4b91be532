#!/usr/bin/env bash
# Turn a Debian 12 system into an hsmctl appliance at factory state (SPEC §3).
#
# One script for both worlds: Vagrant runs it inside each appliance VM, and the lab runs
# it once inside a debootstrap'd bookworm root to make the golden image that every lab
# appliance overlays. Factory state means: four accounts (provider, monitor, admin,
# audit) with the restricted shell as login shell, monitor and audit locked, no keys or
# passwords anywhere, no SSH host keys, an uninitialised customer token. Everything that
# is per device (host keys, audit key, provider key) is made later by
# personalisation (`hsm-boot`), never here.
#
# Usage: appliance-image.sh [--firmware DIR]
#   --firmware DIR  copy the device side of hsmctl (the hsmctl/ package) from DIR into
#                   /opt/hsmctl/lib and build its key-policy PKCS#11 module there (a
#                   compiler is installed for that and removed again); the lab
#                   bind-mounts a firmware snapshot at boot instead, with the module
#                   built on the host by `hsmctl lab up` (hsmctl/lab/lab.py).
set -euo pipefail

firmware=""
while (($#)); do
  case "$1" in
    --firmware) firmware="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "appliance-image: unknown argument $1" >&2; exit 2 ;;
  esac
done

export DEBIAN_FRONTEND=noninteractive
packages=(openssh-server softhsm2 opensc p11-kit python3 python3-pykcs11
          python3-cryptography python3-cffi-backend iproute2 procps passwd libpam-modules)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The stock sshd must never run: the appliance runs its own two instances.
if [[ -d /run/systemd/system ]]; then
  systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true
  systemctl mask ssh.service ssh.socket >/dev/null 2>&1 || true
fi
rm -f /etc/ssh/ssh_host_*

install -d -m 0755 /etc/hsm /opt/hsmctl/lib /var/lib/hsm/home
install -d -m 0755 -o root -g root /etc/hsm/authorized_keys
install -d -m 0700 /var/lib/hsm/state /var/lib/softhsm/tokens
install -d -m 0750 /var/log/hsm
install -d -m 0755 /etc/ssh/mgmt /etc/ssh/data

# Restricted shell, daemon and boot entry points. -I: no PYTHON* variables, no user site.
# -S as well (no site module, no dist-packages) for the per-command and per-session
# entries, which import only the standard library and /opt/hsmctl/lib: the site module is
# ~3 of the ~10 ms of CPU a Python start costs, and hsmsh starts for every device command.
for entry in hsmsh:hsmctl.appliance.shell:-IS hsmd:hsmctl.appliance.daemon:-I \
             hsm-boot:hsmctl.appliance.boot:-I hsm-p11:hsmctl.appliance.p11entry:-IS; do
  name=${entry%%:*}
  rest=${entry#*:}
  module=${rest%%:*}
  flags=${rest#*:}
  cat > "/usr/local/sbin/$name" <<PY
#!/usr/bin/python3 ${flags}
import sys
sys.path.insert(0, "/opt/hsmctl/lib")
from ${module} import main
sys.exit(main())
PY
  chmod 0755 "/usr/local/sbin/$name"
done
for shell in hsmsh hsm-p11; do
  grep -qx "/usr/local/sbin/$shell" /etc/shells || echo "/usr/local/sbin/$shell" >> /etc/shells
done

if [[ -n "$firmware" ]]; then
  rm -rf /opt/hsmctl/lib/hsmctl
  cp -r "$firmware" /opt/hsmctl/lib/hsmctl
  find /opt/hsmctl/lib -name __pycache__ -prune -exec rm -rf {} +
  p11=/opt/hsmctl/lib/hsmctl/appliance/p11
  if [[ -f "$p11/policy.c" && ! -f "$p11/hsm-policy.so" ]]; then
    # Only for the build: an appliance carries no compiler.
    build_deps=(gcc libc6-dev libp11-kit-dev libssl-dev)
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${build_deps[@]}" >/dev/null
    bash "$p11/build.sh" "$p11/hsm-policy.so"
    apt-get purge -y -qq --auto-remove "${build_deps[@]}" >/dev/null
  fi
fi

# Accounts. '*' = no password can match; expired = locked even for keys (pam_unix
# account checks expiry under UsePAM, whatever the authentication method).
for user in provider monitor admin audit; do
  if ! id "$user" >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir "/var/lib/hsm/home/$user" \
            --shell /usr/local/sbin/hsmsh --user-group "$user"
  fi
  install -d -m 0755 -o root -g root "/var/lib/hsm/home/$user"
  usermod --password '*' --shell /usr/local/sbin/hsmsh "$user"
  rm -f "/etc/hsm/authorized_keys/$user"
done
usermod --expiredate 1 monitor
usermod --expiredate 1 audit
usermod --expiredate 1 admin
usermod --expiredate '' provider
passwd -l root >/dev/null
# Application clients (p11-NAME, made by `client register`) share this group: the data
# sshd forces it onto the PKCS#11 entry, the management sshd refuses it.
getent group hsm-p11 >/dev/null || groupadd --system hsm-p11

# SoftHSM: tokens belong to root (the device daemon); sessions never open them.
cat > /etc/softhsm/softhsm2.conf <<'CONF'
directories.tokendir = /var/lib/softhsm/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
chmod 0600 /etc/softhsm/softhsm2.conf
rm -rf /var/lib/softhsm/tokens/*

# PAM for sshd: login uid is optional in containers; slow failed logins per source.
sed -i -E 's/^(session\s+)required(\s+pam_loginuid\.so)/\1optional\2/' /etc/pam.d/sshd
# No Debian message of the day (pam_motd runs run-parts /etc/update-motd.d, five
# processes, in every SSH session: ~10 ms of the device's CPU a connection, and it showed
# the kernel's uname to whoever logged in) and no mail check: an appliance has neither.
sed -i -E '/^\s*session\s+\S+\s+pam_(motd|mail)\.so/d' /etc/pam.d/sshd
if ! grep -q hsm-backoff /etc/pam.d/sshd; then
  sed -i '1i auth optional pam_exec.so quiet /usr/local/sbin/hsm-backoff' /etc/pam.d/sshd
fi
cat > /usr/local/sbin/hsm-backoff <<'SH'
#!/bin/sh
# Per-source back-off for password attempts: asks the device daemon how long to wait.
exec /usr/bin/python3 -I -S -c 'import sys; sys.path.insert(0, "/opt/hsmctl/lib"); from hsmctl.appliance.backoff import main; sys.exit(main())'
SH
chmod 0755 /usr/local/sbin/hsm-backoff

common_sshd() {
  cat <<CONF
Port 22
LogLevel VERBOSE
PermitRootLogin no
PubkeyAuthentication yes
KbdInteractiveAuthentication no
AuthorizedKeysFile /etc/hsm/authorized_keys/%u
UsePAM yes
StrictModes yes
AllowTcpForwarding no
AllowStreamLocalForwarding no
AllowAgentForwarding no
X11Forwarding no
PermitTunnel no
PermitUserRC no
PermitUserEnvironment no
GatewayPorts no
DisableForwarding yes
PrintMotd no
PrintLastLog no
MaxAuthTries 4
MaxSessions 4
LoginGraceTime 30
ClientAliveInterval 15
ClientAliveCountMax 4
HostKeyAlgorithms ssh-ed25519,ecdsa-sha2-nistp256
CONF
}

{
  echo "# Management interface (provider network): provider and monitor, keys only."
  common_sshd
  cat <<'CONF'
HostKey /etc/ssh/mgmt/ssh_host_ed25519_key
HostKey /etc/ssh/mgmt/ssh_host_ecdsa_key
PidFile /run/hsm/sshd-mgmt.pid
AllowUsers provider monitor
DenyGroups hsm-p11
PasswordAuthentication no
AuthenticationMethods publickey
SetEnv HSM_INTERFACE=mgmt
CONF
} > /etc/hsm/sshd_mgmt_config

{
  echo "# Data interface (tenant network): admin (key and password, always), audit (key),"
  echo "# application clients p11-NAME (key; the PKCS#11 service and nothing else)."
  common_sshd
  cat <<'CONF'
HostKey /etc/ssh/data/ssh_host_ed25519_key
HostKey /etc/ssh/data/ssh_host_ecdsa_key
PidFile /run/hsm/sshd-data.pid
AllowUsers admin audit p11-*
PasswordAuthentication yes
PermitEmptyPasswords no
AuthenticationMethods publickey
SetEnv HSM_INTERFACE=data
Match User admin
    AuthenticationMethods publickey,password
Match Group hsm-p11
    AuthenticationMethods publickey
    PasswordAuthentication no
    ForceCommand /usr/local/sbin/hsm-p11
    PermitTTY no
    DisableForwarding yes
    AllowTcpForwarding no
    AllowStreamLocalForwarding no
    AllowAgentForwarding no
    X11Forwarding no
    PermitTunnel no
CONF
} > /etc/hsm/sshd_data_config
chmod 0644 /etc/hsm/sshd_mgmt_config /etc/hsm/sshd_data_config

# In a VM, systemd runs the appliance's boot/supervisor; in the lab it is PID 1 of the
# appliance's PID namespace.
cat > /etc/systemd/system/hsm-appliance.service <<'UNIT'
[Unit]
Description=hsmctl appliance (device daemon and its two sshd instances)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
Environment=SOFTHSM2_CONF=/etc/softhsm/softhsm2.conf
ExecStart=/usr/local/sbin/hsm-boot
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
if [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload
  systemctl enable hsm-appliance.service >/dev/null
fi

echo "factory" > /etc/hsm/image-state
