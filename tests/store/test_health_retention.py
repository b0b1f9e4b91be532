"""Health poll retention (schema version 3), on real SQLite and a real PostgreSQL: a poll
deletes, in its own transaction, the polls older than the retention but each appliance's
newest good one (``last_ok`` is read from it) and the alerts cleared before it; never a
poll the alert window counts, never an active alert. A version-2 database gets the time
index at migration. The whole health run (hsmctl.provider.health.health, probes built by
hand) prunes by ``health_retention_days``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from hsmctl.provider import alerts as al
from hsmctl.state import Store
from hsmctl.state.engine import url_for
from hsmctl.state.healthlog import Applied, PollRow
from hsmctl.state.schema import LATEST, MIGRATIONS, schema_version

pytestmark = pytest.mark.store

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
RULE = al.AlertRule(polls=2, window=timedelta(minutes=60))
RETENTION = timedelta(days=30)


def _decide(
    appliance: str, history: Sequence[PollRow], active: set[str]
) -> list[tuple[str, str, int]]:
    polls = [al.Poll(p.time, frozenset(p.problems), frozenset({"psu1"})) for p in history]
    return [(c.kind, c.transition.value, c.count) for c in al.decide(polls, active, RULE)]


def poll(
    store: Store,
    when: datetime,
    problems: dict[str, tuple[str, ...]],
    retention: timedelta | None = RETENTION,
) -> Applied:
    rows = [
        PollRow(a, when, True, not p, "ok", p, {"at": when.isoformat()})
        for a, p in problems.items()
    ]
    return store.record_health(
        rows,
        when - RULE.window,
        _decide,
        al.message,
        prune_before=when - retention if retention is not None else None,
    )


def _times(store: Store, appliance: str) -> list[str]:
    return [
        r["detail"]["at"] for r in store.snapshot()["health_polls"] if r["appliance"] == appliance
    ]


def test_polls_past_the_retention_are_pruned_but_the_newest_good_one(db_url: str) -> None:
    """40 days of daily polls: hsm01 good throughout, hsm02 good for 5 days then bad.
    After day 39 hsm01 keeps days 9..39 (the edge is kept); hsm02 keeps the same plus
    day 4, its last good poll, so ``last_ok`` still says when it was last fine. An active
    alert stays however old."""
    with Store.open(db_url) as s:
        pruned = 0
        for day in range(40):
            when = T0 + timedelta(days=day)
            applied = poll(s, when, {"hsm01": (), "hsm02": () if day < 5 else ("psu1",)})
            pruned += applied.pruned
        assert pruned == 2 * 9 - 1  # days 0..8 of each, hsm02's day 4 kept
        kept = {d.isoformat() for d in (T0 + timedelta(days=n) for n in range(9, 40))}
        assert set(_times(s, "hsm01")) == kept
        assert set(_times(s, "hsm02")) == kept | {(T0 + timedelta(days=4)).isoformat()}
        _, last = s.health_status(["hsm01", "hsm02"])
        assert last["hsm02"] == T0 + timedelta(days=4)
        assert last["hsm01"] == T0 + timedelta(days=39)
        raised_at = T0 + timedelta(days=39, minutes=10)
        assert [a.kind for a, _ in poll(s, raised_at, {"hsm02": ("psu1",)}).raised] == ["psu1"]
        poll(s, T0 + timedelta(days=80), {"hsm02": ("psu1",)})
        active, last = s.health_status(["hsm02"])
        assert [(a.kind, a.raised_at) for a in active["hsm02"]] == [("psu1", raised_at)]
        assert last["hsm02"] == T0 + timedelta(days=4)
        assert set(_times(s, "hsm02")) == {(T0 + timedelta(days=n)).isoformat() for n in (4, 80)}


def test_no_retention_given_prunes_nothing(db_url: str) -> None:
    with Store.open(db_url) as s:
        for day in range(5):
            poll(s, T0 + timedelta(days=day), {"hsm01": ()}, retention=None)
        assert len(_times(s, "hsm01")) == 5


def test_the_alert_window_is_never_pruned(db_url: str) -> None:
    """A retention shorter than the window (1 minute, window 60) still leaves the window's
    polls: the second bad poll 10 minutes after the first raises the alert (K=2)."""
    with Store.open(db_url) as s:
        tiny = timedelta(minutes=1)
        first = poll(s, T0, {"hsm01": ("psu1",)}, retention=tiny)
        assert first.raised == []
        second = poll(s, T0 + timedelta(minutes=10), {"hsm01": ("psu1",)}, retention=tiny)
        assert [(a.kind, n) for a, n in second.raised] == [("psu1", 2)]
        assert second.pruned == 0
        # Past the window, the old bad polls go: only the new one is left.
        third = poll(s, T0 + timedelta(minutes=200), {"hsm01": ("psu1",)}, retention=tiny)
        assert third.pruned == 2 and len(_times(s, "hsm01")) == 1


def test_cleared_alerts_past_the_retention_are_pruned(db_url: str) -> None:
    with Store.open(db_url) as s:
        poll(s, T0, {"hsm01": ("psu1",)})
        poll(s, T0 + timedelta(minutes=10), {"hsm01": ("psu1",)})
        cleared = poll(s, T0 + timedelta(minutes=20), {"hsm01": ()})
        assert [a.kind for a, _ in cleared.cleared] == ["psu1"]
        assert len(s.snapshot()["alerts"]) == 1
        poll(s, T0 + timedelta(days=29), {"hsm01": ()})
        assert len(s.snapshot()["alerts"]) == 1  # cleared 29 days ago: kept
        poll(s, T0 + timedelta(days=31), {"hsm01": ()})
        assert s.snapshot()["alerts"] == []


def test_a_version_2_database_gets_the_time_index(db_url: str) -> None:
    engine = sa.create_engine(url_for(db_url))
    if engine.dialect.name == "sqlite":
        Path(db_url).parent.mkdir(parents=True, exist_ok=True)
    with engine.begin() as conn:
        schema_version.create(conn)
        for m in MIGRATIONS[:2]:
            m.apply(conn)
            conn.execute(
                schema_version.insert().values(
                    version=m.version, description=m.description, applied_at=T0
                )
            )
        # A version-2 database made before this index existed.
        conn.execute(sa.text("DROP INDEX IF EXISTS ix_health_polls_time"))
    with engine.connect() as conn:
        names = {ix["name"] for ix in sa.inspect(conn).get_indexes("health_polls")}
        assert "ix_health_polls_time" not in names
    engine.dispose()
    with Store.open(db_url) as s:
        assert s.schema_version() == LATEST >= 3
        assert any(
            r["step"] == "migrate" and r["detail"] == {"version": 3}
            for r in s.snapshot()["journal"]
        )
    engine = sa.create_engine(url_for(db_url))
    with engine.connect() as conn:
        names = {ix["name"] for ix in sa.inspect(conn).get_indexes("health_polls")}
    engine.dispose()
    assert "ix_health_polls_time" in names


def test_health_runs_prune_by_the_configured_retention(tmp_path: Path) -> None:
    """hsmctl.provider.health.health with ``health_retention_days: 2``: polls a day apart,
    the store holds the polls of the last 2 days (and the day-0 one only while it is the
    newest good one)."""
    from hsmctl.appliance import sensors
    from hsmctl.provider import health as hl
    from tests.provider_env import make_env

    env = make_env(tmp_path)
    conf = env.write_config("health.yaml", health_retention_days=2)
    clock = [T0]

    def prober(ctx: Any, appliance: str) -> hl.Probe:
        return hl.Probe(
            appliance,
            hl.Attempt(hl.Login.SKIPPED),
            hl.Attempt(hl.Login.OK),
            sensors=sensors.readings([]),
        )

    counts = []
    for _ in range(5):
        hl.health(str(conf), ["unit01"], prober=prober, now=lambda: clock[0])
        counts.append(len(env.snapshot()["health_polls"]))
        clock[0] += timedelta(days=1)
    # day n keeps days n-2 (exactly at the edge: kept), n-1, n
    assert counts == [1, 2, 3, 3, 3]


def test_retention_days_is_a_checked_configuration_key(tmp_path: Path) -> None:
    from hsmctl import config
    from hsmctl.errors import ConfigError

    good = tmp_path / "good.yaml"
    good.write_text("health_retention_days: 7\n")
    assert config.load(str(good)).health_retention_days == 7
    default = tmp_path / "default.yaml"
    default.write_text("role: provider\n")
    assert config.load(str(default)).health_retention_days == 30
    for bad in ("0", "-1", "'7'", "7.5"):
        f = tmp_path / "bad.yaml"
        f.write_text(f"health_retention_days: {bad}\n")
        with pytest.raises(ConfigError, match="health_retention_days"):
            config.load(str(f))
