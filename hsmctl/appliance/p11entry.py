"""``hsm-p11``: the only program a client account runs (its login shell and the data
sshd's forced command). It touches no token: it hands its stdin and stdout to ``hsmd``
(SCM_RIGHTS), which identifies the caller and serves PKCS#11 on them
(:mod:`p11service`), and waits until the daemon says the service has ended.

Whatever arguments sshd passes (``-c COMMAND``) are ignored: a client gets this one
service or nothing.
"""

from __future__ import annotations

import os
import socket
import sys

from hsmctl.appliance import paths, protocol


def main(argv: list[str] | None = None) -> int:
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(paths.SOCKET))
    except OSError:
        print("hsm-p11: the device daemon is not available", file=sys.stderr)
        return protocol.EXIT_UNAVAILABLE
    with sock, sock.makefile("rb") as replies:
        protocol.send(sock, {"type": "p11"})
        try:
            reply = protocol.recv(replies)
        except ValueError:
            reply = None
        if reply is None or reply.get("type") != "send-fds":
            error = (reply or {}).get("error", "refused")
            print(f"hsm-p11: {error}", file=sys.stderr)
            return protocol.EXIT_DENIED
        socket.send_fds(sock, [b"F"], [0, 1])
        # Only the service holds the session's streams now: when it ends, so does the
        # SSH channel, whatever happens to this process.
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        try:
            reply = protocol.recv(replies)
        except (ValueError, OSError):
            reply = None
    if reply is None or reply.get("type") != "result":
        return protocol.EXIT_FAILED
    return int(reply.get("exit", protocol.EXIT_FAILED))


if __name__ == "__main__":
    sys.exit(main())
