"""Run ansible-playbook so that it ends with the hsmctl process that started it.

ansible-runner starts ``ansible-playbook`` through pexpect in a session of its own with
SIGHUP ignored, so when hsmctl is killed (``kill -9``, an OOM kill) the playbook goes on
changing devices while the operator re-runs the command. The adapter puts a shim named
``ansible-playbook`` first on the run's PATH; it runs ``python -m hsmctl.runner.guard
REAL-ANSIBLE-PLAYBOOK ARGS...``. The guard:

* asks the kernel for SIGTERM when its parent (hsmctl) dies (``PR_SET_PDEATHSIG``), and
  gives up at once if hsmctl already died before that (its parent is no longer the pid
  hsmctl passed in ``HSMCTL_RUNNER_PARENT``);
* runs the real ansible-playbook as its child, in its own process group (the session
  pexpect made), and returns its exit status;
* on SIGTERM, SIGINT or SIGHUP (hsmctl gone, or ansible-runner cancelling) sends SIGTERM
  to the whole process group — ansible-playbook, its forks and the modules they run —
  and SIGKILL after ``GRACE`` seconds if anything is still there.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

PARENT_ENV = "HSMCTL_RUNNER_PARENT"
GRACE = 10.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def _die_with_parent(signum: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def main(argv: Sequence[str]) -> int:
    if not argv:
        print("usage: python -m hsmctl.runner.guard PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    _die_with_parent(signal.SIGTERM)
    parent = os.environ.get(PARENT_ENV, "")
    if parent.isdigit() and os.getppid() != int(parent):
        print("hsmctl ended before the playbook started; not starting it", file=sys.stderr)
        return 143
    group = os.getpgid(0)
    deadline: float | None = None  # set once asked to stop: SIGKILL for what is left then

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal deadline
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # the group signal reaches us too
        deadline = time.monotonic() + GRACE
        os.killpg(group, signal.SIGTERM)

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    child = subprocess.Popen(list(argv))
    if deadline is not None:  # asked to stop while the child was starting
        os.killpg(group, signal.SIGTERM)
    while True:
        try:
            status = child.wait(0.2)
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() > deadline:
                os.killpg(group, signal.SIGKILL)
            continue
        if deadline is not None:  # its children may ignore SIGTERM: none outlives it
            os.killpg(group, signal.SIGKILL)
        return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
