"""SQLite's own file locks survive a second opening of the store in the same process.

Closing any descriptor of the database file drops every POSIX lock the process holds on
it, SQLite's included. Provisioning runs its steps in threads of the process that holds
the store open (hsmctl.runner.stepserver), so a store opened there must never open and
close the file itself: another process's connection would then think it is the last one,
checkpoint and delete the WAL under ours, and ours would fail ("disk I/O error", seen
when a reader polled the journal during ``hsmctl provision``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hsmctl.state.model import Operation, StepStatus
from hsmctl.state.store import Store

pytestmark = pytest.mark.store

OTHER_PROCESS = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], timeout=10)
c.execute("SELECT count(*) FROM journal").fetchone()
c.close()
"""


def test_a_second_open_in_process_keeps_the_first_connections_locks(tmp_path: Path) -> None:
    db = tmp_path / "hsmctl.db"
    with Store.open(db) as first:
        first.record_step(Operation.SYNC, "one", StepStatus.OK)
        for n in range(5):
            with Store.open(db) as again:  # what each served step does
                again.record_step(Operation.SYNC, f"again-{n}", StepStatus.OK)
            # A reader in another process comes and goes, as `hsmctl fleet list` does.
            subprocess.run([sys.executable, "-c", OTHER_PROCESS, str(db)], check=True)
            assert Path(f"{db}-wal").exists(), "the WAL was removed under an open store"
            first.record_step(Operation.SYNC, f"first-{n}", StepStatus.OK)
        steps = [e.step for e in first.journal() if e.step != "migrate"]
    assert steps.count("one") == 1 and len(steps) == 11
