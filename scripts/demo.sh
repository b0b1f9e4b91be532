#!/usr/bin/env bash
# The main flow, end to end, on the namespace lab (make demo). Prints what happens.
set -euo pipefail
cd "$(dirname "$0")/.."
hsmctl=$PWD/.venv/bin/hsmctl

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d$1)"; }

step "1. The lab: a provider network, 2 tenant networks, 4 appliances over 2 stamps"
if "$hsmctl" lab status >/dev/null 2>&1; then
  echo "(a lab is already up; using it)"
  "$hsmctl" lab status
else
  "$hsmctl" lab up --tenants 2 --appliances 4
fi
client=$("$hsmctl" lab status --json | json '["tenants"][0]["client_netns"]')

step "2. Provider: provision an appliance into tenant1's delegated subnet (ansible-runner)"
"$hsmctl" provision --tenant tenant1 --vnet vnet1 --subnet hsm --request-id demo-tenant1 --json \
  > /tmp/hsmctl-demo-provision.json
cat /tmp/hsmctl-demo-provision.json; echo
appliance=$(json '["appliance"]' < /tmp/hsmctl-demo-provision.json)
handoff=$(json '["handoff"]' < /tmp/hsmctl-demo-provision.json)
"$hsmctl" fleet list

step "3. Customer (inside tenant1's network): take $appliance over"
ip netns exec "$client" "$hsmctl" takeover --handoff "$handoff" --json > /tmp/hsmctl-demo-takeover.json
cat /tmp/hsmctl-demo-takeover.json; echo
receipt=$(json '["receipt"]' < /tmp/hsmctl-demo-takeover.json)
ip netns exec "$client" "$hsmctl" takeover verify "$receipt"

step "4. Provider: the management interface now refuses the provider's key"
key=$("$hsmctl" lab status --json | json '["provider_key"]')
mgmt=$("$hsmctl" lab status --json | json "[\"appliances\"][[a['id'] for a in d['appliances']].index('$appliance')][\"mgmt_ip\"]")
if ssh -i "$key" -o UserKnownHostsFile="$(dirname "$key")/known_hosts" -o StrictHostKeyChecking=yes \
     -o BatchMode=yes "provider@$mgmt" 'hsm show' 2>&1; then
  echo "UNEXPECTED: the provider key still works" >&2
  exit 1
else
  echo "provider key refused, as it must be"
fi

step "5. Provider: health through the monitoring path; the store learns who owns it"
"$hsmctl" health "$appliance" || true
"$hsmctl" fleet list

step "6. The device's activity log verifies (hash chain, signed checkpoints, key rotations)"
"$hsmctl" lab console "$appliance" -- hsmsh -c 'audit verify'

step "7. Customer: collect the activity log as the least-privileged audit account, verify it"
ip netns exec "$client" "$hsmctl" logs collect --appliance "$appliance" --json; echo
ip netns exec "$client" "$hsmctl" logs verify "$appliance"

step "8. The ownership transfer, as the device recorded it"
ip netns exec "$client" "$hsmctl" logs export "$appliance" | python3 -c '
import json, sys
shown = {"personalised", "ownership-transfer", "key-rotation", "login", "escape-attempt"}
for line in sys.stdin:
    r = json.loads(line)
    d = r["detail"]
    if r["event"] in shown or (r["event"] == "command" and r["actor"] == "admin"):
        what = d.get("command") or d.get("reason") or d.get("method") or ""
        print("%5d %s %-8s %-18s %-7s %s" % (r["seq"], r["time"][:19], r["actor"], r["event"],
                                          r["outcome"], what))
'

printf '\nThe lab stays up for you to explore; "%s lab down" removes it.\n' "$hsmctl"
