"""The takeover in the lab (SPEC §7, issue 5): end to end, identity and input checks,
many appliances through ``playbooks/takeover.yml``, and where secrets must never be.

Appliances: hsm09 … hsm14 (``APPLIANCE_SETS["takeover"]``), provisioned once through
``hsmctl provision --ip`` (each its own provider database), then re-provisioned through
the provisioning steps whenever a test needs a fresh hand-off.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from hsmctl import auditlog
from hsmctl.errors import HostKeyMismatch
from hsmctl.ssh import AuthenticationFailed, DeviceConnection, PinnedHostKeys
from hsmctl.takeover.faults import ENV
from hsmctl.takeover.workflow import STEPS, token_label
from tests.conftest import (
    APPLIANCE_SETS,
    ensure_lab,
    factory_reset,
    hsmctl,
    provider_config,
    provision,
    takeover,
)
from tests.lab.secret_scan import ProcSampler, files_under, grep_files
from tests.lab.takeover_helpers import (
    LAB_DIR,
    PROVIDER_KEY,
    PROVIDER_KNOWN_HOSTS,
    Rig,
    admin_activity,
    admin_login,
    ansible_runner_cli,
    console,
    customer_state,
    escrowed,
    journal,
    last_seq,
    one_time_password,
    provision_all,
    resign_bundle,
    restart_hsmd,
    runner_outcomes,
    sshd_log,
    takeover_cli,
    verify_receipt,
    write_inventory,
)

pytestmark = pytest.mark.lab

TENANT = "tenant1"
EXIT_USAGE, EXIT_INTEGRITY = 2, 3


@pytest.fixture(scope="module")
def lab_status(_lab_session: None) -> dict[str, Any]:
    return ensure_lab()


@pytest.fixture(scope="module")
def rigs(lab_status: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rig]:
    """hsm10 … hsm14 provisioned (``hsmctl provision --ip``), in parallel."""
    base = tmp_path_factory.mktemp("rigs")
    found = {a: Rig(lab_status, a, TENANT, base / a) for a in APPLIANCE_SETS["takeover"][1:]}
    provision_all(list(found.values()))
    return found


# -- 1. end to end --------------------------------------------------------------------------------


@dataclass
class Owned:
    rig: Rig
    tenant_conf: Path
    provider_conf: Path
    result: dict[str, Any]
    seq_before: int
    otp: str

    @property
    def state(self) -> Path:
        return customer_state(self.tenant_conf, self.rig.appliance)

    @property
    def keys(self) -> list[str]:
        j = journal(self.tenant_conf, self.rig.appliance)
        assert j is not None
        return list(j["host_keys"]["current"])

    @property
    def password(self) -> str:
        value = escrowed(self.tenant_conf, self.rig.appliance, "admin-password")
        assert value is not None
        return value


@pytest.fixture(scope="module")
def owned(lab_status: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Owned:
    """hsm09: ``hsmctl provision`` (tenant1), then ``hsmctl takeover`` from the client
    namespace, both with the conftest helpers, as a user runs them."""
    base = tmp_path_factory.mktemp("e2e")
    rig = Rig(lab_status, APPLIANCE_SETS["takeover"][0], TENANT, base)
    restart_hsmd(rig.appliance)
    factory_reset(rig.appliance)
    pconf = provider_config(base / "provider", [rig.appliance])
    out = provision(pconf, TENANT, "--ip", rig.ip)
    assert out["appliance"] == rig.appliance and out["ip"] == rig.ip
    rig.handoff = Path(out["handoff"])
    tconf = rig.tenant_conf(base)
    seq = last_seq(rig.appliance)
    result = takeover(lab_status, tconf, TENANT, out["handoff"])
    assert result["appliance"] == rig.appliance and result["state"] == "customer-owned"
    return Owned(rig, tconf, pconf, result, seq, one_time_password(rig))


def test_provider_key_is_refused_on_management_by_openssh(owned: Owned) -> None:
    proc = subprocess.run(
        [
            "ssh",
            "-i",
            str(PROVIDER_KEY),
            "-o",
            f"UserKnownHostsFile={PROVIDER_KNOWN_HOSTS}",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ConnectTimeout=10",
            "-F",
            "/dev/null",
            f"provider@{owned.rig.mgmt_ip}",
            "hsm show",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 255, proc
    assert b"Permission denied" in proc.stderr, proc.stderr
    assert b"owner_state" not in proc.stdout


def test_provider_key_is_refused_on_management_by_paramiko(owned: Owned) -> None:
    pins = PinnedHostKeys.from_known_hosts(PROVIDER_KNOWN_HOSTS.read_text(), owned.rig.mgmt_ip)
    conn = DeviceConnection(owned.rig.mgmt_ip, username="provider", pinned=pins, key=PROVIDER_KEY)
    with pytest.raises(AuthenticationFailed):
        conn.connect()
    conn.close()


def test_key_and_new_password_work_and_show_the_new_label(owned: Owned) -> None:
    shown = json.loads(admin_login(owned.rig, owned.keys, owned.password, command="hsm show"))
    assert shown["label"] == f"{TENANT}-{owned.rig.appliance}"
    assert shown["initialised"] is True
    assert shown["owner_state"] == "customer-owned"
    assert shown["provider_access"] is False
    assert shown["monitor"] == "disabled"


def test_one_time_password_key_alone_and_password_alone_are_refused(owned: Owned) -> None:
    with pytest.raises(AuthenticationFailed):
        admin_login(owned.rig, owned.keys, owned.otp)
    with pytest.raises(AuthenticationFailed):
        admin_login(owned.rig, owned.keys, None)
    with pytest.raises(AuthenticationFailed):
        admin_login(owned.rig, owned.keys, owned.password, with_key=False)


def test_the_old_data_host_keys_are_no_longer_served(owned: Owned) -> None:
    from hsmctl.handoff import read_bundle

    original = read_bundle(owned.rig.handoff)["data_host_keys"]
    assert not set(original) & set(owned.keys)
    with pytest.raises(HostKeyMismatch):
        admin_login(owned.rig, original, owned.password)


def test_the_activity_log_holds_the_whole_transfer_and_no_earlier_admin_session(
    owned: Owned,
) -> None:
    lines = console(owned.rig.appliance, "cat", "/var/log/hsm/audit.jsonl").stdout.splitlines()
    records = [json.loads(line) for line in lines]
    pins = json.loads((owned.state / "pins.json").read_text())
    report = auditlog.verify_lines(lines, pins["audit_keys"], device=owned.rig.appliance)
    assert report.ok, report.violations
    mine = [r for r in records if r["seq"] > owned.seq_before]
    otp_set = [
        r["seq"]
        for r in mine
        if r["event"] == "result" and r["detail"].get("command", "").startswith("user otp set")
    ]
    assert otp_set == [], "the provider set a one-time password during the takeover"
    transfers = [r for r in mine if r["event"] == "ownership-transfer"]
    assert len(transfers) == 1
    transfer = transfers[0]["seq"]
    started = datetime.fromisoformat(
        json.loads((owned.state / "takeover.json").read_text())["started_at"].replace("Z", "+00:00")
    )
    # Before the transfer: only this takeover's own admin activity, from the client.
    client_ip = next(t for t in owned.rig.lab["tenants"] if t["name"] == TENANT)["client_ip"]
    for r in mine:
        if r["actor"] == "admin" and r["seq"] < transfer:
            assert datetime.fromisoformat(r["time"].replace("Z", "+00:00")) >= started, r
            assert r["source"] == client_ip, r
    commands = [
        r["detail"]["command"]
        for r in mine
        if r["actor"] == "admin" and r["event"] == "result" and r["outcome"] == "ok"
    ]
    wanted = [
        "user password",
        "sysconf provider-access revoke",
        "user disable monitor",
        "sysconf hostkey stage",
        "sysconf hostkey activate",
        f"hsm init --label {token_label_of(owned)}",
        "hsm co-pin set",
        "audit key rotate",
        "user credential set audit",
        "user enable audit",
        "audit export --after 0",
    ]
    positions = [commands.index(c) for c in wanted]
    assert positions == sorted(positions), commands
    assert any(r["event"] == "key-rotation" for r in mine)
    # The provider's powers ended at the transfer: nothing of theirs succeeded after it.
    late = [
        r for r in mine if r["actor"] == "provider" and r["seq"] > transfer and r["outcome"] == "ok"
    ]
    assert late == [], late


def token_label_of(owned: Owned) -> str:
    from hsmctl.handoff import open_bundle

    opened = open_bundle(
        owned.rig.handoff, LAB_DIR / "provider" / "signing_key.pub.pem", owned.rig.identity
    )
    return token_label(opened)


def test_receipt_verifies_and_a_tampered_one_exits_3(owned: Owned, tmp_path: Path) -> None:
    receipt = Path(owned.result["receipt"])
    ok = hsmctl(
        "--config",
        str(owned.tenant_conf),
        "takeover",
        "verify",
        str(receipt),
        "--json",
        netns=owned.rig.netns,
    )
    assert ok.returncode == 0, ok.stderr
    shown = json.loads(ok.stdout)
    assert shown["verified"] is True and shown["appliance"] == owned.rig.appliance
    doc = json.loads(receipt.read_text())
    names = {c["name"] for c in doc["checks"]}
    assert {
        "one-time-password-refused",
        "key-without-password-refused",
        "password-without-key-refused",
        "provider-access-revoked",
        "no-admin-session-before-the-customer",
        "host-keys-rotated",
        "token-answers-new-pins",
        "activity-log-verifies",
    } <= names
    doc["host_key_fingerprints"] = list(reversed(doc["host_key_fingerprints"]))
    tampered = tmp_path / "receipt.json"
    tampered.write_text(json.dumps(doc))
    bad = hsmctl(
        "--config",
        str(owned.tenant_conf),
        "takeover",
        "verify",
        str(tampered),
        netns=owned.rig.netns,
    )
    assert bad.returncode == EXIT_INTEGRITY, bad.stderr


def test_a_rerun_of_a_finished_takeover_changes_nothing(owned: Owned) -> None:
    seq = last_seq(owned.rig.appliance)
    again = takeover_cli(owned.rig.netns, owned.tenant_conf, owned.rig.handoff)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == owned.result
    assert admin_activity(owned.rig.appliance, seq) == []


def test_fleet_list_says_customer_owned_after_health(owned: Owned) -> None:
    conf = str(owned.provider_conf)
    proc = hsmctl("--config", conf, "health", owned.rig.appliance, "--json")
    assert proc.returncode == 0, proc.stderr
    fleet = json.loads(hsmctl("--config", conf, "fleet", "list", "--json", check=True).stdout)
    row = next(a for a in fleet["appliances"] if a["id"] == owned.rig.appliance)
    assert row["state"] == "customer-owned"


# -- 3. identity and input checks -----------------------------------------------------------------


def _nothing_sent(rig: Rig, seq: int, sshd_lines: int) -> None:
    """No admin login (of any outcome), session or command since ``seq``, and no
    authentication attempt for anyone in the data sshd's log."""
    assert admin_activity(rig.appliance, seq) == []
    new = sshd_log(rig.appliance)[sshd_lines:]
    assert not [
        line for line in new if "admin" in line or "Accepted" in line or "Failed" in line
    ], new


def test_another_appliance_answering_the_address_exits_3_and_gets_nothing(
    rigs: dict[str, Rig], tmp_path: Path
) -> None:
    wanted, other = rigs["hsm10"], rigs["hsm11"]
    wanted.reprovision()
    other.reprovision()
    # hsm10's bundle, signed by the provider, but naming hsm11's address: hsm11 answers.
    moved = resign_bundle(wanted, tmp_path / "moved.json", data_ip=other.ip)
    conf = wanted.tenant_conf(tmp_path)
    seqs = {r.appliance: last_seq(r.appliance) for r in (wanted, other)}
    lines = {r.appliance: len(sshd_log(r.appliance)) for r in (wanted, other)}
    proc = takeover_cli(wanted.netns, conf, moved)
    assert proc.returncode == EXIT_INTEGRITY, proc.stderr
    assert b"host key" in proc.stderr
    for r in (wanted, other):
        _nothing_sent(r, seqs[r.appliance], lines[r.appliance])
    # Nothing was committed: the genuine bundle takes over with the same customer state.
    good = takeover_cli(wanted.netns, conf, wanted.handoff)
    assert good.returncode == 0, good.stderr
    verify_receipt(Path(json.loads(good.stdout)["receipt"]), wanted.identity)


def test_host_keys_of_another_appliance_in_the_bundle_exit_3(
    rigs: dict[str, Rig], tmp_path: Path
) -> None:
    from hsmctl.handoff import read_bundle

    rig, other = rigs["hsm11"], rigs["hsm12"]
    rig.reprovision()
    other.reprovision()
    foreign = resign_bundle(
        rig, tmp_path / "foreign.json", data_host_keys=read_bundle(other.handoff)["data_host_keys"]
    )
    seq, lines = last_seq(rig.appliance), len(sshd_log(rig.appliance))
    proc = takeover_cli(rig.netns, rig.tenant_conf(tmp_path), foreign)
    assert proc.returncode == EXIT_INTEGRITY, proc.stderr
    _nothing_sent(rig, seq, lines)


def test_a_tampered_bundle_exits_3(rigs: dict[str, Rig], tmp_path: Path) -> None:
    rig = rigs["hsm11"]
    doc = json.loads(rig.handoff.read_text())
    doc["expires_at"] = "2099-01-01T00:00:00Z"
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(doc))
    seq = last_seq(rig.appliance)
    proc = takeover_cli(rig.netns, rig.tenant_conf(tmp_path), tampered)
    assert proc.returncode == EXIT_INTEGRITY, proc.stderr
    assert admin_activity(rig.appliance, seq) == []
    assert not (customer_state(rig.tenant_conf(tmp_path), rig.appliance) / "takeover.json").exists()


def test_an_expired_bundle_exits_3_but_a_started_takeover_finishes(
    rigs: dict[str, Rig], tmp_path: Path
) -> None:
    rig = rigs["hsm11"]
    rig.reprovision()
    now = datetime.now(UTC)
    expired = resign_bundle(
        rig, tmp_path / "expired.json", now=now - timedelta(hours=2), validity=timedelta(hours=1)
    )
    seq = last_seq(rig.appliance)
    proc = takeover_cli(rig.netns, rig.tenant_conf(tmp_path / "fresh"), expired)
    assert proc.returncode == EXIT_INTEGRITY, proc.stderr
    assert b"expired" in proc.stderr
    assert admin_activity(rig.appliance, seq) == []

    # A bundle valid for a few more seconds: start, get killed after the password change,
    # let it expire, run again.
    life = timedelta(seconds=10)
    short = resign_bundle(
        rig,
        tmp_path / "short.json",
        now=datetime.now(UTC) - timedelta(hours=1),
        validity=timedelta(hours=1) + life,
    )
    conf = rig.tenant_conf(tmp_path / "started")
    first = takeover_cli(rig.netns, conf, short, env={ENV: "after:password:kill"})
    assert first.returncode == -9, first.stderr
    j = journal(conf, rig.appliance)
    assert j is not None and j["password"] == "committed"
    from hsmctl.handoff import read_bundle

    expires = datetime.fromisoformat(read_bundle(short)["expires_at"].replace("Z", "+00:00"))
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 1)
    again = takeover_cli(rig.netns, conf, short)
    assert again.returncode == 0, again.stderr
    verify_receipt(Path(json.loads(again.stdout)["receipt"]), rig.identity)


def test_another_tenants_identity_exits_2(
    rigs: dict[str, Rig], lab_status: dict[str, Any], tmp_path: Path
) -> None:
    rig = rigs["hsm12"]
    seq = last_seq(rig.appliance)
    other = next(t for t in lab_status["tenants"] if t["name"] != TENANT)
    proc = takeover_cli(
        rig.netns, rig.tenant_conf(tmp_path), rig.handoff, "--identity", other["identity"]
    )
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert b"another tenant identity" in proc.stderr
    assert admin_activity(rig.appliance, seq) == []


def _secret_file(path: Path, value: str, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize(
    "flag, value, mode, message",
    [
        ("--new-password-file", "short1A", 0o600, b"--new-password-file"),
        ("--new-password-file", "alllowercaseletters", 0o600, b"--new-password-file"),
        ("--new-password-file", "Strong-enough-1234", 0o640, b"too open"),
        ("--so-pin-file", "123", 0o600, b"4 to 255 bytes"),
        ("--co-pin-file", "7" * 256, 0o600, b"4 to 255 bytes"),
        ("--so-pin-file", "12345678", 0o604, b"too open"),
    ],
)
def test_bad_secret_input_exits_2_before_anything_is_sent(
    rigs: dict[str, Rig], tmp_path: Path, flag: str, value: str, mode: int, message: bytes
) -> None:
    rig = rigs["hsm12"]
    seq = last_seq(rig.appliance)
    secret = _secret_file(tmp_path / "secret", value, mode)
    conf = rig.tenant_conf(tmp_path)
    proc = takeover_cli(rig.netns, conf, rig.handoff, flag, str(secret))
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert value.encode() not in proc.stderr + proc.stdout
    assert admin_activity(rig.appliance, seq) == []
    assert not (customer_state(conf, rig.appliance) / "takeover.json").exists()


def test_given_secrets_are_the_ones_used(rigs: dict[str, Rig], tmp_path: Path) -> None:
    """A takeover with --new-password-file, --so-pin-file, --co-pin-file: the device takes
    exactly those (the receipt's PIN check used the escrowed copies)."""
    rig = rigs["hsm12"]
    rig.reprovision()
    files = {
        "--new-password-file": _secret_file(
            tmp_path / "pw", "Given-Pa55word-" + os.urandom(4).hex()
        ),
        "--so-pin-file": _secret_file(tmp_path / "so", "so-" + os.urandom(6).hex()),
        "--co-pin-file": _secret_file(tmp_path / "co", "co-" + os.urandom(6).hex()),
    }
    conf = rig.tenant_conf(tmp_path)
    args = [x for flag, path in files.items() for x in (flag, str(path))]
    proc = takeover_cli(rig.netns, conf, rig.handoff, *args)
    assert proc.returncode == 0, proc.stderr
    for flag, name in (
        ("--new-password-file", "admin-password"),
        ("--so-pin-file", "so-pin"),
        ("--co-pin-file", "co-pin"),
    ):
        assert escrowed(conf, rig.appliance, name) == files[flag].read_text().strip()
    j = journal(conf, rig.appliance)
    assert j is not None
    admin_login(rig, j["host_keys"]["current"], files["--new-password-file"].read_text().strip())


# -- application clients registered by the takeover (issue 11, item 5) -----------------------

CLIENTS = {"app1": "crypto-officer", "app2": "crypto-user"}
CLIENT_FLAGS = [x for name, role in CLIENTS.items() for x in ("--client", f"{name}:{role}")]


def client_list(tenant_conf: Path, rig: Rig) -> list[dict[str, Any]]:
    proc = hsmctl(
        "--config", str(tenant_conf), "client", "list", rig.appliance, "--json", netns=rig.netns
    )
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout)["clients"])


def check_kits(tenant_conf: Path, rig: Rig, result: dict[str, Any]) -> dict[str, str]:
    """The takeover's clients are exactly CLIENTS on the device, each with a kit as
    ``hsmctl client register`` writes it whose key is the one registered; returns each
    client's fingerprint."""
    from hsmctl.ssh import PublicKey

    state = customer_state(tenant_conf, rig.appliance)
    assert result["clients"] == [
        {"client": n, "role": r, "kit": str(state / "clients" / n)} for n, r in CLIENTS.items()
    ]
    listed = client_list(tenant_conf, rig)
    assert sorted((c["name"], c["role"]) for c in listed) == sorted(CLIENTS.items()), listed
    fingerprints = {}
    for c in listed:
        kit = Path(next(k["kit"] for k in result["clients"] if k["client"] == c["name"]))
        name = c["name"]
        assert sorted(p.name for p in kit.iterdir()) == sorted(
            [f"{name}_key", f"{name}_key.pub", "known_hosts", f"{name}.module", "README"]
        )
        assert (kit / f"{name}_key").stat().st_mode & 0o777 == 0o600
        public = PublicKey.parse((kit / f"{name}_key.pub").read_text())
        assert public.fingerprint == c["fingerprint"]
        module = (kit / f"{name}.module").read_text()
        assert f"-i {kit / f'{name}_key'} " in module and f"p11-{name}@{rig.ip}" in module
        fingerprints[name] = c["fingerprint"]
    # No kit being made is left beside them.
    assert sorted(p.name for p in (state / "clients").iterdir()) == sorted(CLIENTS)
    return fingerprints


def test_a_takeover_without_client_registers_none(owned: Owned) -> None:
    assert owned.result["clients"] == []
    assert client_list(owned.tenant_conf, owned.rig) == []
    doc = json.loads(Path(owned.result["receipt"]).read_text())
    assert doc["clients"] == []
    check = next(c for c in doc["checks"] if c["name"] == "clients-registered")
    assert check == {"name": "clients-registered", "ok": True, "detail": []}
    assert not (owned.state / "clients").exists()


def test_a_takeover_with_clients_registers_exactly_them(
    rigs: dict[str, Rig], tmp_path: Path
) -> None:
    """``--client app1:crypto-officer --client app2:crypto-user``: the device lists those
    two with those roles and the keys of their kits, the receipt names them (no secret),
    a rerun changes nothing, and a rerun with another set exits 2 before anything is sent."""
    rig = rigs["hsm12"]
    rig.reprovision()
    conf = rig.tenant_conf(tmp_path)
    proc = takeover_cli(rig.netns, conf, rig.handoff, *CLIENT_FLAGS)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["state"] == "customer-owned"
    fingerprints = check_kits(conf, rig, result)

    receipt = Path(result["receipt"])
    shown = verify_receipt(receipt, rig.identity)
    expected = [
        {"client": n, "role": r, "fingerprint": fingerprints[n]} for n, r in CLIENTS.items()
    ]
    assert shown["clients"] == expected
    doc = json.loads(receipt.read_text())
    assert doc["clients"] == expected
    check = next(c for c in doc["checks"] if c["name"] == "clients-registered")
    assert check["ok"] is True and sorted(check["detail"], key=str) == sorted(expected, key=str)
    text = receipt.read_text()
    for name in CLIENTS:
        key = (customer_state(conf, rig.appliance) / "clients" / name / f"{name}_key").read_text()
        assert key.split("\n")[1] not in text

    seq = last_seq(rig.appliance)
    again = takeover_cli(rig.netns, conf, rig.handoff, *CLIENT_FLAGS)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == result
    other = takeover_cli(rig.netns, conf, rig.handoff, "--client", "app1:crypto-officer")
    assert other.returncode == EXIT_USAGE, other.stderr
    assert b"app2:crypto-user" in other.stderr, other.stderr
    assert admin_activity(rig.appliance, seq) == []


def test_a_resumed_client_step_keeps_its_set_and_never_overwrites_a_registration(
    rigs: dict[str, Rig], tmp_path: Path
) -> None:
    """Killed inside the clients step: a rerun with another --client set exits 2 before
    anything is sent; a client registered meanwhile under the same name with another key
    stops the rerun (exit 3) and stays as it was; once it is revoked, the rerun finishes."""
    rig = rigs["hsm12"]
    rig.reprovision()
    conf = rig.tenant_conf(tmp_path)
    first = takeover_cli(rig.netns, conf, rig.handoff, *CLIENT_FLAGS, env={ENV: "send:client-list"})
    assert first.returncode == -9, first.stderr
    j = journal(conf, rig.appliance)
    assert j is not None and [(c["name"], c["role"]) for c in j["clients"]] == list(CLIENTS.items())

    seq = last_seq(rig.appliance)
    other = takeover_cli(rig.netns, conf, rig.handoff, "--client", "app1:crypto-officer")
    assert other.returncode == EXIT_USAGE, other.stderr
    assert b"left out: app2:crypto-user" in other.stderr, other.stderr
    assert admin_activity(rig.appliance, seq) == []

    # Someone registers app1 with a key of their own before the rerun.
    foreign = hsmctl(
        "--config", str(conf), "client", "register", rig.appliance, "--name", "app1",
        "--role", "crypto-officer", "--output", str(tmp_path / "foreign"), "--json",
        netns=rig.netns,
    )  # fmt: skip
    assert foreign.returncode == 0, foreign.stderr
    theirs = json.loads(foreign.stdout)["fingerprint"]
    stopped = takeover_cli(rig.netns, conf, rig.handoff, *CLIENT_FLAGS)
    assert stopped.returncode == EXIT_INTEGRITY, stopped.stderr
    assert b"client app1" in stopped.stderr and theirs.encode() in stopped.stderr
    listed = client_list(conf, rig)
    assert [(c["name"], c["fingerprint"]) for c in listed] == [("app1", theirs)]

    revoked = hsmctl(
        "--config", str(conf), "client", "revoke", rig.appliance, "--name", "app1",
        netns=rig.netns,
    )  # fmt: skip
    assert revoked.returncode == 0, revoked.stderr
    done = takeover_cli(rig.netns, conf, rig.handoff, *CLIENT_FLAGS)
    assert done.returncode == 0, done.stderr
    fingerprints = check_kits(conf, rig, json.loads(done.stdout))
    assert theirs not in fingerprints.values()
    verify_receipt(Path(json.loads(done.stdout)["receipt"]), rig.identity)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--client", "app1"], b"expected NAME:ROLE"),
        (["--client", "app1:admin"], b"unknown role 'admin'"),
        (["--client", "App_1:crypto-user"], b"bad NAME"),
        (["--client", "app1-:crypto-user"], b"bad NAME"),
        (["--client", "a" * 29 + ":crypto-user"], b"bad NAME"),
        (["--client", "app1:crypto-user", "--client", "app1:crypto-officer"], b"more than once"),
    ],
)
def test_bad_client_input_exits_2_before_anything_is_sent(
    rigs: dict[str, Rig], tmp_path: Path, args: list[str], message: bytes
) -> None:
    rig = rigs["hsm12"]
    seq = last_seq(rig.appliance)
    conf = rig.tenant_conf(tmp_path)
    proc = takeover_cli(rig.netns, conf, rig.handoff, *args)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert admin_activity(rig.appliance, seq) == []
    assert not (customer_state(conf, rig.appliance) / "takeover.json").exists()


# -- 5. the playbook over five appliances, and 4. the secrets scan ------------------------------


PLAYBOOK_CLIENTS = {"hsm10": ["app1:crypto-user"]}  # hsm_clients: the module's clients


def _host_vars(rig: Rig, handoff: Path) -> dict[str, Any]:
    clients = PLAYBOOK_CLIENTS.get(rig.appliance)
    return {"hsm_handoff": str(handoff)} | ({"hsm_clients": clients} if clients else {})


@dataclass
class PlaybookRun:
    rigs: list[Rig]
    broken: Rig
    tenant_conf: Path
    private_dir: Path
    proc: subprocess.CompletedProcess[bytes]
    outcomes: dict[str, dict[str, Any]]
    sampler: ProcSampler
    seconds: float


@pytest.fixture(scope="module")
def playbook_run(rigs: dict[str, Rig], tmp_path_factory: pytest.TempPathFactory) -> PlaybookRun:
    """takeover.yml over hsm10 … hsm14 in parallel (forks 5), through ``ansible-runner
    run`` inside the client namespace (its artifacts kept for the scan); hsm13's bundle
    names hsm14's host keys (re-signed by the provider), so it must fail alone. Every
    process's arguments and environment are sampled throughout."""
    base = tmp_path_factory.mktemp("playbook")
    chosen = [rigs[a] for a in ("hsm10", "hsm11", "hsm12", "hsm13", "hsm14")]
    threads = [threading.Thread(target=r.reprovision) for r in chosen]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    from hsmctl.handoff import read_bundle

    broken = rigs["hsm13"]
    wrong = resign_bundle(
        broken,
        base / "hsm13-wrong-keys.json",
        data_host_keys=read_bundle(rigs["hsm14"].handoff)["data_host_keys"],
    )
    conf = chosen[0].tenant_conf(base)
    hosts = {r.appliance: _host_vars(r, wrong if r is broken else r.handoff) for r in chosen}
    inventory = write_inventory(base / "hosts.yml", hosts)
    sampler = ProcSampler(base / "procs.json").start()
    started = time.monotonic()
    try:
        proc = ansible_runner_cli(
            chosen[0].netns, base / "runner", inventory, {"hsmctl_config": str(conf)}, forks=5
        )
    finally:
        seconds = time.monotonic() - started
        sampler.stop()
    return PlaybookRun(
        chosen,
        broken,
        conf,
        base / "runner",
        proc,
        runner_outcomes(base / "runner"),
        sampler,
        seconds,
    )


def test_playbook_takes_five_over_in_parallel_and_one_failure_stays_alone(
    playbook_run: PlaybookRun,
) -> None:
    run = playbook_run
    print(f"\ntakeover.yml, 5 appliances, forks 5: {run.seconds:.1f} s")
    assert run.proc.returncode != 0  # the play reports the one failure
    assert sorted(run.outcomes) == sorted(r.appliance for r in run.rigs)
    for rig in run.rigs:
        outcome = run.outcomes[rig.appliance]
        if rig is run.broken:
            assert outcome["status"] == "runner_on_failed", outcome
            assert outcome["exit_code"] == EXIT_INTEGRITY, outcome
            continue
        assert outcome["status"] == "runner_on_ok", outcome
        assert outcome["state"] == "customer-owned"
        assert outcome["steps"] == [s.value for s in STEPS]
        clients = [c.split(":") for c in PLAYBOOK_CLIENTS.get(rig.appliance, [])]
        state = customer_state(run.tenant_conf, rig.appliance)
        assert outcome["clients"] == [
            {"client": n, "role": r, "kit": str(state / "clients" / n)} for n, r in clients
        ]
        verify_receipt(Path(outcome["receipt"]), rig.identity)
        j = journal(run.tenant_conf, rig.appliance)
        assert j is not None and "receipt" in j["done"]
    stdout = run.proc.stdout.decode()
    assert "Report every appliance" in stdout
    report = stdout[stdout.index("Report every appliance") :].split("TASK [", 1)[0]
    print(report.strip())
    for rig in run.rigs:
        assert rig.appliance in stdout
    assert "FAILED (exit 3)" in stdout
    recap = stdout[stdout.rindex("PLAY RECAP") :]
    assert recap.count("failed=0") == 4 and recap.count("failed=1") == 1, recap


def test_playbook_rerun_resumes_and_changes_nothing_done(playbook_run: PlaybookRun) -> None:
    run = playbook_run
    done = [r for r in run.rigs if r is not run.broken]
    seqs = {r.appliance: last_seq(r.appliance) for r in done}
    inventory = write_inventory(
        run.private_dir.parent / "done.yml",
        {r.appliance: _host_vars(r, r.handoff) for r in done},
    )
    proc = ansible_runner_cli(
        done[0].netns,
        run.private_dir.parent / "runner2",
        inventory,
        {"hsmctl_config": str(run.tenant_conf)},
        forks=5,
    )
    assert proc.returncode == 0, proc.stdout.decode()[-2000:]
    outcomes = runner_outcomes(run.private_dir.parent / "runner2")
    assert all(o["changed"] is False and o["steps"] == [] for o in outcomes.values()), outcomes
    for r in done:
        assert admin_activity(r.appliance, seqs[r.appliance]) == []


def _needles(run: PlaybookRun) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for rig in run.rigs:
        if rig is run.broken:
            continue
        values = [
            escrowed(run.tenant_conf, rig.appliance, n)
            for n in ("admin-password", "so-pin", "co-pin")
        ]
        assert all(values), values
        found[rig.appliance] = [v for v in values if v] + [one_time_password(rig)]
    return found


def test_secrets_are_nowhere_but_the_escrow_and_the_device_hashes(
    playbook_run: PlaybookRun, lab_status: dict[str, Any]
) -> None:
    run = playbook_run
    per_device = _needles(run)
    needles = [n for values in per_device.values() for n in values]
    hits: list[str] = []
    # The customer's state: journals, receipts, pins; the escrow is the one place.
    state = Path(yaml.safe_load(run.tenant_conf.read_text())["state_dir"])
    hits += grep_files(
        (
            p
            for p in files_under(state)
            if "secrets" not in p.relative_to(state).parts
            and "retired" not in p.relative_to(state).parts
        ),
        needles,
    )
    escrow_hits = grep_files(files_under(state), needles)
    assert len(escrow_hits) >= 3 * len(per_device)  # the scan does find what is there
    # ansible-runner's private data directory: artifacts, events, command, env.
    hits += grep_files(files_under(run.private_dir), needles)
    # The provider's side: this test's provider databases and bundles, the lab's provider dir.
    for rig in run.rigs:
        hits += grep_files(files_under(rig.directory), needles)
    hits += grep_files(files_under(LAB_DIR / "provider"), needles)
    # Each device: logs and its whole overlay, but for the password hashes and the tokens.
    for appliance, values in per_device.items():
        upper = LAB_DIR / "appliances" / appliance
        hits += grep_files(
            files_under(upper, skip=("upper/etc/shadow", "upper/var/lib/softhsm/tokens")), values
        )
    # Every process's arguments and environment during the run.
    assert run.sampler.samples > 50, run.sampler.samples
    assert any("ansible" in blob for blob in run.sampler.blobs), "the sampler saw no ansible"
    hits += run.sampler.hits(needles)
    assert hits == [], "\n".join(hits)
