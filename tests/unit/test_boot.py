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
