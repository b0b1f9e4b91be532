"""The device's activity log: append-only, hash-chained, fsynced, one writer, rotated into
segments that are deleted only once the customer's collector has acknowledged them.

Lifecycle: the daemon opens the :class:`ActivityLog` once (recovering the head from the
files' last line), appends through it from every thread under one lock, and closes it at
exit. Every append is written and fsynced before it returns; if it cannot be, the append
raises :class:`LogUnavailable` and the caller must refuse the command (fail closed).
If the file is replaced or truncated behind the daemon's back, appends fail closed from
then on (a replacement that ends exactly where the daemon left off, e.g. the log copied to
another filesystem, is followed): the log never silently restarts or forks a chain.

Segments (issue 15): the active file is ``audit.jsonl``; when the next record would take
it past :attr:`RetentionConfig.segment_bytes` it is renamed ``audit-<first seq>.jsonl``
(twelve digits) and a new active file begins. The chain runs on across files unchanged:
the log is the concatenation of its segments, and reading (``audit export|show|verify``)
goes through :meth:`ActivityLog.pieces`, which spans them. A closed segment is deleted
only when every record in it comes before the acknowledged seq (``audit ack``), and
never before its deletion is in the log; the acknowledged record itself stays, because
the collector's next export starts at it to prove the device did not roll back. An ack
beyond what ``audit export`` has sent is refused. At ``limit_bytes`` of retained log
ordinary records fail closed; the last ``reserve_bytes`` above it take only what lets a
collector free space (the export's checkpoint, the ack and the deletions it logs).

Before a segment goes, its ``key-rotation`` records are copied (fsynced) to
``audit.rotations.jsonl``: with them a verifier that pins only the device's initial audit
key (a re-provisioned device's next owner) still carries trust to the key that signs the
oldest record left, and starts there (``audit key show``'s ``log_base``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from hsmctl.auditlog import chain

INDEX_STRIDE = 1024
MIB = 1 << 20


class _IncompleteTail(Exception):
    def __init__(self, offset: int, dropped: int) -> None:
        self.offset = offset
        self.dropped = dropped


class LogUnavailable(Exception):
    """A record could not be written; nothing may happen that it would have recorded."""


class AckRefused(Exception):
    """``audit ack`` past what has been exported: the collector cannot have stored it."""

    def __init__(self, seq: int, exported: int) -> None:
        super().__init__(
            f"cannot acknowledge record {seq}: audit export has sent records only up to "
            f"{exported}; acknowledge what your collector has verified and stored"
        )
        self.seq = seq
        self.exported = exported


class Trimmed(Exception):
    """An export from before the oldest record still on the device."""

    def __init__(self, after: int, first: int, acked: int) -> None:
        super().__init__(
            f"records 1 to {first - 1} were deleted after the collector acknowledged "
            f"records through {acked}; the oldest record on the device is {first}: "
            f"export with --after {first - 1} or later"
        )
        self.after = after
        self.first = first


def _now() -> str:
    return chain.rfc3339(datetime.now(UTC))


@dataclass(frozen=True)
class RetentionConfig:
    """How the device keeps its log (``/etc/hsm/log.json``; the lab sets it small through
    the console). ``limit_bytes`` is the fail-closed point; the warning comes at
    ``high_water_percent`` of it."""

    segment_bytes: int = 16 * MIB
    limit_bytes: int = 1024 * MIB
    high_water_percent: int = 70

    def __post_init__(self) -> None:
        if self.segment_bytes < 1024:
            raise ValueError("segment_bytes must be at least 1024")
        if self.limit_bytes < 4 * self.segment_bytes:
            raise ValueError("limit_bytes must be at least 4 segments")
        if not 1 <= self.high_water_percent <= 95:
            raise ValueError("high_water_percent must be from 1 to 95")

    @property
    def high_water_bytes(self) -> int:
        return self.limit_bytes * self.high_water_percent // 100

    @property
    def reserve_bytes(self) -> int:
        """Room past the limit for what frees space: an export's checkpoint, an ack and
        the deletions it logs (a few records a collection)."""
        return min(MIB, max(16 * 1024, self.limit_bytes // 20))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RetentionConfig:
        unknown = set(d) - {"segment_bytes", "limit_bytes", "high_water_percent"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        values: dict[str, int] = {}
        for key in ("segment_bytes", "limit_bytes", "high_water_percent"):
            if key in d:
                value = d[key]
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError(f"{key} must be an integer")
                values[key] = value
        return cls(**values)


def load_config(path: Path) -> tuple[RetentionConfig, str | None]:
    """The configuration at ``path`` (defaults if there is none), and the problem with it
    if it could not be used (then the defaults apply: the log must open regardless)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return RetentionConfig(), None
    except (OSError, ValueError) as exc:
        return RetentionConfig(), f"{path}: {exc}"
    try:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return RetentionConfig.from_dict(data), None
    except ValueError as exc:
        return RetentionConfig(), f"{path}: {exc}"


@dataclass
class Segment:
    """One file of the log: records ``first_seq`` … ``last_seq`` (``last_seq`` is
    ``first_seq - 1`` while it is empty). ``offsets[k]`` is the byte offset of record
    ``first_seq + k * INDEX_STRIDE``."""

    path: Path
    first_seq: int
    last_seq: int
    size: int = 0
    offsets: list[int] = field(default_factory=list)
    last_hash: str = ""

    @property
    def records(self) -> int:
        return self.last_seq - self.first_seq + 1

    def offset_of(self, seq: int) -> int:
        """Byte offset of record ``seq`` (first_seq <= seq <= last_seq + 1)."""
        if seq > self.last_seq:
            return self.size
        k = (seq - self.first_seq) // INDEX_STRIDE
        offset = self.offsets[k]
        at = self.first_seq + k * INDEX_STRIDE
        if at < seq:
            with open(self.path, "rb") as fh:
                fh.seek(offset)
                while at < seq:
                    offset += len(fh.readline())
                    at += 1
        return offset

    def as_dict(self) -> dict[str, Any]:
        return {
            "segment": self.path.name,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "bytes": self.size,
            "last_hash": self.last_hash,
        }


def deletable(closed: list[Segment], acked: int) -> list[Segment]:
    """The closed segments an ack of ``acked`` releases: every record in them comes
    before it (so they are always the oldest ones, and the acked record stays). Pure."""
    out = []
    for seg in closed:
        if seg.last_seq >= acked:
            break
        out.append(seg)
    return out


class Piece(NamedTuple):
    """Bytes ``start``..``end`` of an open segment file (open before any deletion, so a
    reader is never cut short by one)."""

    file: BinaryIO
    start: int
    end: int


@dataclass(frozen=True)
class DiskUse:
    """``hsm show``'s ``log_disk``: ``warning`` is true from the high-water mark on (and
    at the limit); ``message`` says why, for a person (null without a warning)."""

    used_bytes: int
    limit_bytes: int
    high_water_bytes: int
    segments: int
    acked_seq: int
    message: str | None

    @property
    def warning(self) -> bool:
        return self.message is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "used_bytes": self.used_bytes,
            "limit_bytes": self.limit_bytes,
            "high_water_bytes": self.high_water_bytes,
            "segments": self.segments,
            "acked_seq": self.acked_seq,
            "warning": self.warning,
            "message": self.message,
        }


_CLOSED = re.compile(r"-([0-9]{12,19})$")


class ActivityLog:
    def __init__(self, path: Path, config: RetentionConfig | None = None) -> None:
        self.path = path
        self.config = config or RetentionConfig()
        self.state_path = path.with_name(path.stem + ".retention.json")
        self.rotations_path = path.with_name(path.stem + ".rotations.jsonl")
        self.lock = threading.RLock()
        self.fd = -1
        self.ino: tuple[int, int] = (0, 0)
        self.head: chain.Head | None = None
        self.segments: list[Segment] = []  # oldest first; the last is the active file
        self.failed: str | None = None
        self.acked_seq = 0
        self.exported_seq = 0
        self.full = False  # a record was refused for the limit since the last release
        # Bytes of an incomplete last record dropped at start (a write cut short by a
        # crash: never fsynced, so never acknowledged); the daemon logs the repair.
        self.repaired_bytes = 0
        self._open(repair_tail=True)
        self._load_state()

    # -- what the rest of the daemon reads ------------------------------------------------

    @property
    def active(self) -> Segment:
        return self.segments[-1]

    @property
    def size(self) -> int:
        """Bytes in the active file."""
        return self.active.size

    @property
    def offsets(self) -> list[int]:
        return self.active.offsets

    @property
    def used(self) -> int:
        return sum(s.size for s in self.segments)

    @property
    def first_seq(self) -> int:
        """The oldest record still on the device (1 until a segment is deleted)."""
        return self.segments[0].first_seq

    def closed_path(self, first_seq: int) -> Path:
        return self.path.with_name(f"{self.path.stem}-{first_seq:012d}{self.path.suffix}")

    # -- opening and recovery ------------------------------------------------------------

    def _closed_files(self) -> list[tuple[int, Path]]:
        found = []
        for p in self.path.parent.glob(f"{self.path.stem}-*{self.path.suffix}"):
            m = _CLOSED.search(p.name[: -len(self.path.suffix)] if self.path.suffix else p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def _open(self, repair_tail: bool = False) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        st = os.fstat(self.fd)
        self.ino = (st.st_dev, st.st_ino)
        try:
            self._scan_all()
        except _IncompleteTail as tail:
            if not repair_tail:
                raise LogUnavailable(f"{self.path}: last record is incomplete") from None
            os.ftruncate(self.fd, tail.offset)
            os.fsync(self.fd)
            self.repaired_bytes = tail.dropped
            self._scan_all()

    def _scan_all(self) -> None:
        """Rebuild the segment list, the head and the indexes from the files. Segments
        that do not continue each other (one removed or changed by someone else) leave
        the log failed closed, but readable: an export still shows the collector the
        break, which it reports as an integrity violation."""
        segments: list[Segment] = []
        head: chain.Head | None = None
        broken: str | None = None
        files = [*self._closed_files(), (0, self.path)]
        for named, path in files:
            active = path == self.path
            first = _first_record(path)
            if first is None:  # empty (or one cut-short record): only the active file
                if not active:
                    broken = broken or f"{path.name} is empty"
                    continue
                seq = head.seq + 1 if head else 1
                segments.append(self._scan(path, seq, tail_may_be_incomplete=True))
                continue
            seq, prev = first
            if not active and seq != named:
                broken = broken or f"{path.name} starts at record {seq}"
            if head is not None and (seq != head.seq + 1 or prev != head.hash):
                broken = broken or f"{path.name} does not continue record {head.seq}"
            seg = self._scan(path, seq, tail_may_be_incomplete=active)
            segments.append(seg)
            head = chain.Head(seg.last_seq, seg.last_hash)
        self.segments = segments
        self.head = head
        if broken is not None:
            self.failed = f"the log's segments do not form one chain ({broken})"

    def _scan(self, path: Path, first: int, tail_may_be_incomplete: bool) -> Segment:
        seg = Segment(path, first, first - 1)
        offset = 0
        with open(path, "rb") as fh:
            for line in fh:
                seq = seg.last_seq + 1
                if (seq - first) % INDEX_STRIDE == 0:
                    seg.offsets.append(offset)
                if not line.endswith(b"\n"):
                    if tail_may_be_incomplete:
                        raise _IncompleteTail(offset, len(line))
                    raise LogUnavailable(f"{path}: last record is incomplete")
                seg.last_seq, seg.last_hash = seq, _hash_of(line)
                offset += len(line)
        seg.size = offset
        return seg

    def _load_state(self) -> None:
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
            acked, exported = int(data["acked_seq"]), int(data["exported_seq"])
        except (OSError, ValueError, KeyError, TypeError):
            acked = exported = 0
        # Never past the head: a log restarted from scratch must not inherit a release.
        top = self.head.seq if self.head else 0
        self.exported_seq = min(max(exported, 0), top)
        self.acked_seq = min(max(acked, 0), self.exported_seq)

    def _save_state(self) -> None:
        data = json.dumps({"acked_seq": self.acked_seq, "exported_seq": self.exported_seq})
        tmp = self.state_path.with_name(f".{self.state_path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_path)
        self._fsync_dir()

    def _fsync_dir(self) -> None:
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

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
        try:
            self._open()
        except LogUnavailable as exc:
            self.failed = f"the log file changed behind the daemon ({exc})"
            raise LogUnavailable(self.failed) from None
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
        urgent: bool = False,
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
            self._write(record, urgent)
            return record

    def append_record(self, build: Any, *, urgent: bool = False) -> dict[str, Any]:
        """Append a record built by ``build(head, time)`` (checkpoints, key rotations)."""
        with self.lock:
            self._check_same_file()
            assert self.head is not None, "a checkpoint needs a record before it"
            record: dict[str, Any] = build(self.head, _now())
            self._write(record, urgent)
            return record

    def _write(self, record: Mapping[str, Any], urgent: bool = False) -> None:
        line = chain.record_line(record)
        cfg = self.config
        room = cfg.limit_bytes + (cfg.reserve_bytes if urgent else 0)
        if self.used + len(line) > room:
            self.full = True
            raise LogUnavailable(
                f"the activity log is full ({self.used} of {cfg.limit_bytes} bytes): the "
                f"collector has acknowledged records only through {self.acked_seq}"
            )
        if self.size > 0 and self.size + len(line) > cfg.segment_bytes:
            self._rotate()
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
        seg = self.active
        seq = int(record["seq"])
        if (seq - seg.first_seq) % INDEX_STRIDE == 0:
            seg.offsets.append(seg.size)
        seg.size += len(line)
        seg.last_seq, seg.last_hash = seq, str(record["hash"])
        self.head = chain.Head(seq, seg.last_hash)

    def _rotate(self) -> None:
        """Close the active file under its first seq's name and start a new one. A crash
        between the two steps leaves no active file: the next open makes an empty one."""
        seg = self.active
        closed = self.closed_path(seg.first_seq)
        try:
            if closed.exists():
                raise OSError(17, f"{closed.name} exists")
            os.rename(self.path, closed)
            self._fsync_dir()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
            self._fsync_dir()
        except OSError as exc:
            raise LogUnavailable(f"cannot rotate the activity log: {exc.strerror}") from exc
        os.close(self.fd)
        self.fd = fd
        st = os.fstat(fd)
        self.ino = (st.st_dev, st.st_ino)
        seg.path = closed
        self.segments.append(Segment(self.path, seg.last_seq + 1, seg.last_seq))

    # -- exports and acknowledgements ----------------------------------------------------

    def mark_exported(self, seq: int) -> None:
        """``audit export`` has sent records through ``seq``. Kept across restarts where
        the disk allows; in memory only when it does not (an export must still work)."""
        with self.lock:
            if seq <= self.exported_seq:
                return
            self.exported_seq = seq
            with contextlib.suppress(OSError):
                self._save_state()

    def acknowledge(self, seq: int) -> int:
        """Record that the collector holds records through ``seq``; returns the acked
        seq (never lower than before). Refuses a seq that was never exported."""
        with self.lock:
            if seq > self.exported_seq:
                raise AckRefused(seq, self.exported_seq)
            if seq > self.acked_seq:
                before = self.acked_seq
                self.acked_seq = seq
                try:
                    self._save_state()
                except OSError as exc:
                    self.acked_seq = before
                    raise LogUnavailable(
                        f"cannot keep the acknowledgement: {exc.strerror}"
                    ) from exc
            return self.acked_seq

    def deletable(self) -> list[Segment]:
        with self.lock:
            return deletable(self.segments[:-1], self.acked_seq)

    def release(self, before_delete: Callable[[Segment], object]) -> list[Segment]:
        """Delete the closed segments the ack releases, oldest first, each only after
        ``before_delete(segment)`` has logged it (if logging fails, nothing more goes)."""
        gone: list[Segment] = []
        with self.lock:
            for seg in deletable(self.segments[:-1], self.acked_seq):
                self._keep_rotations(seg)
                before_delete(seg)
                try:
                    seg.path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise LogUnavailable(f"cannot delete {seg.path.name}: {exc}") from exc
                self.segments.remove(seg)
                gone.append(seg)
            if gone:
                self._fsync_dir()
                self.full = self.used >= self.config.limit_bytes
        return gone

    def _keep_rotations(self, seg: Segment) -> None:
        """Copy ``seg``'s key-rotation records to the rotations file (fsynced) before the
        segment goes: trust from the initial key reaches the oldest record only through
        them. A failure keeps the segment (and every later one)."""
        marker = b'"event":"' + chain.KEY_ROTATION_EVENT.encode() + b'"'
        try:
            with open(seg.path, "rb") as fh:
                found = [line for line in fh if marker in line]
            if not found:
                return
            have = set(self.retired_rotations())
            new = [line for line in found if line not in have]
            if not new:
                return
            fd = os.open(self.rotations_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                data = b"".join(new)
                if os.write(fd, data) != len(data):
                    raise OSError(28, "short write")
                os.fsync(fd)
            finally:
                os.close(fd)
            self._fsync_dir()
        except OSError as exc:
            raise LogUnavailable(
                f"cannot keep the key rotations of {seg.path.name}: {exc.strerror or exc}"
            ) from exc

    def retired_rotations(self) -> list[bytes]:
        """The key-rotation records of deleted segments, oldest first, as their lines."""
        try:
            with open(self.rotations_path, "rb") as fh:
                return [line for line in fh if line.endswith(b"\n")]
        except FileNotFoundError:
            return []

    def disk(self) -> DiskUse:
        with self.lock:
            cfg = self.config
            used = self.used
            warning = None
            if self.full or used >= cfg.limit_bytes:
                warning = (
                    f"the activity log is full ({used} of {cfg.limit_bytes} bytes): every "
                    "command except audit export fails closed until the collector "
                    f"acknowledges records past {self.acked_seq} (audit ack)"
                )
            elif used >= cfg.high_water_bytes:
                warning = (
                    f"the activity log is at {used * 100 // cfg.limit_bytes}% of its "
                    f"{cfg.limit_bytes}-byte limit (high-water mark "
                    f"{cfg.high_water_percent}%): the collector has acknowledged records "
                    f"only through {self.acked_seq}; at the limit commands fail closed"
                )
            return DiskUse(
                used, cfg.limit_bytes, cfg.high_water_bytes, len(self.segments),
                self.acked_seq, warning,
            )  # fmt: skip

    # -- reading -------------------------------------------------------------------------

    def _locate(self, after: int) -> tuple[int, int]:
        """(segment index, byte offset) of the first record with seq > ``after``."""
        target = max(after, 0) + 1
        for i, seg in enumerate(self.segments):
            if target <= seg.last_seq:
                return i, seg.offset_of(max(target, seg.first_seq))
        return len(self.segments) - 1, self.size

    def offset_after(self, after: int) -> int:
        """Position of the first record with seq > ``after`` in the concatenation of the
        segments on the device (its size if there is none)."""
        with self.lock:
            i, offset = self._locate(after)
            return sum(s.size for s in self.segments[:i]) + offset

    def pieces(self, after: int, through: int | None = None) -> list[Piece]:
        """The records after ``after`` through ``through`` (default: the head), as open
        file ranges across segments. Raises :class:`Trimmed` when records after
        ``after`` were deleted."""
        with self.lock:
            if self.head is None:
                return []
            end_seq = self.head.seq if through is None else min(through, self.head.seq)
            if after + 1 < self.first_seq and after < end_seq:
                raise Trimmed(after, self.first_seq, self.acked_seq)
            out: list[Piece] = []
            try:
                for seg in self.segments:
                    lo, hi = max(after + 1, seg.first_seq), min(end_seq, seg.last_seq)
                    if lo > hi:
                        continue
                    start = seg.offset_of(lo)
                    end = seg.offset_of(hi + 1)
                    out.append(Piece(open(seg.path, "rb"), start, end))  # noqa: SIM115
            except OSError as exc:
                close_pieces(out)
                raise LogUnavailable(f"cannot read the activity log: {exc}") from exc
            return out

    def lines(self, after: int = 0, through: int | None = None) -> Iterator[bytes]:
        """The records after ``after`` as lines, across segments: a snapshot taken now
        (the files are opened before this returns), read as the caller iterates."""
        return _read_lines(self.pieces(max(after, self.first_seq - 1), through))

    def base(self) -> chain.Head | None:
        """The head before the oldest record on the device (None: it is record 1)."""
        with self.lock:
            first = self.segments[0]
            if first.first_seq == 1 or first.size == 0:
                return None
            got = _first_record(first.path)
            assert got is not None
            return chain.Head(first.first_seq - 1, got[1])

    def tail(self, count: int) -> list[bytes]:
        with self.lock:
            if self.head is None:
                return []
            after = max(self.head.seq - count, self.first_seq - 1)
            return [line.rstrip(b"\n") for line in self.lines(after)]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _read_lines(pieces: list[Piece]) -> Iterator[bytes]:
    try:
        for piece in pieces:
            piece.file.seek(piece.start)
            left = piece.end - piece.start
            for line in piece.file:
                if left <= 0:
                    break
                left -= len(line)
                yield line
    finally:
        close_pieces(pieces)


def close_pieces(pieces: list[Piece]) -> None:
    for piece in pieces:
        with contextlib.suppress(OSError):
            piece.file.close()


def _first_record(path: Path) -> tuple[int, str] | None:
    """(seq, prev) of a file's first record, or None if it is empty."""
    with open(path, "rb") as fh:
        line = fh.readline()
    if not line:
        return None
    if not line.endswith(b"\n"):
        # Only the active file's only record: an incomplete tail, repaired by the scan.
        return None if path.stat().st_size == len(line) else _parse_first(line)
    return _parse_first(line)


def _parse_first(line: bytes) -> tuple[int, str]:
    try:
        record = json.loads(line)
        return int(record["seq"]), str(record["prev"])
    except (ValueError, KeyError, TypeError) as exc:
        raise LogUnavailable(f"an unreadable record at the start of a segment: {exc}") from exc


def _hash_of(line: bytes) -> str:
    # Lines are canonical JSON with sorted keys: the top-level "hash" is the last key
    # named so (only plain strings and numbers follow it; a nested one sits in "detail",
    # before it).
    marker = b'"hash":"'
    i = line.rfind(marker)
    if i < 0:
        raise LogUnavailable("a record without a hash")
    return line[i + len(marker) : i + len(marker) + 64].decode("ascii")
