"""The state store against real SQLite and a real PostgreSQL: allocation, anti-affinity,
quotas, exhaustion, resume, release, and races between separate processes."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections import Counter
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsmctl.errors import ConfigError, ConflictError, UnreachableError, UsageError
from hsmctl.inventory import Inventory, Placement, check_placement, parse_inventory
from hsmctl.secret import Secret
from hsmctl.state import (
    ApplianceState,
    Interface,
    Operation,
    RequestStatus,
    StepStatus,
    Store,
)
from hsmctl.state.schema import LATEST

pytestmark = pytest.mark.store

S = ApplianceState


def _ed25519() -> str:
    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    return pub.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


def _p256() -> str:
    pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    return pub.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


def make_inventory(quota: dict[str, int] | None = None, *, renumber: bool = False) -> Inventory:
    """Region r1: stamps s1, s2 (3 appliances each); region r2: stamp s3 (2 appliances).
    Tenant t1: vnet v1 (no region) and vnet v1r (region r1); tenant t2: vnet v1 too."""
    lines = ["regions:"]
    n = 0
    for region, stamps in (("r1", (("s1", 3), ("s2", 3))), ("r2", (("s3", 2),))):
        lines += [f"  - name: {region}", "    stamps:"]
        for stamp, count in stamps:
            lines += [f"      - name: {stamp}", "        appliances:"]
            for _ in range(count):
                n += 1
                lines += [
                    f"          - id: hsm{n:02d}",
                    f'            serial: "SN{n:04d}"',
                    "            model: test",
                    f"            mgmt_ip: 192.0.2.{10 + (9 - n if renumber else n)}",
                    f"            mgmt_host_keys: ['{_ed25519()}']",
                ]
    lines.append("tenants:")
    for tenant in ("t1", "t2"):
        lines += [
            f"  - name: {tenant}",
            f"    identity_public_key: '{_p256()}'",
            "    vnets:",
            "      - {name: v1, cidr: 10.0.0.0/16, subnets: [",
            "          {name: hsm, cidr: 10.0.1.0/24, delegated: true},",
            "          {name: tiny, cidr: 10.0.2.0/29, delegated: true}]}",
            "      - {name: v1r, region: r1, cidr: 10.1.0.0/16, subnets: [",
            "          {name: hsm, cidr: 10.1.1.0/24, delegated: true}]}",
        ]
        if quota:
            lines.append(f"    quota: {json.dumps(quota)}")
    return parse_inventory([(Path("test.yaml"), "\n".join(lines) + "\n")])


@pytest.fixture
def inventory() -> Inventory:
    return make_inventory()


@pytest.fixture
def store(db_url: str, inventory: Inventory) -> Any:
    s = Store.open(db_url)
    s.sync_inventory(inventory)
    yield s
    s.close()


def place(
    inv: Inventory, tenant: str = "t1", vnet: str = "v1", subnet: str = "hsm", **kw: Any
) -> Placement:
    return check_placement(inv, tenant, vnet, subnet, **kw)


# -- open, migrate, sync -----------------------------------------------------------------


def test_open_migrates_once_and_reopens(db_url: str) -> None:
    with Store.open(db_url) as s:
        assert s.schema_version() == LATEST
    with Store.open(db_url) as s:
        assert s.schema_version() == LATEST
        versions = [r["version"] for r in s.snapshot()["schema_version"]]
    assert versions == list(range(1, LATEST + 1))


def test_sqlite_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    with Store.open(state_dir / "hsmctl.db") as s:
        assert s.backend == "sqlite"
    assert (state_dir / "hsmctl.db").stat().st_mode & 0o077 == 0
    conn = sqlite3.connect(state_dir / "hsmctl.db")
    try:  # WAL is recorded in the file itself
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    # A directory stands for the state_dir holding hsmctl.db.
    with Store.open(state_dir) as s:
        assert s.schema_version() == LATEST


def test_sync_adds_available_pins_keys_and_never_clobbers_state(
    store: Store, inventory: Inventory
) -> None:
    fleet = store.list_appliances()
    assert [a.id for a in fleet] == [a.id for a in sorted(inventory.appliances, key=lambda a: a.id)]
    assert {a.state for a in fleet} == {S.AVAILABLE}
    pinned = store.host_keys("hsm01", Interface.MGMT)
    assert [k.fingerprint for k in pinned] == list(inventory.appliance("hsm01").mgmt_fingerprints)

    [a] = store.allocate("r1", place(inventory))
    store.set_state(a.appliance, S.PROVISIONED)
    again = store.sync_inventory(inventory)
    assert again.added == () and again.updated == () and again.host_key_mismatch == ()
    assert store.get_appliance(a.appliance).state == S.PROVISIONED

    other = make_inventory(renumber=True)  # same ids, new keys, management addresses swapped
    report = store.sync_inventory(other)
    assert set(report.host_key_mismatch) == {a.id for a in inventory.appliances}
    assert set(report.updated) == {a.id for a in inventory.appliances}
    assert store.host_keys("hsm01", Interface.MGMT) == pinned  # kept until re-pinned
    rec = store.get_appliance(a.appliance)
    assert rec.state == S.PROVISIONED and rec.mgmt_ip == str(other.appliance(a.appliance).mgmt_ip)


# -- allocation --------------------------------------------------------------------------


def test_allocate_basics(store: Store, inventory: Inventory) -> None:
    [a] = store.allocate("req-1", place(inventory))
    assert a.request_id == "req-1" and a.tenant == "t1" and a.vnet == "v1"
    assert a.ip == "10.0.1.4"  # .0-.3 are reserved
    rec = store.get_appliance(a.appliance)
    assert (rec.state, rec.tenant, rec.data_ip) == (S.PROVISIONING, "t1", "10.0.1.4")
    req = store.get_request("req-1")
    assert req is not None and req.status == RequestStatus.ALLOCATED and req.count == 1
    assert store.allocation(a.appliance) == a
    [entry] = store.journal(request_id="req-1")
    assert entry.operation == Operation.ALLOCATE and entry.appliance == a.appliance
    [b] = store.allocate(None, place(inventory))  # a request id is made up if none is given
    assert b.ip == "10.0.1.5" and b.appliance != a.appliance


def test_requested_address(store: Store, inventory: Inventory) -> None:
    [a] = store.allocate("r1", place(inventory, ip="10.0.1.200"))
    assert a.ip == "10.0.1.200"
    before = store.snapshot()
    with pytest.raises(ConflictError, match=r"10\.0\.1\.200 .* already assigned to " + a.appliance):
        store.allocate("r2", place(inventory, ip="10.0.1.200"))
    assert store.snapshot() == before
    # The same address in another tenant's (isolated) network is fine.
    [b] = store.allocate("r3", place(inventory, tenant="t2", ip="10.0.1.200"))
    assert b.ip == "10.0.1.200"
    with pytest.raises(UsageError, match="cannot be used with --count"):
        store.allocate("r4", place(inventory, ip="10.0.1.201"), count=2)
    bad = Placement("t1", "v1", "hsm", IPv4Network("10.0.1.0/24"), ip=IPv4Address("10.0.1.3"))
    with pytest.raises(UsageError, match="not a usable address"):
        store.allocate("r5", bad)
    assert store.get_request("r4") is None and store.get_request("r5") is None


def test_anti_affinity_spreads_a_tenant_over_stamps(store: Store, inventory: Inventory) -> None:
    first = store.allocate("a", place(inventory, vnet="v1r"), count=2)
    assert sorted(a.stamp for a in first) == ["s1", "s2"]
    [third] = store.allocate("b", place(inventory, vnet="v1r"))
    [fourth] = store.allocate("c", place(inventory, vnet="v1r"))
    assert {third.stamp, fourth.stamp} == {"s1", "s2"}
    # Another tenant's holdings do not count against t1's spread.
    [x] = store.allocate("d", place(inventory, tenant="t2", vnet="v1r"))
    [y] = store.allocate("e", place(inventory, tenant="t2", vnet="v1r"))
    assert {x.stamp, y.stamp} == {"s1", "s2"}


def test_anti_affinity_across_regions_when_vnet_has_no_region(
    store: Store, inventory: Inventory
) -> None:
    got = store.allocate("a", place(inventory), count=3)
    assert sorted(a.stamp for a in got) == ["s1", "s2", "s3"]


def test_default_quotas_two_per_stamp_four_per_region(store: Store, inventory: Inventory) -> None:
    store.allocate("a", place(inventory, stamp="s1"), count=2)
    before = store.snapshot()
    with pytest.raises(
        ConflictError, match="quota exceeded for tenant t1 in stamp s1: stamp s1 holds 2 of 2"
    ):
        store.allocate("b", place(inventory, stamp="s1"))
    assert store.snapshot() == before
    got = store.allocate("c", place(inventory, vnet="v1r"), count=2)
    assert {a.stamp for a in got} == {"s2"}
    before = store.snapshot()
    # Region r1 now holds 4: the fifth is refused though s1 and s2 still have free ones.
    with pytest.raises(ConflictError, match="region r1 holds 4 of 4") as err:
        store.allocate("d", place(inventory, vnet="v1r"))
    assert err.value.exit_code == 5
    assert store.snapshot() == before
    # Region r2 is a separate budget.
    assert len(store.allocate("e", place(inventory), count=2)) == 2


def test_quotas_are_configurable(db_url: str) -> None:
    inv = make_inventory(quota={"per_stamp": 1, "per_region": 2})
    with Store.open(db_url) as s:
        s.sync_inventory(inv)
        got = s.allocate("a", place(inv, vnet="v1r"), count=2)
        assert sorted(a.stamp for a in got) == ["s1", "s2"]
        with pytest.raises(ConflictError, match="quota exceeded"):
            s.allocate("b", place(inv, vnet="v1r"))
        with pytest.raises(ConflictError, match="quota exceeded"):
            s.allocate("c", place(inv, stamp="s3"), count=2)
        big = make_inventory(quota={"per_stamp": 3, "per_region": 6})
        t1 = place(big, vnet="v1r")
        assert len(s.allocate("d", t1, count=4)) == 4


def test_count_is_all_or_nothing_and_exhaustion_changes_nothing(db_url: str) -> None:
    inv = make_inventory(quota={"per_stamp": 10, "per_region": 10})
    with Store.open(db_url) as s:
        s.sync_inventory(inv)
        s.allocate("a", place(inv), count=6)
        before = s.snapshot()
        with pytest.raises(ConflictError, match="only 2 free appliance"):
            s.allocate("b", place(inv), count=3)
        assert s.snapshot() == before
        s.allocate("c", place(inv, tenant="t2"), count=2)
        before = s.snapshot()
        with pytest.raises(ConflictError, match="no free appliance for tenant t1"):
            s.allocate("d", place(inv))
        assert s.snapshot() == before
        assert s.get_request("d") is None


def test_address_exhaustion(db_url: str) -> None:
    inv = make_inventory(quota={"per_stamp": 10, "per_region": 10})
    with Store.open(db_url) as s:
        s.sync_inventory(inv)
        got = s.allocate("a", place(inv, subnet="tiny"), count=3)  # a /29 has 3 usable
        assert [a.ip for a in got] == ["10.0.2.4", "10.0.2.5", "10.0.2.6"]
        before = s.snapshot()
        with pytest.raises(
            ConflictError, match=r"subnet tiny \(10\.0\.2\.0/29\) .* no free address"
        ):
            s.allocate("b", place(inv, subnet="tiny"))
        assert s.snapshot() == before


def test_request_id_resumes_instead_of_allocating_again(store: Store, inventory: Inventory) -> None:
    first = store.allocate("resume-me", place(inventory), count=2)
    before = store.snapshot()
    again = store.allocate("resume-me", place(inventory), count=2)
    assert again == sorted(first, key=lambda a: a.appliance)
    assert store.snapshot() == before
    with pytest.raises(UsageError, match="different parameters"):
        store.allocate("resume-me", place(inventory, subnet="tiny"), count=2)
    assert store.snapshot() == before


def test_release_returns_appliance_and_frees_address(store: Store, inventory: Inventory) -> None:
    [a] = store.allocate("r1", place(inventory))
    [b] = store.allocate("r2", place(inventory))
    rec = store.release(a.appliance, reason="playbook failed before touching the device")
    assert (rec.state, rec.tenant, rec.data_ip) == (S.AVAILABLE, None, None)
    assert store.allocation(a.appliance) is None
    req = store.get_request("r1")
    assert req is not None and req.status == RequestStatus.RELEASED
    with pytest.raises(ConflictError, match="released"):
        store.allocate("r1", place(inventory))
    assert store.release(a.appliance).state == S.AVAILABLE  # idempotent
    [c] = store.allocate("r3", place(inventory))
    assert c.ip == a.ip  # the freed address is handed out again
    store.set_state(b.appliance, S.PROVISIONED)
    store.set_state(b.appliance, S.CUSTOMER_OWNED)
    with pytest.raises(ConflictError, match="deprovision"):
        store.release(b.appliance)
    store.set_state(b.appliance, S.DEPROVISIONING)
    assert store.release(b.appliance).state == S.AVAILABLE


def test_state_transitions(store: Store, inventory: Inventory) -> None:
    [a] = store.allocate("r1", place(inventory))
    ident = a.appliance
    assert store.set_state(ident, S.PROVISIONED).state == S.PROVISIONED
    with pytest.raises(ConflictError, match="cannot become provisioning"):
        store.set_state(ident, S.PROVISIONING)
    with pytest.raises(ConflictError, match="expected customer-owned"):
        store.set_state(ident, S.DEPROVISIONING, expect=[S.CUSTOMER_OWNED])
    with pytest.raises(ValueError, match="reason"):
        store.set_state(ident, S.FAILED)
    failed = store.set_state(ident, S.FAILED, reason="network set timed out")
    assert failed.failure_reason == "network set timed out"
    resumed = store.set_state(ident, S.PROVISIONING, expect=[S.FAILED])
    assert resumed.state == S.PROVISIONING and resumed.failure_reason is None
    with pytest.raises(ValueError, match="release"):
        store.set_state(ident, S.AVAILABLE)
    store.set_state("hsm08", S.FAILED, reason="dead fan")  # found broken while available
    with pytest.raises(ConflictError, match="no allocation"):
        store.set_state("hsm08", S.PROVISIONING)
    with pytest.raises(UsageError, match="no appliance 'nope'"):
        store.get_appliance("nope")


def test_journal_and_requests(store: Store, inventory: Inventory) -> None:
    [a] = store.allocate("r1", place(inventory))
    n = store.record_step(
        Operation.PROVISION,
        "network-set",
        StepStatus.OK,
        appliance=a.appliance,
        request_id="r1",
        detail={"ip": a.ip},
    )
    entries = store.journal(request_id="r1", operation=Operation.PROVISION)
    assert [e.id for e in entries] == [n] and entries[0].detail == {"ip": a.ip}
    assert store.journal(after=n) == []
    with pytest.raises(ValueError, match="never"):
        store.record_step(
            Operation.PROVISION, "otp", StepStatus.OK, detail={"password": "hunter2-not-stored"}
        )
    with pytest.raises(ValueError, match="Secret"):
        store.record_step(
            Operation.PROVISION, "otp", StepStatus.OK, detail={"v": [Secret("hunter2-not-stored")]}
        )
    done = store.update_request("r1", RequestStatus.SUCCEEDED, {"appliance": a.appliance})
    assert done.status == RequestStatus.SUCCEEDED and done.result == {"appliance": a.appliance}
    assert "hunter2" not in json.dumps(store.snapshot())
    assert len(store.journal(operation=Operation.PROVISION)) == 1  # the refusals wrote nothing


def test_pin_host_keys(store: Store) -> None:
    keys = [_ed25519(), _p256()]
    pinned = store.pin_host_keys("hsm01", Interface.DATA, keys)
    assert len(pinned) == 2 and all(k.fingerprint.startswith("SHA256:") for k in pinned)
    assert store.host_keys("hsm01", Interface.DATA) == pinned
    rotated = store.pin_host_keys("hsm01", Interface.DATA, [_ed25519()])
    assert store.host_keys("hsm01", Interface.DATA) == rotated and len(rotated) == 1
    assert len(store.host_keys("hsm01", Interface.MGMT)) == 1  # untouched
    with pytest.raises(UsageError, match="host key"):
        store.pin_host_keys("hsm01", Interface.DATA, ["ssh-ed25519 AAAA"])
    with pytest.raises(UsageError, match="no appliance"):
        store.pin_host_keys("nope", Interface.DATA, keys)


# -- races between processes ---------------------------------------------------------------

WORKER = r"""
import json, sys
from ipaddress import ip_address, ip_network
from hsmctl.errors import HsmctlError
from hsmctl.inventory import Placement, Quota
from hsmctl.state import Store

job = json.loads(sys.stdin.readline())
# Allocation races start from an open store; open races start at the gun.
store = Store.open(job["url"]) if job["mode"] != "open" else None
print("ready", flush=True)
sys.stdin.readline()  # the starting gun
try:
    if store is None:
        store = Store.open(job["url"])
        print(json.dumps({"version": store.schema_version()}))
    else:
        p = Placement(job["tenant"], job["vnet"], job["subnet"], ip_network(job["cidr"]),
                      ip=ip_address(job["ip"]) if job["ip"] else None, region=job["region"],
                      stamp=job["stamp"],
                      quota=Quota(**job["quota"]))
        got = store.allocate(job["request_id"], p, count=job["count"])
        print(json.dumps({"ok": [[a.appliance, a.ip] for a in got]}))
except HsmctlError as exc:
    print(json.dumps({"error": type(exc).__name__, "code": exc.exit_code, "message": str(exc)}))
finally:
    if store is not None:
        store.close()
"""


def race(jobs: list[dict[str, Any]], url: str) -> list[dict[str, Any]]:
    """Start one process per job, let each open the store, then release them together."""
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
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"url": url, **job}) + "\n")
            proc.stdin.flush()
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line == "ready\n", proc.stderr.read() if proc.stderr else line
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.close()
        results = []
        for proc in procs:
            assert proc.stdout is not None and proc.stderr is not None
            out, err = proc.stdout.read(), proc.stderr.read()
            proc.wait(timeout=120)
            assert proc.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None and not pipe.closed:
                    pipe.close()


def _job(
    request_id: str, p: Placement, quota: tuple[int, int] | None = (100, 100)
) -> dict[str, Any]:
    """An allocation for a worker; ``quota`` overrides the inventory's (None keeps it)."""
    per_stamp, per_region = quota or (p.quota.per_stamp, p.quota.per_region)
    return {
        "mode": "allocate",
        "request_id": request_id,
        "tenant": p.tenant,
        "vnet": p.vnet,
        "subnet": p.subnet,
        "cidr": str(p.cidr),
        "ip": str(p.ip) if p.ip else None,
        "region": p.region,
        "stamp": p.stamp,
        "count": 1,
        "quota": {"per_stamp": per_stamp, "per_region": per_region},
    }


def test_race_processes_for_fewer_appliances_than_requests(
    store: Store, inventory: Inventory, db_url: str
) -> None:
    store.allocate("setup", place(inventory, tenant="t2"), count=5)  # 3 of 8 left free
    results = race(
        [_job(f"race-{i}", place(inventory, tenant=f"t{1 + i % 2}")) for i in range(8)], db_url
    )
    wins = [r["ok"][0] for r in results if "ok" in r]
    losses = [r for r in results if "error" in r]
    assert len(wins) == 3 and len(losses) == 5
    assert {r["code"] for r in losses} == {5} and {r["error"] for r in losses} == {"ConflictError"}
    assert len({w[0] for w in wins}) == 3  # no appliance twice
    per_tenant_ips = Counter((store.allocation(a) or pytest.fail()).tenant + ip for a, ip in wins)
    assert max(per_tenant_ips.values()) == 1  # no address twice within a network
    held = store.allocations()
    assert len(held) == 8 and len({a.appliance for a in held}) == 8
    assert [a.id for a in store.list_appliances(state=S.AVAILABLE)] == []


def test_race_processes_for_one_address(store: Store, inventory: Inventory, db_url: str) -> None:
    results = race([_job(f"ip-{i}", place(inventory, ip="10.0.1.77")) for i in range(8)], db_url)
    wins = [r for r in results if "ok" in r]
    assert len(wins) == 1, results
    assert all(r["code"] == 5 for r in results if "error" in r)
    assert [a.ip for a in store.allocations()] == ["10.0.1.77"]


def test_race_processes_cannot_break_quota(store: Store, inventory: Inventory, db_url: str) -> None:
    # Region r1 has 6 free appliances, but the tenant may hold 2 per stamp, 4 per region.
    target = place(inventory, vnet="v1r")
    results = race([_job(f"q-{i}", target, quota=None) for i in range(8)], db_url)
    wins = [r["ok"][0][0] for r in results if "ok" in r]
    assert len(wins) == 4, results
    held = store.allocations(tenant="t1")
    assert max(Counter(a.stamp for a in held).values()) <= 2
    assert max(Counter(a.region for a in held).values()) <= 4


def test_race_processes_cannot_break_a_region_quota_through_two_stamps(
    store: Store, inventory: Inventory, db_url: str
) -> None:
    # The tenant holds 3 of 4 in region r1. Racers for stamp s1 and for stamp s2, each
    # asking for its own address, touch no common row, so only serialisable isolation
    # (or SQLite's single writer) stops two of them taking "the last one" at once.
    store.allocate("setup", place(inventory, vnet="v1r"), count=3)
    jobs = [
        _job(
            f"s-{i}",
            place(inventory, vnet="v1r", stamp=f"s{1 + i % 2}", ip=f"10.1.1.{100 + i}"),
            quota=(3, 4),
        )
        for i in range(8)
    ]
    results = race(jobs, db_url)
    assert len([r for r in results if "ok" in r]) == 1, results
    assert all(r["code"] == 5 for r in results if "error" in r)
    assert len(store.allocations(tenant="t1")) == 4


def test_race_processes_resume_the_same_request(
    store: Store, inventory: Inventory, db_url: str
) -> None:
    results = race([_job("same-request", place(inventory)) for _ in range(6)], db_url)
    assert all("ok" in r for r in results), results
    assert len({tuple(r["ok"][0]) for r in results}) == 1
    assert len(store.allocations()) == 1


def test_race_processes_opening_a_new_database(db_url: str) -> None:
    # db_url is an empty database (PostgreSQL) or a file not created yet (SQLite).
    results = race([{"mode": "open"} for _ in range(6)], db_url)
    assert results == [{"version": LATEST}] * 6
    with Store.open(db_url) as s:
        assert [r["version"] for r in s.snapshot()["schema_version"]] == list(range(1, LATEST + 1))


def test_unreachable_postgres_and_bad_urls_are_clear_errors() -> None:
    with pytest.raises(UnreachableError, match=r"127\.0\.0\.1:1") as err:
        Store.open("postgresql://hsmctl:not-shown@127.0.0.1:1/hsmctl")
    assert err.value.exit_code == 4 and "not-shown" not in str(err.value)
    with pytest.raises(ConfigError, match="unsupported database 'mysql'"):
        Store.open("mysql://u@localhost/db")
    with pytest.raises(ConfigError, match="in-memory"):
        Store.open("sqlite://")


def test_records_round_trip_through_json(store: Store, inventory: Inventory) -> None:
    [a] = store.allocate("r1", place(inventory))
    store.update_request("r1", RequestStatus.RUNNING, {"appliances": []})
    records: list[Any] = [
        a,
        store.get_appliance(a.appliance),
        store.get_request("r1"),
        *store.journal(request_id="r1"),
        *store.host_keys(a.appliance, Interface.MGMT),
        store.sync_inventory(make_inventory()),
    ]
    for record in records:
        data = json.loads(json.dumps(record.as_dict()))
        assert type(record).from_dict(data) == record
    assert store.get_appliance(a.appliance).as_dict()["state"] == "provisioning"
