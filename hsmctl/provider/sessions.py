"""One management connection per appliance for the steps of one provisioning run (issue 15).

Every SSH connection costs the device ~30-40 ms of CPU (sshd's fork and re-exec, key
exchange, publickey authentication, PAM's account check, the ``login`` record) and this
host a paramiko handshake; the steps of one appliance opened four. When ``hsmctl
provision`` serves the steps itself (:func:`hsmctl.provider.provisioning.serve_steps`),
they share a :class:`SessionPool`: the first step that needs the device connects, the
connection stays open between steps, and :meth:`SessionPool.close` closes all at the end
of the run (also on error or interrupt). Plain ``ansible-playbook`` and AWX run each step
in a process of its own and have no pool: one connection per step, as before.

Rules:

* One connection per appliance, never shared across appliances or runs (the pool belongs
  to one run). Its pins are the run's inventory's, loaded once per run; provisioning pins
  data-interface keys only, never management ones, so the pins cannot change under a
  pooled connection.
* One user at a time: the per-appliance store lock already serialises an appliance's
  steps; a lease asked for while the connection is out (never, in a run) gets a connection
  of its own that is closed when it is returned.
* A connection found dead when leased (transport not active) is replaced silently. A
  step that fails on a reused connection with a connection failure (not a device's
  reply: :class:`~hsmctl.ssh.DeviceCommandFailed`) may have met a connection the device or
  the network dropped between steps: :meth:`SessionPool.run` drops it and runs the step
  once more on a new connection (steps are idempotent). A failure on a fresh connection
  is reported as it is.

A fleet poll (``hsmctl health``) has :class:`PollLogins` instead: every login of the poll
is a connection of its own (a poll logs in once or twice per appliance and runs at most
one command), but the keys are loaded once per run and each appliance's first TCP
connection may have been opened ahead (:mod:`hsmctl.provider.ahead`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import paramiko
from paramiko.ssh_exception import SSHException

from hsmctl.errors import HsmctlError, UnreachableError, UsageError
from hsmctl.provider.ahead import OpenAhead
from hsmctl.ssh import (
    DeviceCommandFailed,
    DeviceConnection,
    OutputLimitExceeded,
    PinnedHostKeys,
    SshProtocolError,
    Timeouts,
    tcp_connect,
)
from hsmctl.ssh.hostkeys import SSH_PORT

log = logging.getLogger(__name__)

T = TypeVar("T")


def _keeps(conn: DeviceConnection, exc: BaseException | None) -> bool:
    """Whether a connection may serve the next step after a lease ended with ``exc``: a
    device's reply (any exit status) or a workflow's own error leave the connection as it
    was; a transport failure, an interrupt or a dead transport do not."""
    if not conn.connected:
        return False
    if exc is None or isinstance(exc, DeviceCommandFailed):
        return True
    return isinstance(exc, HsmctlError) and not _connection_failure(exc)


def _connection_failure(exc: BaseException) -> bool:
    if isinstance(exc, DeviceCommandFailed):
        return False  # the device answered (even 69, its daemon down): the link is fine
    return isinstance(exc, UnreachableError | SshProtocolError | OutputLimitExceeded)


class Lease:
    """``with pool.lease(appliance, make) as conn:`` a connected
    :class:`~hsmctl.ssh.DeviceConnection`; leaving the block returns it to the pool
    instead of closing it (or closes it: see :func:`_keeps`)."""

    def __init__(
        self, pool: SessionPool, appliance: str, make: Callable[[], DeviceConnection]
    ) -> None:
        self._pool = pool
        self._appliance = appliance
        self._make = make
        self._conn: DeviceConnection | None = None
        self._pooled = False
        self.reused = False

    def __enter__(self) -> DeviceConnection:
        conn, self._pooled, self.reused = self._pool._take(self._appliance, self._make)
        self._conn = conn
        return conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if not self._pooled:
            conn.close()
            return
        self._pool._give_back(self._appliance, conn, keep=_keeps(conn, exc))
        if exc is not None and self.reused and _connection_failure(exc):
            self._pool._stale(self._appliance)


class SessionPool:
    """The management connections of one provisioning run, one per appliance.

    Lifecycle: create (no I/O) → :meth:`lease` / :meth:`run` from any thread →
    :meth:`close` once, when the run ends. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[str, DeviceConnection] = {}
        self._out: set[str] = set()
        self._stale_failed: set[str] = set()
        self._closed = False
        self.opened = 0
        """Connections made through the pool (for tests and measurements)."""

    def lease(self, appliance: str, make: Callable[[], DeviceConnection]) -> Lease:
        """The appliance's pooled connection as a context manager; ``make`` builds a new
        (unconnected) one when there is none, or none alive."""
        return Lease(self, appliance, make)

    def run(self, appliance: str, step: Callable[[], T]) -> T:
        """``step()``, run once more (only once) when it failed with a connection
        failure on a connection an earlier step had left in the pool."""
        with self._lock:
            self._stale_failed.discard(appliance)
        try:
            return step()
        except HsmctlError:
            with self._lock:
                again = appliance in self._stale_failed
                self._stale_failed.discard(appliance)
            if not again:
                raise
            log.debug("%s: the pooled connection failed; the step runs again", appliance)
            return step()

    def close(self) -> None:
        """Close every idle connection; a connection still leased is closed when it is
        returned. Leases after this get connections of their own. Never raises."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for conn in idle.values():
            conn.close()

    def __enter__(self) -> SessionPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- for Lease ---------------------------------------------------------------------------

    def _take(
        self, appliance: str, make: Callable[[], DeviceConnection]
    ) -> tuple[DeviceConnection, bool, bool]:
        """(a connected connection, pooled?, reused?)."""
        with self._lock:
            pooled = not self._closed and appliance not in self._out
            conn = self._idle.pop(appliance, None) if pooled else None
            if pooled:
                self._out.add(appliance)
        try:
            if conn is not None and conn.connected:
                return conn, True, True
            if conn is not None:
                conn.close()  # dead since it was returned: a new one
            conn = make()
            conn.connect()
        except BaseException:
            if pooled:
                with self._lock:
                    self._out.discard(appliance)
            raise
        if pooled:
            with self._lock:
                self.opened += 1
        return conn, pooled, False

    def _give_back(self, appliance: str, conn: DeviceConnection, *, keep: bool) -> None:
        with self._lock:
            self._out.discard(appliance)
            keep = keep and not self._closed
            if keep:
                self._idle[appliance] = conn
        if not keep:
            conn.close()

    def _stale(self, appliance: str) -> None:
        with self._lock:
            self._stale_failed.add(appliance)


# -- a fleet poll: keys loaded once, first connections opened ahead ---------------------------


def load_key(path: str | os.PathLike[str]) -> paramiko.PKey:
    """An OpenSSH private key file (unencrypted), loaded once for a whole run: a
    :class:`~hsmctl.ssh.DeviceConnection` given a path reads and parses it at every
    connect. The message never quotes the file."""
    try:
        return paramiko.PKey.from_path(Path(path))
    except (OSError, SSHException, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else type(exc).__name__
        raise UsageError(f"cannot load the SSH private key {path}: {reason}") from exc


class PollLogins:
    """The management logins of one fleet poll (``hsmctl health``): each a connection of
    its own, with the run's keys (loaded once, not at every connect) and, for an
    appliance's first login, the TCP connection :class:`~hsmctl.provider.ahead.OpenAhead`
    opened for it (see there: nothing about trust changes).

    Lifecycle: create (no I/O) → :meth:`connection` from any thread (an unconnected
    :class:`~hsmctl.ssh.DeviceConnection`, used and closed as usual). The
    :class:`~hsmctl.provider.ahead.OpenAhead` belongs to the caller, who closes it.
    """

    def __init__(
        self,
        addresses: Mapping[str, str],
        keys: Mapping[str, paramiko.PKey],
        ahead: OpenAhead | None = None,
        *,
        port: int = SSH_PORT,
        timeouts: Timeouts | None = None,
    ) -> None:
        self._addresses = dict(addresses)
        self._keys = dict(keys)
        self._ahead = ahead
        self._port = port
        self._timeouts = timeouts or Timeouts()

    def connection(self, appliance: str, user: str, pinned: PinnedHostKeys) -> DeviceConnection:
        """A login as ``user`` (one of the keys' accounts) at the appliance's management
        address, pinned to ``pinned``; not yet connected."""
        ahead = self._ahead

        def connect_socket(host: str, port: int, timeout: float) -> socket.socket:
            sock = ahead.take(appliance, host, port, timeout) if ahead is not None else None
            return sock if sock is not None else tcp_connect(host, port, timeout)

        return DeviceConnection(
            self._addresses[appliance],
            username=user,
            pinned=pinned,
            key=self._keys[user],
            port=self._port,
            connect_socket=connect_socket,
            timeouts=self._timeouts,
        )
