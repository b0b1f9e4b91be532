#!/usr/bin/env bash
# `ansible-test sanity` on the built collection hsmctl.fleet, without containers: build
# it from the package's directory, install it into a temporary collections path, and run
# the sanity tests there with the virtualenv's ansible-test (--local; each test still gets
# a virtualenv of its own). ansible-test fetches get-pip.py from a host this machine
# cannot reach, so its cache (in a temporary HOME) gets scripts/get-pip-standin.py; the
# file name follows the pip ansible-core 2.19's ansible-test pins (24.2).
# The only ignores are the GPLv3 header checks (tests/sanity/ignore-2.19.txt): hsmctl is
# Apache-2.0.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bin=${VENV_BIN:-$root/.venv/bin}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export HOME="$tmp/home" ANSIBLE_CONFIG="$tmp/empty.cfg" PATH="$bin:$PATH"
: > "$ANSIBLE_CONFIG"
mkdir -p "$HOME/.ansible/test/cache"
cp scripts/get-pip-standin.py "$HOME/.ansible/test/cache/get_pip_24_2.py"
"$bin/ansible-galaxy" collection build hsmctl/ansible_collections/hsmctl/fleet \
  --output-path "$tmp/built" >/dev/null
ANSIBLE_COLLECTIONS_PATH="$tmp/collections" "$bin/ansible-galaxy" collection install \
  "$tmp"/built/hsmctl-fleet-*.tar.gz \
  -p "$tmp/collections" >/dev/null
cd "$tmp/collections/ansible_collections/hsmctl/fleet"
"$bin/ansible-test" sanity --local --python 3.11 "$@"
