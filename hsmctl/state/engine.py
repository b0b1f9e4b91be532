"""Database engines and transactions for the state store.

Concurrency, which is the point of this module:

* SQLite (default, one host): every write transaction starts with ``BEGIN IMMEDIATE``,
  which takes the database's write lock before the first read, so the read-decide-write
  of an allocation is serial across processes; ``busy_timeout`` makes waiters wait
  instead of failing; WAL lets readers run beside the writer.
* PostgreSQL (several operators, several hosts): transactions run SERIALIZABLE, so two
  allocations that read the same free appliances or quota counts cannot both commit;
  the loser gets a serialization failure and is retried from scratch.
* Read-only (the Ansible inventory plugin): :meth:`Database.open` with ``read_only``
  never creates, migrates or writes. SQLite opens ``mode=ro`` (and ``query_only``): it
  may create the ``-wal``/``-shm`` files WAL readers need beside the database, never
  touches the database file; on a read-only filesystem, where no writer can exist, it
  reads the file as ``immutable``. PostgreSQL sessions are
  ``default_transaction_read_only``.
* On both, the UNIQUE/PRIMARY KEY constraints (see :mod:`hsmctl.state.schema`) are the
  last line of defence; a violation caused by a race is retried like a serialization
  failure, and if retries run out it becomes :class:`ConflictError` (exit 5), never a
  crash. Every refusal raises inside the transaction, so nothing is changed.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.engine.url import URL

from hsmctl.errors import ConfigError, ConflictError, HsmctlError, UnreachableError
from hsmctl.state import schema

T = TypeVar("T")

DB_FILE = "hsmctl.db"
BUSY_TIMEOUT_MS = 30_000
MAX_ATTEMPTS = 25
CONNECT_TIMEOUT_S = 10
# libpq's TCP keepalives: a dead connection is noticed in about 10 s, idle or not.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 4,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}
_MIGRATION_LOCK = 0x6873_6D63_746C_0001  # "hsmctl" + 1: one advisory lock id for migrations


class Retry(Exception):
    """A guarded write found the row changed under it; run the transaction again."""


class Database:
    """One engine and the transactions run on it.

    Lifecycle: :meth:`open` (engine only, no connection yet) → :meth:`migrate` →
    :meth:`run` as often as needed → :meth:`close`. Never carry one across ``fork``.
    """

    def __init__(self, engine: Engine, *, read_only: bool = False) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        self.read_only = read_only

    @classmethod
    def open(cls, target: str | os.PathLike[str], *, read_only: bool = False) -> Database:
        """A PostgreSQL URL, a SQLite URL, a SQLite file, or a directory holding
        ``hsmctl.db``. ``read_only``: the database must exist; nothing is ever written
        (ConfigError naming the file if a SQLite database is missing)."""
        url = url_for(target)
        engine = _read_only_engine(url) if read_only else _make_engine(url)
        return cls(engine, read_only=read_only)

    def close(self) -> None:
        self.engine.dispose()

    @property
    def url(self) -> str:
        """The database URL, password hidden: safe for logs and messages."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def _begin(self, *, write: bool, isolation: str | None = None) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            options: dict[str, Any] = {"hsmctl_write": write}
            if isolation and not self.sqlite:
                options["isolation_level"] = isolation
            conn.execution_options(**options)
            with conn.begin():
                yield conn

    def run(self, fn: Callable[[Connection], T], *, write: bool = True) -> T:
        """Run ``fn`` in one transaction, retrying it whole when it lost a race."""
        delay = 0.005
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                with self._begin(write=write) as conn:
                    return fn(conn)
            except Retry:
                pass
            except sa.exc.DBAPIError as exc:
                if not is_race(exc):
                    raise self.translate(exc) from exc
                if attempt == MAX_ATTEMPTS:
                    raise ConflictError(
                        f"state store {self.url}: still contended after {MAX_ATTEMPTS} "
                        "attempts; nothing was changed, try again"
                    ) from exc
            except sa.exc.SQLAlchemyError as exc:
                raise HsmctlError(f"state store {self.url}: {exc}") from exc
            time.sleep(random.uniform(0, delay))  # noqa: S311 - jitter, not crypto
            delay = min(delay * 2, 0.25)
        raise ConflictError(f"state store {self.url}: busy; nothing was changed, try again")

    def translate(self, exc: sa.exc.DBAPIError) -> HsmctlError:
        """A driver error as hsmctl's: unreachable (no SQLSTATE: never connected) or failed."""
        first = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else repr(exc)
        if isinstance(exc, sa.exc.OperationalError) and not self.sqlite and not _sqlstate(exc):
            # psycopg: no SQLSTATE means the server was never reached (refused, timeout).
            return UnreachableError(f"state store {self.url}: {first}")
        return HsmctlError(f"state store {self.url}: {first}")

    def migrate(self, on_applied: Callable[[Connection, int], None]) -> None:
        """Apply pending migrations, once, however many processes open a new database;
        ``on_applied`` records each version applied, in the same transaction."""
        if self.read_only:
            raise RuntimeError("a read-only database is never migrated")

        def step(conn: Connection) -> None:
            if not self.sqlite:
                # READ COMMITTED: after the lock is granted, later statements see what
                # the previous holder committed.
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
            try:
                applied = schema.migrate(conn)
            except schema.SchemaTooNew as exc:
                raise ConfigError(f"state store {self.url}: {exc}; upgrade hsmctl") from exc
            for version in applied:
                on_applied(conn, version)

        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                with self._begin(write=True, isolation="READ COMMITTED") as conn:
                    step(conn)
                    return
            except sa.exc.DBAPIError as exc:
                if not is_race(exc) or attempt == MAX_ATTEMPTS:
                    raise self.translate(exc) from exc
                time.sleep(random.uniform(0, 0.05))  # noqa: S311


def where_given(q: sa.Select[Any], *tests: tuple[sa.Column[Any], object]) -> sa.Select[Any]:
    """``q`` narrowed to ``column == value`` for each filter the caller gave (not None)."""
    for column, value in tests:
        if value is not None:
            q = q.where(column == value)
    return q


def _sqlstate(exc: sa.exc.DBAPIError) -> str | None:
    return getattr(exc.orig, "sqlstate", None)


def is_race(exc: sa.exc.DBAPIError) -> bool:
    """Errors that mean "someone else got there first": retry the whole transaction."""
    if _sqlstate(exc) in {"40001", "40P01", "23505", "55P03"}:
        return True
    orig = exc.orig
    if isinstance(orig, sqlite3.IntegrityError):
        return "UNIQUE constraint failed" in str(orig)
    if isinstance(orig, sqlite3.OperationalError):
        text = str(orig)
        return "database is locked" in text or "database is busy" in text
    return False


def url_for(target: str | os.PathLike[str]) -> URL:
    text = os.fspath(target)
    if "://" in text:
        try:
            url = make_url(text)
        except sa.exc.ArgumentError as exc:
            raise ConfigError(f"database_url is not a database URL: {exc}") from exc
        if url.get_backend_name() == "postgresql" and url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        if url.drivername not in ("postgresql+psycopg", "sqlite", "sqlite+pysqlite"):
            raise ConfigError(
                f"database_url: unsupported database {url.drivername!r} "
                "(use postgresql+psycopg://... or a SQLite file)"
            )
        if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
            raise ConfigError(
                "database_url: SQLite needs a file (an in-memory database is not shared)"
            )
        return url
    path = Path(text)
    if path.is_dir():
        path = path / DB_FILE
    return URL.create("sqlite+pysqlite", database=str(path.resolve()))


def _make_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    return sa.create_engine(
        url,
        isolation_level="SERIALIZABLE",
        pool_pre_ping=True,
        max_overflow=-1,  # threads never wait for a connection (see _sqlite_engine)
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S, **KEEPALIVES},
    )


def _read_only_engine(url: URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(
            url,
            isolation_level="REPEATABLE READ",
            connect_args={
                "connect_timeout": CONNECT_TIMEOUT_S,
                "options": "-c default_transaction_read_only=on",
                **KEEPALIVES,
            },
        )
    assert url.database
    path = Path(url.database)
    if not path.is_file():
        raise ConfigError(
            f"state store {path} does not exist: hsmctl creates it on the first provider "
            "command (e.g. hsmctl fleet list)"
        )
    query = {"uri": "true", "mode": "ro"}
    try:
        if os.statvfs(path.parent).f_flag & os.ST_RDONLY:
            # Nobody can write here, and a WAL reader could not create its -shm file.
            query["immutable"] = "1"
    except OSError:
        pass
    engine = sa.create_engine(
        URL.create("sqlite+pysqlite", database=f"file:{quote(str(path.resolve()))}", query=query),
        connect_args={"timeout": BUSY_TIMEOUT_MS / 1000},
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        dbapi_conn.isolation_level = None
        dbapi_conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        dbapi_conn.execute("PRAGMA query_only = ON")

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")

    return engine


def _sqlite_engine(url: URL) -> Engine:
    assert url.database
    path = Path(url.database)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The provider's database is nobody else's business: create it 0600. Only when it
        # does not exist yet: closing a descriptor of the file drops every POSIX lock this
        # process holds on it, those of SQLite's open connections included (SQLite's
        # "how to corrupt" 2.2), and steps run in threads beside an open store.
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"state store {path}: {exc.strerror}") from exc
    # The threads of one process (a provisioning run's steps) may share an engine: every
    # transaction gets a connection at once, none waits for the pool (which keeps five
    # open and closes the rest when they are given back); the database's own lock is
    # where writers wait.
    engine = sa.create_engine(
        url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000}, max_overflow=-1
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        # Let us issue BEGIN ourselves (pysqlite would defer it past the first read).
        dbapi_conn.isolation_level = None
        for pragma in (
            f"busy_timeout = {BUSY_TIMEOUT_MS}",
            "journal_mode = WAL",
            "synchronous = FULL",
            "foreign_keys = ON",
        ):
            dbapi_conn.execute(f"PRAGMA {pragma}")

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("hsmctl_write", True)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine
