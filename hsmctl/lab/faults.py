"""Lab-only hardware faults and the lab's sensor path (the emulated BMC).

``inject`` runs the appliance's own sensor module (:mod:`hsmctl.appliance.sensors`) as
root on the console, the way a technician's test rig would; ``read`` is the lab's
out-of-band sensor reading: the appliance's root-only register file, read from outside the
device like a baseboard management controller reads its sensors, with no process and no
account on the appliance. Both need root and a lab that is up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hsmctl.appliance import sensors
from hsmctl.errors import CommandFailed, UnreachableError, UsageError
from hsmctl.lab import control
from hsmctl.lab.workdir import require_root, up_state

KINDS = (*sensors.FAULTS, "clear")
_RUN = (
    "import sys; sys.path.insert(0, '/opt/hsmctl/lib'); "
    "from hsmctl.appliance.sensors import main; sys.exit(main())"
)


def inject(appliance: str, kind: str) -> dict[str, Any]:
    """Inject ``kind`` (or ``clear`` every fault) on ``appliance``; its new readings."""
    if kind not in KINDS:
        raise UsageError(f"unknown fault {kind!r} (known: {', '.join(KINDS)})")
    argv = ["fault", kind] if kind != "clear" else ["clear"]
    proc = control.console(appliance, ["/usr/bin/python3", "-I", "-c", _RUN, *argv])
    if proc.returncode != 0:
        raise CommandFailed(
            f"{appliance}: fault {kind}: {proc.stderr.decode(errors='replace').strip()}",
            argv=argv,
            status=proc.returncode,
        )
    readings: dict[str, Any] = json.loads(proc.stdout)
    return {"appliance": appliance, "fault": kind, "sensors": readings}


class LabSensors:
    """The lab's out-of-band sensor driver: ``read(appliance)`` -> readings."""

    def __init__(self) -> None:
        require_root()
        self._pids: dict[str, int] = {
            k: int(v) for k, v in (up_state().get("init_pids") or {}).items()
        }

    def read(self, appliance: str) -> dict[str, Any]:
        pid = self._pids.get(appliance)
        if pid is None:
            raise UnreachableError(f"{appliance}: no such appliance in the lab (out of band)")
        path = Path(f"/proc/{pid}/root") / sensors.SENSORS.relative_to("/")
        try:
            text: str | None = path.read_text()
        except FileNotFoundError:
            if not Path(f"/proc/{pid}/root").exists():
                raise UnreachableError(f"{appliance}: its console does not answer") from None
            text = None
        return sensors.parse(text)
