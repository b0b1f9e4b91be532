"""hsm-boot (the appliance's init): after the first-boot personalisation it starts itself
afresh, so the long-lived supervisor does not keep the token library and cryptography
that personalising loaded (issue 15: memory per appliance)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hsmctl.appliance import boot, paths

pytestmark = pytest.mark.unit


class Restarted(Exception):
    pass


def _device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    device, factory = tmp_path / "device.json", tmp_path / "factory.json"
    factory.write_text(json.dumps({"id": "hsm01"}))
    monkeypatch.setattr(paths, "DEVICE", device)
    monkeypatch.setattr(paths, "FACTORY", factory)
    return device


def test_first_boot_personalises_then_restarts_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = _device(tmp_path, monkeypatch)
    script = tmp_path / "hsm-boot"
    script.write_text("# stand-in\n")
    monkeypatch.setattr(sys, "argv", [str(script)])
    calls: list[Any] = []

    def personalise(factory: dict[str, object]) -> None:
        calls.append(("personalise", factory))
        device.write_text("{}")

    def execv(path: str, argv: list[str]) -> None:
        calls.append(("execv", path, argv))
        raise Restarted

    import hsmctl.appliance.personalise as pers

    monkeypatch.setattr(pers, "personalise", personalise)
    monkeypatch.setattr(boot.os, "execv", execv)
    monkeypatch.setattr(boot.Supervisor, "run", lambda self: pytest.fail("supervised in-process"))
    with pytest.raises(Restarted):
        boot.main()
    assert calls == [
        ("personalise", {"id": "hsm01"}),
        ("execv", sys.executable, [sys.executable, "-I", str(script)]),
    ]


def test_personalised_device_supervises_without_restarting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _device(tmp_path, monkeypatch).write_text("{}")
    monkeypatch.setattr(boot, "_configure_mgmt", lambda factory: None)
    monkeypatch.setattr(boot.os, "execv", lambda *a: pytest.fail("restarted"))
    monkeypatch.setattr(boot.Supervisor, "run", lambda self: 7)
    assert boot.main() == 7


def test_no_restart_without_a_script_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["-c"])
    assert boot.restart_argv() is None


def test_the_supervisor_alone_imports_no_token_library_or_cryptography() -> None:
    """What the restarted supervisor loads: boot's own imports, nothing of the token
    (PyKCS11, SoftHSM) or of cryptography."""
    code = (
        "import json, sys; import hsmctl.appliance.boot; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('PyKCS11', 'cryptography', 'hsmctl'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out)
    assert not [m for m in loaded if m.startswith(("PyKCS11", "cryptography"))], loaded
    assert "hsmctl.appliance.personalise" not in loaded
    assert "hsmctl.appliance.auditkey" not in loaded


# The supervisor's loop with stand-in services: each child records its start (a line with
# its pid in NAME.starts) and sleeps. IDLE_WAIT is an hour, so whatever the loop does in
# these tests, a signal woke it: a child's end, SIGUSR1, SIGTERM.
SUPERVISE = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from hsmctl.appliance import boot, paths
tmp = Path(sys.argv[1])
paths.RUN, paths.BOOT_PID, paths.SOCKET = tmp, tmp / "boot.pid", tmp / "hsmd.sock"
paths.SOCKET.touch()
boot.IDLE_WAIT = 3600.0
boot.data_address = lambda: "198.18.0.1"
CHILD = (
    "import os, sys, time; open(sys.argv[1], 'a').write(f'{os.getpid()}\\\\n');"
    "time.sleep(3600)"
)

class Stand(boot.Supervisor):
    def argv(self, name):
        return [sys.executable, "-c", CHILD, str(tmp / f"{name}.starts")]

sys.exit(Stand().run())
"""


def _starts(tmp_path: Path, name: str) -> list[int]:
    path = tmp_path / f"{name}.starts"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _until(check: Any, what: str, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def test_the_supervisor_wakes_on_signals_not_on_a_timer(tmp_path: Path) -> None:
    """A service that dies is started again, SIGUSR1 restarts the data sshd, SIGTERM
    stops everything: each at once, with the loop's idle wait an hour long."""
    import os
    import signal

    root = str(Path(__file__).resolve().parents[2])
    sup = subprocess.Popen([sys.executable, "-I", "-c", SUPERVISE, str(tmp_path), root])
    try:
        names = ("hsmd", "sshd-mgmt", "sshd-data")
        _until(lambda: all(len(_starts(tmp_path, n)) == 1 for n in names), "all three started")
        first = _starts(tmp_path, "hsmd")[0]
        os.kill(first, signal.SIGKILL)  # restarted once a second has passed since its start
        _until(lambda: len(_starts(tmp_path, "hsmd")) == 2, "hsmd started again")
        sup.send_signal(signal.SIGUSR1)
        _until(lambda: len(_starts(tmp_path, "sshd-data")) == 2, "the data sshd restarted")
        assert len(_starts(tmp_path, "sshd-mgmt")) == 1
        children = [_starts(tmp_path, n)[-1] for n in names]
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0
        for pid in [*children, first, _starts(tmp_path, "sshd-data")[0]]:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
