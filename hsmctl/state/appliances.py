"""The appliances table: rows from the inventory, state moves, reads.

Hardware facts come from the inventory and may change (a re-cabled or renumbered
fleet); the state is the store's alone and moves only along
:data:`~hsmctl.state.model.TRANSITIONS`, checked inside the transaction that writes it.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from hsmctl.errors import ConflictError, UsageError
from hsmctl.inventory.model import Inventory
from hsmctl.state import journal, pins, schema
from hsmctl.state.engine import where_given
from hsmctl.state.model import TRANSITIONS, ApplianceState, Interface, Operation, StepStatus
from hsmctl.state.records import ApplianceRecord, SyncReport, utcnow


def row(conn: Connection, appliance: str) -> sa.Row[Any]:
    """The appliance's row; UsageError if the store does not know it."""
    found = conn.execute(
        sa.select(schema.appliances).where(schema.appliances.c.id == appliance)
    ).first()
    if found is None:
        raise UsageError(f"no appliance {appliance!r} in the state store")
    return found


def get(conn: Connection, appliance: str) -> ApplianceRecord:
    return ApplianceRecord.from_dict(row(conn, appliance)._mapping)


def select(state: ApplianceState | None, tenant: str | None) -> sa.Select[Any]:
    t = schema.appliances
    return where_given(sa.select(t).order_by(t.c.id), (t.c.state, state), (t.c.tenant, tenant))


def sync(conn: Connection, inventory: Inventory) -> SyncReport:
    """Add new appliances as available and pin their management keys; refresh the facts
    of known ones; leave their state and pins alone."""
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
        found = rows.get(a.id)
        if found is None:
            conn.execute(
                t.insert().values(id=a.id, state=ApplianceState.AVAILABLE, updated_at=now, **facts)
            )
            added.append(a.id)
        elif any(getattr(found, k) != v for k, v in facts.items()):
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


def set_state(
    conn: Connection,
    appliance: str,
    state: ApplianceState,
    reason: str | None,
    expected: frozenset[ApplianceState] | None,
) -> ApplianceRecord:
    """Move one appliance (arguments already checked by ``Store.set_state``)."""
    current = row(conn, appliance).state
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
    if state == ApplianceState.PROVISIONING and not _allocated(conn, appliance):
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
    return get(conn, appliance)


def _allocated(conn: Connection, appliance: str) -> bool:
    al = schema.allocations
    return conn.execute(sa.select(al).where(al.c.appliance == appliance)).first() is not None
