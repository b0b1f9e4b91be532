"""PAM hook (``pam_exec``) for password attempts: wait as long as the daemon says.

The daemon counts recent failures per source address; after a few, each further
attempt from that address is slowed. Accounts are never locked by failures, so an
attacker on the network cannot lock the customer out. Always succeeds (it only waits).
"""

from __future__ import annotations

import os
import socket
import time

from hsmctl.appliance import paths, protocol


def main() -> int:
    source = os.environ.get("PAM_RHOST", "")
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2)
        sock.connect(str(paths.SOCKET))
        protocol.send(sock, {"type": "backoff", "source": source})
        reply = protocol.recv(sock.makefile("rb")) or {}
        sock.close()
        delay = float(reply.get("delay", 0))
    except (OSError, ValueError):
        delay = 1.0  # the daemon is unreachable: be slow rather than fast
    if delay > 0:
        time.sleep(min(delay, 8.0))
    return 0
