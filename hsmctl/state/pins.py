"""Pinned SSH host keys per appliance and interface: the keys a session must see.

Management keys come from the inventory (manufacturing) at sync; data keys are recorded
by provisioning and replaced on rotation or factory reset. Every pin is journaled with
its fingerprints, so a changed key can be traced to the run that pinned it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from hsmctl.errors import UsageError
from hsmctl.inventory.model import HOST_KEY_TYPES, PublicKey
from hsmctl.state import journal, schema
from hsmctl.state.model import Interface, Operation, StepStatus
from hsmctl.state.records import PinnedHostKey, utcnow


def parse(appliance: str, interface: Interface, keys: Sequence[str | PublicKey]) -> list[PublicKey]:
    """Host key lines as keys; UsageError before any transaction if one is not a host key."""
    parsed = []
    for k in keys:
        try:
            parsed.append(k if isinstance(k, PublicKey) else PublicKey.parse(k, HOST_KEY_TYPES))
        except ValueError as exc:
            raise UsageError(f"appliance {appliance} {interface.value} host key: {exc}") from exc
    if not parsed:
        raise UsageError(f"appliance {appliance}: no {interface.value} host keys to pin")
    return parsed


def pin(
    conn: Connection,
    appliance: str,
    interface: Interface,
    keys: Iterable[PublicKey],
    now: datetime,
) -> None:
    """Add pins (the caller has removed any it replaces) and journal them."""
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
    journal.write(
        conn,
        Operation.HOST_KEYS,
        "pin",
        StepStatus.OK,
        {"interface": interface.value, "fingerprints": [k.fingerprint for k in keys]},
        appliance=appliance,
    )


def replace(
    conn: Connection, appliance: str, interface: Interface, keys: Sequence[PublicKey]
) -> list[PinnedHostKey]:
    """Drop an interface's pins and pin ``keys`` instead; returns the new pins."""
    h = schema.host_keys
    conn.execute(h.delete().where(h.c.appliance == appliance, h.c.interface == interface))
    pin(conn, appliance, interface, keys, utcnow())
    return pinned(conn, appliance, interface)


def pinned(conn: Connection, appliance: str, interface: Interface) -> list[PinnedHostKey]:
    h = schema.host_keys
    rows = conn.execute(
        sa.select(h)
        .where(h.c.appliance == appliance, h.c.interface == interface)
        .order_by(h.c.algorithm, h.c.fingerprint)
    )
    return [PinnedHostKey.from_dict(r._mapping) for r in rows]


def fingerprints(conn: Connection, interface: Interface) -> dict[str, set[str]]:
    """Every appliance's pinned fingerprints on one interface."""
    out: dict[str, set[str]] = {}
    h = schema.host_keys
    for key in conn.execute(sa.select(h).where(h.c.interface == interface)):
        out.setdefault(key.appliance, set()).add(key.fingerprint)
    return out
