"""Incremental, verified collection of appliances' activity logs (SPEC §8).

One appliance, one run, as a state machine whose decisions are pure functions of the
archive's cursor and the pins (:func:`plan_resume`, :func:`trust_roots`):

1. lock the archive (busy → exit 5) and :meth:`~Archive.recover` it;
2. connect as ``audit`` to the data address, host keys pinned (mismatch → exit 3,
   unreachable → exit 4);
3. ``audit export --after HEAD-1``: the stream restarts at the archived head, so the
   device's record there must hash the same (else rollback/truncation → exit 3);
4. verify as the bytes arrive (:mod:`.pipeline`): no gap, links, hashes, checkpoint and
   key-rotation signatures against the pinned audit keys; a violation stops the transfer;
5. append verified chunks to the archive, commit through the last checkpoint (fsync,
   then the cursor). On any failure the archive goes back to its cursor: nothing
   verified earlier changes.

A device may be hostile, so one run is bounded whatever it sends: in time by
``CollectOptions.timeout`` (the whole run, connection included: the archive lock is never held
longer, so the next timer run is not locked out) and ``CollectOptions.stall_timeout`` (no
output); in memory and disk by the pipeline's :class:`~.pipeline.Limits` (a record's
length, what may arrive unsigned) and the SSH transport's own bounds. A breach names the
appliance and the record: exit 3 for a limit, 4 for time.

Many appliances run in parallel threads (bounded); verification of large logs uses a
shared pool of worker processes. A failure of one appliance never stops the others; the
command's exit code is the most severe of theirs (3, 4, 1, 5).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from hsmctl.auditlog import GENESIS_HEAD, Head, Violation
from hsmctl.collect.appliances import archive_of, taken_over
from hsmctl.collect.archive import SEGMENT_BYTES, Archive, Cursor
from hsmctl.collect.pipeline import (
    DEFAULT_LIMITS,
    ChunkedVerifier,
    ChunkResult,
    Halted,
    Limits,
    Summary,
    TrustState,
    VerifyPool,
    default_workers,
)
from hsmctl.customer.store import ApplianceDir, Pins
from hsmctl.errors import (
    ConflictError,
    HsmctlError,
    IntegrityError,
    UnreachableError,
    UsageError,
    most_severe,
)
from hsmctl.progress import NullProgress, Progress

if TYPE_CHECKING:
    from hsmctl.ssh import DeviceConnection, Timeouts

COLLECTOR_KEY = "audit-collector-key"
CREDENTIAL_PREFIX = "collector-key_"
"""systemd ``LoadCredential=collector-key:DIR`` names each file of DIR so."""


class LogIntegrityError(IntegrityError):
    """The device's log failed verification; names the appliance and the records."""

    def __init__(self, appliance: str, violations: Sequence[Violation], cursor: Cursor) -> None:
        first = violations[0]
        text = "; ".join(str(v) for v in violations)
        super().__init__(
            f"{appliance}: activity log verification failed at record {first.seq}: {text}; "
            f"nothing from this run was archived (the archive still ends at record "
            f"{cursor.seq})",
            detail={
                "appliance": appliance,
                "violations": [v.as_dict() for v in violations],
                "archive_head": cursor.seq,
            },
        )
        self.violations = tuple(violations)


@dataclass(frozen=True)
class CollectOptions:
    """How one ``logs collect`` run goes: its bounds, its parallelism, where the keys are."""

    lock_wait: float = 0.0
    """Seconds to wait for a busy archive before exit 5."""
    timeout: float = 3600.0
    """Limit on one appliance's run, connection and export (a large first collection can
    take minutes)."""
    stall_timeout: float = 120.0
    """An export that sends nothing for this long has stalled (exit 4). The device streams
    its log file as fast as we read it: a pause of seconds is already unusual."""
    record_bytes: int = DEFAULT_LIMITS.record_bytes
    unsigned_records: int | None = DEFAULT_LIMITS.unsigned_records
    unsigned_bytes: int | None = DEFAULT_LIMITS.unsigned_bytes
    """What an export may hold: see :class:`~.pipeline.Limits`."""
    connect_timeout: float = 10.0
    parallel: int = 4
    workers: int = field(default_factory=default_workers)
    """Verification processes for large logs; 0 verifies in the collecting thread (the
    default when the compiled byte scan is built, else one per CPU)."""
    key_dir: Path | None = None
    """Collector keys as files (``collector-key_ID`` or ``ID``), e.g. systemd credentials."""
    segment_bytes: int = SEGMENT_BYTES


@dataclass(frozen=True)
class Target:
    """Everything needed to collect one appliance, read from the customer's state."""

    appliance: str
    state: ApplianceDir
    data_ip: str
    host_keys: tuple[str, ...]
    audit_keys: Mapping[str, str]
    retired: frozenset[str]
    key: Path
    port: int = 22
    base: Head | None = None
    """Where the log starts if the device deleted its oldest records before this
    tenancy (``pins.log_base``, proved by the takeover); None: record 1."""
    base_keys: Mapping[str, str] = field(default_factory=dict)
    base_retired: frozenset[str] = frozenset()
    """The keys trusted and retired at ``base``: for an archive that starts there (one
    from record 1, e.g. the same tenant's before a re-provisioning, keeps the pins')."""


@dataclass
class ApplianceReport:
    """What collecting one appliance did (a row of the command's JSON), or its error."""

    appliance: str
    new_records: int = 0
    last_seq: int = 0
    verified: bool = False
    error: HsmctlError | None = None
    acked_seq: int | None = None
    """The device was told it may delete records before this one (``audit ack``)."""
    ack_error: str | None = None
    """Why the ack failed; the collection itself stands (the next run acks again)."""

    @property
    def exit_code(self) -> int:
        return self.error.exit_code if self.error else 0

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "appliance": self.appliance,
            "new_records": self.new_records,
            "last_seq": self.last_seq,
            "verified": self.verified,
        }
        if self.acked_seq is not None:
            d["acked_seq"] = self.acked_seq
        if self.ack_error is not None:
            d["ack_error"] = self.ack_error
        if self.error is not None:
            d["error"] = {
                "exit_code": self.error.exit_code,
                "message": str(self.error),
                **{k: v for k, v in self.error.detail.items() if k != "appliance"},
            }
        return d


@dataclass
class Report:
    """The whole run: one :class:`ApplianceReport` per appliance, the most severe exit."""

    appliances: list[ApplianceReport]

    @property
    def exit_code(self) -> int:
        return most_severe(o.exit_code for o in self.appliances)

    def as_dict(self) -> dict[str, Any]:
        return {"appliances": [o.as_dict() for o in self.appliances]}


# -- pure decisions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Resume:
    after: int
    """``audit export --after`` this."""
    start: Head
    anchor: Head | None
    """The archived head the device must still hold (None: empty archive)."""
    skip: int
    """Leading records of the stream that are already archived."""


def plan_resume(cursor: Cursor) -> Resume:
    """Export from the record before the head so the device must show the head again."""
    if cursor.seq == 0:
        return Resume(0, GENESIS_HEAD, None, 0)
    if not cursor.segments and cursor.base is not None and cursor.seq == cursor.base.seq:
        # Nothing archived yet and the device's log starts after a proved base.
        return Resume(cursor.seq, cursor.base, None, 0)
    return Resume(cursor.seq - 1, Head(cursor.seq - 1, cursor.prev), cursor.head, 1)


def trust_roots(
    audit_keys: Mapping[str, str], retired: Iterable[str], cursor: Cursor
) -> TrustState:
    """The pinned keys (bundle, takeover) plus what the archived chain has trusted since;
    a key the chain retired stays retired whatever is pinned."""
    gone = frozenset(cursor.retired_keys) | frozenset(retired)
    trusted = {**audit_keys, **cursor.trusted_keys}
    return TrustState({k: v for k, v in trusted.items() if k not in gone}, gone, cursor.device)


# -- reading the customer's state ---------------------------------------------------------------


def load_target(state: Path, appliance: str, key_dir: Path | None) -> Target:
    st = taken_over(state, appliance)
    pins = st.load_pins()
    if not (pins.data_ip and pins.data_host_keys and pins.audit_keys):
        raise UsageError(f"{appliance}: pins.json lacks the data address, host keys or audit keys")
    base_keys, base_retired, base = based_trust(appliance, pins)
    return Target(
        appliance=appliance,
        state=st,
        data_ip=pins.data_ip,
        host_keys=tuple(pins.data_host_keys),
        audit_keys=dict(pins.audit_keys),
        retired=frozenset(pins.retired),
        key=collector_key(st, key_dir),
        port=int(pins.data_port or 22),
        base=base,
        base_keys=base_keys,
        base_retired=base_retired,
    )


def based_trust(appliance: str, pins: Pins) -> tuple[dict[str, str], frozenset[str], Head | None]:
    """The pinned audit keys and retired ones, and the log's base: with ``pins.log_base``
    the deleted segments' key rotations carry trust from the initial key to the base
    again (re-checked here, offline), and the keys they retired stay retired."""
    keys, retired = dict(pins.audit_keys), frozenset(pins.retired)
    if not pins.log_base:
        return keys, retired, None
    from hsmctl.auditlog.anchor import AnchorError, LogBase, carry_trust

    try:
        base = LogBase.from_dict(pins.log_base)
        initial = pins.initial_audit_key_id
        start = {initial: keys[initial]} if initial in keys else keys
        trusted, gone = carry_trust(
            start, base.key_rotations, device=appliance, base_seq=base.seq, retired_keys=retired
        )
    except AnchorError as exc:
        raise IntegrityError(f"{appliance}: pins.json log_base: {exc}") from exc
    gone = gone | retired
    merged = {k: v for k, v in {**keys, **trusted}.items() if k not in gone}
    return merged, gone, base.head


def target_trust(target: Target, cursor: Cursor) -> TrustState:
    """:func:`trust_roots` of the pins, or of the keys at the base for an archive that
    starts there."""
    if cursor.base is not None:
        return trust_roots(target.base_keys, target.base_retired, cursor)
    return trust_roots(target.audit_keys, target.retired, cursor)


def start_cursor(cursor: Cursor, base: Head | None) -> Cursor:
    """An empty archive of a log that starts after ``base`` begins there (in memory:
    written only with the first records)."""
    if base is None or cursor.seq or cursor.segments:
        return cursor
    return replace(cursor, seq=base.seq, hash=base.hash, prev="", base=base)


def is_credential(path: Path) -> bool:
    """A file systemd put in this service's own credentials directory. Its mode is not
    the administrator's: systemd grants the service user read access with an ACL where it
    can, and then the mode shows the ACL mask as group bits (0440). Only that user (and
    root) can enter the directory, so the file is private however its mode reads."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not creds:
        return False
    return path.parent.resolve() == Path(creds).resolve()


def collector_key(st: ApplianceDir, key_dir: Path | None) -> Path:
    """The ``audit`` account's private key: from ``key_dir`` if it has one for this
    appliance, else the escrow. Like every secret file, refused if group/other can read."""
    candidates = []
    if key_dir is not None:
        candidates += [key_dir / f"{CREDENTIAL_PREFIX}{st.appliance}", key_dir / st.appliance]
    candidates.append(st.dir / "secrets" / COLLECTOR_KEY)
    for path in candidates:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            continue
        if mode & (stat.S_IRWXG | stat.S_IRWXO) and not is_credential(path):
            raise UsageError(
                f"{st.appliance}: collector key {path} is accessible by group or others "
                f"({stat.S_IMODE(mode):04o}); chmod 600"
            )
        return path
    raise UsageError(
        f"{st.appliance}: no collector key (looked for {', '.join(map(str, candidates))}); "
        "the takeover escrows one"
    )


# -- the run ------------------------------------------------------------------------------------


class Collector:
    """Collect a set of appliances. Lifecycle: create → :meth:`run` (once) → report."""

    def __init__(
        self, state: Path, options: CollectOptions | None = None, progress: Progress | None = None
    ) -> None:
        self.state = state
        self.options = options or CollectOptions()
        self.progress = progress or NullProgress()

    def run(self, appliances: Iterable[str]) -> Report:
        ids = list(dict.fromkeys(appliances))
        pool = VerifyPool(self.options.workers) if self.options.workers > 0 else None
        try:
            with ThreadPoolExecutor(max(1, min(self.options.parallel, len(ids) or 1))) as ex:
                outcomes = list(ex.map(lambda a: self._one(a, pool), ids))
        finally:
            if pool is not None:
                pool.close()
        return Report(outcomes)

    def _one(self, appliance: str, pool: VerifyPool | None) -> ApplianceReport:
        try:
            target = load_target(self.state, appliance, self.options.key_dir)
            outcome = collect(target, self.options, pool)
        except HsmctlError as exc:
            text = str(exc)
            self.progress.step(text if text.startswith(f"{appliance}:") else f"{appliance}: {text}")
            return ApplianceReport(appliance, error=exc)
        except Exception as exc:
            err = HsmctlError(f"{appliance}: unexpected {type(exc).__name__}: {exc}")
            self.progress.step(str(err))
            return ApplianceReport(appliance, error=err)
        ack = f"; ack failed: {outcome.ack_error}" if outcome.ack_error else ""
        self.progress.step(
            f"{appliance}: {outcome.new_records} new records, verified through "
            f"{outcome.last_seq}{ack}"
        )
        return outcome


def export_command(after: int) -> str:
    """The device command (SPEC §3): JSON lines of the records after ``after``, ending
    with a fresh checkpoint. Its output needs no parser: it is the log itself."""
    if after < 0:
        raise ValueError("after must be >= 0")
    return f"audit export --after {after}"


def ack_command(seq: int) -> str:
    """The device command that lets it delete log segments before ``seq`` (issue 15)."""
    if seq < 1:
        raise ValueError("seq must be >= 1")
    return f"audit ack {seq}"


def acknowledge(
    conn: DeviceConnection | None, seq: int, left: float
) -> tuple[int | None, str | None]:
    """Send ``audit ack SEQ`` on the export's connection, once the records through ``seq``
    are fsynced and the cursor is moved: (acked seq, None), or (None, why not). Never
    raises: a failed ack costs the device disk space, not the verified collection."""
    if conn is None or not conn.connected:
        return None, "the export's connection is gone"
    if left <= 0:
        return None, "no time left for the ack"
    try:
        result = conn.run(ack_command(seq), check=False, timeout=left)
    except HsmctlError as exc:
        return None, exc.message
    if not result.ok:
        text = (result.stderr or result.stdout).strip().splitlines()
        return None, f"device exit {result.status}: {text[-1] if text else 'no message'}"
    return seq, None


Stream = Callable[[int, BinaryIO], None]
"""``stream(after, sink)``: write the device's ``audit export --after`` output into
``sink``; raise HsmctlError if the transfer fails. The transport boundary: SSH in
:func:`collect`, bytes in tests."""


def collect(
    target: Target, options: CollectOptions, pool: VerifyPool | None = None
) -> ApplianceReport:
    """Collect one appliance over SSH (steps 1-5 of the module docstring)."""
    from hsmctl.ssh import DeviceConnection, PinnedHostKeys, Timeouts

    deadline = 0.0  # set once the lock is held: the lock is held no longer than the run
    conns: list[DeviceConnection] = []  # the export's, kept open for the ack

    def export(after: int, sink: BinaryIO) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise UnreachableError(f"{target.data_ip}: no time left ({options.timeout:g} s)")
        conn = DeviceConnection(
            target.data_ip,
            port=target.port,
            username="audit",
            pinned=PinnedHostKeys.of(*target.host_keys),
            key=target.key,
            timeouts=_within(
                Timeouts(connect=options.connect_timeout, idle=options.stall_timeout), left
            ),
        )
        conns.append(conn)
        conn.connect()
        left = deadline - time.monotonic()
        if left <= 0:
            raise UnreachableError(f"{conn.label}: timed out after {options.timeout:g} s")
        conn.run_stream(export_command(after), sink, timeout=left)

    archive = archive_of(target.state, segment_bytes=options.segment_bytes)
    try:
        with archive.lock(exclusive=True, wait=options.lock_wait):
            deadline = time.monotonic() + options.timeout
            before = start_cursor(archive.recover(), target.base)
            after = ingest(
                archive,
                before,
                target_trust(target, before),
                export,
                pool,
                limits=Limits(
                    options.record_bytes, options.unsigned_records, options.unsigned_bytes
                ),
            )
        report = ApplianceReport(target.appliance, after.seq - before.seq, after.seq, True)
        if after.seq > before.seq:  # fsynced, cursor moved: the device may let go of them
            left = deadline - time.monotonic()
            report.acked_seq, report.ack_error = acknowledge(
                conns[-1] if conns else None, after.seq, left
            )
        return report
    finally:
        for conn in conns:
            conn.close()


def _within(timeouts: Timeouts, left: float) -> Timeouts:
    """``timeouts`` with every phase ending within ``left`` seconds from now, so the whole
    run keeps one deadline."""
    return replace(
        timeouts,
        connect=min(timeouts.connect, left),
        banner=min(timeouts.banner, left),
        auth=min(timeouts.auth, left),
        channel=min(timeouts.channel, left),
        command=left,
    )


def ingest(
    archive: Archive,
    cursor: Cursor,
    trust: TrustState,
    stream: Stream,
    pool: VerifyPool | None = None,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> Cursor:
    """Pull, verify and archive what follows ``cursor`` (hold the exclusive lock). Returns
    the new cursor; on any failure the archive is left exactly at ``cursor``, and the
    error names the appliance and the last record received."""
    resume = plan_resume(cursor)
    appender = archive.begin(cursor)
    try:
        skip = resume.skip

        def store(chunk: bytes, result: ChunkResult) -> None:
            nonlocal skip
            covered, records = result.covered, result.records
            while skip and chunk:
                cut = chunk.index(b"\n") + 1
                chunk, covered, skip = chunk[cut:], max(0, covered - cut), skip - 1
                records -= 1
            appender.append(chunk, covered, records)

        verifier = ChunkedVerifier(
            trust, resume.start, anchor=resume.anchor, on_verified=store, pool=pool, limits=limits
        )
        failure: HsmctlError | None = None
        try:
            stream(resume.after, cast(BinaryIO, _Sink(verifier)))
        except Halted:
            pass
        except HsmctlError as exc:
            failure = exc
        summary = verifier.finish(complete=failure is None)
        if summary.violations:  # evidence of tampering outranks a dropped link
            raise LogIntegrityError(archive.appliance, summary.violations, cursor)
        if failure is not None:
            raise _stopped(archive.appliance, failure, summary, cursor) from failure
        return appender.commit(
            trusted_keys=summary.state.trusted,
            retired_keys=tuple(summary.state.retired),
            device=summary.state.device,
        )
    except BaseException:
        appender.abort()
        raise


_SAME_CODE: Mapping[int, type[HsmctlError]] = {
    2: UsageError,
    3: IntegrityError,
    4: UnreachableError,
    5: ConflictError,
}


def _stopped(appliance: str, error: HsmctlError, summary: Summary, cursor: Cursor) -> HsmctlError:
    """The transport's failure said about the appliance (the transport knows only its
    address) and the record the export stopped after; same exit code."""
    got = (
        f"the export stopped after record {summary.head.seq}"
        if summary.records
        else "no record arrived"
    )
    tail = getattr(error, "output_tail", "")  # a device command's stderr goes last
    wrapped = _SAME_CODE.get(error.exit_code, HsmctlError)(
        f"{appliance}: {error.message}; {got}; nothing from this run was archived (the "
        f"archive still ends at record {cursor.seq})" + (f"\n{tail}" if tail else ""),
        detail={
            **error.detail,
            "appliance": appliance,
            "last_seq_received": summary.head.seq if summary.records else None,
            "archive_head": cursor.seq,
        },
    )
    wrapped.exit_code = error.exit_code
    return wrapped


class _Sink:
    """The binary sink ``run_stream`` writes the export into."""

    def __init__(self, verifier: ChunkedVerifier) -> None:
        self.verifier = verifier

    def write(self, data: bytes) -> int:
        self.verifier.feed(data)
        return len(data)


# -- offline verification of a whole archive ----------------------------------------------------
