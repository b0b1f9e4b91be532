"""The provider's state store: appliances, allocations, requests, journal, host keys.

Lifecycle: ``Store.open(path_or_url)`` (or :meth:`Store.for_config`) creates the
engine and applies pending migrations; every method then runs in its own short
transaction; ``close()`` (or leaving the ``with`` block) disposes of the connections.
Open one Store per process: never carry one across ``fork``.

Concurrency, which is the point of this module:

* SQLite (default, one host): every write transaction starts with ``BEGIN IMMEDIATE``,
  which takes the database's write lock before the first read, so the read-decide-write
  of an allocation is serial across processes; ``busy_timeout`` makes waiters wait
  instead of failing; WAL lets readers run beside the writer.
* PostgreSQL (several operators, several hosts): transactions run SERIALIZABLE, so two
  allocations that read the same free appliances or quota counts cannot both commit;
  the loser gets a serialization failure and is retried from scratch.
* On both, the UNIQUE/PRIMARY KEY constraints (see :mod:`hsmctl.state.schema`) are the
  last line of defence; a violation caused by a race is retried like a serialization
  failure, and if retries run out it becomes :class:`ConflictError` (exit 5), never a
  crash. Every refusal raises inside the transaction, so nothing is changed.

Nothing secret is stored: the journal refuses :class:`~hsmctl.secret.Secret` values and
keys that name secrets.
"""

from __future__ import annotations

import enum
import os
import random
import re
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Self, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.engine.url import URL

from hsmctl.config import Config
from hsmctl.errors import ConfigError, ConflictError, HsmctlError, UnreachableError, UsageError
from hsmctl.inventory.model import (
    HOST_KEY_TYPES,
    Inventory,
    Placement,
    PublicKey,
    is_reserved,
    usable_addresses,
)
from hsmctl.secret import Secret
from hsmctl.state import schema
from hsmctl.state.model import (
    RELEASABLE,
    TRANSITIONS,
    ApplianceState,
    Interface,
    Operation,
    RequestStatus,
    StepStatus,
)

T = TypeVar("T")

DB_FILE = "hsmctl.db"
BUSY_TIMEOUT_MS = 30_000
MAX_ATTEMPTS = 25
CONNECT_TIMEOUT_S = 10
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# Journal keys that name a secret: refused even when the value looks harmless.
SECRET_WORDS = frozenset({"password", "passwd", "passphrase", "pin", "secret", "otp", "private"})

# -- records -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ApplianceRecord:
    id: str
    region: str
    stamp: str
    serial: str
    model: str
    mgmt_ip: str
    state: ApplianceState
    tenant: str | None
    data_ip: str | None
    failure_reason: str | None
    updated_at: datetime


@dataclass(frozen=True)
class Allocation:
    """An appliance given to a request, with its address in the tenant's subnet."""

    appliance: str
    request_id: str
    tenant: str
    vnet: str
    subnet: str
    ip: str
    region: str
    stamp: str
    mgmt_ip: str


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    tenant: str
    vnet: str
    subnet: str
    requested_ip: str | None
    stamp: str | None
    count: int
    status: RequestStatus
    result: Any
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class JournalEntry:
    id: int
    time: datetime
    appliance: str | None
    request_id: str | None
    operation: Operation
    step: str
    status: StepStatus
    detail: dict[str, Any]


@dataclass(frozen=True)
class PinnedHostKey:
    appliance: str
    interface: Interface
    algorithm: str
    fingerprint: str
    key_line: str
    pinned_at: datetime


@dataclass(frozen=True)
class SyncReport:
    """What ``sync_inventory`` did. ``missing``: in the database, not in the inventory
    (kept: they may hold a tenant). ``host_key_mismatch``: the inventory's management keys
    differ from the pinned ones (kept pinned; re-pin deliberately)."""

    added: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    host_key_mismatch: tuple[str, ...] = ()


class _Retry(Exception):
    """A guarded write found the row changed under it; run the transaction again."""


@dataclass
class _Plan:
    """The in-transaction picture allocation decides on."""

    free: dict[str, list[sa.Row[Any]]]
    stamp_region: dict[str, str]
    held_stamp: Counter[str] = field(default_factory=Counter)
    held_region: Counter[str] = field(default_factory=Counter)


# -- helpers -----------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes; everything here is stored in UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _check_detail(value: object, path: str = "detail") -> None:
    if isinstance(value, Secret):
        raise ValueError(f"{path}: a Secret must never be written to the journal")
    if isinstance(value, Mapping):
        for key, item in value.items():
            words = set(re.split(r"[^a-z]+", str(key).lower()))
            if words & SECRET_WORDS:
                raise ValueError(f"{path}.{key}: the journal never holds secrets")
            _check_detail(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_detail(item, f"{path}[{i}]")


def _plain(value: object) -> object:
    if isinstance(value, datetime):
        return _aware(value).isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _sqlstate(exc: sa.exc.DBAPIError) -> str | None:
    return getattr(exc.orig, "sqlstate", None)


def _is_race(exc: sa.exc.DBAPIError) -> bool:
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


# -- the store ---------------------------------------------------------------------------


class Store:
    """The provider's state: see the module docstring for lifecycle and concurrency."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sqlite = engine.dialect.name == "sqlite"

    # lifecycle ----------------------------------------------------------------------

    @classmethod
    def open(cls, target: str | os.PathLike[str]) -> Store:
        """Open (and migrate) a database: a PostgreSQL URL, a SQLite URL, a SQLite file,
        or a directory (the state_dir) holding ``hsmctl.db``."""
        store = cls(_make_engine(_url_for(target)))
        try:
            store._migrate()
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def for_config(cls, config: Config) -> Store:
        """The provider's database: ``database_url`` if set, else SQLite in state_dir."""
        if config.database_url:
            return cls.open(config.database_url)
        return cls.open(Path(config.require("state_dir")) / DB_FILE)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The database URL, password hidden: safe for logs and messages."""
        return self._engine.url.render_as_string(hide_password=True)

    @property
    def backend(self) -> str:
        return self._engine.dialect.name

    # transactions -------------------------------------------------------------------

    @contextmanager
    def _begin(self, *, write: bool, isolation: str | None = None) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            options: dict[str, Any] = {"hsmctl_write": write}
            if isolation and not self._sqlite:
                options["isolation_level"] = isolation
            conn.execution_options(**options)
            with conn.begin():
                yield conn

    def _run(self, fn: Callable[[Connection], T], *, write: bool = True) -> T:
        """Run ``fn`` in one transaction, retrying it whole when it lost a race."""
        delay = 0.005
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                with self._begin(write=write) as conn:
                    return fn(conn)
            except _Retry:
                pass
            except sa.exc.DBAPIError as exc:
                if not _is_race(exc):
                    raise self._translate(exc) from exc
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

    def _translate(self, exc: sa.exc.DBAPIError) -> HsmctlError:
        first = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else repr(exc)
        if isinstance(exc, sa.exc.OperationalError) and not self._sqlite and not _sqlstate(exc):
            # psycopg: no SQLSTATE means the server was never reached (refused, timeout).
            return UnreachableError(f"state store {self.url}: {first}")
        return HsmctlError(f"state store {self.url}: {first}")

    def _migrate(self) -> None:
        def step(conn: Connection) -> None:
            if not self._sqlite:
                # READ COMMITTED: after the lock is granted, later statements see what
                # the previous holder committed.
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
            try:
                applied = schema.migrate(conn)
            except schema.SchemaTooNew as exc:
                raise ConfigError(f"state store {self.url}: {exc}; upgrade hsmctl") from exc
            for version in applied:
                _journal(conn, Operation.SYNC, "migrate", StepStatus.OK, {"version": version})

        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                with self._begin(write=True, isolation="READ COMMITTED") as conn:
                    step(conn)
                    return
            except sa.exc.DBAPIError as exc:
                if not _is_race(exc) or attempt == MAX_ATTEMPTS:
                    raise self._translate(exc) from exc
                time.sleep(random.uniform(0, 0.05))  # noqa: S311

    def schema_version(self) -> int:
        return self._run(schema.current_version, write=False)

    # inventory ----------------------------------------------------------------------

    def sync_inventory(self, inventory: Inventory) -> SyncReport:
        """Add new appliances as ``available`` and pin their manufacturing management
        keys; refresh the hardware facts of known ones; never touch their state."""

        def tx(conn: Connection) -> SyncReport:
            t = schema.appliances
            rows = {r.id: r for r in conn.execute(sa.select(t))}
            pinned: dict[str, set[str]] = {}
            for key in conn.execute(
                sa.select(schema.host_keys).where(schema.host_keys.c.interface == Interface.MGMT)
            ):
                pinned.setdefault(key.appliance, set()).add(key.fingerprint)
            now = _now()
            added, updated, mismatch = [], [], []
            for a in inventory.appliances:
                facts = {
                    "region": a.region,
                    "stamp": a.stamp,
                    "serial": a.serial,
                    "model": a.model,
                    "mgmt_ip": str(a.mgmt_ip),
                }
                row = rows.get(a.id)
                if row is None:
                    conn.execute(
                        t.insert().values(
                            id=a.id, state=ApplianceState.AVAILABLE, updated_at=now, **facts
                        )
                    )
                    added.append(a.id)
                elif any(getattr(row, k) != v for k, v in facts.items()):
                    conn.execute(t.update().where(t.c.id == a.id).values(updated_at=now, **facts))
                    updated.append(a.id)
                if a.id not in pinned:
                    _pin(conn, a.id, Interface.MGMT, a.mgmt_host_keys, now)
                elif pinned[a.id] != set(a.mgmt_fingerprints):
                    mismatch.append(a.id)
            known = {a.id for a in inventory.appliances}
            report = SyncReport(
                added=tuple(added),
                updated=tuple(updated),
                missing=tuple(sorted(set(rows) - known)),
                host_key_mismatch=tuple(mismatch),
            )
            if added or updated:
                _journal(
                    conn,
                    Operation.SYNC,
                    "inventory",
                    StepStatus.OK,
                    {"added": added, "updated": updated, "missing": list(report.missing)},
                )
            return report

        return self._run(tx)

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
        _validate_request(rid, placement, count)
        return self._run(lambda conn: self._allocate(conn, rid, placement, count))

    def _allocate(self, conn: Connection, rid: str, p: Placement, count: int) -> list[Allocation]:
        existing = conn.execute(
            sa.select(schema.requests).where(schema.requests.c.request_id == rid)
        ).first()
        if existing is not None:
            return _resume(conn, existing, p, count)

        plan = _load_plan(conn, p)
        chosen: list[sa.Row[Any]] = []
        for _ in range(count):
            options = [
                s
                for s, rows in plan.free.items()
                if rows
                and plan.held_stamp[s] < p.quota.per_stamp
                and plan.held_region[plan.stamp_region[s]] < p.quota.per_region
            ]
            if not options:
                raise _no_capacity(p, count, len(chosen), plan)
            best = min(options, key=lambda s: (plan.held_stamp[s], -len(plan.free[s]), s))
            row = plan.free[best].pop(0)
            chosen.append(row)
            plan.held_stamp[best] += 1
            plan.held_region[plan.stamp_region[best]] += 1

        ips = _pick_addresses(conn, p, count)
        now = _now()
        conn.execute(
            schema.requests.insert().values(
                request_id=rid,
                tenant=p.tenant,
                vnet=p.vnet,
                subnet=p.subnet,
                requested_ip=str(p.ip) if p.ip else None,
                stamp=p.stamp,
                count=count,
                status=RequestStatus.ALLOCATED,
                result=None,
                created_at=now,
                updated_at=now,
            )
        )
        out = []
        t = schema.appliances
        for row, ip in zip(chosen, ips, strict=True):
            changed = conn.execute(
                t.update()
                .where(t.c.id == row.id, t.c.state == ApplianceState.AVAILABLE)
                .values(
                    state=ApplianceState.PROVISIONING,
                    tenant=p.tenant,
                    data_ip=str(ip),
                    failure_reason=None,
                    updated_at=now,
                )
            ).rowcount
            if changed != 1:
                raise _Retry()
            conn.execute(
                schema.allocations.insert().values(
                    appliance=row.id, request_id=rid, tenant=p.tenant, created_at=now
                )
            )
            conn.execute(
                schema.address_assignments.insert().values(
                    tenant=p.tenant,
                    vnet=p.vnet,
                    subnet=p.subnet,
                    ip=str(ip),
                    appliance=row.id,
                    assigned_at=now,
                )
            )
            a = Allocation(
                row.id, rid, p.tenant, p.vnet, p.subnet, str(ip), row.region, row.stamp, row.mgmt_ip
            )
            _journal(
                conn,
                Operation.ALLOCATE,
                "allocate",
                StepStatus.OK,
                {
                    "tenant": p.tenant,
                    "vnet": p.vnet,
                    "subnet": p.subnet,
                    "ip": str(ip),
                    "stamp": row.stamp,
                    "region": row.region,
                },
                appliance=row.id,
                request_id=rid,
            )
            out.append(a)
        return out

    def release(self, appliance: str, *, reason: str | None = None) -> ApplianceRecord:
        """Return an appliance to the pool and free its address.

        Only from provisioning, deprovisioning or failed: a provisioned or customer-owned
        appliance must be deprovisioned (zeroized) first. Releasing an appliance that is
        already available is a no-op, so a deprovisioning run can be resumed.
        """

        def tx(conn: Connection) -> ApplianceRecord:
            row = _appliance_row(conn, appliance)
            alloc = conn.execute(
                sa.select(schema.allocations).where(schema.allocations.c.appliance == appliance)
            ).first()
            if row.state == ApplianceState.AVAILABLE and alloc is None:
                return _record(row)
            if row.state not in RELEASABLE:
                raise ConflictError(
                    f"appliance {appliance} is {row.state.value}; deprovision (zeroize) it "
                    "before it goes back to the pool"
                )
            conn.execute(
                schema.address_assignments.delete().where(
                    schema.address_assignments.c.appliance == appliance
                )
            )
            conn.execute(
                schema.allocations.delete().where(schema.allocations.c.appliance == appliance)
            )
            now = _now()
            t = schema.appliances
            conn.execute(
                t.update()
                .where(t.c.id == appliance)
                .values(
                    state=ApplianceState.AVAILABLE,
                    tenant=None,
                    data_ip=None,
                    failure_reason=None,
                    updated_at=now,
                )
            )
            rid = alloc.request_id if alloc is not None else None
            if rid is not None:
                left = conn.execute(
                    sa.select(sa.func.count())
                    .select_from(schema.allocations)
                    .where(schema.allocations.c.request_id == rid)
                ).scalar_one()
                if left == 0:
                    r = schema.requests
                    conn.execute(
                        r.update()
                        .where(r.c.request_id == rid)
                        .values(status=RequestStatus.RELEASED, updated_at=now)
                    )
            _journal(
                conn,
                Operation.RELEASE,
                "release",
                StepStatus.OK,
                {
                    "from": row.state.value,
                    "tenant": row.tenant,
                    "ip": row.data_ip,
                    "reason": reason,
                },
                appliance=appliance,
                request_id=rid,
            )
            return _record(_appliance_row(conn, appliance))

        return self._run(tx)

    # appliances ---------------------------------------------------------------------

    def set_state(
        self,
        appliance: str,
        state: ApplianceState,
        *,
        reason: str | None = None,
        expect: Iterable[ApplianceState] | None = None,
    ) -> ApplianceRecord:
        """Move an appliance along :data:`TRANSITIONS`; ``expect`` makes it a
        compare-and-set (ConflictError if the current state is not one of them)."""
        state = ApplianceState(state)
        if state == ApplianceState.AVAILABLE:
            raise ValueError("an appliance becomes available through release()")
        if state == ApplianceState.FAILED and not reason:
            raise ValueError("a failed appliance needs a reason")
        expected = frozenset(expect) if expect is not None else None

        def tx(conn: Connection) -> ApplianceRecord:
            row = _appliance_row(conn, appliance)
            current = row.state
            if expected is not None and current not in expected:
                want = ", ".join(sorted(s.value for s in expected))
                raise ConflictError(
                    f"appliance {appliance} is {current.value}, expected {want}",
                    detail={"appliance": appliance, "state": current.value},
                )
            if state != current and state not in TRANSITIONS[current]:
                raise ConflictError(
                    f"appliance {appliance} is {current.value}; it cannot become {state.value}",
                    detail={"appliance": appliance, "state": current.value},
                )
            if state == ApplianceState.PROVISIONING and _allocation_row(conn, appliance) is None:
                raise ConflictError(f"appliance {appliance} has no allocation to provision")
            t = schema.appliances
            conn.execute(
                t.update()
                .where(t.c.id == appliance, t.c.state == current)
                .values(
                    state=state,
                    failure_reason=reason if state == ApplianceState.FAILED else None,
                    updated_at=_now(),
                )
            )
            _journal(
                conn,
                Operation.STATE,
                "set-state",
                StepStatus.OK,
                {"from": current.value, "to": state.value, "reason": reason},
                appliance=appliance,
            )
            return _record(_appliance_row(conn, appliance))

        return self._run(tx)

    def get_appliance(self, appliance: str) -> ApplianceRecord:
        return self._run(lambda c: _record(_appliance_row(c, appliance)), write=False)

    def list_appliances(
        self, *, state: ApplianceState | None = None, tenant: str | None = None
    ) -> list[ApplianceRecord]:
        t = schema.appliances
        q = sa.select(t).order_by(t.c.id)
        if state is not None:
            q = q.where(t.c.state == state)
        if tenant is not None:
            q = q.where(t.c.tenant == tenant)
        return self._run(lambda c: [_record(r) for r in c.execute(q)], write=False)

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
        def tx(conn: Connection) -> list[Allocation]:
            q = _allocation_query()
            al = schema.allocations
            if request_id is not None:
                q = q.where(al.c.request_id == request_id)
            if tenant is not None:
                q = q.where(al.c.tenant == tenant)
            if appliance is not None:
                q = q.where(al.c.appliance == appliance)
            return [_allocation(r) for r in conn.execute(q)]

        return self._run(tx, write=False)

    # requests -----------------------------------------------------------------------

    def get_request(self, request_id: str) -> RequestRecord | None:
        r = schema.requests
        q = sa.select(r).where(r.c.request_id == request_id)

        def tx(conn: Connection) -> RequestRecord | None:
            row = conn.execute(q).first()
            return _request(row) if row is not None else None

        return self._run(tx, write=False)

    def update_request(
        self, request_id: str, status: RequestStatus, result: Any = None
    ) -> RequestRecord:
        """Record a request's progress and its JSON result (never secrets)."""
        status = RequestStatus(status)
        _check_detail(result, "result")
        r = schema.requests

        def tx(conn: Connection) -> RequestRecord:
            changed = conn.execute(
                r.update()
                .where(r.c.request_id == request_id)
                .values(status=status, result=result, updated_at=_now())
            ).rowcount
            if changed != 1:
                raise UsageError(f"no request {request_id!r}")
            return _request(conn.execute(sa.select(r).where(r.c.request_id == request_id)).one())

        return self._run(tx)

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
        _check_detail(data)
        return self._run(
            lambda c: _journal(
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
        j = schema.journal
        q = sa.select(j).order_by(j.c.id)
        if appliance is not None:
            q = q.where(j.c.appliance == appliance)
        if request_id is not None:
            q = q.where(j.c.request_id == request_id)
        if operation is not None:
            q = q.where(j.c.operation == operation)
        if after is not None:
            q = q.where(j.c.id > after)
        if limit is not None:
            q = q.limit(limit)
        return self._run(
            lambda c: [
                JournalEntry(
                    r.id,
                    _aware(r.time),
                    r.appliance,
                    r.request_id,
                    r.operation,
                    r.step,
                    r.status,
                    dict(r.detail),
                )
                for r in c.execute(q)
            ],
            write=False,
        )

    # host keys ----------------------------------------------------------------------

    def pin_host_keys(
        self, appliance: str, interface: Interface, keys: Sequence[str | PublicKey]
    ) -> list[PinnedHostKey]:
        """Replace the pinned keys of one interface (after provisioning records the data
        keys, after a rotation, after a factory reset)."""
        interface = Interface(interface)
        parsed = []
        for k in keys:
            try:
                parsed.append(k if isinstance(k, PublicKey) else PublicKey.parse(k, HOST_KEY_TYPES))
            except ValueError as exc:
                raise UsageError(
                    f"appliance {appliance} {interface.value} host key: {exc}"
                ) from exc
        if not parsed:
            raise UsageError(f"appliance {appliance}: no {interface.value} host keys to pin")

        def tx(conn: Connection) -> list[PinnedHostKey]:
            _appliance_row(conn, appliance)
            h = schema.host_keys
            conn.execute(h.delete().where(h.c.appliance == appliance, h.c.interface == interface))
            _pin(conn, appliance, interface, parsed, _now())
            return _pinned(conn, appliance, interface)

        return self._run(tx)

    def host_keys(self, appliance: str, interface: Interface) -> list[PinnedHostKey]:
        return self._run(lambda c: _pinned(c, appliance, Interface(interface)), write=False)

    # inspection ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, list[dict[str, object]]]:
        """Every row of every table, in key order, as plain values: for tests, backups
        and "was anything changed?" checks."""

        def tx(conn: Connection) -> dict[str, list[dict[str, object]]]:
            out = {}
            for table in schema.METADATA.sorted_tables:
                rows = conn.execute(sa.select(table).order_by(*table.primary_key.columns))
                out[table.name] = [{k: _plain(v) for k, v in row._mapping.items()} for row in rows]
            return out

        return self._run(tx, write=False)


# -- transaction bodies ------------------------------------------------------------------

_MIGRATION_LOCK = 0x6873_6D63_746C_0001  # "hsmctl" + 1: one advisory lock id for migrations


def _validate_request(rid: str, p: Placement, count: int) -> None:
    if not REQUEST_ID_RE.match(rid):
        raise UsageError(
            f"request id {rid!r} is not valid (up to 128 letters, digits, '.', '_', ':', '-')"
        )
    if count < 1:
        raise UsageError(f"--count must be at least 1, got {count}")
    if p.ip is not None:
        if count != 1:
            raise UsageError("--ip names one address; it cannot be used with --count above 1")
        if p.ip not in p.cidr or is_reserved(p.cidr, p.ip):
            raise UsageError(f"address {p.ip} is not a usable address of subnet {p.cidr}")


def _resume(conn: Connection, row: sa.Row[Any], p: Placement, count: int) -> list[Allocation]:
    asked = (p.tenant, p.vnet, p.subnet, str(p.ip) if p.ip else None, p.stamp, count)
    stored = (row.tenant, row.vnet, row.subnet, row.requested_ip, row.stamp, row._mapping["count"])
    if asked != stored:
        raise UsageError(
            f"request {row.request_id} was made with different parameters "
            f"(tenant {row.tenant}, vnet {row.vnet}, subnet {row.subnet}, "
            f"ip {row.requested_ip}, stamp {row.stamp}, count {row._mapping['count']}); "
            "use a new request id",
            detail={"request_id": row.request_id},
        )
    found = [
        _allocation(r)
        for r in conn.execute(
            _allocation_query().where(schema.allocations.c.request_id == row.request_id)
        )
    ]
    if not found:
        raise ConflictError(
            f"request {row.request_id} has been released; use a new request id",
            detail={"request_id": row.request_id},
        )
    return found


def _load_plan(conn: Connection, p: Placement) -> _Plan:
    t = schema.appliances
    q = sa.select(t.c.id, t.c.region, t.c.stamp, t.c.mgmt_ip).where(
        t.c.state == ApplianceState.AVAILABLE
    )
    if p.stamp is not None:
        q = q.where(t.c.stamp == p.stamp)
    if p.region is not None:
        q = q.where(t.c.region == p.region)
    free: dict[str, list[sa.Row[Any]]] = {}
    stamp_region: dict[str, str] = {}
    for row in conn.execute(q.order_by(t.c.id)):
        free.setdefault(row.stamp, []).append(row)
        stamp_region[row.stamp] = row.region
    plan = _Plan(free, stamp_region)
    al = schema.allocations
    held = conn.execute(
        sa.select(t.c.stamp, t.c.region, sa.func.count())
        .select_from(al.join(t, al.c.appliance == t.c.id))
        .where(al.c.tenant == p.tenant)
        .group_by(t.c.stamp, t.c.region)
    )
    for stamp, region, n in held:
        plan.held_stamp[stamp] += n
        plan.held_region[region] += n
    return plan


def _no_capacity(p: Placement, count: int, placed: int, plan: _Plan) -> ConflictError:
    scope = "".join(
        [f" in stamp {p.stamp}" if p.stamp else "", f" in region {p.region}" if p.region else ""]
    )
    free_total = sum(len(v) for v in plan.free.values()) + placed
    detail: dict[str, object] = {
        "tenant": p.tenant,
        "requested": count,
        "free": free_total,
        "held_by_stamp": dict(plan.held_stamp),
        "held_by_region": dict(plan.held_region),
        "quota": {"per_stamp": p.quota.per_stamp, "per_region": p.quota.per_region},
    }
    if free_total == 0:
        return ConflictError(
            f"no free appliance{scope} for tenant {p.tenant}; nothing was changed",
            detail=detail,
        )
    if free_total < count:
        return ConflictError(
            f"only {free_total} free appliance(s){scope} for {count} requested by tenant "
            f"{p.tenant}; nothing was changed",
            detail=detail,
        )
    blocked = []
    for stamp in sorted(plan.free):
        region = plan.stamp_region[stamp]
        if plan.held_region[region] >= p.quota.per_region:
            blocked.append(
                f"region {region} holds {plan.held_region[region]} of {p.quota.per_region}"
            )
        elif plan.held_stamp[stamp] >= p.quota.per_stamp:
            blocked.append(f"stamp {stamp} holds {plan.held_stamp[stamp]} of {p.quota.per_stamp}")
    return ConflictError(
        f"quota exceeded for tenant {p.tenant}{scope}: {'; '.join(sorted(set(blocked)))} "
        f"(limits: {p.quota.per_stamp} per stamp, {p.quota.per_region} per region); "
        "nothing was changed",
        detail=detail,
    )


def _pick_addresses(conn: Connection, p: Placement, count: int) -> list[IPv4Address]:
    aa = schema.address_assignments
    used = {
        row.ip: row.appliance
        for row in conn.execute(
            sa.select(aa.c.ip, aa.c.appliance).where(aa.c.tenant == p.tenant, aa.c.vnet == p.vnet)
        )
    }
    if p.ip is not None:
        owner = used.get(str(p.ip))
        if owner is not None:
            raise ConflictError(
                f"address {p.ip} in {p.tenant}/{p.vnet} is already assigned to {owner}; "
                "nothing was changed",
                detail={"ip": str(p.ip), "appliance": owner},
            )
        return [p.ip]
    picked = []
    for ip in usable_addresses(p.cidr):
        if str(ip) not in used:
            picked.append(ip)
            if len(picked) == count:
                return picked
    raise ConflictError(
        f"subnet {p.subnet} ({p.cidr}) of {p.tenant}/{p.vnet} has no free address for "
        f"{count} appliance(s); nothing was changed",
        detail={"subnet": p.subnet, "cidr": str(p.cidr)},
    )


def _journal(
    conn: Connection,
    operation: Operation,
    step: str,
    status: StepStatus,
    detail: Mapping[str, Any],
    *,
    appliance: str | None = None,
    request_id: str | None = None,
) -> int:
    result = conn.execute(
        schema.journal.insert().values(
            time=_now(),
            appliance=appliance,
            request_id=request_id,
            operation=operation,
            step=step,
            status=status,
            detail=dict(detail),
        )
    )
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def _pin(
    conn: Connection,
    appliance: str,
    interface: Interface,
    keys: Iterable[PublicKey],
    now: datetime,
) -> None:
    keys = list(keys)
    for k in keys:
        conn.execute(
            schema.host_keys.insert().values(
                appliance=appliance,
                interface=interface,
                fingerprint=k.fingerprint,
                algorithm=k.algorithm,
                key_line=k.line,
                pinned_at=now,
            )
        )
    _journal(
        conn,
        Operation.HOST_KEYS,
        "pin",
        StepStatus.OK,
        {"interface": interface.value, "fingerprints": [k.fingerprint for k in keys]},
        appliance=appliance,
    )


def _pinned(conn: Connection, appliance: str, interface: Interface) -> list[PinnedHostKey]:
    h = schema.host_keys
    rows = conn.execute(
        sa.select(h)
        .where(h.c.appliance == appliance, h.c.interface == interface)
        .order_by(h.c.algorithm, h.c.fingerprint)
    )
    return [
        PinnedHostKey(
            r.appliance, r.interface, r.algorithm, r.fingerprint, r.key_line, _aware(r.pinned_at)
        )
        for r in rows
    ]


def _appliance_row(conn: Connection, appliance: str) -> sa.Row[Any]:
    row = conn.execute(
        sa.select(schema.appliances).where(schema.appliances.c.id == appliance)
    ).first()
    if row is None:
        raise UsageError(f"no appliance {appliance!r} in the state store")
    return row


def _allocation_row(conn: Connection, appliance: str) -> sa.Row[Any] | None:
    al = schema.allocations
    return conn.execute(sa.select(al).where(al.c.appliance == appliance)).first()


def _allocation_query() -> sa.Select[Any]:
    al, aa, t = schema.allocations, schema.address_assignments, schema.appliances
    return (
        sa.select(
            al.c.appliance,
            al.c.request_id,
            al.c.tenant,
            aa.c.vnet,
            aa.c.subnet,
            aa.c.ip,
            t.c.region,
            t.c.stamp,
            t.c.mgmt_ip,
        )
        .select_from(
            al.join(aa, aa.c.appliance == al.c.appliance).join(t, t.c.id == al.c.appliance)
        )
        .order_by(al.c.appliance)
    )


def _allocation(r: sa.Row[Any]) -> Allocation:
    return Allocation(
        r.appliance, r.request_id, r.tenant, r.vnet, r.subnet, r.ip, r.region, r.stamp, r.mgmt_ip
    )


def _record(r: sa.Row[Any]) -> ApplianceRecord:
    return ApplianceRecord(
        id=r.id,
        region=r.region,
        stamp=r.stamp,
        serial=r.serial,
        model=r.model,
        mgmt_ip=r.mgmt_ip,
        state=r.state,
        tenant=r.tenant,
        data_ip=r.data_ip,
        failure_reason=r.failure_reason,
        updated_at=_aware(r.updated_at),
    )


def _request(r: sa.Row[Any]) -> RequestRecord:
    return RequestRecord(
        request_id=r.request_id,
        tenant=r.tenant,
        vnet=r.vnet,
        subnet=r.subnet,
        requested_ip=r.requested_ip,
        stamp=r.stamp,
        count=r._mapping["count"],
        status=r.status,
        result=r.result,
        created_at=_aware(r.created_at),
        updated_at=_aware(r.updated_at),
    )


# -- engines -----------------------------------------------------------------------------


def _url_for(target: str | os.PathLike[str]) -> URL:
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
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
    )


def _sqlite_engine(url: URL) -> Engine:
    assert url.database
    path = Path(url.database)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The provider's database is nobody else's business: create it 0600.
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    except OSError as exc:
        raise ConfigError(f"state store {path}: {exc.strerror}") from exc
    engine = sa.create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

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
