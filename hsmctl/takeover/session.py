"""The takeover's admin session to the appliance: always with a credential that logs in.

Lifecycle: create it with the opened bundle and the journal; :meth:`AdminSession.admin`
returns the open session or opens one (the journal's live credential, pinned to the
journaled host keys); :meth:`~AdminSession.run` and :meth:`~AdminSession.read` send a
command between its ``send:``/``sent:`` fault points; :meth:`~AdminSession.drop` closes
it, and the next ``admin()`` opens a fresh one. Each login also tells what happened
before an interruption: the new password logging in commits a ``pending`` change, and a
staged host key answering completes a rotation; both are journaled at once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TypeVar

from hsmctl.customer.context import TenantContext
from hsmctl.customer.store import ApplianceDir
from hsmctl.device import Fact
from hsmctl.errors import HsmctlError, UnreachableError
from hsmctl.handoff import OpenedBundle
from hsmctl.secret import Secret
from hsmctl.ssh import AuthenticationFailed, DeviceConnection, PinnedHostKeys
from hsmctl.takeover import faults
from hsmctl.takeover.journal import FileJournal
from hsmctl.takeover.records import PasswordState

T = TypeVar("T")

RECONNECT_WAIT = 10.0
"""Seconds a login retries an unreachable device: a rerun can land while the data sshd
restarts (a run killed during a host-key activation)."""
HOSTKEY_ACTIVATION_WAIT = 20.0  # seconds for the data sshd to come back with the new keys


def fault_point(command: str) -> str:
    """The command's words, not its option values: the same name on every appliance."""
    words = command.split()
    return "-".join(words[: next((i for i, w in enumerate(words) if w[:2] == "--"), None)])


class AdminSession:
    def __init__(self, ctx: TenantContext, bundle: OpenedBundle, journal: FileJournal) -> None:
        self.ctx = ctx
        self.bundle = bundle
        self.journal = journal
        self.conn: DeviceConnection | None = None

    @property
    def state(self) -> ApplianceDir:
        return self.journal.state

    def pinned(self) -> PinnedHostKeys:
        return PinnedHostKeys.of(*self.journal.record.host_keys.pinned)

    def login(self, password: Secret | None, *, with_key: bool = True) -> DeviceConnection:
        """A connection (not yet open) as admin, pinned to the journaled host keys."""
        return DeviceConnection(
            self.bundle.data_ip,
            username="admin",
            pinned=self.pinned(),
            key=self.ctx.identity if with_key else None,
            password=password,
        )

    def connect_with(self, password: Secret) -> DeviceConnection:
        deadline = time.monotonic() + RECONNECT_WAIT
        while True:
            try:
                return self.login(password).connect()
            except UnreachableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def admin(self) -> DeviceConnection:
        """A session as admin with whichever credential the journal says is live."""
        if self.conn is not None and self.conn.connected:
            return self.conn
        record = self.journal.record
        pw_state = record.password
        new = self.state.escrowed("admin-password")
        candidates: list[Secret] = []
        if pw_state is not PasswordState.ONE_TIME and new is not None:
            candidates.append(new)
        if pw_state is not PasswordState.COMMITTED:
            candidates.append(self.bundle.otp)
        last: HsmctlError | None = None
        for password in candidates:
            try:
                self.conn = self.connect_with(password)
            except AuthenticationFailed as exc:
                last = exc
                continue
            if record.host_keys.observe(self.conn.host_key()):
                self.journal.save()
            if password is new and pw_state is PasswordState.PENDING:
                # The change happened before an interruption: the new password logs in.
                record.password = PasswordState.COMMITTED
                self.journal.save()
            return self.conn
        if last is None:  # committed, but the escrowed password is gone
            raise HsmctlError(
                f"{self.bundle.appliance}: the journal says the admin password was changed, "
                f"but {self.state.secret_path('admin-password')} is missing; restore it"
            )
        raise last

    def refused(self, password: Secret | None, *, with_key: bool = True) -> bool:
        """Whether a login with these credentials is refused (the proof's last checks)."""
        conn = self.login(password, with_key=with_key)
        try:
            conn.connect()
        except AuthenticationFailed:
            return True
        finally:
            conn.close()
        return False

    def run(self, command: str, stdin: Sequence[Secret | str] = ()) -> str:
        conn = self.admin()
        point = fault_point(command)
        faults.reached(f"send:{point}", conn)
        out = conn.run(command, stdin).stdout
        faults.reached(f"sent:{point}", conn)
        return out

    def read(self, fact: Fact[T]) -> T:
        """A fact's command, sent like any other; its reply parsed or refused (exit 3)."""
        return fact.process(self.run(fact.command), self.bundle.appliance)

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def await_new_host_key(self) -> None:
        """Reconnect until the device serves a staged key. ``activate`` returns once the
        data sshd has restarted, but a rerun after an interruption can land while it
        restarts; until then the old and the staged keys stay pinned, so an interruption
        here never leaves us pinned to keys the device does not serve."""
        deadline = time.monotonic() + HOSTKEY_ACTIVATION_WAIT
        while True:
            self.admin()
            if self.journal.record.host_keys.rotated:
                return
            self.drop()
            if time.monotonic() > deadline:
                raise UnreachableError(
                    f"{self.bundle.appliance}: the data interface does not serve its new host "
                    f"keys {HOSTKEY_ACTIVATION_WAIT:g} s after activation; run the takeover again"
                )
            time.sleep(0.2)
