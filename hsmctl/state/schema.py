"""The provider database: tables (SQLAlchemy Core) and the ordered migrations.

The same schema serves SQLite and PostgreSQL, so only portable types are used (text
addresses, JSON, timezone-aware timestamps). Double allocation is impossible at the
database level, whatever the code above does:

* ``allocations.appliance`` is the primary key: an appliance belongs to one request;
* ``address_assignments`` has the address ``(tenant, vnet, ip)`` as primary key and a
  UNIQUE appliance: one address per appliance, one appliance per address;
* ``requests.request_id`` is the primary key: a request is recorded once.

:data:`METADATA` always describes the newest schema. Migrations run in order at open
(:func:`migrate`); each one is applied once and recorded in ``schema_version``. When
migration 2 arrived, the version-1 tables were frozen in :mod:`~hsmctl.state.schema_v1`
(copied definitions), so a fresh database still goes through every step.

Version 2 (issue 15, health over time): ``health_polls``, one row per appliance per
``hsmctl health`` poll (what was seen, the problems found), and ``alerts``, one row per
alert from its raising to its clearing (``cleared_at`` NULL while it is active; at most
one active alert per appliance and kind, kept so by the health run's transaction).

Version 3 (health retention): an index on ``health_polls.time``, so the poll that prunes
the polls older than the retention finds them without a full scan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from hsmctl.state import schema_v1
from hsmctl.state.columns import NAMING, BigId, JSONType, _enum, _ts
from hsmctl.state.model import ApplianceState, Interface, Operation, RequestStatus, StepStatus

METADATA = sa.MetaData(naming_convention=NAMING)

schema_version = sa.Table(
    "schema_version",
    METADATA,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("applied_at", _ts(), nullable=False),
)

appliances = sa.Table(
    "appliances",
    METADATA,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("region", sa.String(64), nullable=False),
    sa.Column("stamp", sa.String(64), nullable=False),
    # Serial and mgmt_ip are unique in the inventory, which owns them; not UNIQUE here, so
    # a re-cabled or renumbered fleet (swapped addresses, a retired appliance's address
    # reused) syncs in one pass.
    sa.Column("serial", sa.String(64), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("mgmt_ip", sa.String(45), nullable=False),
    sa.Column("state", _enum(ApplianceState, "appliance_state"), nullable=False, index=True),
    # Denormalised from the allocation for `fleet list`; written in the same transaction.
    sa.Column("tenant", sa.String(64)),
    sa.Column("data_ip", sa.String(45)),
    sa.Column("failure_reason", sa.Text),
    sa.Column("updated_at", _ts(), nullable=False),
)

requests = sa.Table(
    "requests",
    METADATA,
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("vnet", sa.String(64), nullable=False),
    sa.Column("subnet", sa.String(64), nullable=False),
    sa.Column("requested_ip", sa.String(45)),
    sa.Column("stamp", sa.String(64)),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("status", _enum(RequestStatus, "request_status"), nullable=False),
    sa.Column("result", JSONType),
    sa.Column("created_at", _ts(), nullable=False),
    sa.Column("updated_at", _ts(), nullable=False),
    sa.CheckConstraint("count >= 1", name="count_positive"),
)

allocations = sa.Table(
    "allocations",
    METADATA,
    sa.Column("appliance", sa.String(64), sa.ForeignKey("appliances.id"), primary_key=True),
    sa.Column(
        "request_id",
        sa.String(128),
        sa.ForeignKey("requests.request_id"),
        nullable=False,
        index=True,
    ),
    sa.Column("tenant", sa.String(64), nullable=False, index=True),
    sa.Column("created_at", _ts(), nullable=False),
    # Lets address_assignments prove its tenant matches the allocation's.
    sa.UniqueConstraint("appliance", "tenant"),
)

address_assignments = sa.Table(
    "address_assignments",
    METADATA,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("vnet", sa.String(64), primary_key=True),
    sa.Column("ip", sa.String(45), primary_key=True),
    sa.Column("subnet", sa.String(64), nullable=False),
    sa.Column("appliance", sa.String(64), nullable=False, unique=True),
    sa.Column("assigned_at", _ts(), nullable=False),
    sa.ForeignKeyConstraint(
        ["appliance", "tenant"], ["allocations.appliance", "allocations.tenant"]
    ),
)

journal = sa.Table(
    "journal",
    METADATA,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("time", _ts(), nullable=False),
    sa.Column("appliance", sa.String(64), index=True),
    sa.Column("request_id", sa.String(128), index=True),
    sa.Column("operation", _enum(Operation, "operation", constrained=False), nullable=False),
    sa.Column("step", sa.String(100), nullable=False),
    sa.Column("status", _enum(StepStatus, "step_status", constrained=False), nullable=False),
    sa.Column("detail", JSONType, nullable=False),
)

host_keys = sa.Table(
    "host_keys",
    METADATA,
    sa.Column("appliance", sa.String(64), sa.ForeignKey("appliances.id"), primary_key=True),
    sa.Column("interface", _enum(Interface, "interface"), primary_key=True),
    sa.Column("fingerprint", sa.String(64), primary_key=True),
    sa.Column("algorithm", sa.String(32), nullable=False),
    sa.Column("key_line", sa.Text, nullable=False),
    sa.Column("pinned_at", _ts(), nullable=False),
)


# -- version 2: health over time --------------------------------------------------------

health_polls = sa.Table(
    "health_polls",
    METADATA,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("appliance", sa.String(64), nullable=False),
    sa.Column("time", _ts(), nullable=False),
    sa.Column("reachable", sa.Boolean, nullable=False),
    # True when nothing was wrong: the poll that clears alerts.
    sa.Column("ok", sa.Boolean, nullable=False),
    # "ok", "no telemetry (customer choice)", "unavailable"
    sa.Column("telemetry", sa.String(64), nullable=False),
    # The problem kinds found (["psu1", "unreachable", ...]); what the alert rule counts.
    sa.Column("problems", JSONType, nullable=False),
    sa.Column("detail", JSONType, nullable=False),
    sa.Index("ix_health_polls_appliance_time", "appliance", "time"),
)

alerts = sa.Table(
    "alerts",
    METADATA,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("appliance", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("raised_at", _ts(), nullable=False),
    sa.Column("cleared_at", _ts()),
    sa.Index("ix_alerts_appliance_kind", "appliance", "kind"),
)

# -- version 3: health poll retention ---------------------------------------------------

# Pruning deletes the polls older than the retention (``health_retention_days``) on every
# poll: this index lets it find them without reading the whole table.
health_polls_time = sa.Index("ix_health_polls_time", health_polls.c.time)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _v1(conn: Connection) -> None:
    schema_v1.V1.create_all(conn, tables=list(schema_v1.TABLES))


def _v2(conn: Connection) -> None:
    METADATA.create_all(conn, tables=[health_polls, alerts])


def _v3(conn: Connection) -> None:
    # A database made fresh by this hsmctl got the index with the table in _v2.
    health_polls_time.create(conn, checkfirst=True)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _v1),
    Migration(2, "health polls and alerts", _v2),
    Migration(3, "health poll retention index", _v3),
)
LATEST = MIGRATIONS[-1].version


class SchemaTooNew(Exception):
    """The database was migrated by a newer hsmctl; this one must not write to it."""

    def __init__(self, found: int) -> None:
        super().__init__(f"schema version {found} is newer than this hsmctl knows ({LATEST})")
        self.found = found


def current_version(conn: Connection) -> int:
    value = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
    return int(value or 0)


def installed_version(conn: Connection) -> int:
    """:func:`current_version` without creating anything: 0 for a database no hsmctl
    has migrated (no ``schema_version`` table)."""
    if not sa.inspect(conn).has_table(schema_version.name):
        return 0
    return current_version(conn)


def migrate(conn: Connection) -> list[int]:
    """Apply the pending migrations inside the caller's transaction; return them.

    The caller holds the backend's lock (SQLite ``BEGIN IMMEDIATE``; a PostgreSQL
    advisory lock), so two processes opening a new database at once apply each step once.
    """
    METADATA.create_all(conn, tables=[schema_version])
    found = current_version(conn)
    if found > LATEST:
        raise SchemaTooNew(found)
    applied = []
    for m in MIGRATIONS:
        if m.version <= found:
            continue
        m.apply(conn)
        conn.execute(
            schema_version.insert().values(
                version=m.version, description=m.description, applied_at=datetime.now(UTC)
            )
        )
        applied.append(m.version)
    return applied
