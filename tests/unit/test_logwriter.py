"""The device's activity-log writer (:mod:`hsmctl.appliance.logwriter`) on a temp file:
recovery of the head, the seq -> offset index, rollback of a partial write, failing
closed when the file changes behind its back; segments, acks, deletion and the limit."""

from __future__ import annotations

import errno
import json
import os
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hsmctl import auditlog
from hsmctl.appliance import logwriter
from hsmctl.appliance.logwriter import ActivityLog, LogUnavailable

pytestmark = pytest.mark.unit

DEVICE = "hsm-test"


@pytest.fixture(scope="module")
def signer() -> auditlog.SoftwareSigner:
    return auditlog.SoftwareSigner.generate()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "log" / "audit.jsonl"


@pytest.fixture
def log(path: Path) -> Iterator[ActivityLog]:
    log = ActivityLog(path)
    yield log
    log.close()


def append(log: ActivityLog, n: int = 1, event: str = "command") -> list[dict[str, Any]]:
    return [
        log.append(
            actor="admin",
            role="admin",
            source="198.19.0.4",
            event=event,
            outcome="ok",
            detail={"command": "hsm show", "i": i},
        )
        for i in range(n)
    ]


def checkpoint(log: ActivityLog, signer: auditlog.SoftwareSigner) -> dict[str, Any]:
    return log.append_record(
        lambda prev, now: auditlog.make_checkpoint(prev, signer, device=DEVICE, time=now)
    )


def verify(path: Path, signer: auditlog.SoftwareSigner) -> auditlog.VerifyReport:
    report = auditlog.verify_file(path, {signer.key_id: signer.public_key_pem}, device=DEVICE)
    assert report.ok, [str(v) for v in report.violations]
    return report


def offsets_of(path: Path) -> list[int]:
    """Byte offset of every record, computed independently of the writer."""
    out, at = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        out.append(at)
        at += len(line)
    return out


# --- head recovery -----------------------------------------------------------------------


def test_a_new_log_starts_the_chain(log: ActivityLog, path: Path) -> None:
    assert log.head is None and log.size == 0
    (first,) = append(log)
    assert first["seq"] == 1 and first["prev"] == auditlog.GENESIS
    assert log.head == auditlog.Head(1, first["hash"])
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_reopen_recovers_the_head_and_continues(
    path: Path, signer: auditlog.SoftwareSigner
) -> None:
    log = ActivityLog(path)
    written = append(log, 5)
    checkpoint(log, signer)
    head, size = log.head, log.size
    log.close()

    again = ActivityLog(path)
    try:
        assert again.head == head and again.size == size == path.stat().st_size
        (nxt,) = append(again)
        assert nxt["seq"] == 7 and nxt["prev"] == head.hash  # type: ignore[union-attr]
        checkpoint(again, signer)
    finally:
        again.close()
    report = verify(path, signer)
    assert report.records == 8 and report.last_checkpoint_seq == 8
    assert json.loads(path.read_bytes().splitlines()[0]) == written[0]


# --- the seq -> offset index -------------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 3, 4, logwriter.INDEX_STRIDE])
def test_offset_after_and_tail_match_the_file(
    path: Path, monkeypatch: pytest.MonkeyPatch, stride: int
) -> None:
    monkeypatch.setattr(logwriter, "INDEX_STRIDE", stride)
    n = 17
    log = ActivityLog(path)
    append(log, n)
    expected = offsets_of(path)
    lines = path.read_bytes().splitlines()
    # The index built while appending, and the one rebuilt by a reopen, agree with the file.
    for current in (log, ActivityLog(path)):
        try:
            assert current.offsets == expected[::stride]
            for after in range(-2, n + 3):
                want = expected[after] if 0 <= after < n else (0 if after < 0 else current.size)
                assert current.offset_after(after) == want, after
            assert current.tail(0) == []
            assert current.tail(3) == lines[-3:]
            assert current.tail(n + 5) == lines
        finally:
            current.close()


# --- partial writes: the chain on disk stays whole ---------------------------------------


def failing_write(
    log: ActivityLog, monkeypatch: pytest.MonkeyPatch, keep: Callable[[int], int]
) -> None:
    """The next write to the log puts ``keep(len)`` bytes on disk, then reports ENOSPC
    (a short write when some bytes went through), like a filesystem running full."""
    real = os.write

    def write(fd: int, data: bytes) -> int:
        if fd != log.fd:
            return real(fd, data)
        monkeypatch.setattr(os, "write", real)
        n = keep(len(data))
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data[:n])

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("keep", [lambda n: 0, lambda n: n // 2, lambda n: n - 1])
def test_a_failed_write_leaves_no_partial_record(
    log: ActivityLog,
    path: Path,
    monkeypatch: pytest.MonkeyPatch,
    signer: auditlog.SoftwareSigner,
    keep: Callable[[int], int],
) -> None:
    append(log, 3)
    before, head = path.read_bytes(), log.head
    failing_write(log, monkeypatch, keep)
    with pytest.raises(LogUnavailable, match="cannot write"):
        append(log)
    assert path.read_bytes() == before and log.head == head and log.size == len(before)
    # Once there is room again the chain goes on with no gap and no half record.
    (nxt,) = append(log)
    assert nxt["seq"] == 4 and nxt["prev"] == head.hash  # type: ignore[union-attr]
    checkpoint(log, signer)
    assert verify(path, signer).records == 5


def test_a_failed_fsync_takes_the_record_back(
    log: ActivityLog, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    append(log, 2)
    before = path.read_bytes()
    real = os.fsync

    def fsync(fd: int) -> None:
        monkeypatch.setattr(os, "fsync", real)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(LogUnavailable):
        append(log)
    assert path.read_bytes() == before
    assert append(log)[0]["seq"] == 3


# --- the file changed behind the writer's back: fail closed ------------------------------


def test_a_moved_copy_that_ends_at_the_head_is_followed(
    log: ActivityLog, path: Path, signer: auditlog.SoftwareSigner
) -> None:
    # What an operator does to move the log to another filesystem (and the lab's
    # full-disk test does with a bind mount).
    append(log, 3)
    copy = path.with_name("copy.jsonl")
    copy.write_bytes(path.read_bytes())
    os.replace(copy, path)
    append(log, 2)
    checkpoint(log, signer)
    assert verify(path, signer).records == 6


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(
            lambda p: p.write_bytes(b"".join(p.read_bytes().splitlines(True)[:-1])), id="truncated"
        ),
        pytest.param(lambda p: p.write_bytes(b""), id="emptied"),
        pytest.param(lambda p: (p.unlink(), p.write_bytes(b"")), id="replaced-by-new"),
    ],
)
def test_a_rewritten_log_fails_closed_for_good(
    log: ActivityLog, path: Path, tamper: Callable[[Path], object]
) -> None:
    append(log, 4)
    tamper(path)
    after = path.read_bytes()
    with pytest.raises(LogUnavailable, match="changed behind"):
        append(log)
    # Sticky: the file now looks consistent to a fresh scan, but the writer never forks
    # the chain by writing on from an older head.
    for _ in range(2):
        with pytest.raises(LogUnavailable):
            append(log)
        with pytest.raises(LogUnavailable):
            log.append_record(lambda prev, now: {})
    assert path.read_bytes() == after


def test_a_foreign_append_fails_closed(log: ActivityLog, path: Path) -> None:
    append(log, 2)
    other = ActivityLog(path)  # a second writer: never allowed on the device
    append(other, 1)
    other.close()
    with pytest.raises(LogUnavailable):
        append(log)
    assert len(path.read_bytes().splitlines()) == 3


def test_a_deleted_log_fails_closed(log: ActivityLog, path: Path) -> None:
    append(log, 1)
    path.unlink()
    with pytest.raises(LogUnavailable, match="disappeared"):
        append(log)
    assert not path.exists()


# --- concurrency -------------------------------------------------------------------------


def test_concurrent_appends_never_interleave_or_fork(
    log: ActivityLog, path: Path, signer: auditlog.SoftwareSigner
) -> None:
    threads = [threading.Thread(target=append, args=(log, 25)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    checkpoint(log, signer)
    report = verify(path, signer)
    assert report.records == 8 * 25 + 1 and log.head is not None
    assert log.head.seq == report.last_seq == 201


def test_an_incomplete_last_record_is_repaired_at_start(tmp_path: Path) -> None:
    from hsmctl.appliance.logwriter import ActivityLog

    path = tmp_path / "audit.jsonl"
    log = ActivityLog(path)
    for i in range(3):
        log.append(actor="a", role="admin", source="x", event="e", outcome="ok", detail={"i": i})
    head = log.head
    log.close()
    with open(path, "ab") as fh:
        fh.write(b'{"actor":"a","detail":{"i":3')  # a write cut short by a crash
    reopened = ActivityLog(path)
    assert reopened.head == head
    assert reopened.repaired_bytes > 0
    assert path.read_bytes().endswith(b"\n")
    record = reopened.append(
        actor="a", role="admin", source="x", event="e", outcome="ok", detail={}
    )
    assert record["seq"] == 4 and record["prev"] == head.hash


# --- segments, acknowledgements and deletion (issue 15) ----------------------------------

SMALL = logwriter.RetentionConfig(segment_bytes=2048, limit_bytes=64 * 1024)


def small_log(path: Path, config: logwriter.RetentionConfig = SMALL) -> ActivityLog:
    return ActivityLog(path, config)


def whole(log: ActivityLog) -> bytes:
    """The log as the device holds it: its segments' bytes, oldest first."""
    return b"".join(seg.path.read_bytes() for seg in log.segments)


def exported(log: ActivityLog, after: int) -> bytes:
    """What ``audit export --after`` streams, read from the pieces it would send."""
    out = b""
    pieces = log.pieces(after)
    try:
        for p in pieces:
            p.file.seek(p.start)
            out += p.file.read(p.end - p.start)
    finally:
        logwriter.close_pieces(pieces)
    log.mark_exported(log.head.seq if log.head else 0)
    return out


def test_the_log_rotates_into_segments_and_the_chain_spans_them(
    path: Path, signer: auditlog.SoftwareSigner
) -> None:
    log = small_log(path)
    append(log, 40)
    checkpoint(log, signer)
    names = sorted(p.name for p in path.parent.iterdir() if p.name.endswith(".jsonl"))
    assert len(names) > 3 and names[-1] == "audit.jsonl"
    # Each closed file is named for its first record, ends whole, and none exceeds the size.
    for seg in log.segments[:-1]:
        assert seg.path.name == f"audit-{seg.first_seq:012d}.jsonl"
        assert 0 < seg.size <= SMALL.segment_bytes
        assert json.loads(seg.path.read_bytes().splitlines()[0])["seq"] == seg.first_seq
    data = whole(log)
    report = auditlog.verify_lines(data.splitlines(), {signer.key_id: signer.public_key_pem})
    assert report.ok and report.records == 41
    # Reading across files: every export position agrees with the concatenation.
    lines = data.splitlines(keepends=True)
    for after in (0, 1, 7, 20, 39, 40, 41):
        assert exported(log, after) == b"".join(lines[after:]), after
        assert log.offset_after(after) == len(b"".join(lines[:after]))
    assert log.tail(3) == [x.rstrip(b"\n") for x in lines[-3:]]
    head, segments = log.head, [(s.path, s.first_seq, s.last_seq) for s in log.segments]
    log.close()
    again = small_log(path)
    try:
        assert again.head == head
        assert [(s.path, s.first_seq, s.last_seq) for s in again.segments] == segments
        (nxt,) = append(again)
        assert nxt["seq"] == 42 and nxt["prev"] == head.hash  # type: ignore[union-attr]
    finally:
        again.close()


def test_an_ack_beyond_the_export_is_refused(path: Path) -> None:
    log = small_log(path)
    append(log, 30)
    with pytest.raises(logwriter.AckRefused, match="only up to 0"):
        log.acknowledge(1)
    exported(log, 0)
    with pytest.raises(logwriter.AckRefused):
        log.acknowledge(31)
    assert log.acknowledge(30) == 30
    assert log.acknowledge(10) == 30  # never goes back
    log.close()


def test_segments_go_only_after_the_ack_and_only_once_logged(path: Path) -> None:
    log = small_log(path)
    append(log, 60)
    closed = list(log.segments[:-1])
    assert len(closed) >= 3
    logged: list[logwriter.Segment] = []

    def note(seg: logwriter.Segment) -> None:
        assert seg.path.exists()  # logged before the file goes
        logged.append(seg)

    assert log.release(note) == [] and all(s.path.exists() for s in closed)  # no ack yet
    exported(log, 0)
    # Acking the last record of a segment keeps that segment: the next export starts there.
    target = closed[1].last_seq
    log.acknowledge(target)
    gone = log.release(note)
    assert gone == logged == [closed[0]]
    assert not closed[0].path.exists() and closed[1].path.exists()
    assert log.first_seq == closed[1].first_seq <= target
    # The export the collector runs next (--after ACKED-1) still works; before it, not.
    assert json.loads(exported(log, target - 1).splitlines()[0])["seq"] == target
    with pytest.raises(logwriter.Trimmed, match=f"on the device is {closed[1].first_seq}:"):
        log.pieces(0)
    # A logging failure stops the deletion before anything else goes.
    log.acknowledge(log.head.seq)  # type: ignore[union-attr]

    def fail(seg: logwriter.Segment) -> None:
        raise LogUnavailable("full")

    before = [s.path for s in log.segments]
    with pytest.raises(LogUnavailable):
        log.release(fail)
    assert all(p.exists() for p in before)
    assert len(log.release(note)) == len(before) - 1  # all but the active one
    log.close()


def test_acks_and_exports_survive_a_restart_but_never_past_the_head(path: Path) -> None:
    log = small_log(path)
    append(log, 30)
    exported(log, 0)
    log.acknowledge(25)
    log.close()
    again = small_log(path)
    assert (again.acked_seq, again.exported_seq) == (25, 30)
    again.close()
    # A log started over (files gone) does not inherit the release.
    for p in path.parent.glob("audit*.jsonl"):
        p.unlink()
    fresh = small_log(path)
    assert (fresh.acked_seq, fresh.exported_seq) == (0, 0)
    fresh.close()


def test_a_crash_between_the_rename_and_the_new_file_loses_nothing(
    path: Path, signer: auditlog.SoftwareSigner
) -> None:
    log = small_log(path)
    append(log, 5)
    head = log.head
    log.close()
    os.rename(path, path.with_name("audit-000000000001.jsonl"))  # the rotation's first step
    again = small_log(path)
    assert again.head == head and path.exists() and path.stat().st_size == 0
    (nxt,) = append(again)
    assert nxt["seq"] == 6
    checkpoint(again, signer)
    report = auditlog.verify_lines(
        whole(again).splitlines(), {signer.key_id: signer.public_key_pem}
    )
    assert report.ok and report.records == 7
    again.close()


def test_the_limit_fails_closed_with_a_reserve_for_what_frees_space(path: Path) -> None:
    cfg = logwriter.RetentionConfig(segment_bytes=1024, limit_bytes=8192, high_water_percent=50)
    log = small_log(path, cfg)
    warned_at = None
    while True:
        try:
            append(log)
        except LogUnavailable as exc:
            assert "full" in str(exc)
            break
        if warned_at is None and log.disk().warning:
            warned_at = log.used
    full = log.used
    assert warned_at is not None and warned_at < full * 0.6  # the warning came well before
    assert full <= cfg.limit_bytes and "full" in (log.disk().message or "")
    # What a collector needs still fits: it goes into the reserve past the limit.
    record = log.append(
        actor="audit", role="audit", source="x", event="command", outcome="ok",
        detail={"command": "audit ack 5"}, urgent=True,
    )  # fmt: skip
    assert record["seq"] == log.head.seq and log.used > cfg.limit_bytes  # type: ignore[union-attr]
    exported(log, 0)
    log.acknowledge(log.head.seq)  # type: ignore[union-attr]
    log.release(lambda seg: None)
    assert log.used < cfg.high_water_bytes and log.disk().warning is False
    append(log)  # room again
    disk = log.disk().as_dict()
    assert set(disk) == {
        "used_bytes", "limit_bytes", "high_water_bytes", "segments", "acked_seq", "warning",
        "message",
    }  # fmt: skip
    assert disk["segments"] == len(log.segments) and disk["acked_seq"] == log.acked_seq
    assert disk["warning"] is False and disk["message"] is None
    log.close()


def test_the_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "log.json"
    assert logwriter.load_config(conf) == (logwriter.RetentionConfig(), None)
    conf.write_text('{"segment_bytes": 4096, "limit_bytes": 65536, "high_water_percent": 60}')
    cfg, problem = logwriter.load_config(conf)
    assert problem is None and cfg.segment_bytes == 4096 and cfg.high_water_bytes == 39321
    for bad in ('{"segment_bytes": 4096, "limit_bytes": 8192}', '{"size": 1}', "[]", "{"):
        conf.write_text(bad)
        cfg, problem = logwriter.load_config(conf)
        assert cfg == logwriter.RetentionConfig() and problem


@pytest.mark.parametrize("seed", range(8))
def test_random_appends_exports_acks_never_lose_an_unacked_record(
    tmp_path: Path, signer: auditlog.SoftwareSigner, seed: int
) -> None:
    """Property-ish: whatever order appends, exports (a collector archiving what it got),
    acks (up to anything exported, some refused), deletions and restarts come in, the
    device still holds every record from the acked one on, the archive plus the device
    make one unbroken chain, and nothing unacked was ever deleted."""
    rng = random.Random(seed)
    path = tmp_path / "audit.jsonl"
    cfg = logwriter.RetentionConfig(segment_bytes=1024 + rng.randrange(2048), limit_bytes=1 << 20)
    log = small_log(path, cfg)
    archive: list[bytes] = []  # what the collector stored, records 1..len
    deleted: list[logwriter.Segment] = []
    for _ in range(200):
        op = rng.random()
        if op < 0.55 or log.head is None:
            append(log, rng.randrange(1, 6))
            if rng.random() < 0.2:
                checkpoint(log, signer)
        elif op < 0.75:
            after = max(len(archive) - 1, 0)  # the collector re-reads its head record
            got = exported(log, after).splitlines(keepends=True)
            if archive:
                assert got[0] == archive[-1]
                got = got[1:]
            archive += got
        elif op < 0.92:
            seq = rng.randrange(1, (log.head.seq if log.head else 1) + 3)
            if seq > log.exported_seq:
                with pytest.raises(logwriter.AckRefused):
                    log.acknowledge(seq)
            elif seq <= len(archive):  # a collector acks only what it stored
                log.acknowledge(seq)
                deleted += log.release(lambda seg: None)
        else:
            log.close()
            log = small_log(path, cfg)
        # Invariants after every step.
        assert log.first_seq <= max(log.acked_seq, 1)
        assert all(seg.last_seq < log.acked_seq for seg in deleted)
        on_device = whole(log).splitlines(keepends=True)
        seqs = [json.loads(x)["seq"] for x in on_device]
        assert seqs == list(range(log.first_seq, log.first_seq + len(seqs)))
        chain = archive[: log.first_seq - 1] + on_device
        assert len(archive) >= log.first_seq - 1  # everything deleted was archived first
        assert [json.loads(x)["seq"] for x in chain] == list(range(1, len(chain) + 1))
    assert deleted and log.first_seq > 1  # the run did delete segments
    checkpoint(log, signer)
    chain = archive[: log.first_seq - 1] + whole(log).splitlines(keepends=True)
    report = auditlog.verify_lines(chain, {signer.key_id: signer.public_key_pem}, device=DEVICE)
    assert report.ok, [str(v) for v in report.violations]
    base = log.base()
    tail = auditlog.verify_lines(
        whole(log).splitlines(), {signer.key_id: signer.public_key_pem}, start=base
    )
    assert tail.ok and tail.last_seq == log.head.seq  # type: ignore[union-attr]
    log.close()


def test_a_removed_middle_segment_fails_closed_but_stays_readable(path: Path) -> None:
    log = small_log(path)
    append(log, 40)
    middle = log.segments[1]
    log.close()
    middle.path.unlink()  # root on the box removes records the collector never saw
    again = small_log(path)
    try:
        with pytest.raises(LogUnavailable, match="do not form one chain"):
            append(again)
        # The export still sends what is there, and the break shows in the records.
        seqs = [json.loads(x)["seq"] for x in exported(again, 0).splitlines()]
        assert seqs[0] == 1 and middle.first_seq not in seqs and seqs[-1] == 40
    finally:
        again.close()


def test_a_deleted_segments_key_rotations_are_kept(
    path: Path, signer: auditlog.SoftwareSigner
) -> None:
    """Before a segment goes, its key-rotation records are copied to the rotations file
    (once each, in order): a re-provisioned device's next owner carries trust from the
    initial key through them to the base (``base()``, the head before the oldest record)."""
    new = auditlog.SoftwareSigner.generate()
    log = small_log(path)
    append(log, 3)
    rotation = log.append_record(
        lambda prev, now: auditlog.make_key_rotation(prev, signer, new, device=DEVICE, time=now)
    )
    append(log, 60)
    assert log.retired_rotations() == [] and log.base() is None
    exported(log, 0)
    acked = log.segments[-2].first_seq + 1
    log.acknowledge(acked)
    gone = log.release(lambda seg: None)
    assert gone and log.first_seq > rotation["seq"]
    kept = log.retired_rotations()
    assert [json.loads(x)["seq"] for x in kept] == [rotation["seq"]]
    assert kept[0] == auditlog.record_line(rotation)
    base = log.base()
    assert base is not None and base.seq == log.first_seq - 1
    assert json.loads(log.segments[0].path.read_bytes().splitlines()[0])["prev"] == base.hash
    log.release(lambda seg: None)  # nothing more to release: nothing copied twice
    assert log.retired_rotations() == kept
    log.close()
    reopened = small_log(path)
    assert reopened.retired_rotations() == kept and reopened.base() == base
    reopened.close()


def test_a_segment_whose_rotations_cannot_be_kept_stays(
    path: Path, signer: auditlog.SoftwareSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    new = auditlog.SoftwareSigner.generate()
    log = small_log(path)
    append(log, 3)
    log.append_record(
        lambda prev, now: auditlog.make_key_rotation(prev, signer, new, device=DEVICE, time=now)
    )
    append(log, 60)
    exported(log, 0)
    log.acknowledge(log.segments[-2].first_seq + 1)
    first = log.segments[0].path
    real_open = os.open

    def no_rotations_file(file: Any, flags: int, *args: Any) -> int:
        if str(file).endswith(".rotations.jsonl"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(file, flags, *args)

    monkeypatch.setattr(os, "open", no_rotations_file)
    logged: list[logwriter.Segment] = []
    with pytest.raises(LogUnavailable, match="key rotations"):
        log.release(logged.append)
    assert first.exists() and not logged and log.first_seq == 1
    monkeypatch.setattr(os, "open", real_open)
    assert log.release(logged.append) and not first.exists()
    log.close()
