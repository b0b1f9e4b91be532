"""The two time formats hsmctl writes, and reading them back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from hsmctl import utc

pytestmark = pytest.mark.unit


def test_formats_and_round_trip() -> None:
    when = datetime(2026, 1, 31, 13, 0, 5, 123, tzinfo=timezone(timedelta(hours=1)))
    assert utc.stamp(when) == "2026-01-31T12:00:05Z"
    assert utc.precise(when) == "2026-01-31T12:00:05.000123Z"
    assert utc.parse(utc.precise(when)) == when.astimezone(UTC)
    assert utc.parse(utc.stamp(when)) == when.replace(microsecond=0).astimezone(UTC)


@pytest.mark.parametrize("bad", ["2026-01-31T12:00:05", "2026-01-31T12:00:05+01:00", "x Z"])
def test_anything_else_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        utc.parse(bad)
    with pytest.raises(ValueError):
        utc.stamp(datetime(2026, 1, 1))  # naive
