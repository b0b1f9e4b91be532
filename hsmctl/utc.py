"""Time as hsmctl writes it: RFC 3339 in UTC with a ``Z``, to the second for documents
(bundles, receipts, journals, cursors) or to the microsecond for activity-log records.
One home for the formats, shared with the firmware (standard library only)."""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> datetime:
    return datetime.now(UTC)


def _aware(when: datetime) -> datetime:
    if when.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return when.astimezone(UTC)


def stamp(when: datetime | None = None) -> str:
    """``2025-01-31T12:00:00Z`` (now, if no time is given)."""
    return _aware(when or now()).strftime("%Y-%m-%dT%H:%M:%SZ")


def precise(when: datetime | None = None) -> str:
    """``2025-01-31T12:00:00.000123Z``, as activity-log records carry time."""
    return _aware(when or now()).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse(text: str) -> datetime:
    """Either form above back to an aware datetime; ``ValueError`` if it is neither."""
    if not text.endswith("Z"):
        raise ValueError(f"not an RFC 3339 UTC time: {text[:40]!r}")
    return datetime.fromisoformat(text[:-1] + "+00:00").astimezone(UTC)
