"""Column types and the naming convention every schema version shares (SQLite and
PostgreSQL hold the same text and names). Used by :mod:`~hsmctl.state.schema` and the
frozen :mod:`~hsmctl.state.schema_v1`; change nothing here that would change a table
an earlier migration made."""

from __future__ import annotations

import enum

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

NAMING = {
    "pk": "pk_%(table_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
}


def _enum(cls: type[enum.StrEnum], name: str, *, constrained: bool = True) -> sa.Enum:
    """Stored as its value in a VARCHAR, so SQLite and PostgreSQL hold the same text.

    The journal's enums are not constrained in the database: adding an operation must
    not need a table rebuild on SQLite; Python validates them on the way in.
    """
    return sa.Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=constrained,
        length=32,
        validate_strings=True,
        values_callable=lambda members: [m.value for m in members],
    )


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
# SQLite only autoincrements an INTEGER PRIMARY KEY.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
