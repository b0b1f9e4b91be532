"""Version 1 of the provider schema, frozen: the tables exactly as migration 1 created
them (copied from :mod:`hsmctl.state.schema` when migration 2 arrived). Migration 1 builds
these, never the newest definitions, so a fresh database goes through every step the same
way an old one did. Never edit this file; change the schema with a new migration."""

from __future__ import annotations

import sqlalchemy as sa

from hsmctl.state.columns import NAMING, BigId, JSONType, _enum, _ts
from hsmctl.state.model import ApplianceState, Interface, Operation, RequestStatus, StepStatus

V1 = sa.MetaData(naming_convention=NAMING)

appliances = sa.Table(
    "appliances",
    V1,
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
    V1,
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
    V1,
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
    V1,
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
    V1,
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
    V1,
    sa.Column("appliance", sa.String(64), sa.ForeignKey("appliances.id"), primary_key=True),
    sa.Column("interface", _enum(Interface, "interface"), primary_key=True),
    sa.Column("fingerprint", sa.String(64), primary_key=True),
    sa.Column("algorithm", sa.String(32), nullable=False),
    sa.Column("key_line", sa.Text, nullable=False),
    sa.Column("pinned_at", _ts(), nullable=False),
)


TABLES = (appliances, requests, allocations, address_assignments, journal, host_keys)
