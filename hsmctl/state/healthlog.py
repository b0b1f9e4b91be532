"""Health polls and alerts in the store (schema version 2).

:func:`record` runs inside one transaction: it writes a whole fleet poll, reads each
appliance's polls within the alert window and its active alerts, asks the caller's pure
``decide`` what changes, and applies them. Two health runs at once therefore never raise
the same alert twice (the second sees the first's row) and a crash leaves either the
whole poll with its alerts or nothing.

Retention: given ``prune_before``, the same transaction deletes the polls older than it
(:func:`prune`), except each appliance's newest good poll (``last_ok`` is read from it),
and the alerts cleared before it. Active alerts are never pruned.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from hsmctl.state.schema import alerts, health_polls


@dataclass(frozen=True)
class PollRow:
    appliance: str
    time: datetime
    reachable: bool
    ok: bool
    telemetry: str
    problems: tuple[str, ...]
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AlertRow:
    id: int
    appliance: str
    kind: str
    message: str
    raised_at: datetime
    cleared_at: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "raised_at": _iso(self.raised_at),
            "cleared_at": _iso(self.cleared_at) if self.cleared_at else None,
        }


@dataclass(frozen=True)
class Applied:
    """What one :func:`record` changed, and what the fleet looks like after it."""

    raised: list[tuple[AlertRow, int]]  # (alert, bad polls within the window)
    cleared: list[tuple[AlertRow, int]]
    active: dict[str, list[AlertRow]]
    last_ok: dict[str, datetime]
    pruned: int = 0  # polls deleted by the retention


# decide(appliance, polls within the window (oldest first, the new one last), active kinds)
#   -> [(kind, "raised" | "cleared", count)]
Decider = Callable[[str, Sequence[PollRow], set[str]], Sequence[tuple[str, str, int]]]


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _aware(t: datetime) -> datetime:
    from datetime import UTC

    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _alert(r: Any) -> AlertRow:
    return AlertRow(
        int(r.id),
        r.appliance,
        r.kind,
        r.message,
        _aware(r.raised_at),
        _aware(r.cleared_at) if r.cleared_at else None,
    )


def active_alerts(conn: Connection, appliances: Sequence[str]) -> dict[str, list[AlertRow]]:
    out: dict[str, list[AlertRow]] = defaultdict(list)
    q = (
        sa.select(alerts)
        .where(alerts.c.cleared_at.is_(None), alerts.c.appliance.in_(list(appliances)))
        .order_by(alerts.c.id)
    )
    for r in conn.execute(q):
        out[r.appliance].append(_alert(r))
    return dict(out)


def last_ok(conn: Connection, appliances: Sequence[str]) -> dict[str, datetime]:
    q = (
        sa.select(health_polls.c.appliance, sa.func.max(health_polls.c.time))
        .where(health_polls.c.ok.is_(True), health_polls.c.appliance.in_(list(appliances)))
        .group_by(health_polls.c.appliance)
    )
    return {a: _aware(t) for a, t in conn.execute(q)}


def prune(conn: Connection, before: datetime) -> tuple[int, int]:
    """Delete the polls older than ``before`` but each appliance's newest good poll, and
    the alerts cleared before ``before``; return (polls, alerts) deleted."""
    newer = health_polls.alias("newer")
    newest_ok = (
        sa.select(sa.func.max(newer.c.time))
        .where(newer.c.appliance == health_polls.c.appliance, newer.c.ok.is_(True))
        .scalar_subquery()
    )
    polls = conn.execute(
        health_polls.delete().where(
            health_polls.c.time < before,
            sa.not_(sa.and_(health_polls.c.ok.is_(True), health_polls.c.time == newest_ok)),
        )
    ).rowcount
    old_alerts = conn.execute(
        alerts.delete().where(alerts.c.cleared_at.is_not(None), alerts.c.cleared_at < before)
    ).rowcount
    return int(polls or 0), int(old_alerts or 0)


def record(
    conn: Connection,
    polls: Sequence[PollRow],
    since: datetime,
    decide: Decider,
    message: Callable[[str, str], str],
    prune_before: datetime | None = None,
) -> Applied:
    """Store ``polls``, apply ``decide``'s alert changes, and (``prune_before``) apply
    the retention, all in the caller's transaction. ``prune_before`` after ``since``
    is moved back to ``since``: the polls the alert rule counts are never pruned."""
    ids = [p.appliance for p in polls]
    pruned = 0
    if prune_before is not None:
        pruned, _ = prune(conn, min(prune_before, since))
    if polls:
        conn.execute(
            health_polls.insert(),
            [
                {
                    "appliance": p.appliance,
                    "time": p.time,
                    "reachable": p.reachable,
                    "ok": p.ok,
                    "telemetry": p.telemetry,
                    "problems": list(p.problems),
                    "detail": dict(p.detail),
                }
                for p in polls
            ],
        )
    history: dict[str, list[PollRow]] = defaultdict(list)
    c = health_polls.c
    q = (  # not ``detail``: decoding every poll's report in the window was most of this query
        sa.select(c.appliance, c.time, c.reachable, c.ok, c.telemetry, c.problems)
        .where(health_polls.c.time > since, health_polls.c.appliance.in_(ids))
        .order_by(health_polls.c.time, health_polls.c.id)
    )
    for r in conn.execute(q):
        history[r.appliance].append(
            PollRow(
                r.appliance,
                _aware(r.time),
                bool(r.reachable),
                bool(r.ok),
                r.telemetry,
                tuple(r.problems),
            )
        )
    active = active_alerts(conn, ids)
    raised: list[tuple[AlertRow, int]] = []
    cleared: list[tuple[AlertRow, int]] = []
    for p in polls:
        current = {a.kind: a for a in active.get(p.appliance, [])}
        for kind, transition, count in decide(p.appliance, history[p.appliance], set(current)):
            if transition == "raised":
                text = message(p.appliance, kind)
                new_id = conn.execute(
                    alerts.insert()
                    .values(appliance=p.appliance, kind=kind, message=text, raised_at=p.time)
                    .returning(alerts.c.id)
                ).scalar_one()
                raised.append((AlertRow(int(new_id), p.appliance, kind, text, p.time), count))
            else:
                a = current[kind]
                conn.execute(
                    alerts.update()
                    .where(alerts.c.id == a.id, alerts.c.cleared_at.is_(None))
                    .values(cleared_at=p.time)
                )
                cleared.append(
                    (AlertRow(a.id, a.appliance, kind, a.message, a.raised_at, p.time), count)
                )
    return Applied(raised, cleared, active_alerts(conn, ids), last_ok(conn, ids), pruned)
