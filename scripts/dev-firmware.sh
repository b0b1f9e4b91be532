#!/usr/bin/env bash
# Developer aid: put the working tree's firmware (hsmctl/appliance, hsmctl/auditlog, the
# key-policy module built from policy.c) on the named lab appliances only, without a
# `lab down` + `lab up` that would disturb everyone else's appliances.
#
#   sudo scripts/dev-firmware.sh hsm41 hsm42
#   sudo FIRMWARE_REF=HEAD scripts/dev-firmware.sh hsm41   # a commit's firmware instead
#
# The snapshot is unpacked into each appliance's own root (a fresh directory each time),
# bind-mounted over /opt/hsmctl/lib inside that appliance only, and its device daemon is
# restarted (hsm-boot restarts it within about a second). New logins and PKCS#11 sessions
# run the new code. The next `lab up` puts the committed tree on every appliance again.
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 APPLIANCE..." >&2; exit 2; }
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
lab=/var/lib/hsmctl-lab
stamp=$(date +%s%N)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

src=$here
if [[ -n ${FIRMWARE_REF:-} ]]; then
  src=$tmp/src
  mkdir -p "$src"
  git -C "$here" archive "$FIRMWARE_REF" hsmctl | tar -C "$src" -xf -
fi

"$py" - "$tmp/out" "$src" <<'EOF'
import shutil, sys
from pathlib import Path
from hsmctl.lab import firmware
dest = Path(sys.argv[1]) / "hsmctl"
dest.mkdir(parents=True)
src = Path(sys.argv[2]) / "hsmctl"
for name in firmware.FIRMWARE_FILES:
    path = src / name
    if path.is_dir():
        shutil.copytree(path, dest / name, ignore=firmware.FIRMWARE_IGNORE)
    else:
        shutil.copy2(path, dest / name)
firmware._build_policy_module(dest / "appliance" / "p11")
firmware.compile_bytecode(dest)
EOF

for id in "$@"; do
  [[ -d $lab/appliances/$id ]] || { echo "no appliance $id in the lab" >&2; exit 2; }
  tar -C "$tmp/out" -cf - hsmctl | "$here/.venv/bin/hsmctl" lab console "$id" -- sh -euc "
    d=/var/lib/hsm-dev-firmware/$stamp
    mkdir -p \$d
    tar -C \$d -xf -
    chmod -R go-w \$d
    mount --bind \$d/hsmctl /opt/hsmctl/lib/hsmctl
    mount -o remount,bind,ro /opt/hsmctl/lib/hsmctl
    pkill -f '^/usr/bin/python3 -I /usr/local/sbin/hsm[d]' || true
    sleep 1.5; test -S /run/hsm/hsmd.sock || sleep 2"
  echo "$id: firmware from ${FIRMWARE_REF:-the working tree} ($stamp)"
done
