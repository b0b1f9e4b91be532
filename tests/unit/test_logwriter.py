"""The device's activity-log writer (:mod:`hsmctl.appliance.logwriter`) on a temp file:
recovery of the head, the seq -> offset index, rollback of a partial write, and failing
closed when the file changes behind its back."""

from __future__ import annotations

import errno
import json
import os
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
