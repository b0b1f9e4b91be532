"""The fleet at scale (issue 15, item 4 acceptance): 20 appliances provisioned in one
``hsmctl provision --count 20`` run, the 20 taken over from the tenant's client namespace,
every log collected (``logs collect --all``), and ``hsmctl health --all`` over all 100
appliances of the lab.

Appliances: APPLIANCE_SETS["scale"]. Provisioned and taken over: hsm51..hsm70 (the 20)
and hsm71 (one appliance alone, the baseline of the ratios); hsm78..hsm80 are the keys
benchmark's and hsm81..hsm100 the provisioning benchmark's, so none of those is changed
here. The health poll reads every appliance of the lab through the
``monitor`` account only (nothing changes on a device) with a provider configuration of
its own (its own state store, an inventory listing all 100), so no one else's store is
written. Addresses: tenant2's ``hsm`` subnet from .4 up (other lab tests take .101 and
above there). Every appliance used is factory-reset before and after, so a rerun works.

Printed (``pytest -s``): provision of 20 in one run against one (issue 15 target <= 3x),
provision + takeover of one appliance (target <= 8 s), and the whole test's time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import (
    APPLIANCE_SETS,
    client_netns,
    ensure_lab,
    factory_reset,
    hsmctl,
    provider_config,
    tenant_config,
)

pytestmark = [pytest.mark.lab, pytest.mark.scale]

TENANT = "tenant2"
LENT = {f"hsm{i}" for i in range(78, 101)}  # the benchmarks' appliances
TWENTY = [f"hsm{i}" for i in range(51, 71)]
ONE = "hsm71"
ONE_IP = "198.19.8.30"  # tenant2/hsm, beside the 20 (.4 .. .23)
TAKEOVER_PARALLEL = 4
assert set(TWENTY) | {ONE} <= set(APPLIANCE_SETS["scale"]) and not LENT & {*TWENTY, ONE}


def _json(proc: Any) -> dict[str, Any]:
    body = json.loads(proc.stdout)
    assert isinstance(body, dict)
    return body


def _room_for(conf: Path, count: int) -> None:
    """The test's own inventory lets the tenant hold ``count`` appliances (the default
    quota, 2 a stamp and 4 a region, is Azure's per-customer default)."""
    inv_path = Path(yaml.safe_load(conf.read_text())["inventory"])
    inv = yaml.safe_load(inv_path.read_text())
    for tenant in inv["tenants"]:
        if tenant["name"] == TENANT:
            tenant["quota"] = {"per_stamp": count, "per_region": count}
    inv_path.write_text(yaml.safe_dump(inv, sort_keys=False))


@pytest.fixture(scope="module")
def scale_lab(_lab_session: None) -> Iterator[dict[str, Any]]:
    lab = ensure_lab()
    factory_reset(*TWENTY, ONE)
    yield lab
    factory_reset(*TWENTY, ONE)


def _provision(conf: Path, *extra: str) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    proc = hsmctl(
        "--config", str(conf), "provision", "--tenant", TENANT, "--vnet", "vnet1",
        "--subnet", "hsm", *extra, "--json", timeout=600,
    )  # fmt: skip
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return took, _json(proc)


def _takeover(lab: dict[str, Any], tenant_conf: Path, handoff: str) -> tuple[float, Any]:
    started = time.monotonic()
    proc = hsmctl(
        "--config", str(tenant_conf), "takeover", "--handoff", handoff, "--json",
        netns=client_netns(lab, TENANT), timeout=600,
    )  # fmt: skip
    return time.monotonic() - started, proc


def _row_id(row: dict[str, Any]) -> str:
    return str(row.get("appliance") or row.get("id"))


@pytest.mark.timeout(1200)
def test_provision_20_take_over_collect_and_health_of_100(
    scale_lab: dict[str, Any], tmp_path: Path
) -> None:
    lab = scale_lab
    begun = time.monotonic()
    everyone = [a["id"] for a in lab["appliances"]]
    assert len(everyone) >= 100
    t_conf = tenant_config(tmp_path / "tenant", lab, TENANT)

    # The baseline: one appliance provisioned and taken over on its own.
    one_conf = provider_config(tmp_path / "one", [ONE])
    one_s, one = _provision(one_conf, "--ip", ONE_IP)
    assert one["appliance"] == ONE
    one_takeover_s, proc = _takeover(lab, t_conf, one["handoff"])
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]

    # Twenty in one run, spread over both stamps.
    conf = provider_config(tmp_path / "twenty", TWENTY)
    _room_for(conf, len(TWENTY))
    twenty_s, out = _provision(conf, "--count", str(len(TWENTY)))
    items = out["appliances"]
    assert sorted(i["appliance"] for i in items) == TWENTY
    assert len({i["ip"] for i in items}) == len(TWENTY)
    assert ONE_IP not in {i["ip"] for i in items}
    listed = _json(hsmctl("--config", str(conf), "fleet", "list", "--json", check=True))
    rows = {a["id"]: a for a in listed["appliances"]}
    assert {rows[a]["state"] for a in TWENTY} == {"provisioned"}
    assert {rows[a]["stamp"] for a in TWENTY} == {"stamp1", "stamp2"}

    # The twenty taken over from the tenant's client namespace, a few at a time.
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=TAKEOVER_PARALLEL) as pool:
        done = list(pool.map(lambda i: _takeover(lab, t_conf, i["handoff"]), items))
    takeovers_s = time.monotonic() - started
    for item, (_, proc) in zip(items, done, strict=True):
        assert proc.returncode == 0, (item["appliance"], proc.stderr.decode()[-3000:])
        body = _json(proc)
        assert (body["appliance"], body["state"]) == (item["appliance"], "customer-owned")

    # Every log collected and verified, in one run.
    started = time.monotonic()
    proc = hsmctl(
        "--config", str(t_conf), "logs", "collect", "--all", "--json",
        netns=client_netns(lab, TENANT), timeout=600,
    )  # fmt: skip
    collect_s = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    collected = {r["appliance"]: r for r in _json(proc)["appliances"]}
    assert sorted(collected) == sorted([*TWENTY, ONE])
    for appliance, row in collected.items():
        assert row["verified"] is True and row["new_records"] > 0, (appliance, row)

    # Health of all 100: monitor polls only, recorded in a store of this test's own.
    health_conf = provider_config(tmp_path / "health", everyone)
    started = time.monotonic()
    proc = hsmctl("--config", str(health_conf), "health", "--all", "--json", timeout=600)
    health_s = time.monotonic() - started
    body = _json(proc)
    polled = body["appliances"] if proc.returncode == 0 else body["error"]["appliances"]
    by_id = {_row_id(r): r for r in polled}
    assert sorted(by_id) == sorted(everyone)
    for appliance in [*TWENTY, ONE]:  # taken over: customer-owned, the provider locked out
        row = by_id[appliance]
        assert row["reachable"] is True, row
        assert row.get("owner_state", "customer-owned") == "customer-owned", row
        assert row.get("provider_key_accepted") in (False, None), row
    # The health poll changed nothing on the devices: still the customer's.
    again = _json(hsmctl("--config", str(conf), "fleet", "list", "--json", check=True))
    assert {a["id"]: a["state"] for a in again["appliances"]} == dict.fromkeys(
        TWENTY, "provisioned"
    )

    total_s = time.monotonic() - begun
    ratio = twenty_s / one_s
    print(
        f"\nscale: provision 1: {one_s:.1f} s; provision 20 in one run: {twenty_s:.1f} s "
        f"({ratio:.2f}x one; target <= 3x)"
        f"\nscale: provision + takeover of one: {one_s + one_takeover_s:.1f} s "
        f"({one_s:.1f} + {one_takeover_s:.1f}; target <= 8 s)"
        f"\nscale: 20 takeovers ({TAKEOVER_PARALLEL} at a time): {takeovers_s:.1f} s; "
        f"logs collect --all (21): {collect_s:.1f} s; health --all ({len(everyone)}): "
        f"{health_s:.1f} s; whole test: {total_s:.1f} s"
    )
