"""Capacity, spares and drift against the lab (issue 15 item 2 acceptance).

Appliances: APPLIANCE_SETS["fleet"] (hsm35 … hsm40; stamp1: 35, 37, 39; stamp2: 36, 38,
40) only, each test with its own provider configuration (own store, own inventory file)
holding just the appliances it uses, factory-reset before and after.

* spares: stamp1 of the test's inventory holds back 1 of its 2 appliances; ``fleet
  capacity`` says so; two ``hsmctl provision`` processes at once for the one appliance
  that is not a spare: exactly one wins, the other exits 5 saying spares are held back and
  how to use them; ``--use-spares`` then takes the spare.
* reconcile: hsm36 provisioned to tenant1 and taken over by the real ``hsmctl takeover``,
  then its data port detached with the fabric driver directly; hsm38 provisioned to
  tenant2, then tenant2 removed from the test's inventory. ``fleet reconcile`` reports
  the takeover the store has not seen (state), the detached port (attachment) and the
  orphan, changing nothing; ``--apply`` re-plugs the port and the store follows the
  device, journaled, while the device's owner, keys and accounts stay as they were (only
  console reads in its log, the customer's collection still verifies). A second store
  that calls hsm36 available sees the state mismatch and touches nothing.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from hsmctl.lab import control as lab_mod
from hsmctl.lab.netns import socket_factory
from hsmctl.ssh import scan_host_keys
from hsmctl.state.model import Operation, StepStatus
from hsmctl.state.store import DB_FILE, Store
from tests.conftest import (
    APPLIANCE_SETS,
    HSMCTL,
    client_netns,
    console,
    factory_reset,
    hsmctl,
    provider_config,
    provision,
    takeover,
    tenant_config,
    unique_ip,
)

pytestmark = pytest.mark.lab

MINE = APPLIANCE_SETS["fleet"]
SPARE_STAMP = ["hsm35", "hsm37"]  # stamp1
DRIFTERS = ["hsm36", "hsm38"]  # stamp2


def store_of(conf: Path) -> Store:
    return Store.open(Path(yaml.safe_load(conf.read_text())["state_dir"]) / DB_FILE)


def one_json(proc: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    text = proc.stdout.decode()
    body = json.loads(text)
    assert isinstance(body, dict) and text.strip() == json.dumps(body), text
    return body


def edit_inventory(conf: Path, change: Any) -> None:
    path = Path(yaml.safe_load(conf.read_text())["inventory"])
    doc = yaml.safe_load(path.read_text())
    change(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def capacity(conf: Path) -> dict[str, dict[str, Any]]:
    body = one_json(hsmctl("--config", str(conf), "fleet", "capacity", "--json", check=True))
    return {s["stamp"]: s for s in body["stamps"]}


def provision_argv(conf: Path, *extra: str) -> list[str]:
    return [HSMCTL, "--config", str(conf), "provision", "--tenant", "tenant1", "--vnet",
            "vnet1", "--subnet", "hsm", "--ip", unique_ip("tenant1"), *extra, "--json"]  # fmt: skip


@pytest.fixture
def spare_stamp() -> Any:
    factory_reset(*SPARE_STAMP)
    yield
    factory_reset(*SPARE_STAMP)


def test_spares_are_held_back_and_concurrent_provisions_take_the_one_left(
    lab: dict[str, Any], tmp_path: Path, spare_stamp: None
) -> None:
    conf = provider_config(tmp_path / "provider", SPARE_STAMP)
    edit_inventory(conf, lambda d: d["regions"][0]["stamps"][0].update(spares=1))
    cap = capacity(conf)
    assert set(cap) == {"stamp1"}
    assert {k: cap["stamp1"][k] for k in ("total", "available", "spares")} == {
        "total": 2,
        "available": 1,
        "spares": 1,
    }

    # Two provisions at once, one non-spare appliance: exactly one wins.
    procs = [
        subprocess.Popen(provision_argv(conf), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = [(p.communicate(timeout=600), p.returncode) for p in procs]
    codes = sorted(rc for _, rc in outs)
    assert codes == [0, 5], [(rc, err.decode()) for (_, err), rc in outs]
    (win,) = [json.loads(out) for (out, _), rc in outs if rc == 0]
    ((lost_out, lost_err),) = [o for o, rc in outs if rc == 5]
    assert win["appliance"] == "hsm35"  # the spare is the stamp's last available one
    message = json.loads(lost_out)["error"]["message"]
    assert "only spares remain" in message and "spares are held back" in message
    assert "--use-spares" in message and "--use-spares" in lost_err.decode()
    cap = capacity(conf)["stamp1"]
    assert (cap["available"], cap["spares"], cap["provisioned"]) == (0, 1, 1)
    with store_of(conf) as s:
        assert [a.appliance for a in s.allocations()] == ["hsm35"]

    # A third, plain: still refused; with --use-spares it gets the spare.
    again = subprocess.run(provision_argv(conf), capture_output=True, timeout=600, check=False)
    assert again.returncode == 5 and b"--use-spares" in again.stderr
    used = subprocess.run(
        provision_argv(conf, "--use-spares"), capture_output=True, timeout=600, check=False
    )
    assert used.returncode == 0, used.stderr.decode()
    assert json.loads(used.stdout)["appliance"] == "hsm37"
    cap = capacity(conf)["stamp1"]
    assert (cap["available"], cap["spares"], cap["spares_configured"]) == (0, 0, 1)
    assert cap["provisioned"] == 2


# -- reconcile ---------------------------------------------------------------------------------


@pytest.fixture
def drifters() -> Any:
    factory_reset(*DRIFTERS)
    yield
    factory_reset(*DRIFTERS)


def reconcile(conf: Path, *extra: str) -> dict[str, Any]:
    proc = hsmctl("--config", str(conf), "fleet", "reconcile", *extra, "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    return one_json(proc)


def items(body: dict[str, Any]) -> set[tuple[Any, ...]]:
    return {
        (d["appliance"], d["kind"], d["store"], d["device"], d["fixable"]) for d in body["drift"]
    }


def hsm_show(appliance: str) -> dict[str, Any]:
    return dict(json.loads(console(appliance, "hsmsh", "-c", "hsm show").stdout))


def log_tail(appliance: str, n: int = 400) -> list[dict[str, Any]]:
    out = console(appliance, "hsmsh", "-c", f"audit show --last {n}").stdout.decode()
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def reachable(ip: str, netns: str) -> bool:
    return bool(scan_host_keys(ip, connect_socket=socket_factory(netns), timeout=10))


def test_reconcile_finds_drift_and_applies_only_what_it_can_prove(
    lab: dict[str, Any], tmp_path: Path, drifters: None
) -> None:
    conf = provider_config(tmp_path / "provider", DRIFTERS)
    t1 = tenant_config(tmp_path / "tenants", lab, "tenant1")
    owned = provision(conf, "tenant1")
    orphan = provision(conf, "tenant2")
    assert (owned["appliance"], orphan["appliance"]) == ("hsm36", "hsm38")
    assert reconcile(conf)["drift"] == []

    # The customer takes hsm36 over (the store does not hear of it); behind the store's
    # back its data port is pulled, and tenant2 leaves the inventory.
    takeover(lab, t1, "tenant1", owned["handoff"])
    netns = client_netns(lab, "tenant1")
    assert reachable(owned["ip"], netns)
    lab_mod.fabric().detach("hsm36")
    assert not _reaches(owned["ip"], netns)
    edit_inventory(
        conf, lambda d: d.update(tenants=[t for t in d["tenants"] if t["name"] != "tenant2"])
    )

    with store_of(conf) as s:
        before = s.snapshot()
    found = reconcile(conf)
    assert found["checked"] == 2 and found["applied"] is False and found["errors"] == []
    assert items(found) == {
        ("hsm36", "state", "provisioned", "customer-owned", True),
        ("hsm36", "attachment", "tenant1/vnet1/hsm", "detached", True),
        ("hsm38", "orphan", "tenant2", None, False),
    }
    assert all(d["why"] for d in found["drift"])
    with store_of(conf) as s:
        assert s.snapshot() == before  # reporting changes nothing
    assert lab_mod.fabric().attachment("hsm36").tenant is None

    device_before = hsm_show("hsm36")
    assert device_before["owner_state"] == "customer-owned"
    mark = log_tail("hsm36", 1)[-1]["seq"]

    applied = reconcile(conf, "--apply")
    fixed = {(d["appliance"], d["kind"]): d for d in applied["drift"]}
    assert fixed["hsm36", "state"]["fixed"] is True
    assert fixed["hsm36", "attachment"]["fixed"] is True
    assert "fixed" not in fixed["hsm38", "orphan"]
    # The port is back where the allocation says; the customer reaches the device again.
    at = lab_mod.fabric().attachment("hsm36")
    assert (at.tenant, at.vnet, at.subnet) == ("tenant1", "vnet1", "hsm")
    assert reachable(owned["ip"], netns)
    with store_of(conf) as s:
        assert s.get_appliance("hsm36").state == "customer-owned"
        assert s.get_appliance("hsm38").state == "provisioned"  # the orphan stays
        journal = s.journal(operation=Operation.RECONCILE)
    assert sorted((e.appliance, e.step, e.status) for e in journal) == [
        ("hsm36", "attachment", StepStatus.OK),
        ("hsm36", "state", StepStatus.OK),
    ]

    # Nothing of the customer's was touched: the device says the same, and its own log
    # holds only console reads since the mark (no account, key or token command).
    # (log_disk counts the log's bytes, which every console read adds to.)
    after = hsm_show("hsm36")
    assert {k: v for k, v in after.items() if k != "log_disk"} == {
        k: v for k, v in device_before.items() if k != "log_disk"
    }
    since = [r for r in log_tail("hsm36") if r["seq"] > mark]
    commands = {r["detail"].get("command") for r in since if r["event"] == "command"}
    assert commands <= {"hsm show", "network show", "audit show --last 400"}, commands
    assert {r["role"] for r in since if r["event"] == "command"} == {"console"}
    collected = hsmctl(
        "--config", str(t1), "logs", "collect", "--appliance", "hsm36", "--json", netns=netns
    )
    assert collected.returncode == 0, collected.stderr.decode()
    assert json.loads(collected.stdout)["appliances"][0]["verified"] is True

    # Idempotent: only what needs a person is left.
    assert items(reconcile(conf, "--apply")) == {("hsm38", "orphan", "tenant2", None, False)}

    # A second store that calls hsm36 available: a state mismatch it must not "fix".
    other = provider_config(tmp_path / "other", ["hsm36"])
    seen = reconcile(other, "--apply")
    assert items(seen) == {
        ("hsm36", "state", "available", "customer-owned", False),
        ("hsm36", "attachment", "detached", "tenant1/vnet1/hsm", False),
    }
    assert all("fixed" not in d for d in seen["drift"])
    assert lab_mod.fabric().attachment("hsm36").tenant == "tenant1"
    assert hsm_show("hsm36")["owner_state"] == "customer-owned"
    with store_of(other) as s:
        assert s.journal(operation=Operation.RECONCILE) == []


def _reaches(ip: str, netns: str) -> bool:
    from hsmctl.errors import UnreachableError

    try:
        return bool(scan_host_keys(ip, connect_socket=socket_factory(netns), timeout=3))
    except UnreachableError:
        return False
