"""The activity-log record format (SPEC §3): canonical JSON, the hash chain, new records.

Pure stdlib (``hsmctl.devicejson`` is too), because the device daemon writes the log with
this module under Debian's system Python. The format is the contract between the device
and every verifier:

* a record is one JSON object with exactly the keys of ``FIELDS``, nested at most
  ``devicejson.MAX_DEPTH`` levels;
* ``canonical(obj)`` is Python's ``json`` with sorted keys (code-point order), separators
  ``(",", ":")``, ``ensure_ascii=False``, no NaN/Infinity, encoded as UTF-8; strings escape
  only ``"``, ``\\`` and control characters (``\\n``, ``\\t``… or ``\\u00xx``);
* ``hash`` is the hex SHA-256 of the canonical record without ``hash``; ``prev`` is the
  previous record's ``hash`` (``GENESIS`` for record 1);
* each line of the file is the canonical JSON of the whole record followed by ``\\n``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from hsmctl import utc
from hsmctl.devicejson import MAX_DEPTH, too_deep

GENESIS = "0" * 64
"""``prev`` of record 1: there is no record before it."""

FIELDS = frozenset(
    {"seq", "time", "actor", "role", "source", "event", "outcome", "detail", "prev", "hash"}
)

CHECKPOINT_EVENT = "checkpoint"
KEY_ROTATION_EVENT = "key-rotation"

Record = dict[str, Any]

# One encoder for every call: json.dumps() with options builds a new encoder each time.
_encode = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode

TIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?Z")
"""RFC 3339 in UTC with a ``Z`` suffix: the only time form a record may carry. ASCII
digits only (``\\d`` would take any Unicode digit), so that the verifier's byte pattern
for a canonical line (which embeds this one) means exactly what this one means."""


class Outcome(StrEnum):
    OK = "ok"
    DENIED = "denied"
    FAILED = "failed"
    ERROR = "error"


OUTCOMES = frozenset(o.value for o in Outcome)


@dataclass(frozen=True, slots=True)
class Head:
    """A position in the chain: enough to continue it or to check it was not rewritten."""

    seq: int
    hash: str

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> Head:
        return cls(int(record["seq"]), str(record["hash"]))

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash}


GENESIS_HEAD = Head(0, GENESIS)
"""The position before record 1."""


def canonical_text(obj: object) -> str:
    """Canonical JSON as text (see the module docstring)."""
    return _encode(obj)


def canonical(obj: object) -> bytes:
    """Canonical JSON as UTF-8: the exact bytes that get hashed and signed."""
    return _encode(obj).encode("utf-8")


def record_hash(record_without_hash: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the canonical record; ``hash`` must already be absent."""
    if "hash" in record_without_hash:
        raise ValueError("record_hash() takes the record without its 'hash' key")
    return hashlib.sha256(canonical(record_without_hash)).hexdigest()


def rfc3339(when: datetime) -> str:
    """Format an aware datetime the way records carry time: UTC, microseconds, ``Z``."""
    return utc.precise(when)


def make_record(
    prev: Head | None,
    *,
    time: datetime | str,
    actor: str,
    role: str,
    source: str,
    event: str,
    outcome: Outcome | str,
    detail: Mapping[str, Any],
) -> Record:
    """Build the next complete record (``seq``, ``prev`` and ``hash`` filled in) after ``prev``.

    ``prev`` is the head of the log so far, or ``None`` for the first record. Inputs are
    checked here so that the device can never write a record a verifier would reject.
    """
    head = prev or GENESIS_HEAD
    stamp = rfc3339(time) if isinstance(time, datetime) else time
    if not TIME_RE.fullmatch(stamp):
        raise ValueError(f"time {stamp!r} is not RFC 3339 UTC (e.g. 2026-11-29T20:01:02Z)")
    for name, value in (("actor", actor), ("role", role), ("source", source), ("event", event)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string")
    record: Record = {
        "seq": head.seq + 1,
        "time": stamp,
        "actor": actor,
        "role": role,
        "source": source,
        "event": event,
        "outcome": Outcome(outcome).value,
        "detail": dict(detail),
        "prev": head.hash,
    }
    body = canonical(record)  # what record_hash() hashes: encoded once
    if too_deep(body):
        raise ValueError(f"detail nests deeper than a verifier accepts ({MAX_DEPTH - 1} levels)")
    record["hash"] = hashlib.sha256(body).hexdigest()
    return record


def record_line(record: Mapping[str, Any]) -> bytes:
    """The line the device appends for ``record``: canonical JSON plus ``\\n``."""
    return canonical(record) + b"\n"
