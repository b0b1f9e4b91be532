"""One appliance's verified activity-log archive: segments, a cursor, one lock (SPEC §8).

Layout (``appliances/ID/archive/``, 0700; files 0600)::

    lock                          flock(2): exclusive while collecting, shared while reading
    cursor.json                   what is archived: the commit point (see below)
    seg-000000000001.jsonl.zst    closed segments, zstd-compressed (.gz: older archives)
    seg-000000200731.jsonl        the active segment; only its first ``bytes`` are archived

A segment holds device lines byte for byte (canonical JSON + ``\\n``), named by its first
seq. Segments close only right after a checkpoint once they reach ``segment_bytes``, so
every closed segment ends signed; a closed segment is compressed in the background while
collection goes on.

Only ``cursor.json`` says what the archive holds: the head (seq, hash, prev), the trust
state of the chain at the head (audit keys trusted and retired, the device name) and the
segment list with each one's seq range, record count and uncompressed length. Commit:

1. append records (already verified) past the committed length, compress closed segments
   to ``.zst`` (temporary, fsync, rename); a segment begun in this run is held in memory
   (within :data:`HOLD_BYTES` for the whole process, else written as it grows) until it
   closes, and is then compressed from memory, its ``.jsonl`` never written, or until the
   commit writes it as the active segment;
2. fsync every segment written (a closed one as its ``.zst``: its ``.jsonl`` only if
   compression failed and the cursor is to name it), then the directory;
3. write ``cursor.json`` atomically (temporary, fsync, rename, fsync the directory);
4. delete what the new cursor no longer names (the ``.jsonl`` of a compressed segment).

A crash before 3 leaves the old cursor, and :meth:`Archive.recover` (run under the lock
before every write) truncates the active segment to its committed length and deletes
unreferenced segment files, so an interrupted run neither loses nor duplicates a record.
Nothing before the cursor's head is ever rewritten.

The cursor is a typed record in :mod:`.cursor`, a segment's entry and its file I/O are in
:mod:`.segments` (both re-exported here).

Lifecycle: ``Archive(dir, appliance)`` → ``with archive.lock(exclusive=True, wait=S):`` →
``recover()`` → ``begin(cursor)`` → :class:`Appender` ``append()``... → ``commit()`` or
``abort()``. Readers: ``with archive.lock(exclusive=False, ...):`` → ``cursor()`` →
``blocks(cursor, after)``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import zstandard

from hsmctl import utc
from hsmctl.collect.cursor import FORMAT, Cursor
from hsmctl.collect.segments import (
    COMPRESSED,
    Segment,
    compress_pieces,
    compress_segment,
    create_segment,
    open_segment,
    segment_name,
    truncate_segment,
    write_all,
    write_pieces,
)
from hsmctl.errors import ConflictError, HsmctlError, IntegrityError
from hsmctl.privatefiles import fsync_dir, write_atomic

__all__ = [
    "BLOCK",
    "COMPRESSED",
    "COMPRESS_LEVEL",
    "CURSOR",
    "FORMAT",
    "LOCK",
    "SEGMENT_BYTES",
    "Appender",
    "Archive",
    "ArchiveDamaged",
    "Cursor",
    "Segment",
    "compress_segment",
    "segment_name",
]

CURSOR = "cursor.json"
LOCK = "lock"
SEGMENT_BYTES = 64 * 1024 * 1024
"""A segment closes at the first checkpoint after it reaches this size."""
COMPRESS_LEVEL = 1
"""zstd level for closed segments. On audit records level 1 compresses to 12.5% at ~800 MB/s
a core, where gzip's fastest level gives 19% at ~150 MB/s: compression was the largest
cost of a big collection after verification (bench/bench_collect.py)."""
BLOCK = 4 * 1024 * 1024
HOLD_BYTES = 2 * SEGMENT_BYTES
"""Memory this process may hold for segments begun in a transaction and not written yet
(:class:`Appender`); beyond it a segment is written as it grows, as before."""

_SEGMENT_FILE = re.compile(r"seg-(\d{12})\.jsonl(\.zst|\.gz)?(\.tmp)?")
_CURSOR_TMP = re.compile(r"\.cursor\.json\.\d+(\.[0-9a-f]+)?\.tmp")  # privatefiles temporaries


class ArchiveDamaged(IntegrityError):
    """The archive on disk does not match its cursor (exit 3): restore it from backup."""


def _now() -> str:
    return utc.stamp()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Archive:
    """The files of one appliance's archive. Thread-compatible: one user at a time per
    process (the lock serialises processes; give each thread its own ``Archive``)."""

    def __init__(
        self,
        directory: Path,
        appliance: str,
        *,
        segment_bytes: int = SEGMENT_BYTES,
        compress_level: int = COMPRESS_LEVEL,
    ) -> None:
        self.dir = directory
        self.appliance = appliance
        self.segment_bytes = segment_bytes
        self.compress_level = compress_level

    # -- locking ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, *, exclusive: bool, wait: float = 0.0) -> Iterator[None]:
        """Hold the archive's lock; if another process holds it, retry for ``wait`` seconds,
        then raise ConflictError (exit 5). The lock dies with its process (kill -9 too)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + max(wait, 0.0)
        try:
            while True:
                try:
                    fcntl.flock(fd, mode)
                    break
                except BlockingIOError:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ConflictError(
                            f"{self.appliance}: the archive is busy (another collection holds "
                            f"{self.dir / LOCK}; waited {max(wait, 0.0):g} s)",
                            detail={"appliance": self.appliance},
                        ) from None
                    time.sleep(min(0.05, remaining))
            yield
        finally:
            os.close(fd)

    # -- the cursor ---------------------------------------------------------------------------

    def cursor(self) -> Cursor:
        """The committed state; an empty cursor if nothing was ever archived."""
        path = self.dir / CURSOR
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return Cursor(self.appliance)
        try:
            cursor = Cursor.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise ArchiveDamaged(f"{self.appliance}: {path} is damaged: {exc}") from exc
        if cursor.appliance != self.appliance:
            raise ArchiveDamaged(f"{path} belongs to {cursor.appliance}, not {self.appliance}")
        return cursor

    def _write_cursor(self, cursor: Cursor) -> None:
        data = json.dumps(cursor.as_dict(), indent=1, sort_keys=True).encode() + b"\n"
        write_atomic(self.dir / CURSOR, data)

    # -- recovery -----------------------------------------------------------------------------

    def recover(self) -> Cursor:
        """Bring the files back to exactly what the cursor says (call with the exclusive
        lock): drop what an interrupted run left past the commit point."""
        cursor = self.cursor()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        named = {s.name for s in cursor.segments}
        changed = False
        for s in cursor.segments:
            path = self.dir / s.name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise ArchiveDamaged(f"{self.appliance}: segment {path} is missing") from None
            if s.compressed:
                continue
            if size < s.bytes:
                raise ArchiveDamaged(
                    f"{self.appliance}: segment {path} holds {size} bytes, the cursor says "
                    f"{s.bytes} (records {s.first_seq}..{s.last_seq})"
                )
            if size > s.bytes:
                truncate_segment(path, s.bytes)
                changed = True
        for entry in os.listdir(self.dir):
            if entry in named:
                continue
            if _SEGMENT_FILE.fullmatch(entry) or _CURSOR_TMP.fullmatch(entry):
                os.unlink(self.dir / entry)
                changed = True
        if changed:
            fsync_dir(self.dir)
        return cursor

    # -- writing ------------------------------------------------------------------------------

    def begin(self, cursor: Cursor) -> Appender:
        return Appender(self, cursor)

    # -- reading ------------------------------------------------------------------------------

    def blocks(self, cursor: Cursor, after: int = 0, size: int = BLOCK) -> Iterator[bytes]:
        """The archived lines of records after ``after``, in line-aligned blocks of about
        ``size`` bytes, in constant memory. Raises ArchiveDamaged if a segment does not
        hold what the cursor says."""
        for seg in cursor.segments:
            if seg.last_seq <= after:
                continue
            skip = max(0, after - seg.first_seq + 1)
            yield from self._segment_blocks(seg, skip, size)

    def _segment_blocks(self, seg: Segment, skip: int, size: int) -> Iterator[bytes]:
        path = self.dir / seg.name
        total = lines = 0
        carry = b""
        try:
            with open_segment(path, seg) as fh:
                while True:
                    want = min(size, seg.bytes - total) if not seg.compressed else size
                    chunk = fh.read(want) if want > 0 else b""
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > seg.bytes:
                        break
                    data = carry + chunk
                    cut = data.rfind(b"\n") + 1
                    carry, data = data[cut:], data[:cut]
                    n = data.count(b"\n")
                    lines += n
                    if skip:
                        if skip >= n:
                            skip -= n
                            continue
                        pos = 0
                        for _ in range(skip):
                            pos = data.index(b"\n", pos) + 1
                        data, skip = data[pos:], 0
                    if data:
                        yield data
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise ArchiveDamaged(f"{self.appliance}: segment {path} is missing") from exc
            raise ArchiveDamaged(f"{self.appliance}: segment {path} is unreadable: {exc}") from exc
        if total != seg.bytes or carry or lines != seg.records:
            raise ArchiveDamaged(
                f"{self.appliance}: segment {path} holds {total} bytes and {lines} whole "
                f"records; the cursor says {seg.bytes} bytes, records "
                f"{seg.first_seq}..{seg.last_seq}"
            )


class _HoldBudget:
    """Bytes of not-yet-written segments this process holds, across its collections."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.held + n > self.limit:
                return False
            self.held += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.held -= n


_HOLD = _HoldBudget(HOLD_BYTES)


class _Unwritten(Exception):
    """A held segment that could be neither compressed nor written: nothing may name it."""


@dataclass
class _Open:
    """A segment being appended to in this transaction: in its file (``fd``, or None
    until the first write of a segment continued from the cursor), or, begun in this
    transaction, ``held``: its bytes as appended, in memory until it closes (then
    compressed from them: its plain file is never written) or the commit writes it."""

    seg: Segment
    fd: int | None
    covered_bytes: int
    covered_records: int
    held: list[memoryview] | None = None


def _compress_held(held: list[memoryview], size: int, src: Path, dst: Path, level: int) -> None:
    """A closed segment held in memory: its ``.zst``; if that fails, its plain ``.jsonl``
    (as a segment written as it grew would have it; fsynced by the commit that names it),
    and if that fails too, _Unwritten. The memory goes back to the budget either way."""
    try:
        try:
            compress_pieces(held, size, dst, level)
        except Exception as exc:
            try:
                write_pieces(src, held)
            except Exception as again:
                raise _Unwritten(f"{src.name}: {again}") from again
            raise exc
    finally:
        _HOLD.give(size)
        held.clear()


class Appender:
    """One transaction on an archive: append verified lines, then commit or abort.

    ``append(data, covered)`` takes whole lines continuing the chain; ``covered`` is how
    many leading bytes of ``data`` end with a verified checkpoint. Only covered records
    are committed: the rest (records after the last signature) stays on the device until
    the next export signs it. Use from one thread.
    """

    def __init__(self, archive: Archive, cursor: Cursor) -> None:
        self.archive = archive
        self.base = cursor
        self._done: list[Segment] = list(cursor.segments)
        self._open: _Open | None = None
        self._next_seq = cursor.seq + 1
        self._covered_line: bytes | None = None
        self._closed: list[_Open] = []  # closed in this transaction, in order
        self._compress: ThreadPoolExecutor | None = None
        self._compressing: dict[str, Future[None]] = {}  # segment name -> compression
        self.appended = 0
        if self._done and not self._done[-1].compressed:
            last = self._done.pop()
            self._open = _Open(last, None, last.bytes, last.records)
        for seg in self._done:  # closed but left uncompressed (an earlier failure): retry
            if not seg.compressed:
                self._start_compression(seg)

    # -- appending --------------------------------------------------------------------------

    def append(self, data: bytes, covered: int = 0, records: int | None = None) -> None:
        """Append whole lines; the first ``covered`` bytes end with a signed record.
        ``records``: how many lines ``data`` holds, if the caller knows (saves a count)."""
        if not data:
            return
        if not data.endswith(b"\n") or not 0 <= covered <= len(data):
            raise ValueError("append() takes whole lines and a covered prefix of them")
        if type(data) is not bytes:  # a segment may hold it until the commit: immutable
            data = bytes(data)
        view = memoryview(data)  # written from where it lies: a chunk is copied once
        tail = data.count(b"\n", covered)  # after the last checkpoint: short
        if covered:
            head = data.count(b"\n", 0, covered) if records is None else records - tail
            last = data[data.rfind(b"\n", 0, covered - 1) + 1 : covered]
            self._write(view[:covered], head, covered_line=last)
        if covered < len(data):
            self._write(view[covered:], tail)

    def _write(self, data: memoryview, n: int, *, covered_line: bytes | None = None) -> None:
        """Write ``data`` (``n`` lines); ``covered_line``: its last line, a signed record
        (everything written so far is covered)."""
        o = self._open
        if o is None:
            seg = Segment(segment_name(self._next_seq, False), self._next_seq, 0, 0)
            o = self._open = _Open(seg, None, 0, 0, held=[])
        if o.held is not None and not _HOLD.take(len(data)):
            self._spill(o)  # over the process's budget: written as it grows from here
        if o.held is not None:
            o.held.append(data)  # a view of an immutable chunk: kept, not copied
        else:
            if o.fd is None:
                path = self.archive.dir / o.seg.name
                o.fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
                os.lseek(o.fd, o.seg.bytes, os.SEEK_SET)
            write_all(o.fd, (data,))
        o.seg = replace(o.seg, records=o.seg.records + n, bytes=o.seg.bytes + len(data))
        self._next_seq += n
        self.appended += n
        if covered_line is not None:
            o.covered_bytes, o.covered_records = o.seg.bytes, o.seg.records
            self._covered_line = covered_line
            if o.seg.bytes >= self.archive.segment_bytes:
                self._rotate()

    def _spill(self, o: _Open) -> None:
        """Write a held segment to its file; it is appended to there from now on."""
        assert o.held is not None
        held, o.held = o.held, None
        try:
            o.fd = create_segment(self.archive.dir / o.seg.name)
            write_all(o.fd, held)
        finally:
            _HOLD.give(sum(len(p) for p in held))

    def _rotate(self) -> None:
        o = self._open
        assert o is not None
        self._closed.append(o)
        self._open = None
        if o.held is not None:
            # Never written: compressed from memory (the same frame as from its file).
            held, o.held = o.held, None
            self._start_compression(o.seg, held)
            return
        assert o.fd is not None
        # Not fsynced here: the segment becomes durable as its compressed copy (fsynced by
        # compress_segment, its own thread), and the ``.jsonl`` is deleted after the
        # commit; only if compression fails is the ``.jsonl`` fsynced, before the cursor
        # names it (:meth:`_finish_compression`). An fsync here held the collecting
        # thread for the disk write of a whole segment (64 MiB) while the channel filled.
        os.close(o.fd)
        o.fd = None
        self._start_compression(o.seg)

    def _start_compression(self, seg: Segment, held: list[memoryview] | None = None) -> None:
        if self._compress is None:
            self._compress = ThreadPoolExecutor(1, thread_name_prefix="archive-compress")
        src = self.archive.dir / seg.name
        dst = self.archive.dir / segment_name(seg.first_seq, True)
        level = self.archive.compress_level
        if held is None:
            job = self._compress.submit(compress_segment, src, dst, level)
        else:
            job = self._compress.submit(_compress_held, held, seg.bytes, src, dst, level)
        self._compressing[seg.name] = job

    # -- ending -----------------------------------------------------------------------------

    def _finish_compression(self, *, durable: bool = False) -> dict[str, bool]:
        """Wait for the compressions: which segments have a ``.zst`` (fsynced). With
        ``durable`` (a commit), a segment that stays uncompressed is fsynced now, as the
        cursor is about to name its ``.jsonl`` (:meth:`_rotate` did not)."""
        done: dict[str, bool] = {}
        unwritten: _Unwritten | None = None
        for name, fut in self._compressing.items():
            try:
                fut.result()
                done[name] = True
            except _Unwritten as exc:  # neither a .zst nor a whole .jsonl: name neither
                unwritten = unwritten or exc
            except Exception:  # disk full...: stays uncompressed, the next run tries again
                done[name] = False
                if durable:
                    _fsync_file(self.archive.dir / name)
        if self._compress is not None:
            self._compress.shutdown(wait=True)
            self._compress = None
        self._compressing = {}
        if unwritten is not None and durable:
            raise HsmctlError(
                f"{self.archive.appliance}: a closed segment could not be stored ({unwritten}); "
                "nothing was committed"
            ) from unwritten
        return done

    def _drop_held(self) -> None:
        o = self._open
        if o is not None and o.held is not None:
            _HOLD.give(sum(len(p) for p in o.held))
            o.held = None

    def _close_fds(self) -> None:
        for o in (*self._closed, self._open):
            if o is not None and o.fd is not None:
                os.close(o.fd)
                o.fd = None

    def abort(self) -> None:
        """Forget everything appended: the files go back to what the cursor says."""
        self._drop_held()
        self._close_fds()
        self._finish_compression()
        self.archive.recover()

    def commit(
        self,
        *,
        trusted_keys: Mapping[str, str],
        retired_keys: tuple[str, ...],
        device: str | None,
    ) -> Cursor:
        """Make the covered records durable, then move the cursor (the commit point).
        ``trusted_keys``/``retired_keys``/``device`` are the verifier's state at the end.
        With nothing new covered, the archive stays byte for byte as it was."""
        if self._covered_line is None:
            self.abort()
            return self.base
        if self._open is not None and self._open.held is not None:
            self._spill(self._open)  # the active segment is a plain file, fsynced below
        segments = [*self._closed, *([self._open] if self._open else [])]
        # Keep up to the last covered byte: closed segments end covered, so only the
        # active one can hold an uncovered tail, or be all tail (then it goes).
        keep: list[_Open] = []
        for o in segments:
            keep.append(o)
            if o.covered_bytes < o.seg.bytes:
                break
        for o in keep:
            if o.covered_bytes < o.seg.bytes:
                if o.fd is not None:
                    os.ftruncate(o.fd, o.covered_bytes)
                else:
                    truncate_segment(self.archive.dir / o.seg.name, o.covered_bytes)
                o.seg = replace(o.seg, records=o.covered_records, bytes=o.covered_bytes)
        for o in keep:
            if o.fd is not None:
                os.fsync(o.fd)
        self._close_fds()
        keep = [o for o in keep if o.seg.records]
        gz = self._finish_compression(durable=True)
        final = [replace(s, name=segment_name(s.first_seq, True), compressed=True)
                 if gz.get(s.name) else s for s in self._done]  # fmt: skip
        for o in keep:
            if gz.get(o.seg.name):
                final.append(
                    replace(o.seg, name=segment_name(o.seg.first_seq, True), compressed=True)
                )
            else:
                final.append(o.seg)
        fsync_dir(self.archive.dir)
        head = json.loads(self._covered_line)
        if head["seq"] != final[-1].last_seq:
            raise HsmctlError(
                f"{self.archive.appliance}: internal error: covered record {head['seq']} is "
                f"not the end of the archive ({final[-1].last_seq}); nothing was committed"
            )
        cursor = Cursor(
            appliance=self.base.appliance,
            seq=int(head["seq"]),
            hash=str(head["hash"]),
            prev=str(head["prev"]),
            device=device,
            trusted_keys=dict(trusted_keys),
            retired_keys=tuple(sorted(retired_keys)),
            segments=tuple(final),
            updated_at=_now(),
            base=self.base.base,
        )
        self.archive._write_cursor(cursor)  # the commit point
        removed = False
        for name, ok in gz.items():
            if ok:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.archive.dir / name)
                    removed = True
        for entry in os.listdir(self.archive.dir):  # truncated-away new segments
            if _SEGMENT_FILE.fullmatch(entry) and entry not in {s.name for s in final}:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.archive.dir / entry)
                    removed = True
        if removed:
            fsync_dir(self.archive.dir)
        return cursor
