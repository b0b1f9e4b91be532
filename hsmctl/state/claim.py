"""Allocation in SQL: read the pool, claim what :mod:`hsmctl.state.allocation` chose,
resume a known request, release an appliance; requests and their results.

Every function runs inside the caller's transaction (:meth:`Database.run`). The claim
is guarded (``UPDATE … WHERE state = 'available'``; a row changed under it retries the
whole transaction) and the constraints of :mod:`hsmctl.state.schema` refuse a second
holder of an appliance or an address, so a choice made on a stale read cannot commit.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from hsmctl.errors import ConflictError, UsageError
from hsmctl.inventory.model import Placement
from hsmctl.state import appliances, journal, schema
from hsmctl.state.allocation import FreeAppliance, Pool, choose_addresses, choose_appliances
from hsmctl.state.engine import Retry, where_given
from hsmctl.state.model import RELEASABLE, ApplianceState, Operation, RequestStatus, StepStatus
from hsmctl.state.records import Allocation, ApplianceRecord, RequestRecord, utcnow


def allocate(conn: Connection, rid: str, p: Placement, count: int) -> list[Allocation]:
    """Resume request ``rid``, or choose and claim ``count`` appliances and addresses."""
    existing = conn.execute(
        sa.select(schema.requests).where(schema.requests.c.request_id == rid)
    ).first()
    if existing is not None:
        return _resume(conn, existing, p, count)
    chosen = choose_appliances(load_pool(conn, p.tenant), p, count)
    ips = choose_addresses(p, _used_addresses(conn, p.tenant, p.vnet), count)
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
    t = schema.appliances
    out = []
    for a, ip in zip(chosen, ips, strict=True):
        changed = conn.execute(
            t.update()
            .where(t.c.id == a.id, t.c.state == ApplianceState.AVAILABLE)
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
                appliance=a.id, request_id=rid, tenant=p.tenant, created_at=now
            )
        )
        conn.execute(
            schema.address_assignments.insert().values(
                tenant=p.tenant,
                vnet=p.vnet,
                subnet=p.subnet,
                ip=str(ip),
                appliance=a.id,
                assigned_at=now,
            )
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
                "stamp": a.stamp,
                "region": a.region,
            },
            appliance=a.id,
            request_id=rid,
        )
        out.append(
            Allocation(a.id, rid, p.tenant, p.vnet, p.subnet, str(ip), a.region, a.stamp, a.mgmt_ip)
        )
    return out


def load_pool(conn: Connection, tenant: str) -> Pool:
    """Every available appliance (by id) and the tenant's holdings per stamp and region."""
    t, al = schema.appliances, schema.allocations
    free = tuple(
        FreeAppliance(r.id, r.region, r.stamp, r.mgmt_ip)
        for r in conn.execute(
            sa.select(t.c.id, t.c.region, t.c.stamp, t.c.mgmt_ip)
            .where(t.c.state == ApplianceState.AVAILABLE)
            .order_by(t.c.id)
        )
    )
    by_stamp: dict[str, int] = {}
    by_region: dict[str, int] = {}
    held = conn.execute(
        sa.select(t.c.stamp, t.c.region, sa.func.count())
        .select_from(al.join(t, al.c.appliance == t.c.id))
        .where(al.c.tenant == tenant)
        .group_by(t.c.stamp, t.c.region)
    )
    for stamp, region, n in held:
        by_stamp[stamp] = by_stamp.get(stamp, 0) + n
        by_region[region] = by_region.get(region, 0) + n
    return Pool(free, by_stamp, by_region)


def _used_addresses(conn: Connection, tenant: str, vnet: str) -> dict[str, str]:
    aa = schema.address_assignments
    q = sa.select(aa.c.ip, aa.c.appliance).where(aa.c.tenant == tenant, aa.c.vnet == vnet)
    return {r.ip: r.appliance for r in conn.execute(q)}


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
    found = allocations(conn, request_id=row.request_id)
    if not found:
        raise ConflictError(
            f"request {row.request_id} has been released; use a new request id",
            detail={"request_id": row.request_id},
        )
    return found


def allocations(
    conn: Connection,
    *,
    request_id: str | None = None,
    tenant: str | None = None,
    appliance: str | None = None,
) -> list[Allocation]:
    al, aa, t = schema.allocations, schema.address_assignments, schema.appliances
    q = (
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
    q = where_given(
        q, (al.c.request_id, request_id), (al.c.tenant, tenant), (al.c.appliance, appliance)
    )
    return [Allocation.from_dict(r._mapping) for r in conn.execute(q)]


def release(conn: Connection, appliance: str, reason: str | None) -> ApplianceRecord:
    """Free an appliance and its address; a request whose last appliance goes is
    marked released. Already available and unallocated: nothing to do."""
    row = appliances.row(conn, appliance)
    al = schema.allocations
    alloc = conn.execute(sa.select(al).where(al.c.appliance == appliance)).first()
    if row.state == ApplianceState.AVAILABLE and alloc is None:
        return ApplianceRecord.from_dict(row._mapping)
    if row.state not in RELEASABLE:
        raise ConflictError(
            f"appliance {appliance} is {row.state.value}; deprovision (zeroize) it "
            "before it goes back to the pool"
        )
    aa = schema.address_assignments
    conn.execute(aa.delete().where(aa.c.appliance == appliance))
    conn.execute(al.delete().where(al.c.appliance == appliance))
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
            sa.select(sa.func.count()).select_from(al).where(al.c.request_id == rid)
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
        {"from": row.state.value, "tenant": row.tenant, "ip": row.data_ip, "reason": reason},
        appliance=appliance,
        request_id=rid,
    )
    return appliances.get(conn, appliance)


def get_request(conn: Connection, request_id: str) -> RequestRecord | None:
    r = schema.requests
    row = conn.execute(sa.select(r).where(r.c.request_id == request_id)).first()
    return RequestRecord.from_dict(row._mapping) if row is not None else None


def update_request(
    conn: Connection, request_id: str, status: RequestStatus, result: Any
) -> RequestRecord:
    r = schema.requests
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
