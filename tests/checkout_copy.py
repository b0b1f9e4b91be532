"""A copy of the checkout as a fresh clone plus uncommitted work would have it: tracked
and new files, nothing ignored (no .venv, no caches). Building a wheel in the checkout
itself would leave setuptools' build/ there."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def copy_checkout(dest: Path) -> Path:
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in filter(None, names):
        src = REPO / os.fsdecode(raw)
        if not os.path.lexists(src):  # deleted in the working tree
            continue
        target = dest / os.fsdecode(raw)
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, target)
    return dest
