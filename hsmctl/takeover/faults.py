"""Fault injection for the crash-safety tests (SPEC §7: "whatever step is interrupted").

Inert unless ``HSMCTL_FAULT_INJECT`` names a point (``POINT`` or ``POINT:kill`` to die
with SIGKILL there, ``POINT:cut`` to cut the SSH connection's TCP socket there). The
points are reported by :func:`reached` into ``HSMCTL_FAULT_TRACE`` when that is set, so a
test can first enumerate every point of a run and then inject a fault at each.
"""

from __future__ import annotations

import os
import signal
from typing import Any

ENV = "HSMCTL_FAULT_INJECT"
TRACE_ENV = "HSMCTL_FAULT_TRACE"


def reached(point: str, connection: Any = None) -> None:
    trace = os.environ.get(TRACE_ENV)
    if trace:
        with open(trace, "a", encoding="utf-8") as fh:
            fh.write(point + "\n")
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    name, _, action = wanted.partition(":")
    if name != point:
        return
    if action == "cut" and connection is not None:
        connection.cut_for_test()
        return
    os.kill(os.getpid(), signal.SIGKILL)
