"""Private files: atomic, durable writes with an exact mode; reads that refuse anything
others may see, and never hang or balloon on what sits at the path."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hsmctl.errors import UsageError
from hsmctl.privatefiles import MAX_PRIVATE_FILE, read_private, write_atomic

pytestmark = pytest.mark.unit


def test_write_is_exact_and_leaves_no_temporary(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        path = write_atomic(tmp_path / "k", b"secret", mode=0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and path.read_bytes() == b"secret"
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


def test_exclusive_write_never_replaces(tmp_path: Path) -> None:
    write_atomic(tmp_path / "k", b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "k", b"second", exclusive=True)
    assert (tmp_path / "k").read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


def test_reads_check_the_opened_file(tmp_path: Path) -> None:
    key = write_atomic(tmp_path / "key", b"k")
    (tmp_path / "link").symlink_to(key)
    assert read_private(tmp_path / "link", what="key") == b"k"  # as OpenSSH follows
    key.chmod(0o640)
    with pytest.raises(UsageError, match="too open"):
        read_private(tmp_path / "link", what="key")
    with pytest.raises(UsageError, match=r"key .*: No such file"):
        read_private(tmp_path / "missing", what="key")
    with pytest.raises(UsageError, match="not a regular file"):
        read_private(tmp_path, what="key")


def test_a_fifo_or_a_huge_file_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(UsageError, match="not a regular file"):
        read_private(fifo, what="secret")
    big = tmp_path / "big"
    with open(big, "wb") as fh:
        fh.truncate(MAX_PRIVATE_FILE + 1)
    big.chmod(0o600)
    with pytest.raises(UsageError, match="larger than"):
        read_private(big, what="secret")
