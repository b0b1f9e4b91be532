"""Streaming verification in line-aligned chunks, on several cores when the log is large.

:class:`~hsmctl.auditlog.ChainVerifier` is sequential and costs ~10 µs a record, which
would make verification, not the network, the limit of a large collection. The chain can
be checked in pieces, though: chunk *k* is verified from the head the previous chunk
*claims* to end at, with the trust state (keys trusted and retired, device) its claimed
key rotations lead to. If every chunk verifies, the whole stream verifies exactly as
one sequential pass would (by induction over chunks: chunk *k-1* proved its claimed end).
Each result is checked against the real state the previous chunk ended in before it is
accepted; on any difference the chunk is verified again, in order, with the real state —
speculation can cost time, never soundness.

The first chunk (and every chunk while the device name is not yet known) is verified in
this process, so a small incremental collection never starts a worker; the second starts
them, and chunks are verified here until they are up (a spawned worker takes from ~0.3 s
on an idle machine to seconds under load: waiting for it left this process idle). Results are
accepted strictly in stream order, and ``on_verified`` sees only accepted chunks: nothing
reaches the archive before it has been verified.

Bounded whatever the device sends (:class:`Limits`): memory by the chunk size and the
chunks in flight, a record by :attr:`Limits.record_bytes`, and what may arrive without a
signature by :attr:`Limits.unsigned_records` / :attr:`Limits.unsigned_bytes` — the
collector writes verified records to disk before a checkpoint signs them, so without
that bound a device that never signs could fill the disk. A breach is a violation like
any other: it names the record, stops the transfer, and nothing of it is kept.

Lifecycle: ``ChunkedVerifier(...)`` → ``feed(bytes)`` as the stream arrives (raises
:class:`Halted` at the first violation, to stop the transfer) → ``finish(complete)``
once.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field, replace

from hsmctl.auditlog import Head, Violation, ViolationKind, blockscan, verify_block, verify_lines
from hsmctl.devicejson import parse
from hsmctl.errors import IntegrityError

CHUNK_BYTES = 4 * 1024 * 1024
"""Chunk size with worker processes (a chunk is shipped to one); also the longest run of
bytes without a line end that is held."""
INLINE_CHUNK_BYTES = 1024 * 1024
"""Chunk size when verifying in the collecting thread (no pool): a chunk is joined,
scanned and written while it is still in the CPU's cache. Measured on the bench (a
million records, interleaved against 4 MiB chunks): 0.13-0.15 CPU-s less per collection."""
ROTATION_MARK = b'"event":"key-rotation"'
RECORD_BYTES = 64 * 1024
"""The longest line a record may be (see :class:`Limits`)."""


@dataclass(frozen=True)
class Limits:
    """What one export may hold; beyond it the device is misbehaving (exit 3).

    Values from what a device writes: a command line is at most 512 bytes
    (``appliance.grammar.MAX_LINE_BYTES``) and the largest record, a key rotation, about
    1.5 KiB, so 64 KiB is forty times any real record. The device signs a checkpoint at
    least every minute while it logs (``daemon.CHECKPOINT_INTERVAL``), at the end of
    every session and before every export, and writes each record with an fsync (a few
    thousand a second at most): 200,000 records or 128 MiB unsigned is more than a
    minute of the busiest device, and bounds the disk a device that never signs can
    take. ``None``: no bound (offline verification of an archive, which holds only
    signed records).
    """

    record_bytes: int = RECORD_BYTES
    unsigned_records: int | None = 200_000
    unsigned_bytes: int | None = 128 * 1024 * 1024


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class TrustState:
    """What verifying the next record depends on besides the previous head."""

    trusted: Mapping[str, str]
    retired: frozenset[str] = frozenset()
    device: str | None = None


@dataclass(frozen=True)
class ChunkResult:
    """The verdict on one chunk (small, so it crosses process boundaries cheaply)."""

    records: int
    head: Head
    last_checkpoint_seq: int | None
    covered: int
    """Bytes of the chunk up to and including its last verified checkpoint (0 if none)."""
    state: TrustState
    violations: tuple[Violation, ...]


def verify_chunk(
    data: bytes,
    state: TrustState,
    start: Head,
    anchor: Head | None,
    record_bytes: int = RECORD_BYTES,
) -> ChunkResult:
    """Verify whole lines continuing the chain after ``start`` (runs in worker processes).
    A line longer than ``record_bytes`` is malformed; the lines before it are verified.

    A chunk whose lines all link and verify is decided on its bytes without being split
    into lines (:func:`~hsmctl.auditlog.blockscan.verify_buffer`, with the compiled
    scan); any other is split and verified as before, which gives the same verdict."""
    if anchor is None:
        fast = blockscan.verify_buffer(
            data,
            state.trusted,
            device=state.device,
            start=start,
            retired_keys=state.retired,
            record_bytes=record_bytes,
        )
        if fast is not None:
            report, covered = fast
            return ChunkResult(
                records=report.records,
                head=report.head,
                last_checkpoint_seq=report.last_checkpoint_seq,
                covered=covered,
                state=TrustState(report.trusted_keys, report.retired_keys, report.device),
                violations=report.violations,
            )
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    too_long: Violation | None = None
    if lines and max(map(len, lines)) > record_bytes:  # one C pass over the lengths
        at = next(i for i, line in enumerate(lines) if len(line) > record_bytes)
        too_long = Violation(
            ViolationKind.MALFORMED,
            start.seq + at + 1,
            f"malformed: a line of {len(lines[at])} bytes, longer than a record may be "
            f"({record_bytes})",
            at + 1,
        )
        lines = lines[:at]
    if anchor is None:
        report = verify_block(
            lines, state.trusted, device=state.device, start=start, retired_keys=state.retired
        )
    else:  # resuming: the archived head must be re-proven, record by record
        report = verify_lines(
            lines,
            state.trusted,
            device=state.device,
            start=start,
            expect_at_least=anchor,
            retired_keys=state.retired,
        )
    violations = report.violations
    if too_long is not None and all(v.kind is ViolationKind.TRUNCATED for v in violations):
        # The lines before it verified (a truncation is only the cut: the long line
        # stood where the known record should be).
        violations = (too_long,)
    covered = 0
    if report.last_checkpoint_seq is not None and not violations:
        through = report.last_checkpoint_seq - start.seq
        # The bytes up to the end of line ``through``, counted from the short side.
        total = len(data) if data.endswith(b"\n") else len(data) + 1
        covered = total - sum(len(line) + 1 for line in lines[through:])
    return ChunkResult(
        records=report.records,
        head=report.head,
        last_checkpoint_seq=report.last_checkpoint_seq,
        covered=covered,
        state=TrustState(report.trusted_keys, report.retired_keys, report.device),
        violations=violations,
    )


def default_workers() -> int:
    """Worker processes a collection uses unless told: none when the compiled byte scan
    (``hsmctl.auditlog._scan``) is there — a 4 MiB chunk then verifies in ~8 ms in the
    collecting thread (without the GIL for most of it), less than handing it to a process
    costs, and the bench measured the in-thread collection faster and cheaper (4.6 s and
    2.7 CPU-s against 5.7 s and 4.1 CPU-s for a million records, 2026-12-07) — else one
    per CPU (the Python scan costs ~2.5 µs a record)."""
    return 0 if blockscan.SCAN is not None else os.cpu_count() or 1


def _up() -> bool:
    """A worker's first task: it has started and imported this module."""
    return True


class VerifyPool:
    """Worker processes for :func:`verify_chunk`, started on first use and shared by the
    threads of one command. ``spawn``: workers inherit no threads, sockets or locks (an
    inherited archive lock would outlive a killed collector).

    A spawned worker takes a while to start (a fresh interpreter importing the verifier:
    ~0.3 s on an idle machine, seconds under load). :meth:`start` begins it and
    :attr:`ready` says when every worker has answered; until then a
    :class:`ChunkedVerifier` verifies in its own thread rather than wait."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._starting: list[Future[bool]] = []

    def _ensure(self) -> ProcessPoolExecutor:
        # Hold the lock.
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn")
            )
            # One task per worker: the executor starts a worker per task waiting for one.
            self._starting = [self._executor.submit(_up) for _ in range(self.workers)]
        return self._executor

    def start(self, *, wait: bool = False) -> None:
        """Start the workers now (idempotent); :attr:`ready` turns true when they are up
        (with ``wait``: return then)."""
        with self._lock:
            self._ensure()
            starting = list(self._starting)
        if wait:
            futures_wait(starting)

    @property
    def ready(self) -> bool:
        """The workers are up (or failed to start: then a chunk sent to them fails and is
        verified again in order, as after any worker failure)."""
        with self._lock:
            return self._executor is not None and all(f.done() for f in self._starting)

    def submit(
        self, data: bytes, state: TrustState, start: Head, record_bytes: int = RECORD_BYTES
    ) -> Future[ChunkResult]:
        with self._lock:
            return self._ensure().submit(verify_chunk, data, state, start, None, record_bytes)

    @property
    def in_flight(self) -> int:
        return 2 * self.workers

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None
                self._starting = []


class Halted(IntegrityError):
    """Raised from :meth:`ChunkedVerifier.feed` at the first violation to stop the stream."""


@dataclass
class Stats:
    inline: int = 0
    """Chunks verified in the calling thread."""
    pooled: int = 0
    """Chunks verified by a worker and accepted."""
    redone: int = 0
    """Chunks verified again in order (a speculation that did not hold, a lost worker)."""


@dataclass
class Summary:
    records: int
    head: Head
    last_checkpoint_seq: int | None
    state: TrustState
    violations: tuple[Violation, ...] = field(default=())
    stats: Stats = field(default_factory=Stats)


@dataclass
class _Pending:
    data: bytes
    future: Future[ChunkResult]
    state: TrustState
    start: Head


class ChunkedVerifier:
    """Verify a byte stream of log lines; hand verified chunks, in order, to
    ``on_verified(data, result)``."""

    def __init__(
        self,
        state: TrustState,
        start: Head,
        *,
        anchor: Head | None = None,
        on_verified: Callable[[bytes, ChunkResult], None] | None = None,
        pool: VerifyPool | None = None,
        chunk_bytes: int | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self._limits = limits
        self._unsigned_records = self._unsigned_bytes = 0  # after the last signed record
        self._state, self._head = state, start  # after the last accepted chunk
        self._spec_state, self._spec_head = state, start  # after the last dispatched chunk
        self._anchor = anchor
        self._on_verified = on_verified
        self._pool = pool
        self._chunk_bytes = chunk_bytes or (CHUNK_BYTES if pool is not None else INLINE_CHUNK_BYTES)
        self._pieces: list[bytes | memoryview] = []  # received, not yet a whole chunk
        self._held = 0  # their length
        self._inflight: deque[_Pending] = deque()
        self._dispatched = 0
        self._records = 0
        self._last_checkpoint: int | None = None
        self._violations: tuple[Violation, ...] = ()
        self.stats = Stats()

    @property
    def halted(self) -> bool:
        return bool(self._violations)

    def feed(self, data: bytes) -> None:
        if self._violations:
            raise Halted("verification already failed")
        # Cut chunks from ``data`` where it lies and hold only the unfinished rest, as
        # pieces: views of the reads (immutable bytes; anything else is copied first), so
        # a chunk's join is the one copy of a byte here. A view keeps its read alive until
        # the chunk is whole: one read (at most the channel window) beyond the chunk.
        if type(data) is not bytes:
            data = bytes(data)
        size, pos = self._chunk_bytes, 0
        view = memoryview(data)
        while self._held + len(data) - pos >= size:
            cut = data.rfind(b"\n", pos, pos + size - self._held) + 1
            if cut == 0:  # the chunk's last line end is in what is held, if anywhere
                held = b"".join(self._pieces)
                end = held.rfind(b"\n") + 1
                if end == 0:
                    while self._inflight:  # an earlier violation comes first
                        self._accept_pending(self._inflight.popleft())
                    self._fail(
                        Violation(
                            ViolationKind.MALFORMED,
                            self._spec_head.seq + 1,
                            f"malformed: a line longer than {size} bytes",
                            self._records + 1,
                        )
                    )
                self._pieces, self._held = [held[end:]], len(held) - end
                self._dispatch(held[:end])
                continue
            self._pieces.append(view[pos:cut])
            chunk = b"".join(self._pieces)
            self._pieces, self._held, pos = [], 0, cut
            self._dispatch(chunk)
        if pos < len(data):
            self._pieces.append(view[pos:] if pos else data)
            self._held += len(data) - pos
        while self._inflight and self._inflight[0].future.done():
            self._accept_pending(self._inflight.popleft())

    def finish(self, *, complete: bool = True) -> Summary:
        """End of the stream. ``complete``: the sender finished normally (a trailing line
        without newline is then checked too); otherwise the whole lines received are
        judged but not stored (a violation among them outranks the cut, and the head
        says how far the device got), and nothing is reported about the cut-off rest —
        not even that it ends before the archived head."""
        try:
            if not self._violations:
                rest = b"".join(self._pieces)
                self._pieces, self._held = [], 0
                whole = rest.rfind(b"\n") + 1
                if complete and (rest or not self._dispatched):
                    if whole or not rest:
                        self._dispatch(rest[:whole])
                    if whole < len(rest):
                        # A last line without its newline: judged, never stored (the
                        # device ends every line; this one may be cut short).
                        self._dispatch(rest[whole:], store=False)
                elif not complete and whole:
                    self._dispatch(rest[:whole], store=False, cut=True)
                while self._inflight:
                    self._accept_pending(self._inflight.popleft())
        except Halted:
            pass
        finally:
            for p in self._inflight:
                p.future.cancel()
            self._inflight.clear()
        return Summary(
            records=self._records,
            head=self._head,
            last_checkpoint_seq=self._last_checkpoint,
            state=self._state,
            violations=self._violations,
            stats=self.stats,
        )

    # -- internals ------------------------------------------------------------------------

    def _dispatch(self, chunk: bytes, *, store: bool = True, cut: bool = False) -> None:
        first = not self._dispatched
        self._dispatched += 1
        pool = self._pool
        if pool is not None and not first and store:
            pool.start()  # a second chunk: a large export, worth the workers
        future: Future[ChunkResult] | None = None
        state, start = self._spec_state, self._spec_head
        if (
            pool is not None
            and not first
            and state.device is not None
            and store
            and pool.ready  # while the workers start: verify here, not wait for them
        ):
            try:
                future = pool.submit(chunk, state, start, self._limits.record_bytes)
            except (BrokenExecutor, RuntimeError):  # a broken or closed pool: verify here
                future = None
        if pool is None or future is None:
            while self._inflight:  # keep the order: everything before goes first
                self._accept_pending(self._inflight.popleft())
            anchor = self._anchor if first else None
            self.stats.inline += 1
            result = verify_chunk(chunk, self._state, self._head, anchor, self._limits.record_bytes)
            if cut:  # a stream cut short may end anywhere, before the archived head too
                kept = tuple(v for v in result.violations if v.kind is not ViolationKind.TRUNCATED)
                result = replace(result, violations=kept)
            self._accept(chunk, result, store=store)
            self._spec_state, self._spec_head = self._state, self._head
            return
        self._inflight.append(_Pending(chunk, future, state, start))
        self._spec_state, self._spec_head = _speculate(chunk, state, start)
        while len(self._inflight) > pool.in_flight:
            self._accept_pending(self._inflight.popleft())

    def _accept_pending(self, p: _Pending) -> None:
        result: ChunkResult | None = None
        if p.state == self._state and p.start == self._head:
            try:
                result = p.future.result()
                self.stats.pooled += 1
            except Exception:
                result = None
        if result is None:  # the speculation was wrong (or the worker failed): redo
            self.stats.redone += 1
            result = verify_chunk(p.data, self._state, self._head, None, self._limits.record_bytes)
        self._accept(p.data, result)

    def _accept(self, chunk: bytes, result: ChunkResult, *, store: bool = True) -> None:
        # Every line before this chunk was a verified record: line numbers follow.
        offset = self._records
        self._records += result.records
        if result.violations:
            self._head = result.head  # verified up to the violation, but never stored
            self._fail(
                *(
                    replace(v, line=None if v.line is None else v.line + offset)
                    for v in result.violations
                )
            )
        if result.last_checkpoint_seq is not None:
            self._last_checkpoint = result.last_checkpoint_seq
            self._unsigned_records = result.head.seq - result.last_checkpoint_seq
            self._unsigned_bytes = len(chunk) - result.covered
        else:
            self._unsigned_records += result.records
            self._unsigned_bytes += len(chunk)
        self._check_unsigned(result.head, offset + result.records)
        self._state, self._head = result.state, result.head
        if self._on_verified is not None and chunk and store:
            self._on_verified(chunk, result)

    def _check_unsigned(self, head: Head, line: int) -> None:
        """Stop before storing more than :class:`Limits` allows without a signature."""
        records, size = self._unsigned_records, self._unsigned_bytes
        most_records, most_bytes = self._limits.unsigned_records, self._limits.unsigned_bytes
        if (most_records is None or records <= most_records) and (
            most_bytes is None or size <= most_bytes
        ):
            return
        self._head = head
        first = head.seq - records + 1
        self._fail(
            Violation(
                ViolationKind.UNSIGNED_TAIL,
                first,
                f"records {first}..{head.seq} ({size} bytes) arrived without a checkpoint, "
                f"more than a device sends unsigned (limits: {most_records} records, "
                f"{most_bytes} bytes); none of them was kept",
                line - records + 1,
            )
        )

    def _fail(self, *violations: Violation) -> None:
        self._violations = violations
        text = "; ".join(str(v) for v in violations)
        raise Halted(f"activity log verification failed: {text}")


def _speculate(chunk: bytes, state: TrustState, start: Head) -> tuple[TrustState, Head]:
    """The state after ``chunk`` if everything in it is what it claims to be."""
    if not chunk:
        return state, start
    end = len(chunk) - 1 if chunk.endswith(b"\n") else len(chunk)
    last = chunk[chunk.rfind(b"\n", 0, end) + 1 : end]
    head = start
    try:
        record = parse(last)  # strict and bounded: a hostile line is a ValueError
        if type(record["seq"]) is int and type(record["hash"]) is str:
            head = Head(record["seq"], record["hash"])
    except (ValueError, KeyError, TypeError):
        pass
    if ROTATION_MARK not in chunk:
        return state, head
    trusted, retired = dict(state.trusted), set(state.retired)
    pos = chunk.find(ROTATION_MARK)
    while pos >= 0:
        lo = chunk.rfind(b"\n", 0, pos) + 1
        hi = chunk.find(b"\n", pos)
        hi = len(chunk) if hi < 0 else hi
        try:
            record = parse(chunk[lo:hi])
            if record.get("event") == "key-rotation":
                d = record["detail"]
                trusted.pop(d["old_key_id"], None)
                retired.add(d["old_key_id"])
                trusted[d["new_key_id"]] = d["new_public_key"]
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        pos = chunk.find(ROTATION_MARK, hi)
    return TrustState(trusted, frozenset(retired), state.device), head
