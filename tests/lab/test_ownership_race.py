"""The ownership transfer cannot be undone: not by a provider command in flight, not by a
crash of the device daemon in the middle of the first password change (issue 10, defects
1 and 5).

Black-box over real SSH: the provider fires each of its state-changing commands in a
tight loop over a multiplexed management connection (several channels at once) while the
admin makes the first ``user password``. Whoever wins, afterwards the device is either
customer-owned with every provider path closed, or the admin's change never happened.
The activity log shows each provider command either completed before the
``ownership-transfer`` record or refused after it.

Only hsm25 (tenant1) and hsm26 (tenant2) are touched (conftest's APPLIANCE_SETS
"hardening"), at data addresses .235 and .236.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import paramiko
import pytest

from tests.lab.firmware_helpers import (
    PROVIDER_KEY,
    Appliance,
    Device,
    appliance,
    audit_records,
    console,
    hsmd_pid,
    last_seq,
    load_key,
    mgmt_conn,
    new_secret,
    provision,
    wait_for_records,
)

pytestmark = pytest.mark.lab

# Where the admin's change lands in the provider's stream (seconds; negative: before it
# starts), per appliance: two appliances race at once, 8 rounds a command. Spread from a
# clear head start to well inside the stream; the jitter of a loaded machine does the rest.
OFFSETS = [[-0.5, -0.1, 0.05, 0.25], [-0.3, 0.0, 0.1, 0.35]]
CHANNELS = 3  # provider commands in flight at once on the one connection
AFTER = 0.4  # seconds the provider keeps firing after the admin's change returned


@pytest.fixture
def hsm25(lab: dict[str, Any]) -> Appliance:
    return appliance(lab, "hsm25", "tenant1", 225)


@pytest.fixture
def hsm26(lab: dict[str, Any]) -> Appliance:
    return appliance(lab, "hsm26", "tenant2", 226)


def provider_commands(dev: Device, provider_password: str) -> dict[str, tuple[str, list[str]]]:
    app = dev.app
    return {
        "user otp set": ("user otp set", [app.tenant_public_key, provider_password]),
        "sysconf factory-reset": ("sysconf factory-reset", []),
        "network set": (
            f"network set --ip {app.data_ip}/{app.prefix} --gateway {app.gateway}",
            [],
        ),
        "user enable monitor": ("user enable monitor", []),
    }


def provider_refused(app: Appliance) -> bool:
    with mgmt_conn(app) as conn:
        try:
            conn.auth_key("provider", load_key(PROVIDER_KEY))
        except paramiko.AuthenticationException:
            return True
        return False


def admin_works(dev: Device, password: str) -> bool:
    try:
        dev.admin(password).close()
    except paramiko.AuthenticationException:
        return False
    return True


@dataclass
class Fired:
    exits: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def fire(conn: Any, line: str, stdin: list[str], stop: threading.Event, fired: Fired) -> None:
    """One provider channel: the command again and again until told to stop or the
    connection is gone (the transfer ends provider sessions)."""
    while not stop.is_set():
        try:
            r = conn.run(line, stdin=stdin, timeout=30)
        except Exception as exc:  # the device ended the session: that is the point
            fired.errors.append(type(exc).__name__)
            return
        fired.exits.append(r.exit)


def one_round(dev: Device, command: str, offset: float) -> dict[str, Any]:
    """The admin's first change ``offset`` seconds after the provider's stream starts
    (negative: before it)."""
    app = dev.app
    provider_password = new_secret("prov")
    line, stdin = provider_commands(dev, provider_password)[command]
    monitor = paramiko.ECDSAKey.generate(bits=256)
    with dev.provider() as p:
        r = p.run(
            "user credential set monitor",
            stdin=[f"{monitor.get_name()} {monitor.get_base64()} monitor"],
        )
        assert r.exit == 0, r
    start = last_seq(app)
    new_password = new_secret("admin")
    admin = dev.admin(dev.otp)
    prov = dev.provider()
    stop = threading.Event()
    fired = Fired()
    threads = [
        threading.Thread(target=fire, args=(prov, line, stdin, stop, fired), daemon=True)
        for _ in range(CHANNELS)
    ]
    change: dict[str, int | None] = {}

    def admin_change() -> None:
        try:
            change["exit"] = admin.run("user password", stdin=[new_password], timeout=60).exit
        except Exception:  # the provider's factory reset ended the admin's session first
            change["exit"] = None

    # A factory reset that runs first ends the admin's session: both orders must leave
    # a consistent device, and the head starts make sure the admin wins some rounds.
    changer = threading.Thread(target=admin_change, daemon=True)
    if offset < 0:
        changer.start()
        time.sleep(-offset)
    for t in threads:
        t.start()
    if offset >= 0:
        time.sleep(offset)
        changer.start()
    changer.join(timeout=90)
    admin.close()
    admin_exit = change.get("exit")
    time.sleep(AFTER)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    prov.close()
    records = [r for r in audit_records(app) if r["seq"] > start]
    return {
        "admin_exit": admin_exit,
        "new_password": new_password,
        "provider_password": provider_password,
        "records": records,
        "fired": fired,
    }


def check_round(dev: Device, command: str, outcome: dict[str, Any]) -> bool:
    """The invariants; True when the admin's change won the round."""
    app = dev.app
    records: list[dict[str, Any]] = outcome["records"]
    transfer = [r for r in records if r["event"] == "ownership-transfer"]
    provider = [
        r for r in records if r["actor"] == "provider" and r["event"] in ("command", "result")
    ]
    if outcome["admin_exit"] != 0:
        # The provider got there first (its factory reset ended the admin's session):
        # then there was no transfer to undo.
        assert command == "sysconf factory-reset", (command, outcome["admin_exit"])
        assert transfer == [], transfer
        return False
    assert len(transfer) == 1, transfer
    t = transfer[0]["seq"]
    after = [r for r in provider if r["seq"] > t]
    # Every provider command after the transfer was refused; none was approved or ran.
    assert all(r["outcome"] == "denied" for r in after), [
        (r["seq"], r["event"], r["outcome"], r["detail"]) for r in after if r["outcome"] != "denied"
    ]
    # Every provider command approved before it also finished before it.
    approved = [r for r in provider if r["event"] == "command" and r["outcome"] == "ok"]
    results = [r for r in provider if r["event"] == "result"]
    assert all(r["seq"] < t for r in approved + results), (t, approved, results)
    # The device, as the customer and the provider now see it.
    assert provider_refused(app), f"{command}: the provider key still logs in"
    assert admin_works(dev, outcome["new_password"]), f"{command}: the new password fails"
    assert not admin_works(dev, dev.otp), f"{command}: the one-time password still works"
    assert not admin_works(dev, outcome["provider_password"]), f"{command}: provider's password"
    with dev.admin(outcome["new_password"]) as a:
        info = a.run("hsm show").json()
        access = a.run("sysconf provider-access show").json()
    assert info["owner_state"] == "customer-owned", info
    assert access["provider_access"] is False and access["provider_enabled"] is False, access
    assert access["provider_key_installed"] is False, access
    # No password, neither the customer's nor the provider's, entered the log.
    text = json.dumps(records)
    for secret in (outcome["new_password"], outcome["provider_password"], dev.otp):
        assert secret not in text
    return True


@pytest.mark.parametrize(
    "command", ["user otp set", "sysconf factory-reset", "network set", "user enable monitor"]
)
def test_provider_command_in_flight_cannot_undo_the_transfer(
    hsm25: Appliance, hsm26: Appliance, command: str
) -> None:
    def rounds(app: Appliance, offsets: list[float]) -> list[bool]:
        won = []
        for offset in offsets:
            dev = provision(app)
            won.append(check_round(dev, command, one_round(dev, command, offset)))
        return won

    with ThreadPoolExecutor(2) as pool:
        runs = pool.map(rounds, (hsm25, hsm26), OFFSETS)
        results = [w for ws in runs for w in ws]
    # Not vacuous: the admin's change won at least some rounds against a live stream.
    assert any(results), f"{command}: the admin never got the change through"


# --- a crash of hsmd inside the first change -------------------------------------------


def arm(app: Appliance, point: str) -> None:
    console(app, "sh", "-c", f"echo {point} > /run/hsm/faults")


def wait_for_hsmd(app: Appliance, old: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        proc = console(app, "pgrep", "-f", "/usr/local/sbin/hsmd", check=False)
        pids = [int(p) for p in proc.stdout.split()]
        if (
            pids
            and old not in pids
            and console(app, "hsmsh", "-c", "help", check=False).returncode == 0
        ):
            return
        time.sleep(0.2)
    raise AssertionError(f"hsmd on {app.id} did not come back")


@pytest.mark.parametrize("point", ["user-password:owned", "user-password:changed"])
def test_hsmd_killed_inside_the_first_change_never_reenables_the_provider(
    hsm25: Appliance, point: str
) -> None:
    app = hsm25
    dev = provision(app)
    old = hsmd_pid(app)
    arm(app, point)
    new_password = new_secret("admin")
    with dev.admin(dev.otp) as a:
        r = a.run("user password", stdin=[new_password])
    assert r.exit != 0, "the daemon was to die inside the change"
    wait_for_hsmd(app, old)
    # The provider is out at either point, and stays out.
    assert provider_refused(app)
    if point == "user-password:owned":
        # Died before the password changed: the admin finishes the change with the
        # one-time password, which no longer expires (nobody could issue another).
        assert not admin_works(dev, new_password)
        with dev.admin(dev.otp) as a:
            shown = a.run("hsm show")
            assert shown.exit == 77 and b"change the one-time password" in shown.err, shown
            r = a.run("user password", stdin=[new_password])
            assert r.exit == 0, r
    # Either way the customer now holds the device with the new password.
    assert admin_works(dev, new_password)
    assert not admin_works(dev, dev.otp)
    with dev.admin(new_password) as a:
        info = a.run("hsm show").json()
        access = a.run("sysconf provider-access show").json()
    assert info["owner_state"] == "customer-owned" and info["provider_access"] is False
    assert access["provider_enabled"] is False and access["provider_key_installed"] is False
    assert provider_refused(app)
    records = audit_records(app)
    assert [r["event"] for r in records].count("ownership-transfer") >= 1


def test_ownership_survives_a_console_otp_set_and_ends_only_with_a_factory_reset(
    hsm26: Appliance,
) -> None:
    """The one-way fact: not even the console re-provisions an owned device without the
    out-of-band factory reset; a password typed as an argument never reaches the log."""
    app = hsm26
    dev = provision(app)
    new_password = new_secret("admin")
    start = last_seq(app)
    with dev.admin(dev.otp) as a:
        typed = a.run(f"user password {new_password}")  # the secret typed as an argument
        assert typed.exit == 64, typed
        assert a.run("user password", stdin=[new_password]).exit == 0
    again = new_secret("otp")
    proc = console(
        app,
        "hsmsh",
        "-c",
        "user otp set",
        input=f"{app.tenant_public_key}\n{again}\n".encode(),
        check=False,
    )
    assert proc.returncode != 0 and b"customer-owned" in proc.stderr, proc
    assert admin_works(dev, new_password) and not admin_works(dev, again)
    assert provider_refused(app)
    records = [r for r in audit_records(app) if r["seq"] > start]
    text = json.dumps(records)
    assert new_password not in text and again not in text
    refused = [r for r in records if r["event"] == "command" and r["outcome"] == "denied"]
    assert any(r["detail"].get("line") == "user password [1 more word not logged]" for r in refused)
    # The out-of-band reset is the way back to the factory, and then the provider is back.
    console(app, "hsmsh", "-c", "sysconf factory-reset")
    assert not provider_refused(app)


def test_a_password_typed_as_a_user_name_never_reaches_the_log(hsm26: Appliance) -> None:
    app = hsm26
    dev = provision(app)
    typed = new_secret("typed")
    start = last_seq(app)
    conn = mgmt_conn(app)
    try:
        with pytest.raises(paramiko.AuthenticationException):
            conn.auth_key(typed, load_key(PROVIDER_KEY))
    finally:
        conn.close()
    with pytest.raises(paramiko.AuthenticationException):
        dev.admin("not-the-password-1A").close()
    records = wait_for_records(app, lambda r: r["actor"] == "unknown-user", after=start, timeout=10)
    assert records and records[0]["event"] == "login" and records[0]["outcome"] != "ok"
    assert typed not in json.dumps(audit_records(app))
