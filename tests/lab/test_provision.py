"""Provisioning, health and deprovisioning against the lab (issue 4 acceptance).

Appliances: APPLIANCE_SETS["provision"] (hsm05..hsm08) only, each test with a provider
configuration of its own (its own state store) holding just the appliances it uses,
factory-reset first. Addresses: the tenants' ``hsm2`` subnets (``--ip`` where the data
path is checked), so these tests do not meet other modules' appliances on the ``hsm``
bridges.

* hand-off: provision into tenant1; tenant1's client sees the bundle's host keys on the
  data address, tenant2's client reaches nothing; the bundle opens only with tenant1's
  identity, its provider signature verifies, tampering is caught; no one-time password
  in the provider's files; the dynamic inventory shows it.
* takeover (the real ``hsmctl takeover``, from the client namespace) → ``health`` says
  customer-owned with the provider key refused → ``fleet list`` too.
* deprovision after that takeover: refused without --yes or a release (exit 2, store
  unchanged, device untouched); with ``hsmctl release``: token wiped, new keys, the reset
  in the device's own log, ``available``, tenant1 no longer reaches it, and it is
  provisionable to tenant2.
* races: four ``hsmctl provision`` processes for two appliances.
* kill -9 in the middle of the playbook, rerun with the same --request-id.
* ``--count 2`` spreads over both stamps, one management connection (``login``) per
  appliance for the whole run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hsmctl.errors import IntegrityError, UnreachableError, UsageError
from hsmctl.handoff import open_bundle, read_bundle, verify_bundle
from hsmctl.lab.netns import socket_factory
from hsmctl.ssh import scan_host_keys
from hsmctl.state.model import Interface, StepStatus
from hsmctl.state.store import DB_FILE, Store
from tests.conftest import (
    APPLIANCE_SETS,
    HSMCTL,
    client_netns,
    console,
    ensure_lab,
    factory_reset,
    hsmctl,
    provider_config,
    provision,
    takeover,
    tenant_config,
)
from tests.postgres import postgres_url, reset_postgres

pytestmark = pytest.mark.lab

__all__ = ["postgres_url"]  # a fixture (tests/postgres.py): one PostgreSQL for two hosts

MINE = APPLIANCE_SETS["provision"]
HANDED, KILLED = "hsm07", "hsm06"
RACERS = ["hsm05", "hsm08"]  # one per stamp
ANSIBLE_INVENTORY = str(Path(HSMCTL).with_name("ansible-inventory"))
T1_IP, T2_IP = "198.19.2.205", "198.19.10.205"  # tenant1/hsm2, tenant2/hsm2


# -- helpers ---------------------------------------------------------------------------------


def store_of(conf: Path) -> Store:
    state_dir = Path(yaml.safe_load(conf.read_text())["state_dir"])
    return Store.open(state_dir / DB_FILE)


def snapshot(conf: Path) -> dict[str, Any]:
    with store_of(conf) as s:
        return s.snapshot()


def one_json(proc: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    """--json: exactly one JSON object on stdout and nothing else, whatever the outcome."""
    text = proc.stdout.decode()
    body = json.loads(text)
    assert isinstance(body, dict)
    assert text.strip() == json.dumps(body), text
    return body


def fleet(conf: Path) -> dict[str, dict[str, Any]]:
    body = one_json(hsmctl("--config", str(conf), "fleet", "list", "--json", check=True))
    return {a["id"]: a for a in body["appliances"]}


def health(conf: Path, appliance: str) -> tuple[int, dict[str, Any]]:
    proc = hsmctl("--config", str(conf), "health", appliance, "--json")
    body = one_json(proc)
    rows = body["appliances"] if proc.returncode == 0 else body["error"]["appliances"]
    (row,) = rows
    return proc.returncode, row


def fingerprints(lines: list[str]) -> set[str]:
    from hsmctl.ssh import PublicKey

    return {PublicKey.parse(line).fingerprint for line in lines}


def unreachable(ip: str, netns: str) -> bool:
    try:
        scan_host_keys(ip, connect_socket=socket_factory(netns), timeout=3)
    except UnreachableError:
        return True
    return False


def provider_public_key(tenant_conf: Path) -> str:
    return str(yaml.safe_load(tenant_conf.read_text())["provider_public_key"])


def hsm_show(appliance: str) -> dict[str, Any]:
    return dict(json.loads(console(appliance, "hsmsh", "-c", "hsm show").stdout))


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mine(_lab_session: None) -> Iterator[dict[str, Any]]:
    """The lab (module-wide); this module's appliances in factory state before and after."""
    lab = ensure_lab()
    factory_reset(*MINE)
    yield lab
    factory_reset(*MINE)


@pytest.fixture(scope="module")
def handed(mine: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """HANDED provisioned into tenant1 (hsm2, T1_IP)."""
    d = tmp_path_factory.mktemp("handoff")
    conf = provider_config(d, [HANDED])
    t1 = tenant_config(d, mine, "tenant1")
    t2 = tenant_config(d, mine, "tenant2")
    started = time.monotonic()
    out = provision(conf, "tenant1", "--subnet", "hsm2", "--ip", T1_IP)
    took = time.monotonic() - started
    assert out["appliance"] == HANDED and out["ip"] == T1_IP
    print(f"provision (1 appliance): {took:.1f} s")
    return {"lab": mine, "conf": conf, "t1": t1, "t2": t2, "out": out, "seconds": took}


@pytest.fixture(scope="module")
def taken_over(handed: dict[str, Any]) -> dict[str, Any]:
    """The real takeover of HANDED by tenant1, from its client namespace."""
    code, before = health(handed["conf"], HANDED)
    assert code == 0, before
    handed["health_before"] = before
    handed["receipt"] = takeover(handed["lab"], handed["t1"], "tenant1", handed["out"]["handoff"])
    return handed


# -- hand-off --------------------------------------------------------------------------------


def test_handoff_reaches_tenant1_only_with_the_bundles_host_keys(handed: dict[str, Any]) -> None:
    lab, out = handed["lab"], handed["out"]
    bundle = read_bundle(out["handoff"])
    presented = scan_host_keys(T1_IP, connect_socket=socket_factory(client_netns(lab, "tenant1")))
    assert {k.fingerprint for k in presented} == set(bundle["data_host_key_fingerprints"])
    assert {k.fingerprint for k in presented} == fingerprints(bundle["data_host_keys"])
    assert unreachable(T1_IP, client_netns(lab, "tenant2"))
    with store_of(handed["conf"]) as s:
        pinned = {k.fingerprint for k in s.host_keys(HANDED, Interface.DATA)}
    assert pinned == set(bundle["data_host_key_fingerprints"])


def test_bundle_opens_only_for_tenant1_and_rejects_tampering(handed: dict[str, Any]) -> None:
    path = Path(handed["out"]["handoff"])
    pub = provider_public_key(handed["t1"])
    ident = {t: yaml.safe_load(handed[t].read_text())["identity"] for t in ("t1", "t2")}
    opened = open_bundle(path, pub, ident["t1"])
    assert (opened.appliance, opened.data_ip, opened.tenant) == (HANDED, T1_IP, "tenant1")
    with pytest.raises(UsageError):
        open_bundle(path, pub, ident["t2"])
    doc = read_bundle(path)
    assert verify_bundle(doc, pub) is False  # signature good, not expired
    for field, value in (("data_ip", "198.19.2.206"), ("appliance", "hsm99")):
        with pytest.raises(IntegrityError):
            verify_bundle({**doc, field: value}, pub)
    sig = doc["signature"]["sig"]
    forged = {
        **doc,
        "signature": {**doc["signature"], "sig": ("A" if sig[0] != "A" else "B") + sig[1:]},
    }
    with pytest.raises(IntegrityError):
        verify_bundle(forged, pub)
    tampered = path.with_name("tampered.json")
    ct = doc["otp"]["ct"]
    tampered.write_text(json.dumps({**doc, "otp": {**doc["otp"], "ct": ct[::-1]}}))
    with pytest.raises(IntegrityError):
        open_bundle(tampered, pub, ident["t1"])
    # The one-time password exists only encrypted in the bundle: not in the provider's
    # database, journal, or any other file of its state directory.
    otp = opened.otp.reveal().encode()
    state_dir = Path(yaml.safe_load(handed["conf"].read_text())["state_dir"])
    for f in state_dir.rglob("*"):
        if f.is_file():
            assert otp not in f.read_bytes(), f
    assert otp not in json.dumps(snapshot(handed["conf"])).encode()


def test_dynamic_inventory_shows_the_provisioned_appliance(handed: dict[str, Any]) -> None:
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [ANSIBLE_INVENTORY, "-i", "playbooks/inventory/hsmctl.yml", "--list"],
        cwd=repo,
        env={**os.environ, "HSMCTL_CONFIG": str(handed["conf"])},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    data = json.loads(proc.stdout)
    stamp = next(a["stamp"] for a in handed["lab"]["appliances"] if a["id"] == HANDED)
    for group in ("tenant_tenant1", "state_provisioned", f"stamp_{stamp}"):
        assert data[group]["hosts"] == [HANDED], group
    assert "198.19.2.205" in json.dumps(data["_meta"]["hostvars"][HANDED])


# -- takeover, health, deprovision -----------------------------------------------------------


HEALTH_KEYS = ("appliance", "reachable", "owner_state", "provider_key_accepted", "monitor", "state")


def test_health_after_takeover_says_customer_owned(taken_over: dict[str, Any]) -> None:
    before = taken_over["health_before"]
    assert {k: before[k] for k in HEALTH_KEYS} == {
        "appliance": HANDED,
        "reachable": True,
        "owner_state": "provisioned",
        "provider_key_accepted": True,
        "monitor": "ok",
        "state": "provisioned",
    }
    conf = taken_over["conf"]
    assert fleet(conf)[HANDED]["state"] == "provisioned"  # the store learns from health
    code, after = health(conf, HANDED)
    assert code == 0
    assert after["reachable"] is True
    assert after["owner_state"] == "customer-owned"
    assert after["provider_key_accepted"] is False
    assert after["monitor"] == "refused"  # disabled by the takeover
    assert fleet(conf)[HANDED]["state"] == "customer-owned"


def test_deprovision_after_takeover(taken_over: dict[str, Any]) -> None:
    lab, conf = taken_over["lab"], str(taken_over["conf"])
    t1ns, t2ns = client_netns(lab, "tenant1"), client_netns(lab, "tenant2")
    assert hsm_show(HANDED)["initialised"] is True  # the customer's token

    # Refused without --yes, and without a release or --force: nothing changes.
    before = snapshot(taken_over["conf"])
    for args in (["--force", "--reason", "x"], ["--yes"]):
        proc = hsmctl("--config", conf, "deprovision", HANDED, *args, "--json")
        assert proc.returncode == 2, proc.stderr
        assert one_json(proc)["error"]["exit_code"] == 2
    assert snapshot(taken_over["conf"]) == before
    assert hsm_show(HANDED)["owner_state"] == "customer-owned"

    # The customer signs a release inside its network; the provider deprovisions.
    rel = hsmctl(
        "--config", str(taken_over["t1"]), "release", HANDED, "--json", netns=t1ns, check=True
    )
    release = one_json(rel)["release"]
    proc = hsmctl("--config", conf, "deprovision", HANDED, "--yes", "--release", release, "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    assert one_json(proc) == {"appliance": HANDED, "state": "available"}

    show = hsm_show(HANDED)
    assert (show["initialised"], show["objects"], show["owner_state"]) == (False, 0, "factory")
    row = fleet(taken_over["conf"])[HANDED]
    assert (row["state"], row["tenant"], row["ip"]) == ("available", None, None)
    with store_of(taken_over["conf"]) as s:
        (record,) = [
            e
            for e in s.journal(appliance=HANDED)
            if e.step == "zeroization" and e.status == StepStatus.OK
        ]
        (auth,) = [
            e
            for e in s.journal(appliance=HANDED)
            if e.step == "authorize" and e.status == StepStatus.OK
        ]
    assert auth.detail["authorization"]["kind"] == "release"
    z = record.detail
    assert all(z["checks"].values()) and z["tenant"] == "tenant1" and z["ip"] == T1_IP
    assert z["before"]["audit_key_id"] != z["after"]["audit_key_id"]
    assert not set(z["before"]["data_host_keys"]) & set(z["after"]["data_host_keys"])
    # The device's own activity log holds the reset at the recorded position.
    seq = z["device_record"]["seq"]
    tail = console(HANDED, "hsmsh", "-c", "audit show --last 400").stdout.decode()
    (dev,) = [json.loads(x) for x in tail.splitlines() if json.loads(x)["seq"] == seq]
    assert dev["detail"]["command"] == "sysconf factory-reset" and dev["role"] == "console"
    assert dev["hash"] == z["device_record"]["hash"]
    assert unreachable(T1_IP, t1ns)

    # Provisionable again, to the other tenant; tenant1 reaches neither address.
    again = provision(taken_over["conf"], "tenant2", "--subnet", "hsm2", "--ip", T2_IP)
    assert (again["appliance"], again["ip"]) == (HANDED, T2_IP)
    keys = {k.fingerprint for k in scan_host_keys(T2_IP, connect_socket=socket_factory(t2ns))}
    assert keys == set(read_bundle(again["handoff"])["data_host_key_fingerprints"])
    assert not keys & set(z["before"]["data_host_keys"])
    assert unreachable(T2_IP, t1ns) and unreachable(T1_IP, t1ns)


# -- concurrency, interruption, parallelism --------------------------------------------------


def _provision_argv(conf: Path, *extra: str) -> list[str]:
    return [
        HSMCTL, "--config", str(conf), "provision", "--tenant", "tenant2", "--vnet", "vnet1",
        "--subnet", "hsm2", *extra, "--json",
    ]  # fmt: skip


def test_concurrent_processes_never_share_an_appliance_or_address(
    mine: dict[str, Any], tmp_path: Path
) -> None:
    factory_reset(*RACERS)
    conf = provider_config(tmp_path, RACERS)
    procs = [
        subprocess.Popen(_provision_argv(conf), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 0, 5, 5], [r.stderr.decode()[-400:] for r in results]
    won = [one_json(r) for r in results if r.returncode == 0]
    lost = [one_json(r)["error"] for r in results if r.returncode == 5]
    assert sorted(w["appliance"] for w in won) == RACERS
    assert len({w["ip"] for w in won}) == 2
    assert all(e["exit_code"] == 5 and "no free appliance" in e["message"] for e in lost)
    rows = fleet(conf)
    assert {a: rows[a]["state"] for a in RACERS} == dict.fromkeys(RACERS, "provisioned")
    with store_of(conf) as s:
        snap = s.snapshot()
    assert sorted(r["appliance"] for r in snap["allocations"]) == RACERS
    assert len({r["ip"] for r in snap["address_assignments"]}) == 2
    assert len(snap["requests"]) == 2  # the losers left no request behind


def test_two_orchestrator_hosts_on_one_postgresql_never_share_or_interleave(
    mine: dict[str, Any], tmp_path: Path, postgres_url: str
) -> None:
    """SPEC §13: two orchestrator hosts (own configuration, state and working directory,
    so no file lock is shared) provisioning from one PostgreSQL at once, two processes
    each, for two appliances: each appliance and address is given once, the two losers
    leave nothing behind, and no step of one appliance starts while another is open
    (the per-appliance lock is PostgreSQL's advisory lock)."""
    factory_reset(*RACERS)
    reset_postgres(postgres_url)
    confs = []
    for host in ("host-a", "host-b"):
        conf = provider_config(tmp_path / host, RACERS)
        body = yaml.safe_load(conf.read_text())
        body["database_url"] = postgres_url
        conf.write_text(yaml.safe_dump(body))
        confs.append(conf)
    procs = [
        subprocess.Popen(
            _provision_argv(conf), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=conf.parent
        )
        for conf in (*confs, *confs)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 0, 5, 5], [r.stderr.decode()[-400:] for r in results]
    won = [one_json(r) for r in results if r.returncode == 0]
    assert sorted(w["appliance"] for w in won) == RACERS
    assert len({w["ip"] for w in won}) == 2
    with Store.open(postgres_url) as store:
        snap = store.snapshot()
    assert sorted(r["appliance"] for r in snap["allocations"]) == RACERS
    assert len({r["ip"] for r in snap["address_assignments"]}) == 2
    assert len(snap["requests"]) == 2
    for appliance in RACERS:
        rows = sorted((r for r in snap["journal"] if r["appliance"] == appliance),
                      key=lambda r: r["id"])  # fmt: skip
        assert len({r["request_id"] for r in rows if r["request_id"]}) == 1, appliance
        open_step: str | None = None
        for r in rows:
            if r["status"] == StepStatus.STARTED:
                assert open_step is None, (appliance, open_step, r["step"])
                open_step = r["step"]
            elif r["status"] in (StepStatus.OK, StepStatus.FAILED) and r["step"] == open_step:
                open_step = None  # (entries a step writes inside itself, e.g. "pin", pass)
        assert open_step is None
    for conf in confs:  # each host's own view, through its own configuration
        assert {a: fleet(conf)[a]["state"] for a in RACERS} == dict.fromkeys(RACERS, "provisioned")
    # The same request resumed on both hosts at once (an operator's rerun on host B while
    # host A's run is still going): the steps of its appliance run one at a time across
    # the hosts — only the database's lock can see both.
    factory_reset(RACERS[0])
    reset_postgres(postgres_url)
    rid = f"both-{uuid.uuid4()}"
    procs = [
        subprocess.Popen(
            [*_provision_argv(conf), "--request-id", rid],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=conf.parent,
        )
        for conf in confs
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    # One host finishes the request. The other runs each step after it, under the lock:
    # it finds the request done (0), or reaches the hand-off and refuses to make a second
    # one-time password, since the first bundle is on the other host and the tenant may
    # hold it (5, nothing re-issued) — which, depends on when it starts.
    codes = sorted(r.returncode for r in results)
    assert codes in ([0, 0], [0, 5]), [r.stderr[-300:] for r in results]
    for r in results:
        assert r.returncode == 0 or b"hsm_reissue_otp" in r.stderr, r.stderr[-300:]
    with Store.open(postgres_url) as store:
        snap = store.snapshot()
    rows = sorted((r for r in snap["journal"] if r["request_id"] == rid), key=lambda r: r["id"])
    open_step = None
    started = 0
    for r in rows:
        if r["status"] == StepStatus.STARTED:
            assert open_step is None, (open_step, r["step"], rows)  # never two at once
            open_step, started = r["step"], started + 1
        elif r["status"] in (StepStatus.OK, StepStatus.FAILED) and r["step"] == open_step:
            open_step = None
    assert started >= 5  # the appliance's steps, never two at once whichever host ran them
    assert fleet(confs[0])[RACERS[0]]["state"] == "provisioned"


def device_log(appliance: str) -> list[dict[str, Any]]:
    """The appliance's own activity log (its hash-chained audit log), read out of band."""
    out = console(appliance, "cat", "/var/log/hsm/audit.jsonl").stdout.decode()
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_count_two_provisions_in_parallel_across_stamps(
    mine: dict[str, Any], tmp_path: Path
) -> None:
    """Also: the steps of an appliance share ONE management connection for the whole run
    (hsmctl.provider.sessions): the device logs a ``login`` per connection, and finds one
    provider login per appliance in its log; and one ``hsm show`` per appliance."""
    factory_reset(*RACERS)
    conf = provider_config(tmp_path, RACERS)
    before = {a: max((e["seq"] for e in device_log(a)), default=-1) for a in RACERS}
    started = time.monotonic()
    proc = subprocess.run(_provision_argv(conf, "--count", "2"), capture_output=True, timeout=300)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr.decode()
    items = one_json(proc)["appliances"]
    assert sorted(i["appliance"] for i in items) == RACERS
    assert {fleet(conf)[a]["stamp"] for a in RACERS} == {"stamp1", "stamp2"}
    for appliance in RACERS:
        run = [e for e in device_log(appliance) if e["seq"] > before[appliance]]
        ours = [e for e in run if e["actor"] == "provider"]  # not a monitor poll's
        logins = [e for e in ours if e["event"] == "login"]
        assert [(e["outcome"], e["detail"]["interface"]) for e in logins] == [("ok", "mgmt")]
        # ... and that connection ran every step's commands.
        commands = [e["detail"]["command"] for e in ours if e["event"] == "command"]
        for wanted in ("hsm show", "network set", "user enable monitor", "user otp set"):
            assert any(c.startswith(wanted) for c in commands), (wanted, commands)
        # One `hsm show` (verify's): monitor and the hand-off of the same run use its
        # reading (provisioning.Readings; the journal holds no finished hand-off here).
        assert commands.count("hsm show") == 1, commands
    print(f"provision --count 2: {took:.1f} s")


def test_killed_mid_playbook_then_rerun_completes_once(
    mine: dict[str, Any], tmp_path: Path
) -> None:
    spare = RACERS[1]
    factory_reset(KILLED, spare)
    conf = provider_config(tmp_path, [KILLED, spare])
    rid = f"kill-{uuid.uuid4()}"
    proc = subprocess.Popen(
        _provision_argv(conf, "--request-id", rid),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    steps: list[tuple[str, str]] = []
    while time.monotonic() < deadline and proc.poll() is None:
        if Path(yaml.safe_load(conf.read_text())["state_dir"], DB_FILE).exists():
            with store_of(conf) as s:
                steps = [(e.step, e.status.value) for e in s.journal(request_id=rid)]
        if ("network", "started") in steps:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        out, err = proc.communicate()
        raise AssertionError(
            f"provisioning ended (exit {proc.returncode}) before the test could kill it:\n"
            f"{err.decode()[-3000:]}{out.decode()[-1000:]}"
        )
    assert ("network", "started") in steps and ("handoff", "ok") not in steps
    below = descendants(proc.pid)
    run_dirs = {
        Path(arg.split("/inventory/")[0])
        for p in below
        for arg in _cmdline(p)
        if arg.startswith(tempfile.gettempdir() + "/hsmctl-run-") and "/inventory/" in arg
    }
    assert len(run_dirs) == 1, "no ansible-runner run among the provisioning's processes"
    assert any("hsmctl.runner.guard" in _cmdline(p) for p in below), "playbook not guarded"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    # ansible-runner starts ansible-playbook in a session of its own (pexpect, SIGHUP
    # ignored); the guard it runs under ends it, its forks and modules with hsmctl.
    end = time.monotonic() + 25
    while time.monotonic() < end and any(alive(p) for p in below):
        time.sleep(0.2)
    left = [(p, _cmdline(p)) for p in below if alive(p)]
    for p, _ in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"outlived the killed hsmctl: {left}"
    # A killed run cannot remove its private data directory; it is 0700 and ours to clean.
    for d in run_dirs:
        if d.exists():
            assert stat.S_IMODE(d.stat().st_mode) == 0o700
            shutil.rmtree(d)

    with store_of(conf) as s:
        assert s.get_request(rid).status.value == "running"  # type: ignore[union-attr]
        (before,) = s.allocations(request_id=rid)
    again = subprocess.run(_provision_argv(conf, "--request-id", rid), capture_output=True)
    assert again.returncode == 0, again.stderr.decode()
    result = one_json(again)
    assert (result["appliance"], result["ip"]) == (before.appliance, before.ip)
    rows = fleet(conf)
    assert sorted(a for a, r in rows.items() if r["state"] != "available") == [before.appliance]
    assert rows[before.appliance]["state"] == "provisioned"
    with store_of(conf) as s:
        snap = s.snapshot()
    assert [r["appliance"] for r in snap["allocations"]] == [before.appliance]
    assert [r["ip"] for r in snap["address_assignments"]] == [before.ip]
    assert [r["request_id"] for r in snap["requests"]] == [rid]
    # The same request id again returns the result without running anything.
    third = one_json(
        subprocess.run(_provision_argv(conf, "--request-id", rid), capture_output=True)
    )
    assert third == result
