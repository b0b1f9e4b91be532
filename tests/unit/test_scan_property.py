"""The compiled byte scan (``hsmctl/auditlog/_scan.c``) against the Python one it speeds
up (``blockscan._link_scan`` with ``compiled=False``): identical results on hostile logs.

The C code takes a line only when the Python path would accept it as an unsigned record
of the common shape, and leaves every other line to the Python path; so the two must give
the same count, running hash and signed indexes on *any* input. The logs here are many
device-like records (flat details, mostly plain ASCII: what the C code takes), long
enough that the scan's growing windows are crossed, with hostile changes to one line
aimed at the grammar the C code parses by hand — byte flips and inserted bytes anywhere
(quotes, backslashes, escapes, NUL, DEL, non-ASCII, invalid UTF-8), truncation, huge and
malformed numbers, times and outcomes, duplicate, reordered and too many detail keys,
signed-event look-alikes of the common shape, and wrong ``seq``/``prev``/``hash`` (upper
case, off by one). Every change is tried as a tamperer leaves it and "rehashed" (the
line's own hash made to match, the rest of the chain rebuilt on it, checkpoints
re-signed), so the grammar, not only the hash, decides. And the fast verifier with the C
scan on still equals the full verifier (test_verify_property's property, here with the
scan asserted present), and a chunk verified on its bytes without being split into lines
(``blockscan.verify_buffer``) gives the ``verify_chunk`` result its lines give.

In CI (``CI=true``) the extension must have been built: the speed path is exercised there.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from hsmctl.auditlog import blockscan
from hsmctl.auditlog.blockscan import ScanModule, _link_scan
from hsmctl.auditlog.chain import GENESIS, GENESIS_HEAD, Head, Record, make_record, record_line
from hsmctl.auditlog.signing import make_checkpoint, make_key_rotation
from hsmctl.auditlog.verify import verify_block, verify_lines
from hsmctl.collect.pipeline import RECORD_BYTES, TrustState, verify_chunk
from tests.unit.test_verify_property import _LONG_STEPS as LONG_STEPS
from tests.unit.test_verify_property import (
    DEVICE,
    PROPERTY,
    Case,
    check_accepted,
    hostile,
    pins,
    self_hashed,
    signers,
)

pytestmark = pytest.mark.unit


IN_CI = os.environ.get("CI") == "true"


def compiled_scan() -> ScanModule:
    """The extension; in CI it must be there, elsewhere a checkout may lack a compiler.
    (pytest.fail, not assert: a failed assert would print the environment.)"""
    if blockscan.SCAN is None:
        if IN_CI:
            pytest.fail("hsmctl.auditlog._scan was not built in CI (pip install skipped it)")
        pytest.skip("hsmctl.auditlog._scan is not built here (no compiler or libssl-dev)")
    return blockscan.SCAN


def test_the_compiled_scan_is_built_in_ci() -> None:
    """Fails in CI (CI=true) without the extension, so the speed path is exercised there."""
    compiled_scan()


# -- device-like logs ---------------------------------------------------------------------------

_KEYS = st.sampled_from(["command", "exit", "interface", "rule", "session", "", "a", "b"])
_PLAIN_TEXT = st.text(st.sampled_from("ab0 -:/.{}[],"), max_size=8)
_PLAIN_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**18), 10**18), _PLAIN_TEXT
)  # fmt: skip
_VALUES = st.one_of(
    *[_PLAIN_VALUES] * 6,
    st.integers(-(2**70), 2**70),
    st.text(st.sampled_from('a "\\\n\x00\x7fé/'), max_size=4),  # escapes, non-ASCII
)
_DETAILS = st.dictionaries(_KEYS, _VALUES, max_size=8)
_TIMES = st.sampled_from(
    ["2026-11-29T20:01:02Z", "2026-11-29T20:01:02.5Z", "2026-11-29T20:01:02.123456789Z"]
)


@dataclass(frozen=True)
class Plain:
    event: str
    outcome: str
    time: str
    detail: dict[str, Any]


_RECORDS = st.builds(
    Plain,
    event=st.sampled_from(["login", "command", "result", "session-end", "checkpoint!", ""]),
    outcome=st.sampled_from(["ok", "denied", "failed", "error"]),
    time=_TIMES,
    detail=_DETAILS,
)
_PATTERN = st.lists(
    st.one_of(*[_RECORDS] * 30, st.just("checkpoint"), st.just("rotate")), min_size=1, max_size=12
)


@st.composite
def _steps(draw: st.DrawFn) -> list[Any]:
    """A few records repeated to a length that crosses the scan's windows (64 lines,
    doubling) or not; each repeat is a new record (its own seq, prev, hash)."""
    pattern = draw(_PATTERN)
    size = draw(st.sampled_from([len(pattern), len(pattern), 40, 63, 64, 65, 200, 600]))
    return (pattern * (size // len(pattern) + 1))[:size]


_STEPS = _steps()
_START_SEQS = st.sampled_from([0, 0, 0, 41, 10**18 - 400, 10**18 - 2, 2**63])


def build(
    steps: list[Any],
    start: Head,
    index: int = -1,
    change: Callable[[bytes], bytes] | None = None,
    *,
    rehash: bool = False,
) -> list[bytes]:
    """The lines of ``steps`` after ``start``; line ``index`` changed by ``change`` (on its
    bytes), and with ``rehash`` the chain rebuilt on the changed line's own hash."""
    keys = signers()
    out: list[bytes] = []
    head: Head | None = None if start == GENESIS_HEAD else start
    key = 0
    for i, step in enumerate(steps):
        record: Record
        if step == "checkpoint" and head is not None:
            record = make_checkpoint(head, keys[key], device=DEVICE, time="2026-11-29T20:01:03Z")
        elif step == "rotate" and head is not None and key == 0:
            record = make_key_rotation(
                head, keys[0], keys[1], device=DEVICE, time="2026-11-29T20:01:03Z"
            )
            key = 1
        else:
            p = step if isinstance(step, Plain) else Plain("boot", "ok", "2026-11-29T20:01:02Z", {})
            record = make_record(
                head,
                time=p.time,
                actor="admin",
                role="admin",
                source="198.19.0.4",
                event=p.event,
                outcome=p.outcome,
                detail=p.detail,
            )
        line = record_line(record)[:-1]
        head = Head.of(record)
        if i == index and change is not None:
            line = change(line)
            if rehash:
                line, claimed = self_hashed(line)
                head = Head(head.seq, claimed)
        out.append(line)
    return out


# -- hostile changes to one line's bytes ------------------------------------------------------

_BYTES = st.sampled_from(
    [b'"', b"\\", b",", b":", b"{", b"}", b"0", b"1", b"9", b"-", b".", b"Z", b"T", b"z",
     b"a", b"F", b"\x00", b"\x1f", b"\x7f", b"\x80", b"\xff", b"\xc3", b" ", b"\t"]
)  # fmt: skip
_SNIPPETS = st.sampled_from(
    [
        b"\\n",
        b"\\u0041",
        b"\\/",
        "é".encode(),
        b"\xc3",
        b"\xed\xa0\x80",
        b"\x00",
        b',"x":1',
        b',"a":1,"a":2',
        b'"',
        b"0",
        b"-",
        b"9" * 19,
        b".5",
        b"e0",
        b"true",
        b"nul",
        b"}",
        b"{",
        b"\r",
        b"\n",
        b',"hash":"' + b"0" * 64 + b'"',
    ]
)


def _sub(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    return lambda line: line.replace(old, new, 1)


def _detail(new: bytes) -> Callable[[bytes], bytes]:
    """The detail object replaced by ``new``."""

    def change(line: bytes) -> bytes:
        lo = line.index(b'"detail":') + len(b'"detail":')
        hi = line.index(b',"event":')
        return line[:lo] + new + line[hi:]

    return change


def _upper(line: bytes, member: bytes) -> bytes:
    """The hex value of the top-level ``member`` in upper case."""
    at = line.rindex(member) + len(member)
    return line[:at] + line[at : at + 64].upper() + line[at + 64 :]


def _seq(to: Callable[[int], bytes]) -> Callable[[bytes], bytes]:
    def change(line: bytes) -> bytes:
        lo = line.rindex(b',"seq":') + 7
        hi = line.index(b",", lo)
        return line[:lo] + to(int(line[lo:hi])) + line[hi:]

    return change


NAMED: dict[str, Callable[[bytes], bytes]] = {
    "duplicate detail key": _detail(b'{"a":1,"a":1}'),
    "unsorted detail keys": _detail(b'{"b":1,"a":1}'),
    "equal prefix keys": _detail(b'{"a":1,"ab":2,"b":3}'),
    "shorter key after": _detail(b'{"ab":1,"a":2}'),
    "eight members": _detail(b'{"a":0,"b":1,"c":2,"d":3,"e":4,"f":5,"g":6,"h":7}'),
    "nine members": _detail(b'{"a":0,"b":1,"c":2,"d":3,"e":4,"f":5,"g":6,"h":7,"i":8}'),
    "18-digit value": _detail(b'{"a":-999999999999999999}'),
    "19-digit value": _detail(b'{"a":1000000000000000000}'),
    "negative zero": _detail(b'{"a":-0}'),
    "leading zero": _detail(b'{"a":01}'),
    "float": _detail(b'{"a":1.0}'),
    "nested object": _detail(b'{"a":{}}'),
    "array": _detail(b'{"a":[]}'),
    "True": _detail(b'{"a":True}'),
    "empty key": _detail(b'{"":null}'),
    "space after colon": _detail(b'{"a": 1}'),
    "signed look-alike": _sub(b'"event":"login"', b'"event":"checkpoint"'),
    "rotation look-alike": _sub(b'"event":"command"', b'"event":"key-rotation"'),
    "outcome okay": _sub(b'"outcome":"ok"', b'"outcome":"okay"'),
    "outcome OK": _sub(b'"outcome":"ok"', b'"outcome":"OK"'),
    "time without Z": _sub(b'Z"}', b'"}'),
    "time lower z": _sub(b'Z"}', b'z"}'),
    "time ten digits": _sub(b'.123456789Z"', b'.1234567891Z"'),
    "time bare dot": _sub(b'02Z"', b'02.Z"'),
    "time offset": _sub(b'Z"}', b'+00:00"}'),
    "trailing bytes": lambda line: line + b" ",
    "leading bytes": lambda line: b" " + line,
    "upper-case hash": lambda line: _upper(line, b',"hash":"'),
    "seq + 1": _seq(lambda n: b"%d" % (n + 1)),
    "seq - 1": _seq(lambda n: b"%d" % (n - 1)),
    "seq with a leading zero": _seq(lambda n: b"0%d" % n),
    "seq 19 digits": _seq(lambda n: b"%d" % (n + 10**18)),
    "prev upper-case": lambda line: _upper(line, b',"prev":"'),
    "hash member twice": _sub(b',"outcome"', b',"hash":"' + b"0" * 64 + b'","outcome"'),
}  # fmt: skip


def _or_unchanged(change: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """A named change on a line that no longer has what it changes leaves it as it is."""

    def safe(line: bytes) -> bytes:
        try:
            return change(line)
        except ValueError:
            return line

    return safe


NAMED = {name: _or_unchanged(change) for name, change in NAMED.items()}


@st.composite
def byte_change(draw: st.DrawFn) -> tuple[str, Callable[[bytes], bytes]]:
    kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "named"]))
    where = draw(st.floats(0, 1))
    span = draw(st.integers(1, 12))
    if kind == "named":
        name = draw(st.sampled_from(sorted(NAMED)))
        return name, NAMED[name]
    byte, snippet = draw(_BYTES), draw(_SNIPPETS)

    def change(line: bytes) -> bytes:
        at = min(int(where * len(line)), len(line) - 1)
        if kind == "flip":
            return line[:at] + byte + line[at + 1 :]
        if kind == "insert":
            return line[:at] + snippet + line[at:]
        if kind == "delete":
            return line[:at] + line[at + span :]
        return line[:at]

    return f"{kind} at {where:.3f} ({byte!r}, {snippet!r}, {span})", change


@st.composite
def hostile_scan(draw: st.DrawFn) -> Case:
    steps = draw(_STEPS)
    seq = draw(_START_SEQS)
    start = GENESIS_HEAD if seq == 0 else Head(seq, draw(st.sampled_from(["ab" * 32, GENESIS])))
    how = draw(st.sampled_from(["change", "change", "change", "clean", "lines"]))
    index = draw(st.integers(0, len(steps) - 1))
    if how == "change":
        name, change = draw(byte_change())
        rehash = draw(st.booleans())
        lines = build(steps, start, index, change, rehash=rehash)
        what = f"{name} at line {index}" + (", rehashed" if rehash else "")
    else:
        lines = build(steps, start)
        what = "clean"
        if how == "lines":
            op = draw(st.sampled_from(["delete", "duplicate", "swap", "empty"]))
            other = draw(st.integers(0, len(lines) - 1))
            if op == "delete":
                del lines[index]
            elif op == "duplicate":
                lines.insert(index, lines[index])
            elif op == "swap":
                lines[index], lines[other] = lines[other], lines[index]
            else:
                lines.insert(index, b"")
            what = f"line {op} at {index}"
    return Case(lines, start, what)


# -- the properties -----------------------------------------------------------------------------


@settings(PROPERTY, max_examples=600)
@given(hostile_scan())
def test_compiled_and_python_scans_agree_on_hostile_logs(case: Case) -> None:
    scan = compiled_scan()
    start = case.start or GENESIS_HEAD
    fast = _link_scan(case.lines, start)
    reference = _link_scan(case.lines, start, compiled=False)
    assert fast == reference, case.what
    n = len(case.lines)
    event(f"lines: {'<64' if n < 64 else '64-300'}; linked: {'all' if fast[0] == n else 'some'}")
    if 1 <= start.seq + 1 <= 10**18 - n:
        taken = scan.scan(case.lines, 0, start.hash.encode(), start.seq + 1)[0]
        event(f"C took from the start: {'0' if not taken else '<64' if taken < 64 else '>=64'}")


@settings(PROPERTY, max_examples=300)
@given(hostile_scan())
def test_fast_and_full_verifier_agree_with_the_compiled_scan(case: Case) -> None:
    compiled_scan()
    full = verify_lines(case.lines, pins(), device=DEVICE, start=case.start)
    fast = verify_block(case.lines, pins(), device=DEVICE, start=case.start)
    assert fast == full, case.what
    check_accepted(case.lines, full)


@settings(PROPERTY, max_examples=400)
@given(hostile(LONG_STEPS))
def test_fast_and_full_verifier_agree_on_the_issue_10_cases_with_the_compiled_scan(
    case: Case,
) -> None:
    """test_verify_property's hostile logs again, the C scan asserted on."""
    compiled_scan()
    full = verify_lines(case.lines, pins(), device=DEVICE, start=case.start)
    assert verify_block(case.lines, pins(), device=DEVICE, start=case.start) == full, case.what
    assert _link_scan(case.lines, case.start or GENESIS_HEAD) == _link_scan(
        case.lines, case.start or GENESIS_HEAD, compiled=False
    ), case.what


@st.composite
def hostile_line(draw: st.DrawFn) -> Case:
    """One record after a head, with one to three changes, mostly rehashed: the grammar
    the C code parses by hand, decided by its bytes alone."""
    seq = draw(st.sampled_from([0, 7, 10**17, 10**18 - 2]))
    start = GENESIS_HEAD if seq == 0 else Head(seq, "cd" * 32)
    lines = build([draw(_RECORDS)], start)
    names = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 2)):
            name = draw(st.sampled_from(sorted(NAMED)))
            change = NAMED[name]
        else:
            name, change = draw(byte_change())
        lines = [change(lines[0])]
        names.append(name)
    if draw(st.integers(0, 3)):
        lines = [self_hashed(lines[0])[0]]
        names.append("rehashed")
    return Case(lines, start, ", ".join(names))


@settings(PROPERTY, max_examples=4000)
@given(hostile_line())
def test_compiled_and_python_scans_agree_on_one_hostile_line(case: Case) -> None:
    compiled_scan()
    start = case.start or GENESIS_HEAD
    fast = _link_scan(case.lines, start)
    assert fast == _link_scan(case.lines, start, compiled=False), case.what
    event(f"linked: {fast[0]}")


def same_chunk_result(case: Case, ending: bytes, record_bytes: int) -> None:
    """verify_chunk with the compiled scan over the unsplit chunk (blockscan.verify_buffer)
    gives the ChunkResult the pure-Python path gives the split lines: verdict, counts,
    head, trust state and the covered bytes."""
    compiled_scan()
    data = b"\n".join(case.lines) + ending
    state = TrustState(pins(), frozenset(), DEVICE)
    start = case.start or GENESIS_HEAD
    fast = verify_chunk(data, state, start, None, record_bytes)
    saved = blockscan.SCAN
    blockscan.SCAN = None
    try:
        reference = verify_chunk(data, state, start, None, record_bytes)
    finally:
        blockscan.SCAN = saved
    assert fast == reference, case.what
    event(f"{'violation' if reference.violations else 'verified'}, covered {bool(fast.covered)}")


@settings(PROPERTY, max_examples=400)
@given(
    hostile_scan(),
    st.sampled_from([b"\n", b"\n", b"", b"\n\n"]),
    st.sampled_from([RECORD_BYTES, RECORD_BYTES, 300, 600]),
)
def test_a_chunk_verified_on_its_bytes_is_verified_as_its_lines(
    case: Case, ending: bytes, record_bytes: int
) -> None:
    """Also with lines over the record limit, an unended last line and empty lines."""
    same_chunk_result(case, ending, record_bytes)


@st.composite
def clean_chunk(draw: st.DrawFn) -> Case:
    steps = draw(_STEPS)
    seq = draw(_START_SEQS)
    start = GENESIS_HEAD if seq == 0 else Head(seq, "ab" * 32)
    return Case(build(steps, start), start, "clean")


@settings(PROPERTY, max_examples=150)
@given(clean_chunk(), st.sampled_from([b"\n", b""]), st.sampled_from([RECORD_BYTES, 500]))
def test_a_clean_chunk_verified_on_its_bytes_is_verified_as_its_lines(
    case: Case, ending: bytes, record_bytes: int
) -> None:
    """Chunks that verify (the fast path's own case), from genesis or any head."""
    same_chunk_result(case, ending, record_bytes)


# -- examples -------------------------------------------------------------------------------------


def _device_log(count: int) -> list[bytes]:
    steps = [
        "checkpoint" if i % 100 == 99 else Plain("command", "ok", "2026-11-29T20:01:02.5Z", {
            "command": "hsm show", "rule": "granted", "session": f"{i:08x}"})
        for i in range(count)
    ]  # fmt: skip
    return build(steps, GENESIS_HEAD)


def test_the_compiled_scan_takes_the_common_line_and_leaves_signed_ones() -> None:
    scan = compiled_scan()
    lines = _device_log(3000)
    # the first checkpoint is line 99: everything before it is the C code's alone
    end, running = scan.scan(lines, 0, GENESIS.encode(), 1)
    assert end == 99
    assert running == lines[98].split(b'"hash":"')[1][:64]
    count, last, signed = _link_scan(lines, GENESIS_HEAD)
    assert count == 3000 and [i for i, _ in signed] == list(range(99, 3000, 100))
    assert (count, last, signed) == _link_scan(lines, GENESIS_HEAD, compiled=False)
    assert verify_block(lines, pins(), device=DEVICE) == verify_lines(lines, pins(), device=DEVICE)


def test_lines_that_are_not_bytes_or_not_in_a_list_go_the_python_way() -> None:
    compiled_scan()
    lines = _device_log(300)
    mixed: list[Any] = [bytearray(line) if i % 7 == 3 else line for i, line in enumerate(lines)]
    reference = _link_scan(lines, GENESIS_HEAD, compiled=False)
    assert reference[0] == 300
    assert _link_scan(mixed, GENESIS_HEAD) == reference
    assert _link_scan(tuple(lines), GENESIS_HEAD) == reference


def test_the_compiled_scan_refuses_arguments_out_of_its_range() -> None:
    scan = compiled_scan()
    lines = _device_log(3)
    with pytest.raises(ValueError):
        scan.scan(lines, 0, b"0" * 63, 1)
    with pytest.raises(ValueError):
        scan.scan(lines, 0, GENESIS.encode(), 0)
    with pytest.raises(ValueError):
        scan.scan(lines, 0, GENESIS.encode(), 10**18 - 2)
    with pytest.raises(OverflowError):
        scan.scan(lines, 0, GENESIS.encode(), 2**64)
    with pytest.raises(TypeError):
        scan.scan(tuple(lines), 0, GENESIS.encode(), 1)  # type: ignore[arg-type]
    assert scan.scan(lines, 3, GENESIS.encode(), 1) == (3, GENESIS.encode())
    assert scan.scan(lines, 5, GENESIS.encode(), 1) == (5, GENESIS.encode())


def test_the_scan_runs_without_the_gil_and_gives_the_same_result_from_threads() -> None:
    """Four threads scan the same list at once (the GIL is released over each window):
    each gets the single-threaded answer."""
    scan = compiled_scan()
    steps = [Plain("command", "ok", "2026-11-29T20:01:02Z", {"n": i}) for i in range(4000)]
    lines = build(steps, GENESIS_HEAD)
    expected = scan.scan(lines, 0, GENESIS.encode(), 1)
    assert expected[0] == 4000
    results: list[tuple[int, bytes]] = []

    def run() -> None:
        for _ in range(5):
            results.append(scan.scan(lines, 0, GENESIS.encode(), 1))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 20
