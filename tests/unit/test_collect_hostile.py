"""A corpus of hostile device output for the collector and the verifier (issue 10).

A device may be hostile: it holds the audit key and writes what it likes, or someone who
does not hold the key rewrote its log file. Each case is an ``audit export`` stream that
follows a good first collection (records 1-5, the head a checkpoint); the stream starts
with the archived head again, as the device must, then misbehaves at record 7 (or at 6,
the first record after the head). Every case must end with:

* exit 3 (4 for a device that stalls or runs past the deadline);
* a message naming the appliance and the record's sequence number;
* the archive byte for byte as it was (the hash of every file in its directory);
* the collecting process under a stated peak RSS (:data:`INGEST_BOUND_MIB`,
  :data:`SSH_BOUND_MIB`), measured from outside (``wait4``) on a child process that ran
  the case, though most cases send far more than that (a 256 MiB line, endless records,
  endless stderr).

The corpus runs twice: through ``ingest`` with the transport injected as bytes (no root;
the transport is the only part replaced), and, for the cases that are about the
transport (endless stdout and stderr, a stall after the head, a device too chatty for the
deadline), through ``collect`` over SSH to a real OpenSSH sshd on loopback (root). The
finite format cases also go through the verifiers themselves (``verify_lines``,
``verify_block``, the chunked pipeline).

Cases marked ``needs the fast verifier fix`` (moved ``hash`` members, lines the device
signed although they are not canonical records) and ``needs the RecursionError fix``
depend on the verifier work in ``hsmctl/auditlog``: they fail until it lands.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from hsmctl import auditlog
from hsmctl.auditlog import GENESIS_HEAD, Head
from hsmctl.collect.archive import Archive
from hsmctl.collect.collector import CollectOptions, Target, collect, ingest, trust_roots
from hsmctl.collect.pipeline import (
    RECORD_BYTES,
    ChunkedVerifier,
    Halted,
    Limits,
    TrustState,
    VerifyPool,
)
from hsmctl.customer.store import ApplianceDir
from hsmctl.errors import HsmctlError, UnreachableError
from tests.unit.loopback_sshd import Sshd, measured, needs_root
from tests.unit.loopback_sshd import sshd as sshd  # the module-scoped fixture

APPLIANCE = "hsm-hostile"
DEVICE = "hsm-hostile"
INGEST_BOUND_MIB = 100
"""Peak RSS of a process collecting through ``ingest``, whatever the device sends: the
interpreter with hsmctl, cryptography and zstandard (~45 MiB) and a few 4 MiB
verification chunks with their copies. Measured: 44-61 MiB."""
SSH_BOUND_MIB = 200
"""The same over SSH: paramiko on top, its receive buffers (at most the 16 MiB window)
and a read of them, copied twice on the way. Measured: 50-152 MiB. Every endless or huge
case sends more than either bound, so a collector that kept it would fail here."""
FIX_VERIFIER = "needs the fast verifier fix (hsmctl/auditlog)"
FIX_RECURSION = "needs the RecursionError fix (hsmctl/auditlog)"
ENDLESS = 3 * 200_000
"""A safety valve, not part of the contract: an "endless" stream stops after this many
records, so a collector without the bounds fails the test instead of filling the disk."""

# One record line, canonical, with its hash: the device's format (hsmctl.auditlog.chain),
# made without json so that endless streams are fast. Also run as the device's own
# generator over SSH (python3 -c), hence plain stdlib and a string.
GENERATOR = r"""
import hashlib, sys, time

def body(seq, prev, detail=b'{"command":"hsm show"}'):
    return (b'{"actor":"admin","detail":' + detail + b',"event":"command","outcome":"ok",'
            b'"prev":"' + prev.encode() + b'","role":"admin","seq":' + str(seq).encode()
            + b',"source":"198.19.0.4","time":"2026-11-29T20:00:00Z"}')

def with_hash(body, at=None):
    digest = hashlib.sha256(body).hexdigest()
    at = body.index(b',"outcome":') if at is None else at
    return body[:at] + b',"hash":"' + digest.encode() + b'"' + body[at:] + b"\n", digest

def endless(seq, prev, limit, delay=0.0):
    for _ in range(limit):
        seq += 1
        line, prev = with_hash(body(seq, prev))
        yield line
        if delay:
            time.sleep(delay)

if __name__ == "__main__":
    out = sys.stdout.buffer
    for line in endless(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])):
        out.write(line)
        if float(sys.argv[4]):
            out.flush()
"""
_gen: dict[str, Any] = {"__name__": "generator"}
exec(compile(GENERATOR, "generator", "exec"), _gen)
body: Callable[..., bytes] = _gen["body"]
with_hash: Callable[..., tuple[bytes, str]] = _gen["with_hash"]
endless: Callable[..., Iterator[bytes]] = _gen["endless"]


# -- the device's log and the hostile exports ---------------------------------------------------


class Log:
    """The device's log as lines; a hostile device appends what it likes."""

    def __init__(self, signer: auditlog.SoftwareSigner, lines: list[bytes] | None = None) -> None:
        self.signer = signer
        self.lines = list(lines or [])
        self.head = GENESIS_HEAD
        if self.lines:
            self.head = Head.of(json.loads(self.lines[-1]))

    def add(self, line: bytes, digest: str) -> None:
        self.lines.append(line)
        self.head = Head(self.head.seq + 1, digest)

    def event(self, detail: bytes = b'{"command":"hsm show"}') -> bytes:
        line, digest = with_hash(body(self.head.seq + 1, self.head.hash, detail))
        self.add(line, digest)
        return line

    def crafted(self, raw_body: bytes, at: int | None = None) -> None:
        """A line the device wrote and hashed as it is: the chain goes on from it."""
        line, digest = with_hash(raw_body, at)
        self.add(line, digest)

    def checkpoint(self) -> None:
        record = auditlog.make_checkpoint(
            self.head, self.signer, device=DEVICE, time="2026-11-29T20:00:01Z"
        )
        self.add(auditlog.record_line(record), record["hash"])


def first_collection(signer: auditlog.SoftwareSigner) -> Log:
    """Records 1-4 and a checkpoint (5): what the archive holds before each case."""
    log = Log(signer)
    for _ in range(4):
        log.event()
    log.checkpoint()
    return log


HEAD_SEQ = 5
BAD_SEQ = 7


def _move_hash(line: bytes, to: Callable[[bytes], int]) -> bytes:
    """The same bytes hashed, the ``,"hash":"H"`` member moved to ``to(body)``: the chain
    and every signature still hold, the line means something else (or nothing)."""
    start = line.index(b',"hash":"')
    member = line[start : start + 74]
    rest = line[:start] + line[start + 74 :]
    at = to(rest)
    return rest[:at] + member + rest[at:]


def _replace_seq(log: Log, seq: int, line: bytes) -> None:
    log.lines[seq - 1] = line


# Each builder gets a log of records 1-5 and leaves what the device will export.
Builder = Callable[[Log], None]


def honest_then(edit: Callable[[bytes], bytes]) -> Builder:
    """Records 6-8 and a checkpoint, all honest; then someone without the key edits the
    line of record 7."""

    def build(log: Log) -> None:
        for _ in range(3):
            log.event()
        log.checkpoint()
        _replace_seq(log, BAD_SEQ, edit(log.lines[BAD_SEQ - 1]))

    return build


def signed(bad_body: Callable[[Log], bytes], at: Callable[[bytes], int] | None = None) -> Builder:
    """Record 6 honest, record 7 what the device crafted (hashed as written, chained),
    record 8 honest, and a checkpoint the device signs over all of it."""

    def build(log: Log) -> None:
        log.event()
        raw = bad_body(log)
        log.crafted(raw, None if at is None else at(raw))
        log.event()
        log.checkpoint()

    return build


def _body7(log: Log, detail: bytes = b'{"command":"hsm show"}') -> bytes:
    return body(log.head.seq + 1, log.head.hash, detail)


def _spaces(line: bytes) -> bytes:
    record = json.loads(line)
    return json.dumps(record, sort_keys=True).encode() + b"\n"  # ", " and ": "


def _seq_first(log: Log) -> bytes:
    record = json.loads(with_hash(_body7(log))[0])
    del record["hash"]
    ordered = {"seq": record.pop("seq"), **record}
    return json.dumps(ordered, separators=(",", ":")).encode()


def _invalid_utf8(line: bytes) -> bytes:
    return line.replace(b'"actor":"admin"', b'"actor":"adm\xffn"', 1)


def _nul(line: bytes) -> bytes:
    return line.replace(b'"actor":"admin"', b'"actor":"adm\x00n"', 1)


def _duplicate(line: bytes) -> bytes:
    return line.replace(b'"actor":"admin"', b'"actor":"admin","actor":"root"', 1)


def _nested(depth: int) -> Callable[[Log], bytes]:
    return lambda log: _body7(log, b'{"x":' + b"[" * depth + b"]" * depth + b"}")


@dataclass(frozen=True)
class Case:
    """One hostile export. ``build`` for a finite stream (the log's lines after record 4);
    ``stream`` for one too long to hold (it writes into the sink itself)."""

    name: str
    seq: int
    exit_code: int = 3
    build: Builder | None = None
    stream: Callable[[Log, BinaryIO], None] | None = None
    format_violation: bool = True
    """The auditlog verifiers must refuse it too (not only the collector's limits)."""
    needs: str = ""
    """The fix elsewhere this case waits for (it fails until then)."""
    workers: int = 0
    """Verification processes (0: in the collecting thread, as small collections are)."""


def _endless_unsigned(log: Log, sink: BinaryIO) -> None:
    sink.write(log.lines[HEAD_SEQ - 1])
    batch: list[bytes] = []
    for line in endless(log.head.seq, log.head.hash, ENDLESS):
        batch.append(line)
        if len(batch) == 2000:
            sink.write(b"".join(batch))
            batch.clear()


def _endless_garbage(log: Log, sink: BinaryIO) -> None:
    sink.write(log.lines[HEAD_SEQ - 1])
    piece = b"y\n" * 32768
    for _ in range(ENDLESS // 100):
        sink.write(piece)


def _huge_line(log: Log, sink: BinaryIO) -> None:
    """256 MiB without a line end (then one), in 1 MiB writes."""
    sink.write(log.lines[HEAD_SEQ - 1])
    log.event()
    sink.write(log.lines[-1])
    piece = b"x" * (1 << 20)
    for _ in range(256):
        sink.write(piece)
    sink.write(b"\n")


def _nested_in_a_pooled_chunk(log: Log, sink: BinaryIO) -> None:
    """Past the first 4 MiB chunk (verified in this process, it teaches the device's name),
    chunks go to worker processes, and the collecting thread reads ahead in each one for
    the key rotations it announces (``pipeline._speculate``): a line claiming to be one,
    nested 200,000 levels deep, reaches that reader before any verifier."""
    sink.write(log.lines[HEAD_SEQ - 1])
    filler = b"".join(log.event(b'{"pad":"' + b"p" * 700 + b'"}') for _ in range(6000))
    sink.write(filler)  # records 6..6005, about 5 MiB
    deep = b"[" * 200_000 + b"]" * 200_000
    line, digest = with_hash(
        body(log.head.seq + 1, log.head.hash, b'{"x":' + deep + b"}").replace(
            b'"event":"command"', b'"event":"key-rotation"'
        )
    )
    log.add(line, digest)
    sink.write(line)
    for _ in range(10):
        sink.write(log.event())


def _stall(log: Log, sink: BinaryIO) -> None:
    """What the transport reports for a device that sent the head, then nothing."""
    sink.write(log.lines[HEAD_SEQ - 1])
    raise UnreachableError("127.0.0.1: 'audit export --after 4' stalled: no output for 2 s")


def _to_detail(rest: bytes) -> int:
    return rest.index(b'"},"event"') + 1  # inside detail, after its last member


def _to_detail_string(rest: bytes) -> int:
    return rest.index(b'hsm show"') + 3  # inside the command string


def _to_event_string(rest: bytes) -> int:
    return rest.index(b'"event":"command"') + 12  # inside the event string


CASES = [
    # Someone without the key moves a record's hash member: same bytes hashed, so the
    # chain and the checkpoint's signature hold; the line is no longer that record.
    Case(
        "moved-hash-into-detail",
        BAD_SEQ,
        build=honest_then(lambda line: _move_hash(line, _to_detail)),
        needs=FIX_VERIFIER,
    ),
    Case(
        "moved-hash-into-a-detail-string",
        BAD_SEQ,
        build=honest_then(lambda line: _move_hash(line, _to_detail_string)),
        needs=FIX_VERIFIER,
    ),
    Case(
        "moved-hash-into-the-event-string",
        BAD_SEQ,
        build=honest_then(lambda line: _move_hash(line, _to_event_string)),
        needs=FIX_VERIFIER,
    ),
    # Non-canonical but valid JSON: re-serialised with its hash kept, or written so
    # (and hashed and signed) by the device itself.
    Case("non-canonical-reserialised", BAD_SEQ, build=honest_then(_spaces)),
    Case("non-canonical-signed", BAD_SEQ, build=signed(_seq_first), needs=FIX_VERIFIER),
    Case("duplicate-key-edited", BAD_SEQ, build=honest_then(_duplicate)),
    Case(
        "duplicate-key-signed",
        BAD_SEQ,
        build=signed(lambda log: _duplicate(_body7(log))),
        needs=FIX_VERIFIER,
    ),
    # Huge lines: a record the device hashed and signed but far longer than any record
    # (1 MiB; nothing in the format forbids it, the collector's limit does), and 256 MiB
    # without a line end.
    Case(
        "huge-line-signed",
        BAD_SEQ,
        build=signed(lambda log: _body7(log, b'{"pad":"' + b"x" * (1 << 20) + b'"}')),
        format_violation=False,
    ),
    Case("huge-line-256MiB", BAD_SEQ, stream=_huge_line, format_violation=False),
    # Endless: valid records and never a checkpoint; lines that are not records.
    Case("endless-without-checkpoint", HEAD_SEQ + 1, stream=_endless_unsigned),
    Case("endless-garbage", HEAD_SEQ + 1, stream=_endless_garbage),
    # Deep nesting: 200,000 levels (longer than a record may be), and 30,000 (shorter).
    Case(
        "deep-nesting-200k",
        BAD_SEQ,
        build=signed(_nested(200_000)),
        format_violation=False,
    ),
    Case("deep-nesting-30k", BAD_SEQ, build=signed(_nested(30_000)), needs=FIX_RECURSION),
    Case("invalid-utf8-edited", BAD_SEQ, build=honest_then(_invalid_utf8)),
    Case(
        "invalid-utf8-signed",
        BAD_SEQ,
        build=signed(lambda log: _invalid_utf8(_body7(log))),
        needs=FIX_VERIFIER,
    ),
    Case("nul-byte-edited", BAD_SEQ, build=honest_then(_nul)),
    Case(
        "nul-byte-signed",
        BAD_SEQ,
        build=signed(lambda log: _nul(_body7(log))),
        needs=FIX_VERIFIER,
    ),
    Case(
        "deep-nesting-in-a-pooled-chunk",
        HEAD_SEQ + 6001,
        stream=_nested_in_a_pooled_chunk,
        format_violation=False,
        needs="needs the bounded parse in pipeline._speculate (hsmctl/devicejson)",
        workers=2,
    ),
    # The transport gives up on a device that stalls after the head (exit 4).
    Case("stall-after-the-head", HEAD_SEQ, exit_code=4, stream=_stall, format_violation=False),
]
BY_NAME = {c.name: c for c in CASES}


def hostile_export(case: Case, log: Log) -> Callable[[int, BinaryIO], None]:
    """The transport, injected: ``stream(after, sink)`` writes what the device sends."""

    def export(after: int, sink: BinaryIO) -> None:
        assert after == HEAD_SEQ - 1
        if case.stream is not None:
            case.stream(log, sink)
            return
        data = b"".join(log.lines[after:])
        for i in range(0, len(data), 65536):
            sink.write(data[i : i + 65536])

    return export


# -- the archive before each case ---------------------------------------------------------------


@dataclass(frozen=True)
class Base:
    dir: Path
    signer: auditlog.SoftwareSigner
    log: Log

    @property
    def trust(self) -> TrustState:
        return TrustState({self.signer.key_id: self.signer.public_key_pem})


def _make_base(directory: Path) -> Base:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    signer = auditlog.SoftwareSigner.from_pem(pem)
    log = first_collection(signer)
    directory.mkdir(parents=True)
    (directory / "signer.pem").write_bytes(pem)
    (directory / "log.jsonl").write_bytes(b"".join(log.lines))
    archive = Archive(ApplianceDir(directory / "state", APPLIANCE).dir / "archive", APPLIANCE)
    trust = TrustState({signer.key_id: signer.public_key_pem})
    with archive.lock(exclusive=True):
        before = archive.recover()
        after = ingest(
            archive,
            before,
            trust_roots(trust.trusted, (), before),
            lambda _, sink: sink.write(b"".join(log.lines)),
        )
    assert after.seq == HEAD_SEQ
    return Base(directory, signer, log)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return _make_base(tmp_path_factory.mktemp("hostile") / "base")


def fresh(base: Base, where: Path) -> Path:
    """A copy of the base state for one case."""
    shutil.copytree(base.dir, where)
    return where


def archive_digest(state: Path) -> str:
    """Every file of the archive directory but the lock, names and bytes."""
    digest = hashlib.sha256()
    directory = state / "state" / "appliances" / APPLIANCE / "archive"
    for path in sorted(directory.iterdir()):
        if path.name != "lock":
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# -- the child that collects --------------------------------------------------------------------


def _load(where: Path) -> tuple[auditlog.SoftwareSigner, Log, Archive]:
    signer = auditlog.SoftwareSigner.from_pem((where / "signer.pem").read_bytes())
    lines = (where / "log.jsonl").read_bytes().splitlines(keepends=True)
    archive = Archive(ApplianceDir(where / "state", APPLIANCE).dir / "archive", APPLIANCE)
    return signer, Log(signer, lines), archive


def _report(run: Callable[[], object]) -> None:
    """Print how the collection ended, as the CLI would see it (a crash is exit 1)."""
    try:
        run()
        outcome: dict[str, Any] = {"exit_code": 0}
    except HsmctlError as exc:
        outcome = {"exit_code": exc.exit_code, "message": str(exc), "error": type(exc).__name__}
    except BaseException as exc:  # the collector's catch-all turns it into exit 1
        outcome = {"exit_code": 1, "message": f"crash: {type(exc).__name__}: {str(exc)[:300]}"}
    print(json.dumps(outcome))


def child_ingest(name: str, where: str) -> None:
    """In the measured child: one case through ``ingest``, the transport injected."""
    case = BY_NAME[name]
    signer, log, archive = _load(Path(where))
    if case.build is not None:
        case.build(log)
    trust = {signer.key_id: signer.public_key_pem}

    def run() -> None:
        pool = VerifyPool(case.workers) if case.workers else None
        if pool is not None:
            pool.start(wait=True)  # the workers' path, not this thread's while they start
        try:
            with archive.lock(exclusive=True):
                before = archive.recover()
                trusted = trust_roots(trust, (), before)
                ingest(archive, before, trusted, hostile_export(case, log), pool)
        finally:
            if pool is not None:
                pool.close()

    _report(run)


def child_collect(
    where: str, port: int, key: str, pin: str, timeout: float, stall: float = 2.0
) -> None:
    """In the measured child: ``collect`` over SSH, as a timer run would."""
    signer, _, _ = _load(Path(where))
    target = Target(
        appliance=APPLIANCE,
        state=ApplianceDir(Path(where) / "state", APPLIANCE),
        data_ip="127.0.0.1",
        host_keys=(pin,),
        audit_keys={signer.key_id: signer.public_key_pem},
        retired=frozenset(),
        key=Path(key),
        port=port,
    )
    options = CollectOptions(timeout=timeout, stall_timeout=stall, workers=0, parallel=1)
    _report(lambda: collect(target, options))


def check(
    name: str, exit_code: int, seq: int, m: Any, before: str, after: str, needs: str, bound: float
) -> None:
    message = str(m.result.get("message", ""))
    print(
        f"{name}: exit {m.result.get('exit_code')}, peak RSS {m.peak_mib:.0f} MiB, "
        f"{m.seconds:.1f} s: {message[:300]}"
    )
    why = f" ({needs})" if needs else ""
    assert m.status == 0, f"child ended with {m.status} after {m.seconds:.0f} s: {m.stderr[-2000:]}"
    assert m.result["exit_code"] == exit_code, message + why
    assert message.startswith(f"{APPLIANCE}: "), message + why
    assert re.search(rf"\brecord {seq}\b", message), message + why
    assert after == before, "the archive changed" + why
    assert m.peak_mib < bound, f"peak RSS {m.peak_mib:.0f} MiB, more than {bound} MiB" + why


def _params(cases: list[Case]) -> list[Any]:
    return [pytest.param(c, id=c.name) for c in cases]


@pytest.mark.unit
@pytest.mark.parametrize("case", _params(CASES))
def test_hostile_export_through_ingest(base: Base, tmp_path: Path, case: Case) -> None:
    where = fresh(base, tmp_path / "case")
    before = archive_digest(where)
    m = measured(
        "from tests.unit.test_collect_hostile import child_ingest\n"
        f"child_ingest({case.name!r}, {str(where)!r})\n",
        timeout=600,
    )
    after = archive_digest(where)
    check(case.name, case.exit_code, case.seq, m, before, after, case.needs, INGEST_BOUND_MIB)


# -- the verifiers themselves --------------------------------------------------------------------

FINITE = [c for c in CASES if c.build is not None]


@pytest.mark.unit
@pytest.mark.parametrize("case", _params(FINITE))
def test_the_chunked_verifier_refuses_the_record(base: Base, case: Case) -> None:
    """The collector's pipeline (also ``hsmctl logs verify``): the first violation is at
    the record, and nothing of the stream is handed on for storing after it."""
    log = Log(base.signer, base.log.lines)
    assert case.build is not None
    case.build(log)
    stored: list[int] = []
    verifier = ChunkedVerifier(
        base.trust,
        GENESIS_HEAD,
        on_verified=lambda chunk, result: stored.append(result.head.seq),
        chunk_bytes=1 << 16,
    )
    data = b"".join(log.lines)
    try:
        for i in range(0, len(data), 4096):
            verifier.feed(data[i : i + 4096])
    except Halted:
        pass
    summary = verifier.finish()
    assert summary.violations, f"accepted {case.needs}"
    assert summary.violations[0].seq == case.seq, summary.violations
    assert all(seq < case.seq for seq in stored)


@pytest.mark.unit
@pytest.mark.parametrize("case", _params([c for c in FINITE if c.format_violation]))
def test_the_log_verifiers_refuse_the_record(base: Base, case: Case) -> None:
    """``verify_lines`` (one pass) and ``verify_block`` (the fast path): a format
    violation, whatever signed it."""
    log = Log(base.signer, base.log.lines)
    assert case.build is not None
    case.build(log)
    trusted = base.trust.trusted
    one_pass = auditlog.verify_lines(log.lines, trusted, require_final_checkpoint=True)
    found = [v.seq for v in one_pass.violations]
    assert found[:1] == [case.seq], f"verify_lines: {one_pass.violations} {case.needs}"
    lines = [line.rstrip(b"\n") for line in log.lines]
    block = auditlog.verify_block(lines, trusted)
    found = [v.seq for v in block.violations]
    assert found[:1] == [case.seq], f"verify_block: {block.violations} {case.needs}"


@pytest.mark.unit
def test_the_corpus_generator_writes_what_the_device_writes(base: Base) -> None:
    """The fast line builder is the device's format, byte for byte."""
    line, digest = with_hash(body(1, GENESIS_HEAD.hash))
    record = auditlog.make_record(
        None,
        time="2026-11-29T20:00:00Z",
        actor="admin",
        role="admin",
        source="198.19.0.4",
        event="command",
        outcome="ok",
        detail={"command": "hsm show"},
    )
    assert line == auditlog.record_line(record) and digest == record["hash"]
    report = auditlog.verify_lines(base.log.lines, base.trust.trusted)
    assert report.ok and report.last_checkpoint_seq == HEAD_SEQ


@pytest.mark.unit
def test_limits_are_what_the_docs_say() -> None:
    limits = Limits()
    assert limits.record_bytes == RECORD_BYTES == 64 * 1024
    assert limits.unsigned_records == 200_000
    assert limits.unsigned_bytes == 128 * 1024 * 1024
    assert CollectOptions().timeout == 3600 and CollectOptions().stall_timeout == 120


# -- over SSH to a real sshd ---------------------------------------------------------------------


@dataclass(frozen=True)
class SshCase:
    name: str
    script: Callable[[Sshd, Log], str]
    exit_code: int
    seq: int
    timeout: float = 600.0
    stall: float = 2.0


def _head_file(server: Sshd, log: Log) -> str:
    return server.put("head.jsonl", log.lines[HEAD_SEQ - 1])


def _generator(server: Sshd) -> str:
    return server.put("generator.py", GENERATOR.encode())


SSH_CASES = [
    # stdout without end: lines that are not records.
    SshCase(
        "ssh-endless-garbage",
        lambda s, log: f"#!/bin/sh\ncat {_head_file(s, log)}\nexec yes\n",
        3,
        HEAD_SEQ + 1,
    ),
    # stdout without end: valid records, never a checkpoint (the device's own python).
    SshCase(
        "ssh-endless-without-checkpoint",
        lambda s, log: (
            f"#!/bin/sh\ncat {_head_file(s, log)}\n"
            f"exec python3 {_generator(s)} {log.head.seq} {log.head.hash} {ENDLESS} 0\n"
        ),
        3,
        HEAD_SEQ + 1,
        stall=30.0,  # the device's python may take seconds to start on a loaded machine
    ),
    # stderr without end, nothing on stdout: a stall as far as the log goes (exit 4).
    SshCase(
        "ssh-endless-stderr",
        lambda s, log: f"#!/bin/sh\ncat {_head_file(s, log)}\nexec cat /dev/zero >&2\n",
        4,
        HEAD_SEQ,
    ),
    # The head, then nothing.
    SshCase(
        "ssh-stall-after-the-head",
        lambda s, log: f"#!/bin/sh\ncat {_head_file(s, log)}\nexec sleep 600\n",
        4,
        HEAD_SEQ,
    ),
    # Never silent for long, never over a limit: five records a second without a
    # checkpoint, for ever. Only the run's deadline (here 6 s) ends it.
    SshCase(
        "ssh-chatty-past-the-deadline",
        lambda s, log: (
            f"#!/bin/sh\ncat {_head_file(s, log)}\n"
            f"exec python3 {_generator(s)} {log.head.seq} {log.head.hash} {ENDLESS} 0.2\n"
        ),
        4,
        HEAD_SEQ,
        timeout=6.0,
    ),
]


@pytest.mark.lab
@needs_root()
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in SSH_CASES])
def test_hostile_export_over_ssh(base: Base, sshd: Sshd, tmp_path: Path, case: SshCase) -> None:
    where = fresh(base, tmp_path / "case")
    log = Log(base.signer, base.log.lines)
    sshd.serve(case.script(sshd, log))
    before = archive_digest(where)
    started = time.monotonic()
    m = measured(
        "from tests.unit.test_collect_hostile import child_collect\n"
        f"child_collect({str(where)!r}, {sshd.port}, {str(sshd.key)!r}, {sshd.host_key!r},"
        f" {case.timeout}, stall={case.stall})\n",
        timeout=600,
    )
    after = archive_digest(where)
    check(case.name, case.exit_code, case.seq, m, before, after, "", SSH_BOUND_MIB)
    if case.exit_code == 4:
        assert time.monotonic() - started < min(case.timeout, 2.0) + 20


@pytest.mark.lab
@needs_root()
def test_stderr_flood_beside_a_good_export_is_kept_short(
    base: Base, sshd: Sshd, tmp_path: Path
) -> None:
    """300 MB of stderr while the export is good: collected, in bounded memory."""
    where = fresh(base, tmp_path / "case")
    log = Log(base.signer, base.log.lines)
    for _ in range(3):
        log.event()
    log.checkpoint()
    export = sshd.put("export.jsonl", b"".join(log.lines[HEAD_SEQ - 1 :]))
    sshd.serve(f"#!/bin/sh\nhead -c 300000000 /dev/zero >&2\ncat {export}\n")
    m = measured(
        "from tests.unit.test_collect_hostile import child_collect\n"
        # stderr is not progress: the 300 MB must not pass for a stall on a loaded machine
        f"child_collect({str(where)!r}, {sshd.port}, {str(sshd.key)!r}, {sshd.host_key!r},"
        " 600, stall=60)\n",
        timeout=600,
    )
    print(f"stderr beside a good export: peak RSS {m.peak_mib:.0f} MiB, {m.seconds:.1f} s")
    assert m.status == 0 and m.result == {"exit_code": 0}, (m.result, m.stderr[-2000:])
    assert m.peak_mib < SSH_BOUND_MIB
    _, _, archive = _load(where)
    assert archive.cursor().seq == log.head.seq
