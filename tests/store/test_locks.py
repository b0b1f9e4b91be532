"""The per-appliance lock (hsmctl.state.locks) between separate processes standing for
orchestrator hosts: each its own working directory and lock directory, one database.

PostgreSQL: mutual exclusion seen in the holders' timestamps, a killed holder releases,
a holder whose session the server ends stops at once (fail closed), and provisioning's
run_step waits for a lock another "host" holds. SQLite: the file lock, as before.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from hsmctl.inventory import check_placement, load_inventory
from hsmctl.state import Operation, Store
from hsmctl.state.locks import advisory_key
from tests.postgres import reset_postgres
from tests.provider_env import make_env

pytestmark = pytest.mark.store

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def holder(
    tmp: Path, name: str, database: str, appliance: str, hold: float, times: int = 1
) -> subprocess.Popen[str]:
    """One "orchestrator host": its own working directory and lock directory."""
    home = tmp / name
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.store.lockholder",
            database,
            str(home / "locks"),
            appliance,
            str(hold),
            str(times),
        ],
        cwd=home,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_line(proc: subprocess.Popen[str], word: str) -> float:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith(word), (line, proc.stderr.read() if proc.stderr else "")
    return float(line.split()[1])


def intervals(out: str) -> list[tuple[float, float]]:
    stamps = [float(line.split()[1]) for line in out.splitlines()]
    return list(zip(stamps[::2], stamps[1::2], strict=True))


@pytest.fixture
def pg(postgres_url: str) -> str:
    reset_postgres(postgres_url)
    Store.open(postgres_url).close()  # migrated before the holders race to open it
    return postgres_url


def test_advisory_key_is_stable_and_per_appliance() -> None:
    # Every host and every release must compute the same key for an appliance.
    assert advisory_key("hsm07") == advisory_key("hsm07")
    assert advisory_key("hsm07") == -968799100349203425
    assert len({advisory_key(f"hsm{n:02d}") for n in range(1000)}) == 1000
    assert all(-(2**63) <= advisory_key(f"x{n}") < 2**63 for n in range(100))


def test_postgres_lock_excludes_across_hosts(pg: str, tmp_path: Path) -> None:
    """Three hosts, three holds each, different lock directories: the holds of one
    appliance never overlap; another appliance's hold runs beside them."""
    procs = [holder(tmp_path, f"host{n}", pg, "hsm07", 0.15, times=3) for n in range(3)]
    other = holder(tmp_path, "host-other", pg, "hsm08", 1.0)
    outs = [p.communicate(timeout=60) for p in procs]
    other_out, other_err = other.communicate(timeout=60)
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    assert other.returncode == 0, other_err
    held = sorted(iv for out, _ in outs for iv in intervals(out))
    assert len(held) == 9
    for (_, end), (start, _) in itertools.pairwise(held):
        assert start >= end, held  # one holder at a time
    # hsm08's lock is another lock: it was held while hsm07's holds went on.
    ((o_start, o_end),) = intervals(other_out)
    assert any(s < o_end and o_start < e for s, e in held)


def test_postgres_lock_of_a_killed_holder_is_released(pg: str, tmp_path: Path) -> None:
    first = holder(tmp_path, "a", pg, "hsm07", 600)
    wait_line(first, "acquired")
    second = holder(tmp_path, "b", pg, "hsm07", 0)
    time.sleep(1.5)
    assert second.poll() is None  # waiting for the first
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=10)
    killed_at = time.monotonic()
    acquired = wait_line(second, "acquired")
    assert acquired - killed_at < 5
    second.communicate(timeout=30)
    assert second.returncode == 0


def test_postgres_holder_fails_closed_when_its_session_ends(pg: str, tmp_path: Path) -> None:
    """The server ends the holder's session (as on a restart or a cut connection): the
    lock goes to the next host, and the old holder must not go on believing it holds
    it — it is gone at once, before its hold would have ended."""
    first = holder(tmp_path, "a", pg, "hsm07", 30)
    wait_line(first, "acquired")
    second = holder(tmp_path, "b", pg, "hsm07", 0)
    time.sleep(1)
    key = advisory_key("hsm07") & 0xFFFF_FFFF_FFFF_FFFF
    engine = sa.create_engine(pg)
    try:
        with engine.begin() as conn:
            (pid,) = conn.execute(
                sa.text(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND classid = :hi AND objid = :lo AND objsubid = 1"
                ),
                {"hi": key >> 32, "lo": key & 0xFFFF_FFFF},
            ).one()
            ended_at = time.monotonic()
            assert conn.execute(sa.select(sa.func.pg_terminate_backend(pid))).scalar()
    finally:
        engine.dispose()
    out, err = first.communicate(timeout=10)
    died_at = time.monotonic()
    assert first.returncode == -signal.SIGKILL, (out, err)
    assert "released" not in out
    assert "lost the lock on hsm07" in err
    assert died_at - ended_at < 5
    wait_line(second, "acquired")
    second.communicate(timeout=30)
    assert second.returncode == 0


def test_provisioning_step_waits_for_another_hosts_lock(pg: str, tmp_path: Path) -> None:
    """run_step (what hsm_provision runs) on "host B" waits while "host A" (this test,
    another state and lock directory) holds the appliance's lock in PostgreSQL: no
    journal entry of the step until A lets go."""
    env = make_env(tmp_path / "env")
    host_b = env.write_config("host-b.yaml", database_url=pg, state_dir=str(tmp_path / "b"))
    with Store.open(pg) as store:
        store.sync_inventory(load_inventory(env.inventory))
        (alloc,) = store.allocate(
            "req-1", check_placement(load_inventory(env.inventory), "t1", "v1", "hsm")
        )
        appliance = alloc.appliance
        with store.appliance_lock(appliance, lock_dir=tmp_path / "a" / "locks"):
            step = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import sys; from hsmctl.provider.provisioning import run_step;"
                    " run_step(sys.argv[1], sys.argv[2], 'req-1', 'attach')",
                    str(host_b),
                    appliance,
                ],
                cwd=tmp_path,
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            time.sleep(3)
            assert step.poll() is None, step.communicate()
            assert store.journal(appliance=appliance, operation=Operation.PROVISION) == []
        _, err = step.communicate(timeout=60)
        # The step ran once A let go; it fails here only because no fabric driver exists.
        assert step.returncode != 0 and "unknown network fabric driver" in err, err
        entries = store.journal(appliance=appliance, operation=Operation.PROVISION)
        assert [(e.step, e.status.value) for e in entries] == [
            ("attach", "started"),
            ("attach", "failed"),
        ]


def test_sqlite_file_lock_still_excludes_and_is_released_by_death(tmp_path: Path) -> None:
    db = str(tmp_path / "state" / "hsmctl.db")
    Store.open(db).close()
    locks = tmp_path / "state" / "locks"
    first = subprocess.Popen(
        [sys.executable, "-m", "tests.store.lockholder", db, str(locks), "hsm07", "600"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_line(first, "acquired")
    assert (locks / "hsm07.lock").exists()
    second = subprocess.Popen(
        [sys.executable, "-m", "tests.store.lockholder", db, str(locks), "hsm07", "0"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    assert second.poll() is None
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=10)
    wait_line(second, "acquired")
    second.communicate(timeout=30)
    assert second.returncode == 0
    # Two holders in turn, many times: never overlapping.
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.store.lockholder", db, str(locks), "hsm07", "0.1", "3"],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    held = sorted(iv for p in procs for iv in intervals(p.communicate(timeout=60)[0]))
    assert len(held) == 9
    for (_, end), (start, _) in itertools.pairwise(held):
        assert start >= end, held
