"""The provider's state store: appliances, allocations, requests, journal, host keys.

Lifecycle: ``Store.open(path_or_url)`` (or :meth:`Store.for_config`) creates the
engine and applies pending migrations; every method then runs in its own short
transaction; ``close()`` (or leaving the ``with`` block) disposes of the connections.
Open one Store per process: never carry one across ``fork``.

Concurrency (SQLite ``BEGIN IMMEDIATE``, PostgreSQL SERIALIZABLE, a lost race retried
whole) lives in :mod:`hsmctl.state.engine`.

Nothing secret is stored: the journal refuses :class:`~hsmctl.secret.Secret` values and
keys that name secrets.
"""

from __future__ import annotations

import os
import re
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from hsmctl.config import Config
from hsmctl.errors import ConflictError, UsageError
from hsmctl.inventory.model import Inventory, Placement, PublicKey, is_reserved, usable_addresses
from hsmctl.state import journal, pins, schema
from hsmctl.state.engine import DB_FILE, Database, Retry
from hsmctl.state.model import (
    RELEASABLE,
    TRANSITIONS,
    ApplianceState,
    Interface,
    Operation,
    RequestStatus,
    StepStatus,
)
from hsmctl.state.records import (
    Allocation,
    ApplianceRecord,
    JournalEntry,
    PinnedHostKey,
    RequestRecord,
    SyncReport,
    plain,
    utcnow,
)

__all__ = ["DB_FILE", "Store"]

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass
class _Plan:
    """The in-transaction picture allocation decides on."""

    free: dict[str, list[sa.Row[Any]]]
    stamp_region: dict[str, str]
    held_stamp: Counter[str] = field(default_factory=Counter)
    held_region: Counter[str] = field(default_factory=Counter)


# -- helpers -----------------------------------------------------------------------------


# -- the store ---------------------------------------------------------------------------


class Store:
    """The provider's state: see the module docstring for lifecycle and concurrency."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # lifecycle ----------------------------------------------------------------------

    @classmethod
    def open(cls, target: str | os.PathLike[str]) -> Store:
        """Open (and migrate) a database: a PostgreSQL URL, a SQLite URL, a SQLite file,
        or a directory (the state_dir) holding ``hsmctl.db``."""
        store = cls(Database.open(target))
        try:
            store._db.migrate()
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

    # inventory ----------------------------------------------------------------------

    def sync_inventory(self, inventory: Inventory) -> SyncReport:
        """Add new appliances as ``available`` and pin their manufacturing management
        keys; refresh the hardware facts of known ones; never touch their state."""

        def tx(conn: Connection) -> SyncReport:
            t = schema.appliances
            rows = {r.id: r for r in conn.execute(sa.select(t))}
            pinned = pins.fingerprints(conn, Interface.MGMT)
            now = utcnow()
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
                    pins.pin(conn, a.id, Interface.MGMT, a.mgmt_host_keys, now)
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
                journal.write(
                    conn,
                    Operation.SYNC,
                    "inventory",
                    StepStatus.OK,
                    {"added": added, "updated": updated, "missing": list(report.missing)},
                )
            return report

        return self._db.run(tx)

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
        return self._db.run(lambda conn: self._allocate(conn, rid, placement, count))

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
        now = utcnow()
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
                raise Retry()
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
            journal.write(
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
                return ApplianceRecord.from_dict(row._mapping)
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
            now = utcnow()
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
            journal.write(
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
            return ApplianceRecord.from_dict(_appliance_row(conn, appliance)._mapping)

        return self._db.run(tx)

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
                    updated_at=utcnow(),
                )
            )
            journal.write(
                conn,
                Operation.STATE,
                "set-state",
                StepStatus.OK,
                {"from": current.value, "to": state.value, "reason": reason},
                appliance=appliance,
            )
            return ApplianceRecord.from_dict(_appliance_row(conn, appliance)._mapping)

        return self._db.run(tx)

    def get_appliance(self, appliance: str) -> ApplianceRecord:
        return self._db.run(
            lambda c: ApplianceRecord.from_dict(_appliance_row(c, appliance)._mapping), write=False
        )

    def list_appliances(
        self, *, state: ApplianceState | None = None, tenant: str | None = None
    ) -> list[ApplianceRecord]:
        t = schema.appliances
        q = sa.select(t).order_by(t.c.id)
        if state is not None:
            q = q.where(t.c.state == state)
        if tenant is not None:
            q = q.where(t.c.tenant == tenant)
        return self._db.run(
            lambda c: [ApplianceRecord.from_dict(r._mapping) for r in c.execute(q)], write=False
        )

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
            return [Allocation.from_dict(r._mapping) for r in conn.execute(q)]

        return self._db.run(tx, write=False)

    # requests -----------------------------------------------------------------------

    def get_request(self, request_id: str) -> RequestRecord | None:
        r = schema.requests
        q = sa.select(r).where(r.c.request_id == request_id)

        def tx(conn: Connection) -> RequestRecord | None:
            row = conn.execute(q).first()
            return RequestRecord.from_dict(row._mapping) if row is not None else None

        return self._db.run(tx, write=False)

    def update_request(
        self, request_id: str, status: RequestStatus, result: Any = None
    ) -> RequestRecord:
        """Record a request's progress and its JSON result (never secrets)."""
        status = RequestStatus(status)
        journal.check_detail(result, "result")
        r = schema.requests

        def tx(conn: Connection) -> RequestRecord:
            changed = conn.execute(
                r.update()
                .where(r.c.request_id == request_id)
                .values(status=status, result=result, updated_at=utcnow())
            ).rowcount
            if changed != 1:
                raise UsageError(f"no request {request_id!r}")
            return RequestRecord.from_dict(
                conn.execute(sa.select(r).where(r.c.request_id == request_id)).one()._mapping
            )

        return self._db.run(tx)

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
            _appliance_row(conn, appliance)
            return pins.replace(conn, appliance, interface, parsed)

        return self._db.run(tx)

    def host_keys(self, appliance: str, interface: Interface) -> list[PinnedHostKey]:
        return self._db.run(lambda c: pins.pinned(c, appliance, Interface(interface)), write=False)

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


# -- transaction bodies ------------------------------------------------------------------


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
        Allocation.from_dict(r._mapping)
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
