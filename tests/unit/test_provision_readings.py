"""A served run's ``hsm show`` readings (issue 15: provisioning speed): ``verify`` reads
the device; ``monitor`` and ``handoff`` of the same run use that reading where it is
sound, and read the device again where the rule against re-issuing a one-time password
needs the device's state of now (the journal holds this request's hand-off as done).
Without a run's readings (plain ansible-playbook, AWX) every step reads the device.

The steps run against a stand-in connection that answers ``hsm show`` and records every
command, and a stand-in store whose journal is given."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hsmctl.contract import OwnerState
from hsmctl.device import Switch
from hsmctl.provider import provisioning
from hsmctl.provider.provisioning import ProvisionStep, Readings, StepOptions
from hsmctl.state.model import StepStatus

pytestmark = pytest.mark.unit

APPLIANCE = "unit01"


@dataclass
class Device:
    owner: OwnerState = OwnerState.FACTORY
    monitor: Switch = Switch.DISABLED
    commands: list[str] = field(default_factory=list)
    batches: list[list[str]] = field(default_factory=list)

    def run_batch(self, requests: Any) -> list[SimpleNamespace]:
        self.batches.append([command for command, _ in requests])
        return [self.run(command, stdin) for command, stdin in requests]

    def run(self, command: str, stdin: Any = ()) -> SimpleNamespace:
        self.commands.append(command)
        if command == "hsm show":
            reply = {"id": APPLIANCE, "model": "m", "firmware": "f", "initialised": False,
                     "owner_state": self.owner.value, "provider_access": True,
                     "monitor": self.monitor.value, "serial": "SN-1"}  # fmt: skip
            return SimpleNamespace(stdout=json.dumps(reply), stderr="", status=0)
        if command == "user enable monitor":
            self.monitor = Switch.ENABLED
        return SimpleNamespace(stdout="{}", stderr="", status=0)

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _ctx(device: Device, journal: list[tuple[str, dict[str, Any]]]) -> Any:
    entries = [
        SimpleNamespace(step=step, status=StepStatus.OK, detail=detail) for step, detail in journal
    ]
    state = SimpleNamespace(state=None)
    store = SimpleNamespace(journal=lambda **kw: entries, get_appliance=lambda a: state)
    return SimpleNamespace(
        management=lambda appliance: device,
        store=store,
        monitor_public_key=lambda: "ssh-ed25519 AAAA provider-monitor",
        state_dir=Path("/nowhere/state"),
    )


ALLOC: Any = SimpleNamespace(appliance=APPLIANCE, request_id="r-1", tenant="t1")


def _verified(device: Device) -> Readings:
    readings = Readings()
    provisioning.step_verify(_ctx(device, []), ALLOC, StepOptions(readings=readings))
    assert device.commands == ["hsm show"]
    device.commands.clear()
    return readings


def test_monitor_uses_verify_reading_of_the_run() -> None:
    device = Device()
    readings = _verified(device)
    opts = StepOptions(readings=readings)
    ctx = _ctx(device, [])
    result = provisioning.step_monitor(ctx, ALLOC, opts)
    assert result["changed"] is True
    assert device.commands == ["user credential set monitor", "user enable monitor"]
    assert device.batches == [device.commands]  # one exec, one device session
    # The run's reading follows the change it made: a second monitor step (a rerun of
    # the task in the same run) with the step journaled changes nothing, asks nothing.
    device.commands.clear()
    again = provisioning.step_monitor(
        _ctx(device, [(ProvisionStep.MONITOR.value, {})]),
        ALLOC,
        opts,
    )
    assert again["changed"] is False and device.commands == []


def test_without_readings_every_step_asks_the_device() -> None:
    device = Device()
    provisioning.step_verify(_ctx(device, []), ALLOC, StepOptions())
    provisioning.step_monitor(_ctx(device, []), ALLOC, StepOptions())
    checked = StepOptions(check=True)
    provisioning.step_handoff(_ctx(device, []), ALLOC, checked)
    assert device.commands.count("hsm show") == 3


def test_handoff_not_yet_done_uses_the_reading() -> None:
    """The journal holds no finished hand-off: the action is ISSUE whatever the device
    says; the reading gives `reissued` (what verify saw). Check mode: nothing changes."""
    device = Device(owner=OwnerState.PROVISIONED)  # an interrupted hand-off's password
    readings = _verified(device)
    opts = StepOptions(check=True, readings=readings)
    result = provisioning.step_handoff(_ctx(device, []), ALLOC, opts)
    assert result["changed"] is True and result["reissued"] is True
    assert device.commands == []


def test_handoff_done_reads_the_device_now() -> None:
    """The journal holds this request's hand-off as done: the device's state of now
    decides. Here verify's reading (factory) is stale: the hand-off finished since (by
    another orchestrator host). Taken from the reading, the step would issue a second
    password; read now, it keeps the one the tenant may hold."""
    device = Device()
    readings = _verified(device)
    device.owner = OwnerState.PROVISIONED
    done = [(ProvisionStep.HANDOFF.value, {"handoff": "/elsewhere/b.json"})]
    for check in (True, False):
        device.commands.clear()
        opts = StepOptions(check=check, readings=readings)
        result = provisioning.step_handoff(_ctx(device, done), ALLOC, opts)
        assert result == {"changed": False, "handoff": "/elsewhere/b.json", "reissued": False}
        assert device.commands == ["hsm show"]


def test_readings_are_per_appliance() -> None:
    device = Device()
    readings = _verified(device)
    other: Any = SimpleNamespace(appliance="unit02", request_id="r-1", tenant="t1")
    assert readings.get("unit02") is None
    provisioning.step_monitor(_ctx(device, []), other, StepOptions(readings=readings))
    assert device.commands[0] == "hsm show"
