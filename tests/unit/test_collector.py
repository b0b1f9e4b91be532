"""The verifying ingest (collection) with the device stood in for by bytes
(tests/unit/logdevice.py; the transport is the only part replaced): incremental runs,
tampering (exit 3, the archive untouched), limits, the chunked verifier, offline
verification."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import BinaryIO

import pytest
import zstandard

from hsmctl import auditlog
from hsmctl.auditlog import GENESIS_HEAD, Head, ViolationKind
from hsmctl.collect.archive import Appender, Archive, Cursor
from hsmctl.collect.collector import (
    LogIntegrityError,
    export_command,
    plan_resume,
)
from hsmctl.collect.pipeline import (
    ChunkedVerifier,
    ChunkResult,
    Halted,
    Limits,
    TrustState,
    VerifyPool,
    verify_chunk,
)
from hsmctl.collect.verify import verify_archive
from hsmctl.errors import IntegrityError, UnreachableError
from tests.unit.logdevice import DEVICE, Device, archived, collect, snapshot, trust

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def key_a() -> auditlog.SoftwareSigner:
    return auditlog.SoftwareSigner.generate()


@pytest.fixture(scope="module")
def key_b() -> auditlog.SoftwareSigner:
    return auditlog.SoftwareSigner.generate()


# -- incremental collection ---------------------------------------------------------------------


def test_collect_then_collect_again_gets_exactly_the_new_records(
    tmp_path: Path, key_a: auditlog.SoftwareSigner
) -> None:
    dev = Device(key_a)
    dev.session(10)
    archive = Archive(tmp_path / "archive", "hsm-test")
    first = collect(archive, dev.stream(), trust(key_a))
    assert first.seq == len(dev.lines) == 12
    assert archived(archive) == dev.data()
    dev.session(5)
    dev.session(3)
    second = collect(archive, dev.stream(), trust(key_a))
    assert second.seq == len(dev.lines)
    # The export restarts at the archived head: the device must show record 12 again.
    assert dev.exports == [0, 11]
    assert archived(archive) == dev.data()
    assert second.device == DEVICE and second.prev == json.loads(dev.lines[-2])["hash"]


def test_nothing_new_changes_nothing(tmp_path: Path, key_a: auditlog.SoftwareSigner) -> None:
    dev = Device(key_a)
    dev.session(3)
    archive = Archive(tmp_path / "archive", "hsm-test")
    collect(archive, dev.stream(), trust(key_a))
    before = snapshot(archive.dir)
    cursor = collect(archive, dev.stream(checkpoint=False), trust(key_a))
    assert cursor.seq == len(dev.lines)
    assert snapshot(archive.dir) == before


def test_only_records_under_a_signature_are_archived(
    tmp_path: Path, key_a: auditlog.SoftwareSigner
) -> None:
    dev = Device(key_a)
    dev.session(4)
    dev.events(3)  # unsigned tail (the device could not write its export checkpoint)
    archive = Archive(tmp_path / "archive", "hsm-test")
    cursor = collect(archive, dev.stream(checkpoint=False), trust(key_a))
    assert cursor.seq == 5
    assert archived(archive) == dev.data()[: sum(map(len, dev.lines[:5]))]
    assert (archive.dir / "seg-000000000001.jsonl").stat().st_size == cursor.segments[0].bytes
    dev.checkpoint()
    assert collect(archive, dev.stream(checkpoint=False), trust(key_a)).seq == 9
    assert archived(archive) == dev.data()


def test_a_key_rotation_carries_trust_and_the_cursor_keeps_it(
    tmp_path: Path, key_a: auditlog.SoftwareSigner, key_b: auditlog.SoftwareSigner
) -> None:
    dev = Device(key_a)
    dev.session(3)
    archive = Archive(tmp_path / "archive", "hsm-test")
    collect(archive, dev.stream(), trust(key_a))
    dev.rotate(key_b)
    dev.session(3)
    cursor = collect(archive, dev.stream(), trust(key_a))
    assert set(cursor.trusted_keys) == {key_b.key_id}
    assert cursor.retired_keys == (key_a.key_id,)
    # A checkpoint by the retired key after the rotation is refused.
    dev.signer = key_a
    dev.session(2)
    with pytest.raises(LogIntegrityError) as err:
        collect(archive, dev.stream(checkpoint=False), trust(key_a))
    assert err.value.violations[0].kind is ViolationKind.RETIRED_KEY


# -- tampering: exit 3, the archive untouched -----------------------------------------------------


def _edit(line: bytes) -> bytes:
    return line.replace(b'"hsm show"', b'"hsm shoW"')


TAMPER: dict[str, tuple[Callable[[list[bytes]], None], ViolationKind, int]] = {
    "edited": (lambda ls: ls.__setitem__(14, _edit(ls[14])), ViolationKind.HASH_MISMATCH, 15),
    "deleted": (lambda ls: ls.__delitem__(14), ViolationKind.GAP, 15),
    "swapped": (
        lambda ls: ls.__setitem__(slice(14, 16), [ls[15], ls[14]]),
        ViolationKind.REORDERED,
        15,
    ),
    "replayed": (lambda ls: ls.insert(15, ls[14]), ViolationKind.DUPLICATE, 15),
    "rolled back": (lambda ls: ls.__delitem__(slice(8, None)), ViolationKind.TRUNCATED, 12),
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampering_stops_collection_and_changes_nothing(
    tmp_path: Path, key_a: auditlog.SoftwareSigner, case: str
) -> None:
    dev = Device(key_a)
    dev.session(10)
    archive = Archive(tmp_path / "archive", "hsm-test")
    collect(archive, dev.stream(), trust(key_a))  # records 1..12
    dev.session(6)
    dev.session(6)
    before = snapshot(archive.dir)
    change, kind, seq = TAMPER[case]
    change(dev.lines)
    with pytest.raises(LogIntegrityError) as err:
        collect(archive, dev.stream(checkpoint=False), trust(key_a))
    assert err.value.exit_code == 3
    assert err.value.violations[0].kind is kind
    assert err.value.violations[0].seq == seq
    assert f"record {seq}" in str(err.value) and "hsm-test" in str(err.value)
    assert snapshot(archive.dir) == before


def test_a_different_record_at_the_head_is_a_rollback(
    tmp_path: Path, key_a: auditlog.SoftwareSigner
) -> None:
    dev = Device(key_a)
    dev.session(10)
    archive = Archive(tmp_path / "archive", "hsm-test")
    collect(archive, dev.stream(checkpoint=False), trust(key_a))  # head: checkpoint 11
    before = snapshot(archive.dir)
    # The log replaced by another history of the same length (re-signed by the device key).
    other = Device(key_a)
    other.events(10, size=1)
    other.checkpoint()
    other.session(3)
    with pytest.raises(LogIntegrityError) as err:
        collect(archive, other.stream(checkpoint=False), trust(key_a))
    assert err.value.violations[0].kind in (ViolationKind.ROLLBACK, ViolationKind.BROKEN_LINK)
    assert err.value.violations[0].seq in (10, 11)
    assert snapshot(archive.dir) == before


def test_forged_signature_and_unknown_key(
    tmp_path: Path, key_a: auditlog.SoftwareSigner, key_b: auditlog.SoftwareSigner
) -> None:
    dev = Device(key_a)
    dev.session(4)
    archive = Archive(tmp_path / "archive", "hsm-test")
    collect(archive, dev.stream(), trust(key_a))
    dev.signer = key_b  # a key nobody pinned
    dev.session(2)
    with pytest.raises(LogIntegrityError) as err:
        collect(archive, dev.stream(checkpoint=False), trust(key_a))
    assert err.value.violations[0].kind is ViolationKind.UNKNOWN_KEY


def test_a_dropped_connection_is_4_and_changes_nothing(
    tmp_path: Path, key_a: auditlog.SoftwareSigner
) -> None:
    dev = Device(key_a)
    dev.session(4)
    archive = Archive(tmp_path / "archive", "hsm-test")
    collect(archive, dev.stream(), trust(key_a))
    before = snapshot(archive.dir)
    dev.session(50)

    def cut(after: int, sink: BinaryIO) -> None:
        sink.write(dev.data(after)[:3000])
        raise UnreachableError("127.0.0.1: connection lost")

    with pytest.raises(UnreachableError) as err:
        collect(archive, cut, trust(key_a))
    assert snapshot(archive.dir) == before
    # The appliance (the transport knows only an address), where the export stopped,
    # where the archive ends.
    assert str(err.value).startswith("hsm-test: 127.0.0.1: connection lost; the export stopped")
    assert "the archive still ends at record 6" in str(err.value)
    assert err.value.detail["archive_head"] == 6


def test_a_device_command_failure_keeps_its_code_and_its_stderr_last(
    tmp_path: Path, key_a: auditlog.SoftwareSigner
) -> None:
    from hsmctl.ssh import DeviceUnavailable, Result

    dev = Device(key_a)
    dev.session(4)
    archive = Archive(tmp_path / "archive", "hsm-test")
    collect(archive, dev.stream(), trust(key_a))

    def down(after: int, sink: BinaryIO) -> None:
        raise DeviceUnavailable("127.0.0.1", Result(export_command(after), 69, "", "hsmd: down\n"))

    with pytest.raises(UnreachableError) as err:
        collect(archive, down, trust(key_a))
    text = str(err.value)
    assert err.value.exit_code == 4
    assert text.startswith("hsm-test: 127.0.0.1: device command 'audit export --after 5'")
    assert "(exit 69); no record arrived; nothing from this run was archived" in text
    assert text.endswith("(the archive still ends at record 6)\nhsmd: down")
    assert err.value.detail["status"] == 69


def test_a_cut_after_a_tampered_record_is_3_not_4(
    tmp_path: Path, key_a: auditlog.SoftwareSigner
) -> None:
    """The whole lines received before the cut are judged: tampering outranks the cut."""
    dev = Device(key_a)
    dev.session(4)
    archive = Archive(tmp_path / "archive", "hsm-test")
    collect(archive, dev.stream(), trust(key_a))
    before = snapshot(archive.dir)
    dev.session(50)
    dev.lines[9] = _edit(dev.lines[9])  # record 10, well inside the first 3000 bytes

    def cut(after: int, sink: BinaryIO) -> None:
        sink.write(dev.data(after)[:3000])
        raise UnreachableError("hsm-test: connection lost")

    with pytest.raises(LogIntegrityError) as err:
        collect(archive, cut, trust(key_a))
    assert err.value.violations[0].seq == 10
    assert snapshot(archive.dir) == before


def test_a_cut_before_the_archived_head_is_4_not_a_rollback(
    tmp_path: Path, key_a: auditlog.SoftwareSigner
) -> None:
    """A stream cut short may end before the record the archive ends at: that is the
    cut, not a truncated log."""
    dev = Device(key_a)
    dev.session(4)
    archive = Archive(tmp_path / "archive", "hsm-test")
    collect(archive, dev.stream(), trust(key_a))
    before = snapshot(archive.dir)

    def cut(after: int, sink: BinaryIO) -> None:
        sink.write(dev.data(after)[:10])  # not even the head's line
        raise UnreachableError("hsm-test: connection lost")

    with pytest.raises(UnreachableError, match="no record arrived"):
        collect(archive, cut, trust(key_a))
    assert snapshot(archive.dir) == before


def test_unsigned_records_beyond_the_limit_stop_collection_before_they_are_stored(
    tmp_path: Path, key_a: auditlog.SoftwareSigner
) -> None:
    dev = Device(key_a)
    dev.session(4)
    archive = Archive(tmp_path / "archive", "hsm-test")
    collect(archive, dev.stream(), trust(key_a))
    before = snapshot(archive.dir)
    dev.events(300)  # records 7..306, and no checkpoint (the log cannot be written)
    stored: list[int] = []
    real_append = Appender.append

    def spy(self: Appender, data: bytes, covered: int = 0, records: int | None = None) -> None:
        stored.append(data.count(b"\n"))
        real_append(self, data, covered, records)

    small = Limits(unsigned_records=100, unsigned_bytes=None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Appender, "append", spy)
        with pytest.raises(LogIntegrityError) as err:
            collect(archive, dev.stream(checkpoint=False, piece=64), trust(key_a), limits=small)
    v = err.value.violations[0]
    assert v.kind is ViolationKind.UNSIGNED_TAIL and v.seq == 7
    assert "records 7..306" in v.message and "arrived without a checkpoint" in v.message
    assert snapshot(archive.dir) == before
    assert stored == []  # judged before anything of it was written
    # Signed by a checkpoint in the same chunk, the same records are no unsigned tail.
    assert collect(archive, dev.stream(), trust(key_a), limits=small).seq == len(dev.lines)
    by_bytes = Limits(unsigned_records=None, unsigned_bytes=10_000)
    dev.events(300)
    with pytest.raises(LogIntegrityError) as err:
        collect(archive, dev.stream(checkpoint=False), trust(key_a), limits=by_bytes)
    assert err.value.violations[0].kind is ViolationKind.UNSIGNED_TAIL


def test_a_record_longer_than_the_limit_is_malformed(
    tmp_path: Path, key_a: auditlog.SoftwareSigner
) -> None:
    dev = Device(key_a)
    dev.session(4)
    archive = Archive(tmp_path / "archive", "hsm-test")
    collect(archive, dev.stream(), trust(key_a))
    before = snapshot(archive.dir)
    dev.events(3)
    dev.events(1, size=5000)  # record 10: a valid record, 5 KB long
    dev.session(2)
    small = Limits(record_bytes=4096)
    with pytest.raises(LogIntegrityError) as err:
        collect(archive, dev.stream(), trust(key_a), limits=small)
    v = err.value.violations[0]
    assert (v.kind, v.seq) == (ViolationKind.MALFORMED, 10)
    assert "longer than a record may be (4096)" in v.message
    assert snapshot(archive.dir) == before
    assert collect(archive, dev.stream(checkpoint=False), trust(key_a)).seq == len(dev.lines)


# -- the chunked verifier -------------------------------------------------------------------------


def test_chunked_verification_equals_one_pass(
    key_a: auditlog.SoftwareSigner, key_b: auditlog.SoftwareSigner
) -> None:
    dev = Device(key_a)
    for i in range(60):
        dev.session(5, size=100)
        if i == 30:
            dev.rotate(key_b)
    data = dev.data()
    sequential = auditlog.verify_lines(dev.lines, trust(key_a).trusted)
    pool = VerifyPool(2)
    pool.start(wait=True)  # else chunks are verified here while the workers start
    try:
        got: list[bytes] = []
        v = ChunkedVerifier(
            trust(key_a), GENESIS_HEAD, pool=pool, chunk_bytes=4096,
            on_verified=lambda chunk, result: got.append(chunk),
        )  # fmt: skip
        for i in range(0, len(data), 777):
            v.feed(data[i : i + 777])
        summary = v.finish()
    finally:
        pool.close()
    assert summary.violations == ()
    assert summary.stats.pooled > 5
    assert summary.head == sequential.head and summary.records == sequential.records
    assert dict(summary.state.trusted) == dict(sequential.trusted_keys)
    assert summary.state.retired == sequential.retired_keys
    assert b"".join(got) == data


class _StartingPool(VerifyPool):
    """A pool whose workers come up after ``starting`` readiness checks; its "workers"
    verify in this thread (what they return is what a worker's verify_chunk returns)."""

    def __init__(self, starting: int) -> None:
        super().__init__(2)
        self.starting, self.started, self.submitted = starting, False, 0

    def start(self, *, wait: bool = False) -> None:
        self.started = True

    @property
    def ready(self) -> bool:
        self.starting -= 1
        return self.starting < 0

    def submit(
        self, data: bytes, state: TrustState, start: Head, record_bytes: int = 65536
    ) -> Future[ChunkResult]:
        assert self.started and self.starting < 0, "a chunk was sent before the workers were up"
        self.submitted += 1
        future: Future[ChunkResult] = Future()
        future.set_result(verify_chunk(data, state, start, None, record_bytes))
        return future


@pytest.mark.parametrize("starting", [0, 5, 10**6])
def test_chunks_are_verified_here_while_the_workers_start(
    key_a: auditlog.SoftwareSigner, key_b: auditlog.SoftwareSigner, starting: int
) -> None:
    """Nothing waits for workers that are not up: those chunks are verified in the
    collecting thread, the rest by the workers once they are, and the verdict and the
    bytes handed on are those of one sequential pass either way."""
    dev = Device(key_a)
    for i in range(40):
        dev.session(5, size=100)
        if i == 20:
            dev.rotate(key_b)
    data = dev.data()
    sequential = auditlog.verify_lines(dev.lines, trust(key_a).trusted)
    pool = _StartingPool(starting)
    got: list[bytes] = []
    v = ChunkedVerifier(
        trust(key_a), GENESIS_HEAD, pool=pool, chunk_bytes=4096,
        on_verified=lambda chunk, result: got.append(chunk),
    )  # fmt: skip
    for i in range(0, len(data), 1000):
        v.feed(data[i : i + 1000])
    summary = v.finish()
    assert summary.violations == ()
    assert summary.head == sequential.head and summary.records == sequential.records
    assert dict(summary.state.trusted) == dict(sequential.trusted_keys)
    assert b"".join(got) == data
    assert pool.started  # from the second chunk on
    chunks = summary.stats.inline + summary.stats.pooled
    assert summary.stats.pooled == pool.submitted
    if starting == 0:
        assert summary.stats.inline == 1  # the first chunk only
    elif starting == 5:
        assert 1 < summary.stats.inline < chunks and pool.submitted > 0
    else:
        assert pool.submitted == 0 and summary.stats.inline == chunks > 10


class _BrokenPool(_StartingPool):
    """Up, but every submit fails as a broken process pool's does."""

    def submit(
        self, data: bytes, state: TrustState, start: Head, record_bytes: int = 65536
    ) -> Future[ChunkResult]:
        self.submitted += 1
        raise BrokenProcessPool("a child process terminated abruptly")


def test_a_broken_pool_leaves_the_chunks_to_this_thread(
    key_a: auditlog.SoftwareSigner,
) -> None:
    dev = Device(key_a)
    for _ in range(30):
        dev.session(5, size=100)
    data = dev.data()
    pool = _BrokenPool(0)
    v = ChunkedVerifier(trust(key_a), GENESIS_HEAD, pool=pool, chunk_bytes=4096)
    v.feed(data)
    summary = v.finish()
    assert summary.violations == ()
    assert summary.head == Head.of(json.loads(dev.lines[-1]))
    assert summary.stats.pooled == 0 and summary.stats.inline > 10
    assert pool.submitted == summary.stats.inline - 1  # all but the first were offered


def test_chunked_verification_finds_tampering_in_a_late_chunk(
    key_a: auditlog.SoftwareSigner,
) -> None:
    dev = Device(key_a)
    for _ in range(80):
        dev.session(5, size=100)
    dev.lines[400] = _edit(dev.lines[400])
    data = dev.data()
    pool = VerifyPool(2)
    pool.start(wait=True)  # else chunks are verified here while the workers start
    try:
        v = ChunkedVerifier(trust(key_a), GENESIS_HEAD, pool=pool, chunk_bytes=8192)
        with contextlib.suppress(Halted):  # raised by feed() or, if still in flight, not
            for i in range(0, len(data), 4096):
                v.feed(data[i : i + 4096])
        summary = v.finish()
    finally:
        pool.close()
    assert [(x.kind, x.seq) for x in summary.violations] == [(ViolationKind.HASH_MISMATCH, 401)]
    assert summary.head.seq == 400
    assert summary.violations[0].line == 401


def test_chunked_verification_redoes_a_wrong_speculation(
    key_a: auditlog.SoftwareSigner, key_b: auditlog.SoftwareSigner
) -> None:
    """A key rotation whose line is not where speculation looks (here: the speculated
    state is forced wrong) is caught by comparing states, and the chunk is redone."""
    dev = Device(key_a)
    for i in range(40):
        dev.session(5, size=100)
        if i == 10:
            dev.rotate(key_b)
    data = dev.data()
    import hsmctl.collect.pipeline as pipeline

    real = pipeline._speculate

    def wrong(chunk: bytes, state: TrustState, start: Head) -> tuple[TrustState, Head]:
        _, h = real(chunk, state, start)
        return TrustState(state.trusted, state.retired, state.device), h  # ignores rotations

    pool = VerifyPool(1)
    pool.start(wait=True)  # else chunks are verified here while the workers start
    try:
        pipeline._speculate = wrong
        v = ChunkedVerifier(trust(key_a), GENESIS_HEAD, pool=pool, chunk_bytes=2048)
        v.feed(data)
        summary = v.finish()
    finally:
        pipeline._speculate = real
        pool.close()
    assert summary.violations == ()
    assert summary.stats.redone > 0
    assert summary.head == Head.of(json.loads(dev.lines[-1]))


def test_a_line_longer_than_a_chunk_is_malformed(key_a: auditlog.SoftwareSigner) -> None:
    v = ChunkedVerifier(trust(key_a), GENESIS_HEAD, chunk_bytes=1024)
    with pytest.raises(Halted):
        v.feed(b"x" * 5000)
    assert v.finish().violations[0].kind is ViolationKind.MALFORMED


def test_plan_resume() -> None:
    assert export_command(9) == "audit export --after 9"
    assert plan_resume(Cursor("a")).after == 0
    c = Cursor("a", seq=10, hash="h" * 64, prev="p" * 64)
    r = plan_resume(c)
    assert (r.after, r.start, r.anchor, r.skip) == (9, Head(9, "p" * 64), Head(10, "h" * 64), 1)


# -- offline verification --------------------------------------------------------------------


def _state_for(tmp_path: Path, signer: auditlog.SoftwareSigner) -> tuple[Path, Archive]:
    state = tmp_path / "state"
    app = state / "appliances" / "hsm-test"
    app.mkdir(parents=True)
    (app / "pins.json").write_text(
        json.dumps({"audit_keys": {signer.key_id: signer.public_key_pem}, "retired": []})
    )
    return state, Archive(app / "archive", "hsm-test", segment_bytes=3000)


def test_verify_archive_offline(tmp_path: Path, key_a: auditlog.SoftwareSigner) -> None:
    state, archive = _state_for(tmp_path, key_a)
    dev = Device(key_a)
    for _ in range(6):
        dev.session(8, size=30)
        collect(archive, dev.stream(), trust(key_a))
    report = verify_archive(state, "hsm-test", workers=0)
    assert report.last_seq == len(dev.lines) and report.segments > 1


def test_verify_archive_finds_an_edited_archive(
    tmp_path: Path, key_a: auditlog.SoftwareSigner
) -> None:
    state, archive = _state_for(tmp_path, key_a)
    dev = Device(key_a)
    dev.session(8, size=30)
    cursor = collect(archive, dev.stream(), trust(key_a))
    first = cursor.segments[0]
    seg = archive.dir / first.name
    if first.compressed:  # an attacker on the customer host recompresses
        seg.write_bytes(zstandard.compress(_edit(zstandard.decompress(seg.read_bytes()))))
    else:
        seg.write_bytes(_edit(seg.read_bytes()))  # same length
    with pytest.raises(IntegrityError) as err:
        verify_archive(state, "hsm-test", workers=0)
    assert "record 1" in str(err.value) and err.value.exit_code == 3


def test_verify_archive_finds_an_edited_cursor(
    tmp_path: Path, key_a: auditlog.SoftwareSigner, key_b: auditlog.SoftwareSigner
) -> None:
    state, archive = _state_for(tmp_path, key_a)
    dev = Device(key_a)
    dev.session(8)
    collect(archive, dev.stream(), trust(key_a))
    doc = json.loads((archive.dir / "cursor.json").read_text())
    doc["trusted_keys"][key_b.key_id] = key_b.public_key_pem
    (archive.dir / "cursor.json").write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="audit keys"):
        verify_archive(state, "hsm-test", workers=0)


def test_a_last_line_without_newline_is_checked_but_not_stored(
    tmp_path: Path, key_a: auditlog.SoftwareSigner
) -> None:
    dev = Device(key_a)
    dev.session(4)
    dev.session(4)  # records 1..10, checkpoints at 5 and 10

    def cut_short(after: int, sink: BinaryIO) -> None:
        sink.write(dev.data(after)[:-1])

    archive = Archive(tmp_path / "archive", "hsm-test")
    assert collect(archive, cut_short, trust(key_a)).seq == 5
    assert archived(archive) == b"".join(dev.lines[:5])
    dev.lines[-1] = _edit(dev.lines[-1]).replace(b'"outcome":"ok"', b'"outcome":"ko"')
    with pytest.raises(LogIntegrityError):
        collect(archive, cut_short, trust(key_a))


# -- the collector key: --key-dir, systemd credentials, the escrow ------------------------------


def test_collector_key_from_systemd_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key systemd handed over as a credential reads 0440 where systemd used an ACL (the
    mask shows as group bits): accepted in $CREDENTIALS_DIRECTORY only. The same mode in
    any other directory, or a directory whose name merely begins like it, is refused;
    the escrow stays the fallback and keys still need no credential (plain --key-dir)."""
    from hsmctl.collect.collector import CREDENTIAL_PREFIX, collector_key
    from hsmctl.customer.store import ApplianceDir
    from hsmctl.errors import UsageError

    st = ApplianceDir(tmp_path / "state", "hsm01")
    (st.dir / "secrets").mkdir()
    escrow = st.dir / "secrets" / "audit-collector-key"
    escrow.write_text("escrowed")
    escrow.chmod(0o600)
    creds, other = tmp_path / "creds", tmp_path / "creds-other"
    for d in (creds, other):
        d.mkdir()
        (d / f"{CREDENTIAL_PREFIX}hsm01").write_text("key")
        (d / f"{CREDENTIAL_PREFIX}hsm01").chmod(0o440)

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert collector_key(st, None) == escrow
    assert collector_key(st, tmp_path / "empty") == escrow
    with pytest.raises(UsageError, match="accessible by group or others"):
        collector_key(st, creds)  # not a credential: an administrator's file, too open

    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert collector_key(st, creds) == creds / f"{CREDENTIAL_PREFIX}hsm01"
    for wrong in (other, creds / ".." / "creds-other"):
        with pytest.raises(UsageError, match="accessible by group or others"):
            collector_key(st, wrong)
    (creds / f"{CREDENTIAL_PREFIX}hsm01").unlink()
    assert collector_key(st, creds) == escrow  # no key for it there: the escrow

    plain = tmp_path / "keys"
    plain.mkdir()
    (plain / "hsm01").write_text("key")
    (plain / "hsm01").chmod(0o600)
    assert collector_key(st, plain) == plain / "hsm01"  # the old layout still works
