"""``hsm-p11``: the only program a client account runs (its login shell and the data
sshd's forced command). It touches no token: it hands its stdin and stdout to ``hsmd``
(SCM_RIGHTS), which identifies the caller and serves PKCS#11 on them
(:mod:`p11service`), and waits until the daemon says the service has ended.

Whatever arguments sshd passes (``-c COMMAND``) are ignored: a client gets this one
service or nothing.

Every new PKCS#11 session waits for this program to hand its streams over (an HA group's
application waits for it after a failover), so the way there imports only built-in
modules (``_socket``, ``os``, ``sys``: no ``socket``, ``json``, ``pathlib``, which cost
tens of milliseconds on a loaded device and are compiled anew each time from the
read-only firmware). The messages on that way are fixed bytes (:mod:`protocol`'s encoding,
checked by tests/unit/test_p11entry.py); anything else the daemon says, and the final
result, are parsed by :mod:`protocol` as before. The daemon makes every check and writes
the log records; nothing of that is here.
"""

from __future__ import annotations

import _socket
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs milliseconds
    from typing import Any

SOCKET = "/run/hsm/hsmd.sock"  # paths.SOCKET (not imported: pathlib)
REQUEST = b'{"type":"p11"}\n'  # protocol.send(sock, {"type": "p11"})
SEND_FDS = b'{"type":"send-fds"}\n'  # the daemon's protocol.send(sock, {"type": "send-fds"})
MAX_LINE = (1 << 20) + 1  # protocol.MAX_MESSAGE + 1: what protocol.recv reads at most


def _line(sock: _socket.socket, buffered: bytearray) -> bytes:
    """One line (with its newline) or what came before EOF / the size bound."""
    while True:
        end = buffered.find(b"\n")
        if end >= 0:
            line = bytes(buffered[: end + 1])
            del buffered[: end + 1]
            return line
        if len(buffered) >= MAX_LINE:
            line = bytes(buffered[:MAX_LINE])
            del buffered[:MAX_LINE]
            return line
        chunk = sock.recv(65536)
        if not chunk:
            line = bytes(buffered)
            buffered.clear()
            return line
        buffered += chunk


def _parse(line: bytes) -> dict[str, Any] | None:
    """:func:`protocol.recv` on one line already read (None: malformed or EOF)."""
    import io

    from hsmctl.appliance import protocol

    try:
        return protocol.recv(io.BytesIO(line))
    except ValueError:
        return None


def _exit(name: str) -> int:
    from hsmctl.appliance import protocol

    return int(getattr(protocol, name))


def main(argv: list[str] | None = None) -> int:
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    except OSError:
        print("hsm-p11: the device daemon is not available", file=sys.stderr)
        return _exit("EXIT_UNAVAILABLE")
    try:
        try:
            sock.connect(SOCKET)
        except OSError:
            print("hsm-p11: the device daemon is not available", file=sys.stderr)
            return _exit("EXIT_UNAVAILABLE")
        buffered = bytearray()
        sock.sendall(REQUEST)
        try:
            line = _line(sock, buffered)
        except OSError:
            line = b""
        if line != SEND_FDS:  # the daemon's fixed encoding; anything else parsed in full
            reply = _parse(line)
            if reply is None or reply.get("type") != "send-fds":
                error = (reply or {}).get("error", "refused")
                print(f"hsm-p11: {error}", file=sys.stderr)
                return _exit("EXIT_DENIED")
        fds = (0).to_bytes(4, sys.byteorder) + (1).to_bytes(4, sys.byteorder)  # two C ints
        sock.sendmsg([b"F"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        # Only the service holds the session's streams now: when it ends, so does the
        # SSH channel, whatever happens to this process.
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        try:
            line = _line(sock, buffered)
        except OSError:
            line = b""
    finally:
        sock.close()
    reply = _parse(line)
    if reply is None or reply.get("type") != "result":
        return _exit("EXIT_FAILED")
    return int(reply.get("exit", _exit("EXIT_FAILED")))


if __name__ == "__main__":
    sys.exit(main())
