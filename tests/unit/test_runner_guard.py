"""The playbook guard: ansible-playbook (and everything it started) ends with hsmctl."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hsmctl.runner.guard import PARENT_ENV

pytestmark = pytest.mark.unit

# Stands in for ansible-playbook: ignores SIGHUP as pexpect's child does, starts a
# grandchild (a fork running a module), records both pids, then waits.
PLAYBOOK = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    grandchild = subprocess.Popen(["sleep", "300"])
    with open(sys.argv[1], "w") as out:
        out.write(f"{os.getpid()} {grandchild.pid}")
    time.sleep(300)
    """
)

# Stands in for hsmctl: starts the guard in a session of its own (as pexpect does).
HSMCTL = textwrap.dedent(
    """
    import os, subprocess, sys, time
    env = dict(os.environ, {parent_env}=str(os.getpid()))
    guard = subprocess.Popen(
        [sys.executable, "-m", "hsmctl.runner.guard", sys.executable, "-c", sys.argv[1],
         sys.argv[2]],
        env=env, start_new_session=True,
    )
    print(guard.pid, flush=True)
    time.sleep(300)
    """
).format(parent_env=PARENT_ENV)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(path: Path, timeout: float = 30) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} never written")


def test_the_playbook_and_its_children_end_when_hsmctl_is_killed(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    hsmctl = subprocess.Popen(
        [sys.executable, "-c", HSMCTL, PLAYBOOK, str(pids)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert hsmctl.stdout is not None
        guard = int(hsmctl.stdout.readline())
        playbook, grandchild = map(int, _wait_for(pids).split())
        assert all(_alive(p) for p in (guard, playbook, grandchild))
        hsmctl.send_signal(signal.SIGKILL)
        hsmctl.wait()
        end = time.monotonic() + 15
        while time.monotonic() < end and any(_alive(p) for p in (guard, playbook, grandchild)):
            time.sleep(0.05)
        assert not any(_alive(p) for p in (guard, playbook, grandchild))
    finally:
        hsmctl.kill()
        hsmctl.wait()
        if hsmctl.stdout is not None:
            hsmctl.stdout.close()
        if pids.exists():
            for p in map(int, pids.read_text().split()):
                if _alive(p):
                    os.kill(p, signal.SIGKILL)


def test_the_exit_status_is_the_playbooks(tmp_path: Path) -> None:
    env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
    run = subprocess.run(
        [sys.executable, "-m", "hsmctl.runner.guard", sys.executable, "-c", "raise SystemExit(4)"],
        env=env,
        check=False,
    )
    assert run.returncode == 4


def test_nothing_starts_when_hsmctl_is_already_gone(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    env = dict(os.environ, **{PARENT_ENV: "1"})  # not our parent: it died and we were adopted
    run = subprocess.run(
        [sys.executable, "-m", "hsmctl.runner.guard", "touch", str(marker)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 143 and not marker.exists()
    assert "not starting" in run.stderr
