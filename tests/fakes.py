"""Stand-ins for the parts a unit test cannot run (the lab tests use the real ones): a
device console answering like the firmware, a network fabric, and the firmware's
recorded replies. One place, so every unit test fakes a device the same way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hsmctl.contract import OwnerState
from hsmctl.device import HsmInfo, Switch

RECORDED = Path(__file__).parent / "unit" / "data" / "device"


def hsm_info(owner: OwnerState, monitor: Switch = Switch.ENABLED) -> HsmInfo:
    """``hsm show`` as the firmware answers it (tests/unit/data/device/hsm-show.json)."""
    return HsmInfo(
        id="a1",
        model="hsmctl-softhsm2",
        firmware="7.8.4-hsmctl",
        initialised=False,
        owner_state=owner,
        provider_access=owner is not OwnerState.CUSTOMER_OWNED,
        monitor=monitor,
        objects=0,
    )


def recorded(command: str, state: str = "") -> dict[str, Any]:
    """A reply recorded from the firmware (tests/unit/data/device/)."""
    name = command.replace(" ", "-") + (f".{state}" if state else "") + ".json"
    case = json.loads((RECORDED / name).read_text())
    reply: dict[str, Any] = json.loads(case["output"])
    return reply


class FakeConsole:
    """Stands in for the out-of-band path (the lab test uses the real one): a device
    that answers like the firmware and whose console fails once on demand."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import ed25519
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        def key() -> str:
            pub = ed25519.Ed25519PrivateKey.generate().public_key()
            return pub.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()

        self.keys = [key(), key()]
        self.reset = False
        self.resets = 0
        self.fail_next_hsm_show = True

    def run(self, appliance: str, line: str, stdin: bytes | None = None) -> Any:
        from hsmctl.provider.drivers import ConsoleResult

        n = 1 if self.reset else 0
        out: Any
        if line == "sysconf factory-reset":
            self.reset, self.resets = True, self.resets + 1
            out = "factory reset done"
        elif line == "hsm show":
            if self.fail_next_hsm_show:
                self.fail_next_hsm_show = False
                return ConsoleResult(1, "", "console: no answer")
            out = recorded("hsm show", "customer-owned") | {"id": appliance}
            if self.reset:
                out = recorded("hsm show") | {"id": appliance, "audit_key_id": f"k{n}"}
        elif line == "audit key show":
            out = recorded("audit key show") | {"key_id": f"k{n}"}
        elif line == "sysconf hostkey show":
            out = recorded("sysconf hostkey show") | {"active_keys": [self.keys[n]]}
        elif line.startswith("audit show"):
            rec = {
                "seq": 7,
                "hash": "h7",
                "time": "t",
                "event": "result",
                "outcome": "ok",
                "detail": {
                    "command": "sysconf factory-reset",
                    "old_key_id": "k0",
                    "new_key_id": "k1",
                },
            }
            out = "\n".join([json.dumps(rec)] if self.reset else [])
        else:
            return ConsoleResult(64, "", f"unexpected {line}")
        return ConsoleResult(0, out if isinstance(out, str) else json.dumps(out), "")


class FakeFabric:
    def __init__(self) -> None:
        self.detached: list[str] = []

    def attach(self, appliance: str, tenant: str, vnet: str, subnet: str) -> None:
        raise AssertionError("deprovisioning never attaches")

    def detach(self, appliance: str) -> None:
        self.detached.append(appliance)
