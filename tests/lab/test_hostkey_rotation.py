"""Data-interface host-key rotation keeps every session it did not end (issue 5).

``sysconf hostkey activate`` restarts the data interface's sshd. A connection that the
old sshd accepted (before the activation, or in the window between the key files being
replaced and the restart) outlives the restart; the device must go on serving it as the
data interface it came in on, not refuse it as coming from nowhere. Before the fix the
daemon matched the caller against the *current* sshd's pid, so every such connection
was refused with "admin may not use this interface" (the takeover had to work around
it). Works on hsm03 (tenant1) only, like the firmware tests.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import paramiko
import pytest

from tests.lab.firmware_helpers import (
    Appliance,
    Conn,
    Device,
    appliance,
    audit_records,
    console,
    data_known,
    last_seq,
    provision,
    take_over,
)

pytestmark = pytest.mark.lab


@pytest.fixture
def dev(lab: dict[str, Any]) -> Device:
    """hsm03, customer-owned, with an audit key."""
    return take_over(provision(appliance(lab, "hsm03", "tenant1", 203)))


def data_sshd_pid(app: Appliance) -> int:
    return int(console(app, "cat", "/run/hsm/sshd-data.pid").stdout.split()[0])


def wait_for_restart(app: Appliance, old_pid: int, timeout: float = 15.0) -> int:
    """The data sshd's new pid, once the old listener is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = console(app, "cat", "/run/hsm/sshd-data.pid", check=False)
        pids = proc.stdout.split()
        if pids and int(pids[0]) != old_pid:
            gone = console(app, "kill", "-0", str(old_pid), check=False).returncode != 0
            if gone:
                return int(pids[0])
        time.sleep(0.1)
    raise AssertionError(f"the data sshd of {app.id} did not restart")


def denied_sessions(app: Appliance, after: int) -> list[dict[str, Any]]:
    return [
        r
        for r in audit_records(app)
        if r["seq"] > after and r["event"] == "session" and r["outcome"] == "denied"
    ]


class AnyOf(paramiko.HostKeys):
    """Known hosts that accept a key any of several sets accepts (paramiko's own holds
    one key per host and type: the old and the new ed25519 key cannot both be in it)."""

    def __init__(self, *sets: paramiko.HostKeys) -> None:
        super().__init__()
        self.sets = sets

    def check(self, hostname: str, key: paramiko.PKey) -> bool:
        return any(s.check(hostname, key) for s in self.sets)


def stage(dev: Device) -> paramiko.HostKeys:
    """Stage new keys; known hosts that accept the current and the staged ones."""
    with dev.admin() as a:
        assert a.run("sysconf hostkey stage").exit == 0
        shown = a.run("sysconf hostkey show").json()
    staged = paramiko.HostKeys()
    for line in shown["staged_keys"]:
        entry = paramiko.hostkeys.HostKeyEntry.from_line(f"{dev.app.data_ip} {line}")
        assert entry is not None and entry.key is not None
        staged.add(dev.app.data_ip, entry.key.get_name(), entry.key)
    return AnyOf(dev.known, staged)


def activate(dev: Device) -> None:
    with dev.admin() as a:
        r = a.run("sysconf hostkey activate")
        assert r.exit == 0, r


def test_sessions_from_before_the_activation_survive_the_restart(dev: Device) -> None:
    app = dev.app
    old_known = dev.known
    held_admin = dev.admin()
    held_audit = dev.audit()
    try:
        assert held_admin.run("hsm show").exit == 0
        seq = last_seq(app)
        old_pid = data_sshd_pid(app)
        stage(dev)
        activate(dev)
        new_pid = wait_for_restart(app, old_pid)
        assert new_pid != old_pid
        # Accepted by the old sshd, used after the restart: still the data interface.
        r = held_admin.run("hsm show")
        assert r.exit == 0, r.err.decode()
        assert json.loads(r.out)["owner_state"] == "customer-owned"
        r = held_audit.run("audit verify")
        assert r.exit == 0, r.err.decode()
    finally:
        held_admin.close()
        held_audit.close()
    assert denied_sessions(app, seq) == []

    # New connections see the new keys only.
    dev.known = data_known(app)
    new_keys = dev.known.lookup(app.data_ip)
    assert new_keys is not None
    assert not any(old_known.check(app.data_ip, key) for key in new_keys.values())
    with dev.admin() as a:
        assert a.run("hsm show").exit == 0
    with pytest.raises(paramiko.BadHostKeyException):
        old = Device(app, known=old_known, password=dev.password)
        old.admin().close()


def test_connections_accepted_during_the_activation_are_served(dev: Device) -> None:
    """Hammer the data interface with fresh logins while the keys are activated: every
    connection that logs in (whichever sshd accepted it, whichever key it saw) must be
    able to run a command, before and after the restart."""
    app = dev.app
    old_known = dev.known
    seq = last_seq(app)
    old_pid = data_sshd_pid(app)
    either = Device(app, known=stage(dev), password=dev.password)
    stop = threading.Event()
    old_logins, new_logins = threading.Event(), threading.Event()
    served: list[tuple[str, int, str]] = []  # (key seen, exit, stderr)
    errors: list[str] = []
    lock = threading.Lock()

    def hammer() -> None:
        pending: list[tuple[Conn, str]] = []
        while not stop.is_set() or pending:
            # Log in now, run the command a moment later: a login just before the restart
            # then runs its command just after it.
            if not stop.is_set():
                try:
                    c = either.admin()
                    key = c.transport.get_remote_server_key()
                    which = "old" if old_known.check(app.data_ip, key) else "new"
                    pending.append((c, which))
                    (new_logins if which == "new" else old_logins).set()
                except (OSError, EOFError, paramiko.SSHException) as exc:
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
            while len(pending) > 2 or (stop.is_set() and pending):
                c, which = pending.pop(0)
                try:
                    r = c.run("hsm show")
                    with lock:
                        served.append((which, r.exit, r.err.decode()))
                except (OSError, EOFError, paramiko.SSHException) as exc:
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                finally:
                    c.close()
            time.sleep(0.05)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        assert old_logins.wait(30), errors
        time.sleep(0.5)
        activate(dev)
        wait_for_restart(app, old_pid)
        # Some logins after the restart too (however loaded the machine), then stop.
        new_logins.clear()
        assert new_logins.wait(30), errors
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(60)
    refused = [s for s in served if s[1] != 0]
    assert not refused, refused
    kinds = {s[0] for s in served}
    assert kinds == {"old", "new"}, (kinds, errors)
    assert denied_sessions(app, seq) == []
