"""Health's pure assessment (probe -> assess) and the exit code of a fleet poll, against
a real SQLite store; probes are built by hand (the lab tests probe real devices)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hsmctl.contract import OwnerState
from hsmctl.inventory import check_placement, load_inventory
from hsmctl.provider import health as hl
from hsmctl.state.model import ApplianceState
from tests.fakes import hsm_info
from tests.provider_env import make_env

pytestmark = pytest.mark.unit

L = hl.Login


@pytest.mark.parametrize(
    ("monitor", "provider", "state", "expect"),
    [
        # after a takeover: monitor disabled, provider key refused -> customer-owned
        (
            hl.Attempt(L.REFUSED),
            hl.Attempt(L.REFUSED),
            ApplianceState.PROVISIONED,
            (True, OwnerState.CUSTOMER_OWNED, False, ApplianceState.CUSTOMER_OWNED, 0),
        ),
        # provisioned, monitor answering
        (
            hl.Attempt(L.OK, hsm_info(OwnerState.PROVISIONED)),
            hl.Attempt(L.OK, hsm_info(OwnerState.PROVISIONED)),
            ApplianceState.PROVISIONED,
            (True, OwnerState.PROVISIONED, True, None, 0),
        ),
        # kept monitor, device says customer-owned
        (
            hl.Attempt(L.OK, hsm_info(OwnerState.CUSTOMER_OWNED)),
            hl.Attempt(L.REFUSED),
            ApplianceState.PROVISIONED,
            (True, OwnerState.CUSTOMER_OWNED, False, ApplianceState.CUSTOMER_OWNED, 0),
        ),
        (
            hl.Attempt(L.UNREACHABLE, exit_code=4),
            hl.Attempt(L.UNREACHABLE, exit_code=4),
            ApplianceState.CUSTOMER_OWNED,
            (False, None, None, None, 4),
        ),
        (
            hl.Attempt(L.HOST_KEY_MISMATCH, exit_code=3),
            hl.Attempt(L.HOST_KEY_MISMATCH, exit_code=3),
            ApplianceState.AVAILABLE,
            (True, None, None, None, 3),
        ),
    ],
)
def test_health_assessment(
    monitor: hl.Attempt, provider: hl.Attempt, state: ApplianceState, expect: tuple[Any, ...]
) -> None:
    a = hl.assess(hl.Probe("a1", monitor, provider), state)
    assert (a.reachable, a.owner_state, a.provider_key_accepted, a.new_state, a.exit_code) == expect


def test_health_exit_code_is_the_most_severe(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    with env.store() as store:
        inv = load_inventory(env.inventory)
        store.allocate("r1", check_placement(inv, "t1", "v1", "hsm"))
        store.set_state("unit01", ApplianceState.PROVISIONED)
    outcomes = {
        "unit01": (L.REFUSED, L.REFUSED),
        "unit02": (L.UNREACHABLE, L.UNREACHABLE),
        "unit03": (L.OK, L.OK),
        "unit04": (L.OK, L.OK),
    }

    def prober(ctx: Any, appliance: str) -> hl.Probe:
        m, p = outcomes[appliance]
        info = hsm_info(OwnerState.FACTORY)
        code = 4 if m is L.UNREACHABLE else 0
        return hl.Probe(
            appliance,
            hl.Attempt(m, info if m is L.OK else None, exit_code=code),
            hl.Attempt(p, info if p is L.OK else None, exit_code=code),
        )

    before = env.snapshot()
    report = hl.health(str(env.config), None, prober=prober)
    assert report.exit_code == 4
    rows = {r["appliance"]: r for r in report.as_dict()["appliances"]}
    assert rows["unit01"]["state"] == "customer-owned"
    assert rows["unit02"]["reachable"] is False
    with env.store() as store:
        assert store.get_appliance("unit01").state == ApplianceState.CUSTOMER_OWNED
    assert env.snapshot() != before


# -- over time: the whole run (store, rule, syslog) with hand-built probes ----------------


def test_a_fleet_poll_is_stored_and_alerts_reach_syslog(tmp_path: Path) -> None:
    """hsmctl.provider.health.health end to end but for the devices: polls stored, one
    bad poll raises nothing, the second (K=2) raises, a good one clears; both reach a UDP
    receiver on loopback as RFC 5424; a customer's choice raises nothing; an unreachable
    receiver is exit 4 with the poll stored all the same."""
    import socket
    from datetime import UTC, datetime, timedelta

    from hsmctl.appliance import sensors

    env = make_env(tmp_path)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(10)
    conf = env.write_config(
        "health.yaml",
        health_syslog=f"udp://127.0.0.1:{receiver.getsockname()[1]}",
        health_alert_polls=2,
    )
    faults: dict[str, list[str]] = {"unit01": ["psu2"], "unit02": ["psu2"]}
    clock = [datetime(2026, 12, 6, 12, 0, tzinfo=UTC)]

    def prober(ctx: Any, appliance: str) -> hl.Probe:
        if appliance == "unit02":  # taken over, monitor disabled: no telemetry
            return hl.Probe(appliance, hl.Attempt(L.REFUSED), hl.Attempt(L.REFUSED))
        return hl.Probe(
            appliance,
            hl.Attempt(L.SKIPPED),
            hl.Attempt(L.OK),
            sensors=sensors.readings(faults.get(appliance, [])),
        )

    def run(**kw: Any) -> hl.HealthReport:
        clock[0] += timedelta(minutes=10)
        return hl.health(str(conf), ["unit01", "unit02"], prober=prober, now=lambda: clock[0], **kw)

    def rows(report: hl.HealthReport) -> dict[str, dict[str, Any]]:
        return {r["id"]: r for r in report.as_dict()["appliances"]}

    try:
        first = rows(run())
        assert first["unit01"]["problems"] == ["psu2"] and first["unit01"]["alerts"] == []
        assert first["unit02"]["telemetry"] == "no telemetry (customer choice)"
        second = run()
        assert [a["kind"] for a in rows(second)["unit01"]["alerts"]] == ["psu2"]
        assert rows(second)["unit02"]["alerts"] == [] and second.exit_code == 0
        msg = receiver.recv(65535)
        assert b"alert-raised" in msg and b'appliance="unit01" kind="psu2"' in msg
        faults["unit01"] = []
        third = rows(run())
        assert third["unit01"]["alerts"] == [] and third["unit01"]["last_ok"]
        assert b"alert-cleared" in receiver.recv(65535)
        with env.store() as store:
            snap = store.snapshot()
        assert len(snap["health_polls"]) == 6
        assert [(a["kind"], a["cleared_at"] is not None) for a in snap["alerts"]] == [
            ("psu2", True)
        ]

        # A receiver that is not there: exit 4, the poll stored anyway.
        closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        faults["unit01"] = ["fan"]
        run(syslog=f"tcp://127.0.0.1:{port}", alert_polls=1)
        assert len(env.snapshot()["health_polls"]) == 8
        faults["unit01"] = []
        report = run(syslog=f"tcp://127.0.0.1:{port}", alert_polls=1)
        assert report.notify_error and report.exit_code == 4
    finally:
        receiver.close()
