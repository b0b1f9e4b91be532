"""The wire between the restricted shell (and the PAM back-off hook) and the device daemon.

A Unix stream socket; each message is one JSON object on one line. The client sends one
request and reads replies until a ``result``. A reply may announce ``stream`` with a byte
count, in which case exactly that many raw bytes follow before the next JSON line (used by
``audit export`` so the log is copied with ``sendfile``, not re-encoded).

Who is asking is never taken from the message: the daemon reads the peer's credentials
from the socket (SO_PEERCRED).
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any, Protocol

from hsmctl import contract

MAX_MESSAGE = 1 << 20

# Device-shell exit statuses (sysexits.h where one fits).
EXIT_OK = contract.EXIT_OK
EXIT_FAILED = contract.EXIT_FAILED
EXIT_USAGE = contract.EXIT_USAGE
EXIT_DENIED = contract.EXIT_DENIED
EXIT_UNAVAILABLE = contract.EXIT_UNAVAILABLE
EXIT_INTEGRITY = contract.EXIT_INTEGRITY


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n")


class _Reader(Protocol):
    def readline(self, size: int = -1, /) -> bytes: ...


def recv(reader: _Reader) -> dict[str, Any] | None:
    line = reader.readline(MAX_MESSAGE + 1)
    if not line:
        return None
    if len(line) > MAX_MESSAGE or not line.endswith(b"\n"):
        raise ValueError("message too long or truncated")
    try:
        data = json.loads(line)
    except RecursionError as exc:  # a session may send anything: nesting is malformed
        raise ValueError("message nested too deeply") from exc
    if not isinstance(data, dict):
        raise ValueError("message is not an object")
    return data


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid
