"""Capacity, spares and drift (issue 15 item 2), the pure parts: spare hold-back in the
allocation choice, the inventory's ``spares``, capacity counts, and the drift comparison
as a table of (store view, device facts, tenants) -> drift. The CLI part runs against a
SQLite store and an inventory in tmp_path (no device contact anywhere)."""

from __future__ import annotations

import json
from collections.abc import Callable
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
import yaml

from hsmctl.cli.main import main
from hsmctl.contract import OwnerState
from hsmctl.errors import ConflictError
from hsmctl.inventory import InventoryError, Placement, check_placement, load_inventory
from hsmctl.provider.capacity import compute
from hsmctl.provider.reconcile import (
    DETACHED,
    DeviceFacts,
    DriftKind,
    Fix,
    StoreView,
    Where,
    compare,
)
from hsmctl.state.allocation import FreeAppliance, Pool, choose_appliances, hold_back_spares
from hsmctl.state.model import ApplianceState
from tests.provider_env import ProviderEnv, make_env

pytestmark = pytest.mark.unit

S, Own = ApplianceState, OwnerState


# -- spares in the allocation choice --------------------------------------------------------


def free(*ids: str, stamp: str = "s1") -> list[FreeAppliance]:
    return [FreeAppliance(i, "r1", stamp, "192.0.2.1") for i in ids]


def place(spares: dict[str, int] | None = None) -> Placement:
    return Placement("t1", "v1", "hsm", IPv4Network("10.0.1.0/24"), spares=spares or {})


def test_hold_back_spares_keeps_the_last_ones_of_each_stamp() -> None:
    usable, held = hold_back_spares(
        {"s1": free("a1", "a2", "a3"), "s2": free("b1", stamp="s2"), "s3": []},
        {"s1": 1, "s2": 3, "s4": 2},
    )
    assert {s: [a.id for a in v] for s, v in usable.items()} == {
        "s1": ["a1", "a2"],
        "s2": [],
        "s3": [],
    }
    assert held == {"s1": 1, "s2": 1}  # never more than there is


def test_spares_are_left_alone_and_only_spares_is_exit_5_naming_use_spares() -> None:
    pool = Pool(tuple(free("a1", "a2")))
    (got,) = choose_appliances(pool, place({"s1": 1}), 1)
    assert got.id == "a1"
    with pytest.raises(ConflictError) as err:
        choose_appliances(Pool(tuple(free("a2"))), place({"s1": 1}), 1)
    assert err.value.exit_code == 5
    assert "only spares remain" in err.value.message
    assert "spares are held back" in err.value.message
    assert "--use-spares" in err.value.message
    assert err.value.detail["spares_held_back"] == {"s1": 1}
    with pytest.raises(ConflictError, match=r"only 1 free appliance.*--use-spares"):
        choose_appliances(pool, place({"s1": 1}), 2)
    # --use-spares: the placement holds nothing back.
    assert [a.id for a in choose_appliances(Pool(tuple(free("a2"))), place(), 1)] == ["a2"]
    # No spares anywhere: the old message.
    with pytest.raises(ConflictError, match=r"^no free appliance"):
        choose_appliances(Pool(()), place({"s1": 1}), 1)


# -- the inventory's spares and capacity -----------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> ProviderEnv:
    return make_env(tmp_path_factory.mktemp("fleet"))


def with_inventory(env: ProviderEnv, name: str, change: Callable[[dict[str, Any]], None]) -> Path:
    doc = yaml.safe_load(env.inventory.read_text())
    change(doc)
    path = env.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return env.write_config(f"conf-{name}.yaml", inventory=str(path))


def spares(n: object) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["regions"][0]["stamps"][0].update(spares=n)  # r1/s1: unit01, unit02


def test_spares_parse_and_reach_the_placement(env: ProviderEnv) -> None:
    conf = with_inventory(env, "spares-1", spares(1))
    inv = load_inventory(yaml.safe_load(conf.read_text())["inventory"])
    assert {s.name: s.spares for s in inv.stamps} == {"s1": 1, "s2": 0, "s3": 0}
    assert check_placement(inv, "t1", "v1", "hsm").spares == {"s1": 1}
    assert check_placement(inv, "t1", "v1", "hsm", use_spares=True).spares == {}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "spares: must be at least 0, got -1"),
        ("two", "spares: expected an integer, got a string"),
        (True, "spares: expected an integer, got a boolean"),
        (3, "spares: 3 is more than the stamp's 2 appliance(s)"),
    ],
)
def test_bad_spares_exit_2_with_the_entry_named(
    env: ProviderEnv, value: object, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = with_inventory(env, f"bad-spares-{value}", spares(value))
    with pytest.raises(InventoryError, match="stamps\\[s1\\]"):
        load_inventory(yaml.safe_load(conf.read_text())["inventory"])
    before = env.snapshot()
    assert main(["--config", str(conf), "fleet", "capacity", "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert message in out["error"]["message"]
    assert env.snapshot() == before


def test_capacity_counts_from_the_store_and_the_inventory(
    env: ProviderEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = with_inventory(env, "capacity", spares(1))
    assert main(["--config", str(conf), "fleet", "capacity", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    rows = {s["stamp"]: s for s in body["stamps"]}
    assert rows["s1"] == {
        "region": "r1",
        "stamp": "s1",
        "total": 2,
        "available": 1,
        "spares": 1,
        "spares_configured": 1,
        "provisioning": 0,
        "provisioned": 0,
        "customer_owned": 0,
        "deprovisioning": 0,
        "failed": 0,
    }
    assert (rows["s2"]["total"], rows["s2"]["available"], rows["s2"]["spares"]) == (1, 1, 0)
    assert rows["s3"]["region"] == "r2"
    assert body["totals"]["total"] == 4 and body["totals"]["spares"] == 1
    # Human output: a table with a total line.
    assert main(["--config", str(conf), "fleet", "capacity"]) == 0
    text = capsys.readouterr().out
    assert "SPARES" in text and "all" in text


def test_capacity_compute_by_state() -> None:
    from datetime import UTC, datetime

    from hsmctl.state.records import ApplianceRecord

    doc = {
        "regions": [
            {
                "name": "r1",
                "stamps": [
                    {
                        "name": "s1",
                        "spares": 2,
                        "appliances": [
                            {
                                "id": f"u{n}",
                                "serial": f"U{n}",
                                "model": "m",
                                "mgmt_ip": f"127.0.0.{n}",
                                "mgmt_host_keys": [_key()],
                            }
                            for n in range(1, 6)
                        ],
                    }
                ],
            }
        ]
    }
    from hsmctl.inventory import parse_inventory

    inv = parse_inventory([(Path("x.yaml"), yaml.safe_dump(doc))])
    states = [S.AVAILABLE, S.CUSTOMER_OWNED, S.PROVISIONED, S.FAILED, S.AVAILABLE]
    now = datetime.now(UTC)
    records = [
        ApplianceRecord(f"u{n}", "r1", "s1", "x", "m", "ip", st, None, None, None, now)
        for n, st in enumerate(states, 1)
    ]
    (row,) = compute(inv, records).stamps
    # Two available, both held back as spares: provisioning can take none.
    assert (row.total, row.available, row.spares) == (5, 0, 2)
    assert (row.customer_owned, row.provisioned, row.failed) == (1, 1, 1)
    records[0] = ApplianceRecord(
        "u1", "r1", "s1", "x", "m", "ip", S.PROVISIONED, "t", "i", None, now
    )
    (row,) = compute(inv, records).stamps
    assert (row.available, row.spares, row.spares_configured) == (0, 1, 2)  # one spare used


def _key() -> str:
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    return pub.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


# -- drift ----------------------------------------------------------------------------------

T1 = Where("t1", "v1", "hsm")


def view(state: ApplianceState, tenant: str | None = "t1", **kw: Any) -> StoreView:
    allocated = tenant is not None
    return StoreView(
        "hsm1",
        state,
        tenant=tenant,
        data_ip="10.0.1.5" if allocated else None,
        attachment=Where(tenant, "v1", "hsm") if allocated else None,
        **kw,
    )


def facts(owner: OwnerState, where: Where = T1, address: str | None = "10.0.1.5/24") -> DeviceFacts:
    return DeviceFacts("hsm1", owner, address, where)


def drift_of(v: StoreView, f: DeviceFacts | None, tenants: tuple[str, ...] = ("t1",)) -> list[Any]:
    got = compare([v], {} if f is None else {"hsm1": f}, tenants)
    return [(d.kind, d.store, d.device, d.fixable, d.fix) for d in got]


def test_no_drift_when_all_agree() -> None:
    assert drift_of(view(S.CUSTOMER_OWNED), facts(Own.CUSTOMER_OWNED)) == []
    assert drift_of(view(S.PROVISIONED), facts(Own.PROVISIONED)) == []
    assert drift_of(view(S.AVAILABLE, None), facts(Own.FACTORY, DETACHED, None)) == []
    # In flight: the workflow's rerun settles the port and the address.
    assert drift_of(view(S.PROVISIONING), facts(Own.FACTORY, DETACHED, None)) == []


def test_detached_behind_the_stores_back_is_fixable_for_a_customer_owned_device() -> None:
    assert drift_of(view(S.CUSTOMER_OWNED), facts(Own.CUSTOMER_OWNED, DETACHED)) == [
        (DriftKind.ATTACHMENT, "t1/v1/hsm", "detached", True, Fix.ATTACH)
    ]
    # Plugged into another tenant's network: re-plugged where the allocation says.
    (d,) = compare(
        [view(S.PROVISIONED)], {"hsm1": facts(Own.PROVISIONED, Where("t2", "v1", "hsm"))}, ["t1"]
    )
    assert d.fixable and d.target == T1


def test_the_store_follows_a_takeover_and_the_port_is_then_fixable() -> None:
    assert drift_of(view(S.PROVISIONED), facts(Own.CUSTOMER_OWNED, DETACHED)) == [
        (DriftKind.STATE, "provisioned", "customer-owned", True, Fix.MARK_CUSTOMER_OWNED),
        (DriftKind.ATTACHMENT, "t1/v1/hsm", "detached", True, Fix.ATTACH),
    ]


def test_state_mismatches_that_need_a_person() -> None:
    # The store calls it free; a customer owns it and it sits in their network.
    assert drift_of(view(S.AVAILABLE, None), facts(Own.CUSTOMER_OWNED, T1, "10.0.1.5/24")) == [
        (DriftKind.STATE, "available", "customer-owned", False, None),
        (DriftKind.ATTACHMENT, "detached", "t1/v1/hsm", False, None),
    ]
    # Reset behind the store's back: neither the state nor the port is "fixed".
    assert drift_of(view(S.CUSTOMER_OWNED), facts(Own.FACTORY, DETACHED, None)) == [
        (DriftKind.STATE, "customer-owned", "factory", False, None),
        (DriftKind.ATTACHMENT, "t1/v1/hsm", "detached", False, None),
        (DriftKind.ADDRESS, "10.0.1.5", None, False, None),
    ]
    assert drift_of(view(S.AVAILABLE, None), facts(Own.PROVISIONED, DETACHED, None))[0][3] is False


def test_an_available_factory_device_in_a_tenant_network_is_unplugged() -> None:
    assert drift_of(view(S.AVAILABLE, None), facts(Own.FACTORY, T1, None)) == [
        (DriftKind.ATTACHMENT, "detached", "t1/v1/hsm", True, Fix.DETACH)
    ]


def test_orphans_are_reported_never_fixed() -> None:
    got = drift_of(view(S.CUSTOMER_OWNED, "gone"), facts(Own.CUSTOMER_OWNED, DETACHED))
    assert got == [
        (DriftKind.ORPHAN, "gone", None, False, None),
        (DriftKind.ATTACHMENT, "gone/v1/hsm", "detached", False, None),
    ]
    # Even without device facts (unreachable), the orphan comes from the store alone.
    assert drift_of(view(S.PROVISIONED, "gone"), None) == [
        (DriftKind.ORPHAN, "gone", None, False, None)
    ]
    (d,) = compare([view(S.PROVISIONED, "gone")], {}, ["t1"])
    assert "hsmctl deprovision hsm1 --yes --force --reason" in d.why


def test_address_and_not_in_inventory() -> None:
    assert drift_of(view(S.CUSTOMER_OWNED), facts(Own.CUSTOMER_OWNED, T1, "10.0.1.9/24")) == [
        (DriftKind.ADDRESS, "10.0.1.5", "10.0.1.9", False, None)
    ]
    assert drift_of(view(S.PROVISIONED, in_inventory=False), facts(Own.PROVISIONED)) == [
        (DriftKind.NOT_IN_INVENTORY, "provisioned", None, False, None)
    ]
    # A device that could not be read: no device drift guessed.
    err = DeviceFacts("hsm1", error="console: no such appliance", exit_code=1)
    assert drift_of(view(S.CUSTOMER_OWNED), err) == []


def test_drift_json_keys() -> None:
    (d,) = compare([view(S.CUSTOMER_OWNED)], {"hsm1": facts(Own.CUSTOMER_OWNED, DETACHED)}, ["t1"])
    assert set(d.as_dict()) == {"kind", "appliance", "store", "device", "fixable", "why", "fix"}
    assert d.as_dict()["kind"] == "attachment" and d.as_dict()["fix"] == "attach"


# -- apply, with the fabric and the devices replaced by tables ---------------------------------


class TableFabric:
    """The fabric as a dict (the lab test drives the real one)."""

    def __init__(self, ports: dict[str, Where]) -> None:
        self.ports = ports
        self.calls: list[tuple[str, ...]] = []

    def attach(self, appliance: str, tenant: str, vnet: str, subnet: str) -> object:
        assert self.ports[appliance] == DETACHED, "attach to a plugged port"
        self.calls.append(("attach", appliance, tenant, vnet, subnet))
        self.ports[appliance] = Where(tenant, vnet, subnet)
        return self.ports[appliance]

    def detach(self, appliance: str) -> object:
        self.calls.append(("detach", appliance))
        self.ports[appliance] = DETACHED
        return DETACHED

    def attachment(self, appliance: str) -> Where:
        return self.ports[appliance]


def test_apply_fixes_the_provable_journals_and_leaves_the_rest(tmp_path: Path) -> None:
    from hsmctl.provider.reconcile import reconcile
    from hsmctl.state.model import Operation, StepStatus

    e = make_env(tmp_path / "env")
    inv = load_inventory(e.inventory)
    with e.store() as s:
        (a,) = s.allocate("r1", check_placement(inv, "t1", "v1", "hsm", stamp="s1"))
        s.set_state(a.appliance, S.PROVISIONED)
    assert a.appliance == "unit01"
    t1 = Where("t1", "v1", "hsm")
    owners = {
        "unit01": Own.CUSTOMER_OWNED,  # taken over, port pulled
        "unit02": Own.FACTORY,  # available but plugged into t1
        "unit03": Own.CUSTOMER_OWNED,  # available in the store, a customer's on the device
        "unit04": Own.FACTORY,
    }
    fabric = TableFabric({"unit01": DETACHED, "unit02": t1, "unit03": t1, "unit04": DETACHED})

    def observer(ctx: Any, fab: Any, appliance: str) -> DeviceFacts:
        address = f"{a.ip}/24" if appliance == "unit01" else None
        return DeviceFacts(appliance, owners[appliance], address, fab.attachment(appliance))

    dry = reconcile(str(e.config), observer=observer, fabric=fabric)
    assert dry.exit_code == 0 and fabric.calls == []
    assert {(d.appliance, d.kind, d.fixable) for d in dry.drift} == {
        ("unit01", DriftKind.STATE, True),
        ("unit01", DriftKind.ATTACHMENT, True),
        ("unit02", DriftKind.ATTACHMENT, True),
        ("unit03", DriftKind.STATE, False),
        ("unit03", DriftKind.ATTACHMENT, False),
    }
    with e.store() as s:
        assert s.journal(operation=Operation.RECONCILE) == []

    done = reconcile(str(e.config), apply=True, observer=observer, fabric=fabric)
    assert done.exit_code == 0
    assert sorted(fabric.calls) == [("attach", "unit01", "t1", "v1", "hsm"), ("detach", "unit02")]
    assert fabric.ports["unit03"] == t1  # the customer's device stays where it is
    assert {(d.appliance, d.kind.value, d.fixed) for d in done.drift if d.fixable} == {
        ("unit01", "state", True),
        ("unit01", "attachment", True),
        ("unit02", "attachment", True),
    }
    with e.store() as s:
        assert s.get_appliance("unit01").state == S.CUSTOMER_OWNED
        assert s.get_appliance("unit03").state == S.AVAILABLE
        entries = s.journal(operation=Operation.RECONCILE)
    assert sorted((x.appliance, x.step, x.status) for x in entries) == [
        ("unit01", "attachment", StepStatus.OK),
        ("unit01", "state", StepStatus.OK),
        ("unit02", "attachment", StepStatus.OK),
    ]
    assert all(x.detail["why"] and x.detail["result"] for x in entries)

    # A rerun finds only what needs a person; a device that cannot be read is exit 4.
    again = reconcile(str(e.config), apply=True, observer=observer, fabric=fabric)
    assert {d.appliance for d in again.drift} == {"unit03"}

    def unreachable(ctx: Any, fab: Any, appliance: str) -> DeviceFacts:
        if appliance == "unit04":
            return DeviceFacts(appliance, error="console: timed out", exit_code=4)
        return observer(ctx, fab, appliance)

    assert reconcile(str(e.config), observer=unreachable, fabric=fabric).exit_code == 4
