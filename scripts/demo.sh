#!/usr/bin/env bash
# The main flow, end to end, on the namespace lab (make demo). Prints what happens.
set -euo pipefail
cd "$(dirname "$0")/.."
hsmctl=.venv/bin/hsmctl

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Bring the lab up: 2 tenants, 4 appliances over 2 stamps"
"$hsmctl" lab up --tenants 2 --appliances 4

step "Talk to an appliance as the provider (management interface, pinned host key)"
key=$("$hsmctl" lab status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["provider_key"])')
ssh -i "$key" -o UserKnownHostsFile="$(dirname "$key")/known_hosts" -o StrictHostKeyChecking=yes \
    -o BatchMode=yes provider@198.18.0.11 'hsm show'

step "The device's activity log verifies (hash chain and signed checkpoints)"
"$hsmctl" lab console hsm01 -- hsmsh -c 'audit verify'

printf '\nThe lab stays up for you to explore; "%s lab down" removes it.\n' "$hsmctl"
