"""The operations journal: append a step, read steps back, and keep secrets out.

The journal outlives every run and is read by people and tools, so nothing secret may
enter it: :func:`check_detail` refuses :class:`~hsmctl.secret.Secret` values and keys
that name secrets, before the transaction starts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from hsmctl.secret import Secret
from hsmctl.state import schema
from hsmctl.state.engine import where_given
from hsmctl.state.model import Operation, StepStatus
from hsmctl.state.records import JournalEntry, utcnow

# Journal keys that name a secret: refused even when the value looks harmless.
SECRET_WORDS = frozenset({"password", "passwd", "passphrase", "pin", "secret", "otp", "private"})


def check_detail(value: object, path: str = "detail") -> None:
    """Raise ValueError if ``value`` holds a Secret or a key that names a secret."""
    if isinstance(value, Secret):
        raise ValueError(f"{path}: a Secret must never be written to the journal")
    if isinstance(value, Mapping):
        for key, item in value.items():
            words = set(re.split(r"[^a-z]+", str(key).lower()))
            if words & SECRET_WORDS:
                raise ValueError(f"{path}.{key}: the journal never holds secrets")
            check_detail(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_detail(item, f"{path}[{i}]")


def write(
    conn: Connection,
    operation: Operation,
    step: str,
    status: StepStatus,
    detail: Mapping[str, Any],
    *,
    appliance: str | None = None,
    request_id: str | None = None,
) -> int:
    """Append one entry inside the caller's transaction; returns its id."""
    result = conn.execute(
        schema.journal.insert().values(
            time=utcnow(),
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


def read(
    conn: Connection,
    *,
    appliance: str | None = None,
    request_id: str | None = None,
    operation: Operation | None = None,
    after: int | None = None,
    limit: int | None = None,
) -> list[JournalEntry]:
    """Entries in the order they were written, filtered by whichever arguments are set."""
    j = schema.journal
    q = where_given(
        sa.select(j).order_by(j.c.id),
        (j.c.appliance, appliance),
        (j.c.request_id, request_id),
        (j.c.operation, operation),
    )
    if after is not None:
        q = q.where(j.c.id > after)
    if limit is not None:
        q = q.limit(limit)
    return [JournalEntry.from_dict(r._mapping) for r in conn.execute(q)]
