"""Spares against real SQLite and PostgreSQL: separate processes racing for the last
appliance that is not a spare get it exactly once, and the spare stays available."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from hsmctl.inventory import Inventory
from hsmctl.state import ApplianceState, Store
from tests.store.test_store import make_inventory, place

pytestmark = pytest.mark.store

WORKER = r"""
import json, sys
from ipaddress import ip_network
from hsmctl.errors import HsmctlError
from hsmctl.inventory import Placement, Quota
from hsmctl.state import Store

job = json.loads(sys.stdin.readline())
store = Store.open(job["url"])
print("ready", flush=True)
sys.stdin.readline()  # the starting gun
try:
    p = Placement(job["tenant"], "v1", "hsm", ip_network("10.0.1.0/24"), stamp="s3",
                  quota=Quota(100, 100), spares=job["spares"])
    got = store.allocate(job["request_id"], p, count=1)
    print(json.dumps({"ok": got[0].appliance}))
except HsmctlError as exc:
    print(json.dumps({"code": exc.exit_code, "message": str(exc)}))
finally:
    store.close()
"""


def race(url: str, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in jobs
    ]
    try:
        for proc, job in zip(procs, jobs, strict=True):
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps({"url": url, **job}) + "\n")
            proc.stdin.flush()
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.close()
        out = []
        for proc in procs:
            assert proc.stdout is not None and proc.stderr is not None
            stdout, stderr = proc.stdout.read(), proc.stderr.read()
            proc.wait(timeout=120)
            assert proc.returncode == 0, stderr
            out.append(json.loads(stdout.strip().splitlines()[-1]))
        return out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None and not pipe.closed:
                    pipe.close()


@pytest.fixture
def inventory() -> Inventory:
    return make_inventory()  # stamp s3: hsm07, hsm08


def test_racers_for_the_last_non_spare_get_it_once(db_url: str, inventory: Inventory) -> None:
    with Store.open(db_url) as s:
        s.sync_inventory(inventory)
    # Stamp s3 has 2 free appliances and holds back 1: one non-spare for 6 racers.
    results = race(
        db_url,
        [{"request_id": f"r{i}", "tenant": f"t{1 + i % 2}", "spares": {"s3": 1}} for i in range(6)],
    )
    wins = [r["ok"] for r in results if "ok" in r]
    losses = [r for r in results if "ok" not in r]
    assert wins == ["hsm07"], results
    assert all(r["code"] == 5 and "--use-spares" in r["message"] for r in losses)
    with Store.open(db_url) as s:
        assert [a.appliance for a in s.allocations()] == ["hsm07"]
        assert [
            a.id for a in s.list_appliances(state=ApplianceState.AVAILABLE) if a.stamp == "s3"
        ] == ["hsm08"]
        # Through the real placement check: the inventory's spares are held back...
        p = place(inventory, stamp="s3")
        assert p.spares == {}  # make_inventory declares none
    # ...and --use-spares (no hold-back) takes the spare.
    (last,) = race(db_url, [{"request_id": "use", "tenant": "t1", "spares": {}}])
    assert last == {"ok": "hsm08"}
