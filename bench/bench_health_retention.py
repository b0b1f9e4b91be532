"""Health poll retention's cost: one 100-appliance poll's store transaction with the
pruning against the same without it, in the same run, on a SQLite store holding 31 days
of 10-minute polls of 100 appliances (446,400 rows; 30 days kept). No lab needed.

``python -m bench health_retention [--runs N]`` (medians of N polls each, default 10).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.engine import Connection

from hsmctl.provider import alerts as al
from hsmctl.state import Store
from hsmctl.state.healthlog import PollRow
from hsmctl.state.schema import health_polls

T0 = datetime(2026, 11, 1, tzinfo=UTC)
RULE = al.AlertRule(polls=3, window=timedelta(minutes=60))
APPLIANCES = [f"hsm{n:03d}" for n in range(1, 101)]
DAYS = 31
RETENTION = timedelta(days=30)


def _decide(
    appliance: str, history: Sequence[PollRow], active: set[str]
) -> list[tuple[str, str, int]]:
    polls = [al.Poll(p.time, frozenset(p.problems), frozenset()) for p in history]
    return [(c.kind, c.transition.value, c.count) for c in al.decide(polls, active, RULE)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench health_retention")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    steps = DAYS * 144
    with tempfile.TemporaryDirectory() as tmp, Store.open(str(Path(tmp) / "hsmctl.db")) as s:

        def seed(conn: Connection) -> None:
            for i in range(steps):
                t = T0 + timedelta(minutes=10 * i)
                conn.execute(
                    health_polls.insert(),
                    [
                        {
                            "appliance": a,
                            "time": t,
                            "reachable": True,
                            "ok": True,
                            "telemetry": "ok",
                            "problems": [],
                            "detail": {},
                        }
                        for a in APPLIANCES
                    ],
                )

        s._db.run(seed)
        now = T0 + timedelta(minutes=10 * steps)
        times: dict[str, list[float]] = {"without pruning": [], "with pruning": []}
        first_pruned = None
        for _ in range(args.runs):
            for mode in times:
                now += timedelta(minutes=10)
                rows = [PollRow(a, now, True, True, "ok", ()) for a in APPLIANCES]
                prune = now - RETENTION if mode == "with pruning" else None
                start = time.perf_counter()
                applied = s.record_health(
                    rows, now - RULE.window, _decide, al.message, prune_before=prune
                )
                times[mode].append(time.perf_counter() - start)
                if prune is not None and first_pruned is None:
                    first_pruned = applied.pruned
        left = len(s.snapshot()["health_polls"])
    print(
        f"store: {steps * len(APPLIANCES)} polls seeded; the first pruning deleted {first_pruned}"
    )
    for mode, values in times.items():
        print(f"{mode}: median {statistics.median(values) * 1000:.0f} ms ({len(values)} polls)")
    ratio = statistics.median(times["with pruning"]) / statistics.median(times["without pruning"])
    print(f"ratio: {ratio:.2f}; polls left: {left}")
    return 0
