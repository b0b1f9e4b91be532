#!/usr/bin/env bash
# Build the key-policy PKCS#11 module (policy.c) into OUTPUT (a .so path).
# Usage: build.sh OUTPUT. Needs gcc, the PKCS#11 header of libp11-kit-dev and libssl-dev
# (libcrypto: the OAEP decoding of BYOK wrapping keys).
set -euo pipefail

if (($# != 1)); then
  echo "usage: $0 OUTPUT.so" >&2
  exit 2
fi
out=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cflags=(
  -shared -fPIC -O2 -Wall -Wextra -Werror -std=gnu11
  -fvisibility=hidden -fstack-protector-strong -D_FORTIFY_SOURCE=2
  "-Wl,-z,relro" "-Wl,-z,now" "-Wl,-z,noexecstack"
  -I/usr/include/p11-kit-1
)
gcc "${cflags[@]}" -o "$out" "$here/policy.c" -ldl -lpthread -lcrypto
