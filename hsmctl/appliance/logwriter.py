"""The device's activity log: append-only, hash-chained, fsynced, one writer.

Lifecycle: the daemon opens the :class:`ActivityLog` once (recovering the head from the
file's last line), appends through it from every thread under one lock, and closes it at
exit. Every append is written and fsynced before it returns; if it cannot be, the append
raises :class:`LogUnavailable` and the caller must refuse the command (fail closed).
If the file is replaced or truncated behind the daemon's back, appends fail closed from
then on (a replacement that ends exactly where the daemon left off, e.g. the log copied to
another filesystem, is followed): the log never silently restarts or forks a chain.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hsmctl.auditlog import chain

INDEX_STRIDE = 1024


class _IncompleteTail(Exception):
    def __init__(self, offset: int, dropped: int) -> None:
        self.offset = offset
        self.dropped = dropped


class LogUnavailable(Exception):
    """A record could not be written; nothing may happen that it would have recorded."""


def _now() -> str:
    return chain.rfc3339(datetime.now(UTC))


class ActivityLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.fd = -1
        self.ino: tuple[int, int] = (0, 0)
        self.head: chain.Head | None = None
        self.size = 0
        # offsets[k] = byte offset of record seq = k * INDEX_STRIDE + 1
        self.offsets: list[int] = []
        self.failed: str | None = None
        # Bytes of an incomplete last record dropped at start (a write cut short by a
        # crash: never fsynced, so never acknowledged); the daemon logs the repair.
        self.repaired_bytes = 0
        self._open(repair_tail=True)

    # -- opening and recovery ------------------------------------------------------------

    def _open(self, repair_tail: bool = False) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        st = os.fstat(self.fd)
        self.ino = (st.st_dev, st.st_ino)
        try:
            self._scan()
        except _IncompleteTail as tail:
            if not repair_tail:
                raise LogUnavailable(f"{self.path}: last record is incomplete") from None
            os.ftruncate(self.fd, tail.offset)
            os.fsync(self.fd)
            self.repaired_bytes = tail.dropped
            self._scan()

    def _scan(self) -> None:
        """Rebuild the head and the seq->offset index from the file."""
        self.offsets = []
        head = None
        offset = 0
        with open(self.path, "rb") as fh:
            for line in fh:
                seq = (head.seq + 1) if head else 1
                if (seq - 1) % INDEX_STRIDE == 0:
                    self.offsets.append(offset)
                if not line.endswith(b"\n"):
                    raise _IncompleteTail(offset, len(line))
                head = chain.Head(seq, _hash_of(line))
                offset += len(line)
        self.head = head
        self.size = offset

    def _check_same_file(self) -> None:
        if self.failed is not None:
            # Sticky: writing on after a rewrite would fork the chain. Restarting the daemon
            # (an operator's decision, on the console) rescans whatever the file now holds.
            raise LogUnavailable(self.failed)
        try:
            st = os.stat(self.path)
        except FileNotFoundError as exc:
            raise LogUnavailable(f"{self.path} has disappeared") from exc
        if (st.st_dev, st.st_ino) == self.ino and st.st_size == self.size:
            return
        # Replaced (e.g. moved to another filesystem) or changed by someone else:
        # continue only if it still ends exactly where we left it.
        old_head = self.head
        os.close(self.fd)
        self._open()
        if self.head != old_head:
            self.failed = "the log file changed behind the daemon"
            raise LogUnavailable(self.failed)

    # -- writing -------------------------------------------------------------------------

    def append(
        self,
        *,
        actor: str,
        role: str,
        source: str,
        event: str,
        outcome: str,
        detail: Mapping[str, Any],
    ) -> dict[str, Any]:
        with self.lock:
            self._check_same_file()
            record = chain.make_record(
                self.head,
                time=_now(),
                actor=actor,
                role=role,
                source=source,
                event=event,
                outcome=outcome,
                detail=detail,
            )
            self._write(record)
            return record

    def append_record(self, build: Any) -> dict[str, Any]:
        """Append a record built by ``build(head, time)`` (checkpoints, key rotations)."""
        with self.lock:
            self._check_same_file()
            assert self.head is not None, "a checkpoint needs a record before it"
            record: dict[str, Any] = build(self.head, _now())
            self._write(record)
            return record

    def _write(self, record: Mapping[str, Any]) -> None:
        line = chain.record_line(record)
        try:
            written = os.write(self.fd, line)
            if written != len(line):
                raise OSError(28, "short write")
            os.fsync(self.fd)
        except OSError as exc:
            # Undo a partial line so the chain on disk stays whole.
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise LogUnavailable(f"cannot write the activity log: {exc.strerror}") from exc
        seq = int(record["seq"])
        if (seq - 1) % INDEX_STRIDE == 0:
            self.offsets.append(self.size)
        self.size += len(line)
        self.head = chain.Head(seq, str(record["hash"]))

    # -- reading -------------------------------------------------------------------------

    def offset_after(self, after: int) -> int:
        """Byte offset of the first record with seq > ``after`` (end of file if none)."""
        with self.lock:
            if self.head is None or after >= self.head.seq:
                return self.size
            target = max(after, 0) + 1
            k = (target - 1) // INDEX_STRIDE
            offset = self.offsets[k]
            seq = k * INDEX_STRIDE + 1
            with open(self.path, "rb") as fh:
                fh.seek(offset)
                while seq < target:
                    offset += len(fh.readline())
                    seq += 1
            return offset

    def tail(self, count: int) -> list[bytes]:
        with self.lock:
            if self.head is None:
                return []
            start = self.offset_after(max(self.head.seq - count, 0))
            end = self.size
        with open(self.path, "rb") as fh:
            fh.seek(start)
            return fh.read(end - start).splitlines()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _hash_of(line: bytes) -> str:
    # Lines are canonical JSON with sorted keys: the top-level "hash" is the last key
    # named so (only plain strings and numbers follow it; a nested one sits in "detail",
    # before it).
    marker = b'"hash":"'
    i = line.rfind(marker)
    if i < 0:
        raise LogUnavailable("a record without a hash")
    return line[i + len(marker) : i + len(marker) + 64].decode("ascii")
