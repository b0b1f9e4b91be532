"""The provider's state store: appliances, allocations, requests, journal, host keys.

Lifecycle: ``Store.open(path_or_url)`` (or :meth:`Store.for_config`) creates the
engine and applies pending migrations (:meth:`Store.open_read_only` neither: it reads an
existing store and never writes); every method then runs in its own short
transaction; ``close()`` (or leaving the ``with`` block) disposes of the connections.
Open one Store per process: never carry one across ``fork``.

This class is the facade: it checks arguments before any transaction and runs one body
per call. Where things live: transactions, isolation and the retry of a lost race in
:mod:`~hsmctl.state.engine`; the choice of appliances and addresses (pure) in
:mod:`~hsmctl.state.allocation`, its claim in :mod:`~hsmctl.state.claim`; state moves
in :mod:`~hsmctl.state.appliances`; the journal (which refuses secrets) in
:mod:`~hsmctl.state.journal`; host keys in :mod:`~hsmctl.state.pins`; the per-appliance
lock in :mod:`~hsmctl.state.locks`; what is returned in :mod:`~hsmctl.state.records`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from hsmctl.config import Config
from hsmctl.errors import ConfigError
from hsmctl.inventory.model import Inventory, Placement, PublicKey
from hsmctl.state import appliances, claim, healthlog, journal, locks, pins, schema
from hsmctl.state.allocation import check_request
from hsmctl.state.engine import DB_FILE, Database
from hsmctl.state.model import ApplianceState, Interface, Operation, RequestStatus, StepStatus
from hsmctl.state.records import (
    Allocation,
    ApplianceRecord,
    JournalEntry,
    PinnedHostKey,
    RequestRecord,
    SyncReport,
    plain,
)

__all__ = ["DB_FILE", "Store", "database_target"]


class Store:
    """The provider's state: see the module docstring for lifecycle and concurrency."""

    def __init__(self, db: Database, *, owner: bool = True) -> None:
        self._db = db
        self._owner = owner

    # lifecycle ----------------------------------------------------------------------

    @classmethod
    def open(cls, target: str | os.PathLike[str]) -> Store:
        """Open (and migrate) a database: a PostgreSQL URL, a SQLite URL, a SQLite file,
        or a directory (the state_dir) holding ``hsmctl.db``."""
        store = cls(Database.open(target))
        try:
            store._db.migrate(_journal_migration)
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def open_read_only(cls, target: str | os.PathLike[str]) -> Store:
        """Open an existing database at the schema this hsmctl knows, for reading only:
        nothing is created, migrated or written (the inventory plugin's way in). A
        missing database, or one that is not migrated or migrated further, is a
        ConfigError naming it; an unreachable server an UnreachableError."""
        store = cls(Database.open(target, read_only=True))
        try:
            found = store._db.run(schema.installed_version, write=False)
            if found != schema.LATEST:
                what = (
                    "is not an hsmctl state store (no schema)"
                    if found == 0
                    else f"has schema version {found}; this hsmctl reads {schema.LATEST}"
                )
                hint = (
                    "upgrade hsmctl"
                    if found > schema.LATEST
                    else "run an hsmctl provider command (e.g. hsmctl fleet list) to migrate it"
                )
                raise ConfigError(f"state store {store.url} {what}: {hint}")
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def for_config(cls, config: Config) -> Store:
        """The provider's database: ``database_url`` if set, else SQLite in state_dir."""
        return cls.open(database_target(config))

    def borrowed(self) -> Store:
        """This store's database for a part of the run that opened it, from any thread:
        its :meth:`close` leaves the database open for the owner, who closes it. The
        steps of one ``hsmctl provision`` run share their run's this way: one engine,
        whose statements are compiled once for the run, not once per step."""
        return Store(self._db, owner=False)

    def close(self) -> None:
        if self._owner:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The database URL, password hidden: safe for logs and messages."""
        return self._db.url

    @property
    def backend(self) -> str:
        return self._db.engine.dialect.name

    def schema_version(self) -> int:
        return self._db.run(schema.current_version, write=False)

    # inventory and appliances -------------------------------------------------------

    def sync_inventory(self, inventory: Inventory) -> SyncReport:
        """Add new appliances as ``available`` and pin their manufacturing management
        keys; refresh the hardware facts of known ones; never touch their state."""
        return self._db.run(lambda c: appliances.sync(c, inventory))

    def set_state(
        self,
        appliance: str,
        state: ApplianceState,
        *,
        reason: str | None = None,
        expect: Iterable[ApplianceState] | None = None,
    ) -> ApplianceRecord:
        """Move an appliance along :data:`~hsmctl.state.model.TRANSITIONS`; ``expect``
        makes it a compare-and-set (ConflictError if the current state is not one of
        them)."""
        state = ApplianceState(state)
        if state == ApplianceState.AVAILABLE:
            raise ValueError("an appliance becomes available through release()")
        if state == ApplianceState.FAILED and not reason:
            raise ValueError("a failed appliance needs a reason")
        expected = frozenset(expect) if expect is not None else None
        return self._db.run(lambda c: appliances.set_state(c, appliance, state, reason, expected))

    def get_appliance(self, appliance: str) -> ApplianceRecord:
        return self._db.run(lambda c: appliances.get(c, appliance), write=False)

    def list_appliances(
        self, *, state: ApplianceState | None = None, tenant: str | None = None
    ) -> list[ApplianceRecord]:
        q = appliances.select(state, tenant)
        return self._db.run(
            lambda c: [ApplianceRecord.from_dict(r._mapping) for r in c.execute(q)], write=False
        )

    # allocation ---------------------------------------------------------------------

    def allocate(
        self, request_id: str | None, placement: Placement, *, count: int = 1
    ) -> list[Allocation]:
        """Atomically give ``count`` free appliances and addresses to a request.

        Stamp anti-affinity: each appliance goes to the stamp where the tenant holds the
        fewest (then the stamp with most free appliances). Quotas per stamp and region
        come from ``placement.quota``. A known ``request_id`` with the same parameters
        returns its allocation again (resume). No capacity, quota or address: raises
        ConflictError and changes nothing.
        """
        rid = request_id if request_id is not None else str(uuid.uuid4())
        check_request(rid, placement, count)
        return self._db.run(lambda c: claim.allocate(c, rid, placement, count))

    def release(self, appliance: str, *, reason: str | None = None) -> ApplianceRecord:
        """Return an appliance to the pool and free its address.

        Only from provisioning, deprovisioning or failed: a provisioned or customer-owned
        appliance must be deprovisioned (zeroized) first. Releasing an appliance that is
        already available is a no-op, so a deprovisioning run can be resumed.
        """
        return self._db.run(lambda c: claim.release(c, appliance, reason))

    def allocation(self, appliance: str) -> Allocation | None:
        found = self.allocations(appliance=appliance)
        return found[0] if found else None

    def allocations(
        self,
        *,
        request_id: str | None = None,
        tenant: str | None = None,
        appliance: str | None = None,
    ) -> list[Allocation]:
        return self._db.run(
            lambda c: claim.allocations(
                c, request_id=request_id, tenant=tenant, appliance=appliance
            ),
            write=False,
        )

    # requests -----------------------------------------------------------------------

    def get_request(self, request_id: str) -> RequestRecord | None:
        return self._db.run(lambda c: claim.get_request(c, request_id), write=False)

    def update_request(
        self, request_id: str, status: RequestStatus, result: Any = None
    ) -> RequestRecord:
        """Record a request's progress and its JSON result (never secrets)."""
        status = RequestStatus(status)
        journal.check_detail(result, "result")
        return self._db.run(lambda c: claim.update_request(c, request_id, status, result))

    # journal ------------------------------------------------------------------------

    def record_step(
        self,
        operation: Operation,
        step: str,
        status: StepStatus,
        *,
        appliance: str | None = None,
        request_id: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> int:
        """Append one step of an operation to the journal; returns its id."""
        data = dict(detail or {})
        journal.check_detail(data)
        return self._db.run(
            lambda c: journal.write(
                c,
                Operation(operation),
                step,
                StepStatus(status),
                data,
                appliance=appliance,
                request_id=request_id,
            )
        )

    def journal(
        self,
        *,
        appliance: str | None = None,
        request_id: str | None = None,
        operation: Operation | None = None,
        after: int | None = None,
        limit: int | None = None,
    ) -> list[JournalEntry]:
        return self._db.run(
            lambda c: journal.read(
                c,
                appliance=appliance,
                request_id=request_id,
                operation=operation,
                after=after,
                limit=limit,
            ),
            write=False,
        )

    # host keys ----------------------------------------------------------------------

    def pin_host_keys(
        self, appliance: str, interface: Interface, keys: Sequence[str | PublicKey]
    ) -> list[PinnedHostKey]:
        """Replace the pinned keys of one interface (after provisioning records the data
        keys, after a rotation, after a factory reset)."""
        interface = Interface(interface)
        parsed = pins.parse(appliance, interface, keys)

        def tx(conn: Connection) -> list[PinnedHostKey]:
            appliances.row(conn, appliance)
            return pins.replace(conn, appliance, interface, parsed)

        return self._db.run(tx)

    def host_keys(self, appliance: str, interface: Interface) -> list[PinnedHostKey]:
        return self._db.run(lambda c: pins.pinned(c, appliance, Interface(interface)), write=False)

    # health (schema 2) --------------------------------------------------------------

    def record_health(
        self,
        polls: Sequence[healthlog.PollRow],
        since: datetime,
        decide: healthlog.Decider,
        message: Callable[[str, str], str],
        prune_before: datetime | None = None,
    ) -> healthlog.Applied:
        """Store one fleet poll and apply the alert changes ``decide`` makes of each
        appliance's polls after ``since``, and prune what is older than ``prune_before``
        (never within the alert window), in one transaction (see
        :mod:`~hsmctl.state.healthlog`)."""
        return self._db.run(
            lambda c: healthlog.record(c, polls, since, decide, message, prune_before)
        )

    def health_status(
        self, appliances: Sequence[str]
    ) -> tuple[dict[str, list[healthlog.AlertRow]], dict[str, datetime]]:
        """Active alerts and the last good poll of ``appliances``, without polling."""
        return self._db.run(
            lambda c: (healthlog.active_alerts(c, appliances), healthlog.last_ok(c, appliances)),
            write=False,
        )

    # locks --------------------------------------------------------------------------

    def appliance_lock(self, appliance: str, *, lock_dir: Path) -> AbstractContextManager[None]:
        """One holder at a time per appliance: a file lock in ``lock_dir`` with SQLite, a
        PostgreSQL advisory lock (seen by every host on the database) otherwise; see
        :mod:`~hsmctl.state.locks` for what happens when the holder or its connection
        dies."""
        return locks.appliance_lock(self._db, appliance, lock_dir=lock_dir)

    # inspection ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, list[dict[str, object]]]:
        """Every row of every table, in key order, as plain values: for tests, backups
        and "was anything changed?" checks."""

        def tx(conn: Connection) -> dict[str, list[dict[str, object]]]:
            out = {}
            for table in schema.METADATA.sorted_tables:
                rows = conn.execute(sa.select(table).order_by(*table.primary_key.columns))
                out[table.name] = [{k: plain(v) for k, v in row._mapping.items()} for row in rows]
            return out

        return self._db.run(tx, write=False)


def database_target(config: Config) -> str | Path:
    """Where a provider configuration keeps its store: ``database_url``, else
    ``state_dir/hsmctl.db``."""
    if config.database_url:
        return config.database_url
    return Path(config.require("state_dir")) / DB_FILE


def _journal_migration(conn: Connection, version: int) -> None:
    journal.write(conn, Operation.SYNC, "migrate", StepStatus.OK, {"version": version})
