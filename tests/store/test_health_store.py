"""Schema migration 2 (health polls, alerts) and the health transaction, on real SQLite
and a real PostgreSQL: a fresh database goes through versions 1 and 2; a version-1
database (made by the frozen version-1 definitions, with data) is migrated in place and
keeps its rows; polls and alert transitions are written in one transaction; two runs
racing on one appliance raise its alert once."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from hsmctl.provider import alerts as al
from hsmctl.state import Store
from hsmctl.state.engine import url_for
from hsmctl.state.healthlog import PollRow
from hsmctl.state.schema import LATEST, schema_version

pytestmark = pytest.mark.store

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
RULE = al.AlertRule(polls=2, window=timedelta(minutes=60))


def _decide(
    appliance: str, history: Sequence[PollRow], active: set[str]
) -> list[tuple[str, str, int]]:
    polls = [al.Poll(p.time, frozenset(p.problems), frozenset({"psu1"})) for p in history]
    return [(c.kind, c.transition.value, c.count) for c in al.decide(polls, active, RULE)]


def poll(store: Store, minute: int, problems: tuple[str, ...], appliance: str = "hsm01") -> object:
    when = T0 + timedelta(minutes=minute)
    row = PollRow(appliance, when, True, not problems, "ok", problems, {"n": minute})
    return store.record_health([row], when - RULE.window, _decide, al.message)


def test_fresh_database_has_version_2_tables(db_url: str) -> None:
    with Store.open(db_url) as s:
        assert s.schema_version() == LATEST >= 2
        snap = s.snapshot()
        assert [r["version"] for r in snap["schema_version"]] == list(range(1, LATEST + 1))
        assert snap["health_polls"] == [] and snap["alerts"] == []


def test_a_version_1_database_is_migrated_in_place(db_url: str) -> None:
    from hsmctl.state import schema_v1

    engine = sa.create_engine(url_for(db_url))
    if engine.dialect.name == "sqlite":
        from pathlib import Path

        Path(db_url).parent.mkdir(parents=True, exist_ok=True)
    with engine.begin() as conn:
        schema_v1.V1.create_all(conn, tables=list(schema_v1.TABLES))
        schema_version.create(conn)
        conn.execute(
            schema_version.insert().values(version=1, description="initial schema", applied_at=T0)
        )
        conn.execute(
            schema_v1.journal.insert().values(
                time=T0, operation="sync", step="old", status="ok", detail={"kept": True}
            )
        )
    engine.dispose()
    with Store.open(db_url) as s:
        assert s.schema_version() == LATEST
        snap = s.snapshot()
        assert any(r["step"] == "old" for r in snap["journal"])  # the old rows are kept
        assert any(
            r["step"] == "migrate" and r["detail"] == {"version": 2} for r in snap["journal"]
        )
        assert snap["health_polls"] == []


def test_polls_and_alerts_round_trip(db_url: str) -> None:
    with Store.open(db_url) as s:
        first = poll(s, 0, ("psu1",))
        assert first.raised == [] and first.active == {}  # type: ignore[attr-defined]
        second = poll(s, 10, ("psu1",))
        ((alert, count),) = second.raised  # type: ignore[attr-defined]
        assert (alert.kind, count, alert.raised_at) == ("psu1", 2, T0 + timedelta(minutes=10))
        assert [a.kind for a in second.active["hsm01"]] == ["psu1"]  # type: ignore[attr-defined]
        assert poll(s, 20, ("psu1",)).raised == []  # type: ignore[attr-defined]
        done = poll(s, 30, ())
        ((gone, _),) = done.cleared  # type: ignore[attr-defined]
        assert gone.id == alert.id and gone.cleared_at == T0 + timedelta(minutes=30)
        assert done.active == {}  # type: ignore[attr-defined]
        assert done.last_ok == {"hsm01": T0 + timedelta(minutes=30)}  # type: ignore[attr-defined]
        active, last_ok = s.health_status(["hsm01", "hsm02"])
        assert active == {} and last_ok == {"hsm01": T0 + timedelta(minutes=30)}
        assert len(s.snapshot()["health_polls"]) == 4


def test_racing_runs_raise_an_alert_once(db_url: str) -> None:
    with Store.open(db_url) as s:
        poll(s, 0, ("psu1",))
    results: list[object] = []
    start = threading.Barrier(4)

    def run() -> None:
        with Store.open(db_url) as s:
            start.wait(timeout=60)  # all four transactions begin together
            results.append(poll(s, 5, ("psu1",)))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    raised = [x for r in results for x in r.raised]  # type: ignore[attr-defined]
    assert len(raised) == 1
    with Store.open(db_url) as s:
        rows = s.snapshot()["alerts"]
    assert len(rows) == 1 and rows[0]["cleared_at"] is None
