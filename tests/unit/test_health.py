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
