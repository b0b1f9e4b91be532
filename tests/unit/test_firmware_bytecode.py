"""The firmware snapshot carries compiled bytecode that the device's Python uses: the
appliance mounts the snapshot read-only, so without it every device process compiled
its modules anew (hsmctl.lab.firmware.compile_bytecode)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hsmctl.errors import HsmctlError
from hsmctl.lab import firmware

pytestmark = pytest.mark.unit


def test_the_snapshots_bytecode_is_what_python_imports(tmp_path: Path) -> None:
    package = tmp_path / "hsmctl"
    (package / "appliance").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "appliance" / "__init__.py").write_text("")
    source = package / "appliance" / "mod.py"
    source.write_text("VALUE = 1\n")
    firmware.compile_bytecode(package)
    # Same size and mtime, other text: only the compiled file can still say 1.
    stat = source.stat()
    source.write_text("VALUE = 2\n")
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from hsmctl.appliance import mod; print(mod.VALUE)"
    )
    out = subprocess.run([sys.executable, "-I", "-B", "-c", code, str(tmp_path)],
                         capture_output=True, check=True, timeout=60)  # fmt: skip
    assert out.stdout == b"1\n"
    # A copy that did not keep mtimes is compiled from its source, as without bytecode
    # (a .pyc records its source's mtime in whole seconds).
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 * 10**9))
    out = subprocess.run([sys.executable, "-I", "-B", "-c", code, str(tmp_path)],
                         capture_output=True, check=True, timeout=60)  # fmt: skip
    assert out.stdout == b"2\n"


def test_a_module_that_does_not_compile_fails_the_snapshot(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("def (:\n")
    with pytest.raises(HsmctlError):
        firmware.compile_bytecode(tmp_path)
