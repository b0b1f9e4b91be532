"""Whether SoftHSM's token store changed: a fingerprint of its files, so the daemon reads
the customer token's status again only when it may have changed.

``hsm show`` runs in every provisioning step and every health poll, and each read of the
token's status is a helper process that loads SoftHSM (~60 ms of the device's CPU, more
than the rest of the command). The status (label, serial, PIN flag, public objects, the
domain's fingerprint) lives in the token store's files (``directories.tokendir``: one
directory a token, one file an object, ``token.object``, SoftHSM's ``generation``
counter), which any process may change: the helper, the PKCS#11 service's ``p11-kit``
processes, a factory reset. :class:`StatusCache` keeps the last status with the
fingerprint taken before and after it was read, and answers from it only while the
fingerprint is the same.

Sound because: every change to a file or a directory's entries sets its ctime (not
settable by a process) to the coarse clock's now; a status is kept only if the store did
not change while it was read and its newest time is older than :data:`SETTLE` before the
read began, so any later change gives some file a newer ctime, and the next fingerprint
differs. SoftHSM's ``generation`` counters are in it by their value (SoftHSM rewrites
them, unchanged, whenever a process opens the token: their times say nothing); what
they count is also in the files they stand beside. Anything unreadable: no cache.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from hsmctl.appliance import paths

SETTLE = 1.0  # seconds; the file system's clock ticks are milliseconds (jiffies)
_MAX_ENTRIES = 100_000  # a store this large is read every time, not fingerprinted

T = TypeVar("T")
Entry = tuple[str, int, int, int, int, bytes]  # path, inode, size, mtime, ctime, content
Fingerprint = tuple[Entry, ...]


def token_dir(conf: Path | None = None) -> Path | None:
    """``directories.tokendir`` from SoftHSM's configuration (``$SOFTHSM2_CONF``, as the
    helper process reads it), or None."""
    path = conf or Path(os.environ.get("SOFTHSM2_CONF") or paths.SOFTHSM_CONF)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "directories.tokendir" and value.strip():
            return Path(value.strip())
    return None


def _entry(path: str, rel: str, st: os.stat_result) -> Entry:
    if rel.endswith("/generation"):
        # SoftHSM rewrites this counter, unchanged, whenever a process reads the token
        # (the status helper included): its value is what tells, not its times.
        with open(path, "rb") as fh:
            return (rel, 0, 0, 0, 0, fh.read(64))
    return (rel, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, b"")


def fingerprint(root: Path) -> Fingerprint | None:
    """Every file and directory under ``root`` (two levels: tokens, their files) with
    its inode, size, mtime, ctime, and the ``generation`` counters' bytes; None if the
    store cannot be read completely."""
    entries: list[Entry] = []
    try:
        todo = [(str(root), "", 0)]
        while todo:
            path, rel, depth = todo.pop()
            st = os.stat(path, follow_symlinks=False)
            entries.append(_entry(path, rel, st))
            if depth < 2 and os.path.isdir(path) and not os.path.islink(path):
                with os.scandir(path) as it:
                    for e in it:
                        todo.append((e.path, f"{rel}/{e.name}", depth + 1))
            if len(entries) > _MAX_ENTRIES:
                return None
    except OSError:
        return None
    return tuple(sorted(entries))


def newest_ns(fp: Fingerprint) -> int:
    return max((max(e[3], e[4]) for e in fp), default=0)


class StatusCache(Generic[T]):
    """The last value ``read`` returned, answered again while the token store's
    fingerprint is unchanged (lifecycle: one per daemon; ``get`` from any thread)."""

    def __init__(
        self,
        root: Callable[[], Path | None] = token_dir,
        *,
        settle: float = SETTLE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._root = root
        self._settle_ns = int(settle * 1e9)
        self._clock = clock
        self._lock = threading.Lock()
        self._kept: tuple[Fingerprint, T] | None = None

    def get(self, read: Callable[[], T]) -> T:
        root = self._root()
        started_ns = int(self._clock() * 1e9)
        before = fingerprint(root) if root is not None else None
        with self._lock:
            kept = self._kept
        if before is not None and kept is not None and kept[0] == before:
            return kept[1]
        value = read()
        after = fingerprint(root) if root is not None else None
        settled = before is not None and newest_ns(before) < started_ns - self._settle_ns
        with self._lock:
            self._kept = (
                (before, value) if before is not None and settled and after == before else None
            )
        return value

    def clear(self) -> None:
        with self._lock:
            self._kept = None
