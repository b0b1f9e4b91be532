"""Emulated hardware sensors: temperature, two power supplies, fans (issue 15).

A real appliance exposes these through its baseboard management controller, to the
serial console and the BMC, never to an account on the device: a provider reads them
out of band (Azure polls every device's serial console). Here the "hardware registers"
are one root-only file, :data:`SENSORS`, that this module writes when a fault is injected
or cleared (lab only: ``hsmctl lab fault ID psu1|psu2|temp|fan|off|clear``); a missing
file is healthy hardware. The lab's out-of-band driver reads the file from outside the
appliance (like a BMC, it needs nothing of the device's OS); ``hsm-sensors show`` on the
console prints the same readings::

    hsmctl lab console hsm31 -- python3 -I -c '...sensors import main...' show

:func:`readings` is pure and shared by both sides, so the console and the driver agree.
``off`` stands for a device that does not answer: its management and data links are set
down (the BMC still answers, and says so); ``clear`` sets them up again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SENSORS = Path("/var/lib/hsm/state/sensors.json")
FAULTS = ("psu1", "psu2", "temp", "fan", "off")
LINKS = ("mgmt0", "data0")

NOMINAL_TEMP_C = 38.0
FAULT_TEMP_C = 92.0
TEMP_LIMIT_C = 75.0
FAN_RPM = 9600
FANS = ("fan1", "fan2", "fan3", "fan4")


def readings(faults: Iterable[str]) -> dict[str, Any]:
    """The sensor readings of hardware with ``faults`` (pure)."""
    f = set(faults)
    off = "off" in f
    return {
        "power": "off" if off else "on",
        "temperature_c": FAULT_TEMP_C if "temp" in f else NOMINAL_TEMP_C,
        "temperature_limit_c": TEMP_LIMIT_C,
        "psu": {
            "psu1": "failed" if "psu1" in f else "ok",
            "psu2": "failed" if "psu2" in f else "ok",
        },
        "fans": {name: (0 if ("fan" in f and name == FANS[0]) else FAN_RPM) for name in FANS},
        "faults": sorted(f),
    }


def parse(text: str | None) -> dict[str, Any]:
    """The readings from the register file's text (None: no file, healthy hardware)."""
    if not text:
        return readings(())
    data = json.loads(text)
    faults = data.get("faults", []) if isinstance(data, dict) else []
    return readings(x for x in faults if x in FAULTS)


def _state() -> dict[str, Any]:
    try:
        data = json.loads(SENSORS.read_text())
    except FileNotFoundError:
        return {"faults": [], "restore": []}
    return data if isinstance(data, dict) else {"faults": [], "restore": []}


def _current() -> set[str]:
    return {x for x in _state().get("faults", []) if x in FAULTS}


def _write(faults: set[str], restore: Sequence[str] = ()) -> None:
    SENSORS.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = SENSORS.with_name(f".{SENSORS.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps({"faults": sorted(faults), "restore": list(restore)}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, SENSORS)


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


def _links_up() -> list[str]:
    """The links of :data:`LINKS` that are administratively up now."""
    return [
        link
        for link in LINKS
        if "UP" in _ip("-o", "link", "show", link).stdout.split(">", 1)[0].split("<")[-1].split(",")
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """``show`` | ``fault KIND`` | ``clear`` (root, on the console)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["show"]:
        print(json.dumps(readings(_current()), sort_keys=True))
        return 0
    if len(args) == 2 and args[0] == "fault" and args[1] in FAULTS:
        state = _state()
        faults = _current() | {args[1]}
        restore = list(state.get("restore", []))
        if args[1] == "off" and "off" not in _current():
            restore = _links_up()  # the links to bring back up at ``clear``
        _write(faults, restore)
        if args[1] == "off":
            for link in LINKS:
                _ip("link", "set", link, "down")
        print(json.dumps(readings(faults), sort_keys=True))
        return 0
    if args == ["clear"]:
        state = _state()
        if "off" in _current():
            for link in state.get("restore", []):
                if link in LINKS:
                    _ip("link", "set", link, "up")
        _write(set())
        print(json.dumps(readings(()), sort_keys=True))
        return 0
    print(f"usage: sensors show | fault {'|'.join(FAULTS)} | clear", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
