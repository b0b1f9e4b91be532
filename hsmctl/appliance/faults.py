"""Fault points in the firmware: where a test may have the device daemon die.

The lab tests prove that no crash of ``hsmd`` between two steps of a privileged change
leaves the device in a state that hands power back (the first ``user password``). A point
is armed by root writing its name, one per line, to ``/run/hsm/faults`` (the out-of-band
console is root; no session account can write there). An armed point fires once: it is
disarmed before the process kills itself, so the restarted daemon carries on.
"""

from __future__ import annotations

import contextlib
import os
import signal

from hsmctl.appliance import paths


def reached(point: str) -> None:
    """Die here with SIGKILL if ``point`` is armed; otherwise do nothing (one stat)."""
    try:
        armed = paths.FAULTS.read_text().split()
    except OSError:
        return
    if point not in armed:
        return
    rest = [p for p in armed if p != point]
    tmp = paths.FAULTS.with_name(f".{paths.FAULTS.name}.tmp")
    with contextlib.suppress(OSError):
        tmp.write_text("".join(f"{p}\n" for p in rest))
        os.replace(tmp, paths.FAULTS)
    os.kill(os.getpid(), signal.SIGKILL)
