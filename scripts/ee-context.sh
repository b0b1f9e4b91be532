#!/usr/bin/env bash
# The execution environment's build context (execution-environment.yml): the hsmctl
# wheel and the hsmctl.fleet collection into dist/, then `ansible-builder create` into
# build/ee (or $1). Building the image from it needs quay.io, which this machine cannot
# reach; run `podman build` / `ansible-builder build` where the registry is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${VENV_BIN:-$(pwd)/.venv/bin}
context=${1:-build/ee}
rm -f dist/hsmctl-*.whl dist/hsmctl-fleet-*.tar.gz
mkdir -p dist
"$bin/pip" wheel -q --no-deps -w dist .
rm -rf build/lib build/bdist.* # setuptools' in-tree build directories
empty=$(mktemp --suffix=.cfg)
trap 'rm -f "$empty"' EXIT
ANSIBLE_CONFIG="$empty" "$bin/ansible-galaxy" collection build \
  hsmctl/ansible_collections/hsmctl/fleet --output-path dist >/dev/null
"$bin/ansible-builder" create -f execution-environment.yml --context "$context" \
  --output-filename Containerfile
echo "build context: $context (image: podman build -t hsmctl-ee $context)"
