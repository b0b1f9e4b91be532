"""The per-appliance lock: one step at a time per appliance, on one host or on many.

One interface, :func:`appliance_lock`; the backend follows the store::

    with appliance_lock(db, "hsm07", lock_dir=state_dir / "locks"):
        ...  # the whole span the lock protects

* SQLite (one orchestrator host): an exclusive ``flock`` on ``LOCK_DIR/APPLIANCE.lock``.
* PostgreSQL (orchestrator hosts sharing one database, e.g. AWX nodes): a session-level
  advisory lock, ``pg_advisory_lock(key)`` with ``key`` = :func:`advisory_key` (the first
  8 bytes of SHA-256 of ``hsmctl/appliance/ID``, a signed bigint), taken on a
  connection of its own that is opened for this lock and closed after it. Local lock
  directories play no part, so two hosts see each other's locks.

Why the lock exists: a killed ``hsmctl provision`` can leave its ansible-playbook
running (ansible-runner starts it in a session of its own); a resumed run, on this host
or another, then waits for the orphan's step instead of interleaving with it, and as
each step is idempotent and holds the lock for its whole body (the one-time password
and the bundle that carries it are written together), the last one to run leaves device
and bundle consistent.

When the holder dies, both release: the kernel drops the ``flock`` with the process; the
process's connection closes and PostgreSQL ends the session and its locks.

When the connection drops while the lock is held, the holder fails closed: the server
may already have given the lock to another host, so this process must not go on
believing it holds it. A watchdog thread owns the lock's connection while it is held:
it wakes whenever the server sends anything (a terminated session's socket becomes
readable at once) and pings every :data:`PING_INTERVAL_S`. A failed ping ends the
process with SIGKILL — the same as a holder that died, which every workflow already
survives (each step is idempotent and journaled; a rerun redoes it). A silent network
fails a ping within libpq's ``tcp_user_timeout`` (:data:`~hsmctl.state.engine.KEEPALIVES`,
10 s), while the server, told by this session's ``tcp_keepalives_*``, releases a silent
client's lock only after about 45 s: the holder is dead before the lock can move. What
remains is the time between the server closing a session itself (administrator,
restart) and the watchdog seeing the socket close, which is milliseconds. Releasing
checks ``pg_advisory_unlock`` returned true; if not, the step fails (UnreachableError).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from hsmctl.errors import UnreachableError
from hsmctl.state.engine import CONNECT_TIMEOUT_S, KEEPALIVES, Database

PING_INTERVAL_S = 1.0
# The server's view of this session (PGC_USERSET, honoured on TCP connections): a client
# that went silent is given up after 30 + 3 * 5 s, well after its own watchdog.
_SERVER_KEEPALIVES = (
    "SET tcp_keepalives_idle = 30",
    "SET tcp_keepalives_interval = 5",
    "SET tcp_keepalives_count = 3",
)

LostHandler = Callable[[str], None]


def advisory_key(appliance: str) -> int:
    """The appliance's advisory lock key: stable across hosts, versions and runs."""
    digest = hashlib.sha256(f"hsmctl/appliance/{appliance}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _die(message: str) -> None:
    sys.stderr.write(f"hsmctl: {message}; stopping at once\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def appliance_lock(
    db: Database, appliance: str, *, lock_dir: Path, on_lost: LostHandler = _die
) -> Iterator[None]:
    """Hold the appliance's lock for the ``with`` body; waits as long as another holds
    it. ``on_lost`` (PostgreSQL only) is called from the watchdog if the lock's
    connection is lost; the default ends the process (see the module docstring)."""
    if db.sqlite:
        with _file_lock(lock_dir, appliance):
            yield
    else:
        with _advisory_lock(db, appliance, on_lost):
            yield


@contextlib.contextmanager
def _file_lock(lock_dir: Path, appliance: str) -> Iterator[None]:
    lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(lock_dir / f"{appliance}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def _advisory_lock(db: Database, appliance: str, on_lost: LostHandler) -> Iterator[None]:
    key = advisory_key(appliance)
    engine = sa.create_engine(
        db.engine.url,
        poolclass=NullPool,  # closing the connection ends the session, whatever happened
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S, **KEEPALIVES},
    )
    try:
        try:
            conn = engine.connect()
        except sa.exc.DBAPIError as exc:
            raise db.translate(exc) from exc
        with conn:
            try:
                for statement in _SERVER_KEEPALIVES:
                    conn.exec_driver_sql(statement)
                conn.execute(sa.select(sa.func.pg_advisory_lock(key)))
            except sa.exc.DBAPIError as exc:
                raise db.translate(exc) from exc
            watchdog = _Watchdog(conn, f"lost the lock on {appliance}", on_lost)
            watchdog.start()
            try:
                yield
            finally:
                lost = watchdog.stop()
            if lost:
                raise UnreachableError(f"{appliance}: {lost}")
            try:
                released = conn.execute(sa.select(sa.func.pg_advisory_unlock(key))).scalar()
            except sa.exc.DBAPIError as exc:
                raise UnreachableError(
                    f"{appliance}: the lock's database connection dropped while held"
                ) from exc
            if not released:
                raise UnreachableError(f"{appliance}: the lock was no longer held")
    finally:
        engine.dispose()


class _Watchdog:
    """Owns the lock's connection while the lock is held: pings it, and calls
    ``on_lost`` once if a ping fails. :meth:`stop` hands the connection back."""

    def __init__(self, conn: Connection, what: str, on_lost: LostHandler) -> None:
        self._conn = conn
        self._what = what
        self._on_lost = on_lost
        self._lost: str | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="hsmctl-lock-watchdog")
        self._thread.daemon = True

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> str | None:
        """Stop watching; what was lost (None: the lock is still held)."""
        os.write(self._wake_w, b"x")
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)
        return self._lost

    def _run(self) -> None:
        dbapi = self._conn.connection.dbapi_connection
        sock: int = dbapi.pgconn.socket  # type: ignore[union-attr]
        while True:
            ready, _, _ = select.select([sock, self._wake_r], [], [], PING_INTERVAL_S)
            if self._wake_r in ready:
                return
            try:
                self._conn.exec_driver_sql("SELECT 1")
            except Exception as exc:  # any failure: the session is gone
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                self._lost = f"{self._what} (database connection: {first})"
                self._on_lost(self._lost)
                return
