"""Fault injection for the crash-safety tests (SPEC §7: "whatever step is interrupted").

Inert unless ``HSMCTL_FAULT_INJECT`` names a point: ``POINT`` or ``POINT:kill`` dies with
SIGKILL there, ``POINT:cut`` cuts the SSH connection's TCP socket there (nothing to cut
where no connection is open: then it does nothing). ``@MS`` after the action delays it by
that many milliseconds, so that it lands while the next remote command is in flight
(``send:hsm-init:kill@150``: the device has the command, we have no answer yet).

Points: ``before:STEP`` and ``after:STEP`` (the journal marked it done) around every step,
``send:CMD`` and ``sent:CMD`` around every device command (CMD: its words, dashed, without
option values), ``pending:password`` (journaled, the change not yet sent) and, with
``--client``, ``kit:NAME`` (the client's kit renamed into place, not yet journaled).

A point reached a second time in one run is named ``POINT#2`` (and so on), so every
occurrence can be targeted. The points are reported by :func:`reached` into
``HSMCTL_FAULT_TRACE`` when that is set (one line per point: its name,
``time.monotonic()`` and whether a connection was open, tab-separated), so a test can
first enumerate every point of a run (how long the command after it took, where a cut
has something to cut), then inject a fault at each.

The cut comes from outside the transport, as a network's would: :func:`cut` shuts down
the process's socket bound to the connection's ``local_address``; the SSH transport has
no test hook.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections import Counter
from typing import Any

ENV = "HSMCTL_FAULT_INJECT"
TRACE_ENV = "HSMCTL_FAULT_TRACE"

_seen: Counter[str] = Counter()


ACTIONS = ("kill", "cut")


def parse(wanted: str) -> tuple[str, str, float]:
    """``POINT[:ACTION[@MS]]`` -> (point, action, delay in seconds). Pure.

    Point names hold colons themselves (``before:escrow``), so the action is the last
    field, and only if it is one."""
    head, _, tail = wanted.rpartition(":")
    action, _, delay = tail.partition("@")
    if not head or action not in ACTIONS:
        return wanted, "kill", 0.0
    return head, action, float(delay) / 1000 if delay else 0.0


def cut(local_address: tuple[str, int] | None) -> bool:
    """Shut down (both ways) this process's TCP socket bound to ``local_address``: the SSH
    session on it fails at its next read or write as if the network had dropped. Whether
    one was found (a connection already closed has none; then nothing happens)."""
    if local_address is None:
        return False
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = os.dup(int(name))
        except OSError:
            continue  # the listing's own descriptor, or one closed meanwhile
        try:
            sock = socket.socket(fileno=fd)  # takes the duplicate; shutdown acts on the socket
        except OSError:
            with contextlib.suppress(OSError):
                os.close(fd)  # not a socket
            continue
        with sock, contextlib.suppress(OSError):
            if sock.type == socket.SOCK_STREAM and sock.getsockname()[:2] == local_address:
                sock.shutdown(socket.SHUT_RDWR)
                return True
    return False


def _act(action: str, connection: Any) -> None:
    if action == "cut":
        if connection is not None:
            cut(connection.local_address)
        return
    os.kill(os.getpid(), signal.SIGKILL)


def reached(point: str, connection: Any = None) -> None:
    _seen[point] += 1
    if _seen[point] > 1:
        point = f"{point}#{_seen[point]}"
    trace = os.environ.get(TRACE_ENV)
    if trace:
        with open(trace, "a", encoding="utf-8") as fh:
            fh.write(f"{point}\t{time.monotonic():.6f}\t{int(connection is not None)}\n")
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    name, action, delay = parse(wanted)
    if name != point:
        return
    if delay:
        timer = threading.Timer(delay, _act, (action, connection))
        timer.daemon = True
        timer.start()
        return
    _act(action, connection)
