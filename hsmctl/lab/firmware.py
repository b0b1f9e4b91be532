"""The firmware snapshot: the device side of the working tree (:data:`FIRMWARE_FILES`,
all the appliance has of hsmctl), with the key-policy PKCS#11 module built from it,
bind-mounted read-only into every appliance."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from hsmctl.errors import HsmctlError
from hsmctl.lab import workdir

REPO_ROOT = Path(__file__).resolve().parents[2]
FIRMWARE_FILES = (
    "__init__.py",
    "contract.py",
    "devicejson.py",
    "errors.py",
    "privatefiles.py",
    "secret.py",
    "utc.py",
    "appliance",
    "auditlog",
)


FIRMWARE_IGNORE = shutil.ignore_patterns("__pycache__", "*.so")


def firmware_dir(base: Path | None = None) -> Path:
    """A snapshot of the device side of the working tree, bind-mounted read-only (the
    VM tier copies it into its box instead), under ``base`` (the lab directory)."""
    base = base or workdir.LAB_DIR
    dest = base / "firmware"
    tmp = base / ".firmware.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "hsmctl").mkdir(parents=True)
    src = REPO_ROOT / "hsmctl"
    for name in FIRMWARE_FILES:
        path = src / name
        if path.is_dir():
            # No host-built extension (the log scan's): the firmware is standard library.
            shutil.copytree(path, tmp / "hsmctl" / name, ignore=FIRMWARE_IGNORE)
        else:
            shutil.copy2(path, tmp / "hsmctl" / name)
    _build_policy_module(tmp / "hsmctl" / "appliance" / "p11")
    compile_bytecode(tmp / "hsmctl")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def compile_bytecode(package: Path) -> None:
    """Write ``__pycache__`` beside the snapshot's sources. The appliance mounts the
    firmware read-only, so without it every device process (each command's ``hsmsh``,
    the back-off hook, ``hsm-p11``) compiled the modules it imports anew, and could not
    keep the result. Timestamp-checked, like Python's own: a source whose mtime or size
    differs from its ``.pyc``'s (a copy that did not keep mtimes) is compiled as before.
    The cache tag names this interpreter (cpython-311 here, as in the bookworm image); a
    device with another Python ignores these files."""
    import compileall

    if not compileall.compile_dir(str(package), quiet=2, workers=1):
        raise HsmctlError(f"compiling the firmware snapshot ({package}) failed")


def _build_policy_module(p11: Path) -> None:
    """The key-policy PKCS#11 module, built from the snapshot's own ``policy.c`` on the
    host (Debian 12, like the image), so the snapshot's source and binary always agree
    and a change to ``policy.c`` reaches the lab at the next ``lab up`` without an image
    rebuild. Needs gcc, libp11-kit-dev and libssl-dev (scripts/install-deps.sh)."""
    proc = subprocess.run(
        ["bash", str(p11 / "build.sh"), str(p11 / "hsm-policy.so")],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise HsmctlError(
            "building the key-policy module (appliance/p11/build.sh) failed; it needs gcc, "
            f"libp11-kit-dev and libssl-dev:\n{proc.stderr[-2000:]}"
        )
