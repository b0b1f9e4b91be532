"""The lab's golden appliance image: debootstrap'd bookworm + ``vagrant/appliance-image.sh``.

Two cache levels under ``/var/cache/hsmctl/images`` so that changing the image script
does not mean downloading Debian again:

* ``base-<key>``: the debootstrap result, keyed by suite and package list;
* ``image-<key>``: base + the image script, keyed by the script's content too.

Each level is built in a temporary directory and renamed into place, so an interrupted
build never leaves a half image that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from hsmctl.errors import CommandFailed, UsageError
from hsmctl.progress import NullProgress, Progress

CACHE = Path(os.environ.get("HSMCTL_IMAGE_CACHE", "/var/cache/hsmctl/images"))
SUITE = "bookworm"
PACKAGES = (
    "openssh-server",
    "softhsm2",
    "opensc",
    "p11-kit",
    "python3",
    "python3-pykcs11",
    "python3-cryptography",
    "python3-cffi-backend",
    "iproute2",
    "procps",
    "passwd",
    "libpam-modules",
)
REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "vagrant" / "appliance-image.sh"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def _key(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def base_key() -> str:
    return _key(SUITE.encode(), ",".join(PACKAGES).encode())


def image_key(script: Path = SCRIPT) -> str:
    return _key(base_key().encode(), script.read_bytes())


def image_path(script: Path = SCRIPT) -> Path:
    return CACHE / f"image-{image_key(script)}" / "rootfs"


def mirror() -> str:
    """The Debian mirror apt on this host already uses (deb822 or one-line format)."""
    candidates = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]
    for path in candidates:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        m = re.search(r"^URIs:\s*(\S+/debian)/?\s*$", text, re.M)
        if m:
            return m.group(1)
        m = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s+bookworm\b", text, re.M)
        if m:
            return m.group(1)
    return DEFAULT_MIRROR


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CommandFailed(
            f"{what} failed", argv=argv, status=proc.returncode, output=proc.stdout + proc.stderr
        )


def _build_base(progress: Progress) -> Path:
    final = CACHE / f"base-{base_key()}"
    if (final / ".complete").exists():
        return final
    tmp = CACHE / f".tmp-base-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    progress.step(f"debootstrap {SUITE} (minbase) from {mirror()}: about a minute, once")
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(tmp / "rootfs"),
            mirror(),
        ],
        "debootstrap",
    )
    (tmp / ".complete").write_text(base_key() + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def build(progress: Progress | None = None, *, script: Path = SCRIPT) -> Path:
    """Return the golden image root, building what is missing."""
    progress = progress or NullProgress()
    if os.geteuid() != 0:
        raise UsageError("building the appliance image needs root")
    final_root = image_path(script)
    final = final_root.parent
    if (final / ".complete").exists():
        return final_root
    CACHE.mkdir(parents=True, exist_ok=True, mode=0o755)
    base = _build_base(progress)
    tmp = CACHE / f".tmp-image-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    progress.step("copying the base system")
    _run(["cp", "-a", str(base / "rootfs"), str(tmp / "rootfs")], "copying the base image")
    progress.step(f"running {script.name} in the image")
    shutil.copy(script, tmp / "rootfs" / "tmp" / "appliance-image.sh")
    _run(
        # a path inside the image being built, not the host's /tmp
        ["chroot", str(tmp / "rootfs"), "/bin/bash", "/tmp/appliance-image.sh"],  # noqa: S108
        "the appliance image script",
    )
    (tmp / "rootfs" / "tmp" / "appliance-image.sh").unlink()
    (tmp / ".complete").write_text(image_key(script) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in CACHE.glob("image-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    progress.step(f"appliance image ready: {final_root}")
    return final_root
