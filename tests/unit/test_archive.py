"""The log archive: segments, rotation, compression, cursor, lock, recovery, private
files (the collection that feeds it is tests/unit/test_collector.py)."""

from __future__ import annotations

import gzip
import json
import os
import threading
import time
from pathlib import Path

import pytest
import zstandard

from hsmctl import auditlog
from hsmctl.collect.archive import Archive, ArchiveDamaged, compress_segment
from hsmctl.collect.collector import (
    ingest,
)
from hsmctl.collect.pipeline import (
    VerifyPool,
)
from hsmctl.errors import ConflictError, HsmctlError
from tests.unit.logdevice import Device, archived, collect, snapshot, trust

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def key_a() -> auditlog.SoftwareSigner:
    return auditlog.SoftwareSigner.generate()


@pytest.fixture(scope="module")
def key_b() -> auditlog.SoftwareSigner:
    return auditlog.SoftwareSigner.generate()


# -- segments, rotation, compression --------------------------------------------------------------


def _rotated(tmp_path: Path, key_a: auditlog.SoftwareSigner, runs: int) -> tuple[Device, Archive]:
    """An archive of small segments (4000 bytes) after ``runs`` collections."""
    dev = Device(key_a)
    archive = Archive(tmp_path / "archive", "hsm-test", segment_bytes=4000)
    for _ in range(runs):
        for _ in range(4):
            dev.session(6, size=40)
        collect(archive, dev.stream(), trust(key_a))
    return dev, archive


def test_segments_rotate_at_checkpoints_and_are_compressed(
    tmp_path: Path, key_a: auditlog.SoftwareSigner
) -> None:
    dev, archive = _rotated(tmp_path, key_a, 5)
    cursor = archive.cursor()
    assert len(cursor.segments) > 3
    names = sorted(p.name for p in archive.dir.iterdir())
    assert names == sorted([*(s.name for s in cursor.segments), "cursor.json", "lock"])
    for seg in cursor.segments[:-1]:
        assert seg.compressed and seg.name.endswith(".jsonl.zst")
        assert seg.bytes >= 4000
        text = zstandard.decompress((archive.dir / seg.name).read_bytes())
        assert len(text) == seg.bytes
        assert b"".join(dev.lines[seg.first_seq - 1 : seg.last_seq]) == text
        assert json.loads(text.splitlines()[-1])["event"] == "checkpoint"  # closed signed
    last = cursor.segments[-1]  # open, or closed (and compressed) if the run ended on one
    assert last.compressed == (last.bytes >= 4000)
    assert archived(archive) == dev.data()
    assert b"".join(archive.blocks(cursor, after=57, size=100)) == dev.data(57)
    assert list(archive.blocks(cursor, after=cursor.seq)) == []


def test_a_big_first_collection_through_worker_processes(
    tmp_path: Path, key_a: auditlog.SoftwareSigner, key_b: auditlog.SoftwareSigner
) -> None:
    dev = Device(key_a)
    for i in range(300):
        dev.session(9, size=200)
        if i == 150:
            dev.rotate(key_b)
    archive = Archive(tmp_path / "archive", "hsm-test", segment_bytes=200_000)
    pool = VerifyPool(2)
    pool.start(wait=True)  # else chunks are verified here while the workers start
    try:
        with archive.lock(exclusive=True):
            cursor = ingest(archive, archive.recover(), trust(key_a), dev.stream(piece=65536), pool)
    finally:
        pool.close()
    assert cursor.seq == len(dev.lines)
    assert archived(archive) == dev.data()
    assert set(cursor.trusted_keys) == {key_b.key_id}


def test_recover_drops_what_an_interrupted_run_left(
    tmp_path: Path, key_a: auditlog.SoftwareSigner
) -> None:
    dev = Device(key_a)
    dev.session(5)
    archive = Archive(tmp_path / "archive", "hsm-test", segment_bytes=1000)
    collect(archive, dev.stream(), trust(key_a))
    before = snapshot(archive.dir)
    cursor = archive.cursor()
    # A run killed mid-way: appended past the cursor, a rotated segment, its gzip half done.
    appender = archive.begin(cursor)
    dev.session(20)
    new = dev.data(cursor.seq)
    appender.append(new, covered=len(new))
    (archive.dir / "seg-000000000099.jsonl.zst.tmp").write_bytes(b"partial")
    (archive.dir / ".cursor.json.123.tmp").write_bytes(b"{")
    (archive.dir / ".cursor.json.123.0a1b2c3d.tmp").write_bytes(b"{")  # privatefiles' name
    # Let its compression thread end first, as the process would die: a snapshot taken
    # while it runs races its rename of a .zst.tmp (the planted one stands for that).
    appender._finish_compression()
    assert snapshot(archive.dir) != before
    del appender  # never committed, never aborted: the process died
    archive.recover()
    assert snapshot(archive.dir) == before
    assert collect(archive, dev.stream(), trust(key_a)).seq == len(dev.lines)
    assert archived(archive) == dev.data()


def test_a_damaged_archive_is_reported(tmp_path: Path, key_a: auditlog.SoftwareSigner) -> None:
    dev = Device(key_a)
    dev.session(5)
    archive = Archive(tmp_path / "archive", "hsm-test")
    cursor = collect(archive, dev.stream(), trust(key_a))
    seg = archive.dir / cursor.segments[0].name
    seg.write_bytes(seg.read_bytes()[:-10])
    with pytest.raises(ArchiveDamaged, match="holds"):
        archive.recover()
    with pytest.raises(ArchiveDamaged):
        list(archive.blocks(cursor))
    (archive.dir / "cursor.json").write_text("{}")
    with pytest.raises(ArchiveDamaged):
        archive.cursor()


def test_compress_segment_round_trips(tmp_path: Path) -> None:
    src = tmp_path / "seg-000000000001.jsonl"
    src.write_bytes(b'{"a":1}\n' * 100_000)
    dst = tmp_path / "seg-000000000001.jsonl.zst"
    compress_segment(src, dst, 1)
    assert zstandard.decompress(dst.read_bytes()) == src.read_bytes()
    assert not (tmp_path / "seg-000000000001.jsonl.zst.tmp").exists()
    frame = zstandard.get_frame_parameters(dst.read_bytes())
    assert frame.has_checksum and frame.content_size == src.stat().st_size


def test_gzip_segments_of_older_archives_are_read_and_checked(
    tmp_path: Path, key_a: auditlog.SoftwareSigner
) -> None:
    # Archives written before segments were zstd hold .jsonl.gz segments: still readable,
    # and an archive can mix both (new segments are zstd).
    dev, archive = _rotated(tmp_path, key_a, 3)
    cursor = archive.cursor()
    old = cursor.segments[0]
    assert old.compressed
    legacy = old.name.removesuffix(".zst") + ".gz"
    text = zstandard.decompress((archive.dir / old.name).read_bytes())
    (archive.dir / legacy).write_bytes(gzip.compress(text))
    (archive.dir / old.name).unlink()
    raw = json.loads((archive.dir / "cursor.json").read_text())
    raw["segments"][0]["name"] = legacy
    (archive.dir / "cursor.json").write_text(json.dumps(raw))
    cursor = archive.cursor()
    assert cursor.segments[0].name == legacy
    assert b"".join(archive.blocks(cursor)) == b"".join(dev.lines[: cursor.head.seq])
    for _ in range(4):
        dev.session(6, size=40)
    cursor = collect(archive, dev.stream(), trust(key_a))
    assert cursor.segments[0].name == legacy and cursor.segments[-2].name.endswith(".zst")
    assert b"".join(archive.blocks(cursor)) == b"".join(dev.lines[: cursor.head.seq])
    (archive.dir / legacy).write_bytes(gzip.compress(text[:-10]))  # damaged: cut short
    with pytest.raises(ArchiveDamaged):
        list(archive.blocks(archive.cursor()))


def _fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the name of every file or directory fsynced, in order."""
    seen: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_a_closed_segment_is_durable_as_its_compressed_copy(
    tmp_path: Path, key_a: auditlog.SoftwareSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rotation does not fsync the closed .jsonl in the collecting thread: its .zst is
    # fsynced (compression thread) before the cursor names it, and the .jsonl goes.
    seen = _fsyncs(monkeypatch)
    dev, archive = _rotated(tmp_path, key_a, 2)
    cursor = archive.cursor()
    closed = [s for s in cursor.segments if s.compressed]
    assert closed
    cursors = [i for i, name in enumerate(seen) if name.startswith(".cursor.json.")]
    for seg in closed:
        plain = seg.name.removesuffix(".zst")
        assert plain not in seen
        assert seen.index(seg.name + ".tmp") < cursors[-1]
        assert not (archive.dir / plain).exists()
    assert archived(archive) == dev.data()


def test_a_segment_left_uncompressed_is_fsynced_before_the_cursor_names_it(
    tmp_path: Path, key_a: auditlog.SoftwareSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hsmctl.collect.archive as archive_module

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(archive_module, "compress_segment", disk_full)
    monkeypatch.setattr(archive_module, "compress_pieces", disk_full)
    seen = _fsyncs(monkeypatch)
    dev, archive = _rotated(tmp_path, key_a, 1)
    (seg,) = archive.cursor().segments
    assert not seg.compressed and seg.bytes >= archive.segment_bytes  # closed, kept plain
    cursor_written = next(i for i, name in enumerate(seen) if name.startswith(".cursor.json."))
    assert seen.index(seg.name) < cursor_written
    monkeypatch.undo()  # compression works again: the next run appends and compresses it
    for _ in range(4):
        dev.session(6, size=40)
    cursor = collect(archive, dev.stream(), trust(key_a))
    assert cursor.segments[0].compressed and cursor.seq == len(dev.lines)
    assert archived(archive) == dev.data()


def _plain_writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the name of every plain segment file opened for writing, in order."""
    opened: list[str] = []
    real = os.open

    def tracked(path: object, flags: int, *args: object, **kwargs: object) -> int:
        name = os.path.basename(str(path))
        if flags & (os.O_WRONLY | os.O_RDWR) and name.endswith(".jsonl"):
            opened.append(name)
        return real(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", tracked)
    return opened


def test_a_segment_begun_in_a_run_is_compressed_from_memory_never_written_plain(
    tmp_path: Path, key_a: auditlog.SoftwareSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hsmctl.collect.archive as archive_module

    dev = Device(key_a)
    for _ in range(16):  # ~3.5 MB: a few of the verifier's 1 MiB chunks, each appended once
        for _ in range(120):
            dev.session(6, size=200)
        dev.checkpoint()  # segments close at the end of an append, after a checkpoint
    archive = Archive(tmp_path / "archive", "hsm-test", segment_bytes=100_000)
    opened = _plain_writes(monkeypatch)
    collect(archive, dev.stream(), trust(key_a))
    dev.session(6, size=200)  # a second run begins a segment it does not fill
    cursor = collect(archive, dev.stream(), trust(key_a))
    monkeypatch.undo()
    closed = [s for s in cursor.segments if s.compressed]
    assert len(closed) >= 2 and not cursor.segments[-1].compressed
    # Only the active segment is written plain, once (by the commit); no closed one ever.
    assert opened == [cursor.segments[-1].name]
    for seg in closed:
        text = dev.data()[len(b"".join(dev.lines[: seg.first_seq - 1])) :][: seg.bytes]
        src = tmp_path / "plain.jsonl"
        src.write_bytes(text)
        compress_segment(src, tmp_path / "ref.zst", archive.compress_level)
        # The very frame compress_segment makes from the file (level, checksum, size).
        assert (archive.dir / seg.name).read_bytes() == (tmp_path / "ref.zst").read_bytes()
    assert archived(archive) == dev.data()
    assert archive_module._HOLD.held == 0


def test_over_the_memory_budget_a_segment_is_written_as_it_grows(
    tmp_path: Path, key_a: auditlog.SoftwareSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hsmctl.collect.archive as archive_module

    budget = archive_module._HoldBudget(6000)  # about one segment and a half
    monkeypatch.setattr(archive_module, "_HOLD", budget)
    peak = 0
    real_take = budget.take

    def take(n: int) -> bool:
        nonlocal peak
        ok = real_take(n)
        peak = max(peak, budget.held)
        return ok

    monkeypatch.setattr(budget, "take", take)
    dev, archive = _rotated(tmp_path, key_a, 4)
    assert peak <= 6000 and budget.held == 0
    cursor = archive.cursor()
    assert sum(s.compressed for s in cursor.segments) >= 3
    assert archived(archive) == dev.data()


def test_a_held_segment_that_cannot_be_stored_fails_the_commit(
    tmp_path: Path, key_a: auditlog.SoftwareSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hsmctl.collect.archive as archive_module

    dev, archive = _rotated(tmp_path, key_a, 1)
    before = snapshot(archive.dir)

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(archive_module, "compress_pieces", disk_full)
    monkeypatch.setattr(archive_module, "write_pieces", disk_full)
    for _ in range(8):
        dev.session(6, size=40)
    with pytest.raises(HsmctlError, match="could not be stored"):
        collect(archive, dev.stream(), trust(key_a))
    monkeypatch.undo()
    archive.recover()
    assert snapshot(archive.dir) == before  # nothing named, nothing left
    assert archive_module._HOLD.held == 0
    assert collect(archive, dev.stream(), trust(key_a)).seq == len(dev.lines)
    assert archived(archive) == dev.data()


def test_a_held_segment_is_not_changed_by_its_callers_buffer(
    tmp_path: Path, key_a: auditlog.SoftwareSigner
) -> None:
    dev = Device(key_a)
    dev.session(5)
    archive = Archive(tmp_path / "archive", "hsm-test")
    archive.recover()
    appender = archive.begin(archive.cursor())
    data = bytearray(dev.data())
    appender.append(data, covered=len(data))  # type: ignore[arg-type]
    data[:] = b"x" * len(data)  # the caller reuses its buffer before the commit
    appender.commit(trusted_keys={}, retired_keys=(), device=None)
    assert archived(archive) == dev.data()


def test_an_aborted_run_gives_its_held_bytes_back(
    tmp_path: Path, key_a: auditlog.SoftwareSigner
) -> None:
    import hsmctl.collect.archive as archive_module

    dev = Device(key_a)
    dev.session(5)
    archive = Archive(tmp_path / "archive", "hsm-test", segment_bytes=1_000_000)
    archive.recover()  # the directory, empty
    before = snapshot(archive.dir)
    appender = archive.begin(archive.cursor())
    data = dev.data()
    appender.append(data, covered=len(data))
    assert archive_module._HOLD.held == len(data)
    assert snapshot(archive.dir) == before  # held, not written
    appender.abort()
    assert archive_module._HOLD.held == 0
    assert snapshot(archive.dir) == before


# -- the lock -------------------------------------------------------------------------------------


def test_a_second_writer_waits_or_gets_5(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "archive", "hsm-test")
    other = Archive(tmp_path / "archive", "hsm-test")
    with archive.lock(exclusive=True):
        start = time.monotonic()
        with pytest.raises(ConflictError) as err, other.lock(exclusive=True, wait=0.3):
            pass
        assert err.value.exit_code == 5
        assert time.monotonic() - start >= 0.3
        with pytest.raises(ConflictError), other.lock(exclusive=False):
            pass
    got = threading.Event()

    def hold() -> None:
        with archive.lock(exclusive=True):
            got.set()
            time.sleep(0.5)

    t = threading.Thread(target=hold)
    t.start()
    got.wait()
    with other.lock(exclusive=True, wait=5):  # waits for the holder, then proceeds
        pass
    t.join()
    with archive.lock(exclusive=False), other.lock(exclusive=False):  # readers share
        pass


def test_files_are_private(tmp_path: Path, key_a: auditlog.SoftwareSigner) -> None:
    dev = Device(key_a)
    dev.session(3)
    archive = Archive(tmp_path / "archive", "hsm-test")
    collect(archive, dev.stream(), trust(key_a))
    assert os.stat(archive.dir).st_mode & 0o777 == 0o700
    for p in archive.dir.iterdir():
        assert p.stat().st_mode & 0o077 == 0, p
