"""The fast verifier (:func:`verify_block`) against the full one (:func:`verify_lines`),
as a property over generated logs and hostile changes to them (issue 10, defect 2).

The device is the adversary here: it holds the audit key, so it can make any bytes
hash-link and sign a checkpoint over them. Every mutation is therefore tried twice:
as a tamperer without keys leaves it (the rest of the log untouched), and "rehashed" —
the changed line gets a ``hash`` member that its other bytes hash to, and every record
after it is made again on top of it, checkpoints re-signed. The properties:

* both verifiers give the same report (verdict, violations, counts, heads, keys);
* whatever they accept is canonical JSON that ``json.loads`` reads back to the same
  bytes, with the hash the spec defines, and that the syslog export can render.

Mutation classes: byte edit, insert, delete and move (within a line or across lines);
NUL and invalid UTF-8 bytes; deleted, duplicated, swapped and inserted lines; the hash
member moved into ``detail``, into the middle of a string or to any position; renderings
that are valid but not canonical JSON (spaces, indentation, unsorted keys, ``\\u0041``
for ``A`` and ``ensure_ascii``, a duplicate key, ``seq`` as ``1.0`` or ``1e0``, ints as
floats, leading or trailing whitespace, CRLF, a BOM); huge and deeply nested values.
Hypothesis runs derandomized without a database, so every run tries the same examples.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsmctl.auditlog.chain import (
    Head,
    Outcome,
    Record,
    canonical,
    make_record,
    record_hash,
    record_line,
)
from hsmctl.auditlog.signing import SoftwareSigner, make_checkpoint, make_key_rotation
from hsmctl.auditlog.verify import VerifyReport, ViolationKind, verify_block, verify_lines
from hsmctl.collect.export import syslog_message
from hsmctl.devicejson import parse

pytestmark = pytest.mark.unit

DEVICE = "hsm-prop"
T = "2026-11-29T20:01:02.5Z"

PROPERTY = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
"""Reproducible: the same examples every run (about 3 s per 400 here)."""


@cache
def signers() -> tuple[SoftwareSigner, SoftwareSigner]:
    return SoftwareSigner.generate(), SoftwareSigner.generate()


def pins() -> dict[str, str]:
    first = signers()[0]
    return {first.key_id: first.public_key_pem}


# -- generated logs ---------------------------------------------------------------------------

# Characters the canonical form treats specially, and some it does not.
_TRICKY = st.sampled_from(['"', "\\", "/", "\x00", "\x08", "\x1f", "\x7f", "\u2028", "é", "😀"])
_TEXT = st.text(st.one_of(st.characters(codec="utf-8"), _TRICKY), max_size=8)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    _TEXT,
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_TEXT, inner, max_size=3)),
    max_leaves=6,
)
_DETAILS = st.one_of(
    st.dictionaries(st.sampled_from(["command", "exit", "rule", "session"]), _SCALARS),
    st.dictionaries(_TEXT, _SCALARS, max_size=10),
    st.dictionaries(_TEXT, _VALUES, max_size=4),
)


@dataclass(frozen=True)
class Event:
    actor: str
    role: str
    event: str
    outcome: str
    detail: dict[str, Any]


Step = Event | str  # or "checkpoint" / "rotate"

_EVENTS = st.builds(
    Event,
    actor=st.one_of(st.just("admin"), _TEXT),
    role=st.sampled_from(["admin", "audit", "system"]),
    event=st.one_of(st.sampled_from(["login", "command", "result", "session-end"]), _TEXT),
    outcome=st.sampled_from([o.value for o in Outcome]),
    detail=_DETAILS,
)
_STEPS = st.lists(
    st.one_of(_EVENTS, _EVENTS, _EVENTS, st.just("checkpoint"), st.just("rotate")),
    min_size=1,
    max_size=10,
).map(lambda steps: [*steps, "checkpoint"])  # at least one: the fast path needs one

# Device-like records: flat details the byte scan takes on its bytes (the common shape),
# many of them, and signed records rare or absent — so blocks end in a long unsigned
# tail, or hold no signed record at all, and the scan's verdict alone decides them.
_FLAT_DETAILS = st.dictionaries(
    st.sampled_from(["command", "exit", "interface", "rule", "session", "", "a!", "a"]),
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63),
        st.text(st.sampled_from('ab "\\\n\x00é/'), max_size=6),
    ),
    max_size=5,
)
_FLAT_EVENTS = st.builds(
    Event,
    actor=st.just("admin"),
    role=st.sampled_from(["admin", "audit"]),
    event=st.sampled_from(["login", "command", "result", "session-end"]),
    outcome=st.sampled_from([o.value for o in Outcome]),
    detail=_FLAT_DETAILS,
)
_LONG_STEPS = st.lists(
    st.one_of(*[_FLAT_EVENTS] * 12, st.just("checkpoint"), st.just("rotate")),
    min_size=1,
    max_size=40,
)


class Log:
    """Records made like the device makes them; line ``index`` can be replaced by any
    bytes, and with ``rehash`` the chain continues from those bytes, re-signed."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps

    def record(self, step: Step, head: Head | None, key: int) -> tuple[Record, int]:
        keys = signers()
        if step == "checkpoint" and head is not None:
            return make_checkpoint(head, keys[key], device=DEVICE, time=T), key
        if step == "rotate" and head is not None and key == 0:  # a retired key never returns
            return make_key_rotation(head, keys[0], keys[1], device=DEVICE, time=T), 1
        if step == "rotate" and head is not None:
            return make_checkpoint(head, keys[key], device=DEVICE, time=T), key
        e = step if isinstance(step, Event) else Event("hsmd", "system", "boot", "ok", {})
        record = make_record(
            head,
            time=T,
            actor=e.actor,
            role=e.role,
            source="192.0.2.7",
            event=e.event,
            outcome=e.outcome,
            detail=e.detail,
        )
        return record, key

    def lines(
        self,
        index: int = -1,
        change: Callable[[Record], bytes] | None = None,
        *,
        rehash: bool = False,
    ) -> list[bytes]:
        out: list[bytes] = []
        head: Head | None = None
        key = 0
        for i, step in enumerate(self.steps):
            record, key = self.record(step, head, key)
            line = record_line(record)[:-1]
            head = Head.of(record)
            if i == index and change is not None:
                line = change(record)
                if rehash:
                    line, claimed = self_hashed(line)
                    head = Head(record["seq"], claimed)
            out.append(line)
        return out


def self_hashed(line: bytes) -> tuple[bytes, str]:
    """What a device holding the key writes: the line's own hash member made to match
    its other bytes (the rule a byte-level check applies), wherever the member stands."""
    at = line.rfind(b',"hash":"')
    if at < 0:
        return line, "f" * 64
    body = line[:at] + line[at + 74 :]
    claimed = hashlib.sha256(body).hexdigest()
    return line[:at] + f',"hash":"{claimed}"'.encode() + line[at + 74 :], claimed


# -- hostile renderings of one record ---------------------------------------------------------


def _member(record: Record) -> bytes:
    return f',"hash":"{record["hash"]}"'.encode()


def _without(record: Record) -> Record:
    return {k: v for k, v in record.items() if k != "hash"}


def _canonical_body(record: Record) -> bytes:
    return canonical(_without(record))


def _at_outcome(body: bytes, record: Record) -> bytes:
    """Put the member where canonical JSON has it (before ``outcome``, however spaced)."""
    cut = body.rfind(b'"outcome"')
    cut = body.rfind(b",", 0, cut)
    return body[:cut] + _member(record) + body[cut:]


def into_detail(record: Record) -> bytes:
    body = _canonical_body(record)
    cut = body.rfind(b',"event":') - 1  # the closing brace of detail
    return body[:cut] + _member(record) + body[cut:]


def into_string(record: Record) -> bytes:
    body = _canonical_body(record)
    cut = body.index(b'"event":"') + len(b'"event":"') + 1  # just before prev: issue 10
    return body[:cut] + _member(record) + body[cut:]


def dumped(**options: Any) -> Callable[[Record], bytes]:
    def render(record: Record) -> bytes:
        text = json.dumps(_without(record), **{"ensure_ascii": False, **options})
        return _at_outcome(text.encode("utf-8", "surrogatepass"), record)

    return render


def unsorted(record: Record) -> bytes:
    body = json.dumps(dict(reversed(list(_without(record).items()))), separators=(",", ":"))
    line = body.encode()
    cut = line.index(b'"outcome"') + len(b'"outcome":"') + len(record["outcome"]) + 1
    return line[:cut] + _member(record) + line[cut:]


def replaced(old: bytes, new: bytes) -> Callable[[Record], bytes]:
    def render(record: Record) -> bytes:
        return record_line(record)[:-1].replace(old, new, 1)

    return render


def seq_as(form: str) -> Callable[[Record], bytes]:
    def render(record: Record) -> bytes:
        seq = record["seq"]
        return replaced(b',"seq":%d,' % seq, f',"seq":{form.format(seq)},'.encode())(record)

    return render


def duplicate_key(record: Record) -> bytes:
    return replaced(b'{"actor":', b'{"actor":"x","actor":')(record)


def detail_value(value: str) -> Callable[[Record], bytes]:
    def render(record: Record) -> bytes:
        return replaced(b'"detail":{', f'"detail":{{"\\u0000":{value},'.encode())(record)

    return render


def wrapped(prefix: bytes, suffix: bytes) -> Callable[[Record], bytes]:
    return lambda record: prefix + record_line(record)[:-1] + suffix


RENDERINGS: dict[str, Callable[[Record], bytes]] = {
    "hash member into detail": into_detail,
    "hash member into a string": into_string,
    "spaces": dumped(sort_keys=True, separators=(", ", ": ")),
    "indented": dumped(sort_keys=True, indent=1),
    "ensure_ascii": dumped(sort_keys=True, separators=(",", ":"), ensure_ascii=True),
    "unsorted keys": unsorted,
    "\\u0041 for A": replaced(b'"source":"1', b'"source":"\\u0031'),
    "escaped slash": replaced(b'"role":"', b'"role":"\\/'),
    "duplicate key": duplicate_key,
    "seq as 1.0": seq_as("{}.0"),
    "seq as 1e0": seq_as("{}e0"),
    "seq with a leading zero": seq_as("0{}"),
    "float with a trailing zero": detail_value("1.50"),
    "float as exponent": detail_value("1E2"),
    "negative zero": detail_value("-0"),
    "5000-digit int": detail_value("9" * 5000),
    "NaN": detail_value("NaN"),
    "deep nesting": detail_value("[" * 40 + "]" * 40),
    "200k [": detail_value("[" * 200_000),
    "huge string (canonical)": detail_value('"' + "x" * 300_000 + '"'),
    "lone surrogate escape": detail_value('"\\ud800"'),
    "leading space": wrapped(b" ", b""),
    "trailing space": wrapped(b"", b" "),
    "CRLF": wrapped(b"", b"\r"),
    "BOM": wrapped(b"\xef\xbb\xbf", b""),
    "NUL at the end": wrapped(b"", b"\x00"),
}


# -- byte mutations -------------------------------------------------------------------------

_SNIPPETS = st.sampled_from(
    [
        b"\x00",
        b"\xff",
        b"\xc3",
        b"\xed\xa0\x80",  # an encoded surrogate: not UTF-8
        b" ",
        b"\r",
        b"\n",
        b'"',
        b"\\",
        b",",
        b"{}",
        b'"x":1,',
        b',"hash":"' + b"0" * 64 + b'"',
        b"[" * 50,
    ]
)


@st.composite
def byte_change(draw: st.DrawFn) -> Callable[[Record], bytes]:
    kind = draw(st.sampled_from(["edit", "insert", "delete", "move"]))
    where = draw(st.floats(0, 1))
    span = draw(st.integers(1, 80))
    snippet = draw(_SNIPPETS)
    byte = draw(st.integers(0, 255))

    def change(record: Record) -> bytes:
        line = record_line(record)[:-1]
        at = int(where * len(line))
        if kind == "edit":
            return line[:at] + bytes([byte]) + line[at + 1 :]
        if kind == "insert":
            return line[:at] + snippet + line[at:]
        if kind == "delete":
            return line[:at] + line[at + span :]
        piece, rest = line[at : at + span], line[:at] + line[at + span :]
        to = int(draw_fraction(span, at) * len(rest))
        return rest[:to] + piece + rest[to:]

    return change


def draw_fraction(span: int, at: int) -> float:
    """A second position for "move", derived from the first (keeps the draw count fixed)."""
    return ((at * 7919 + span * 104729) % 1000) / 1000


@dataclass(frozen=True)
class Case:
    """The lines as the collector splits them from the byte stream, the ``start`` to
    verify from, and what was done (the repr, so that failures read well)."""

    lines: list[bytes]
    start: Head | None
    what: str

    def __repr__(self) -> str:
        shown = [line if len(line) < 400 else line[:200] + b"..." for line in self.lines]
        return f"Case({self.what!r}, start={self.start}, lines={shown})"


@st.composite
def hostile(draw: st.DrawFn, steps: st.SearchStrategy[list[Step]] = _STEPS) -> Case:
    """A log, one hostile change, and maybe a resume point."""
    log = Log(draw(steps))
    n = len(log.steps)
    index = draw(st.integers(0, n - 1))
    rehash = draw(st.booleans())
    how = draw(st.sampled_from(["rendering", "bytes", "lines", "none"]))
    if how == "rendering":
        name = draw(st.sampled_from(sorted(RENDERINGS)))
        lines = log.lines(index, RENDERINGS[name], rehash=rehash)
        what = f"{name} at line {index}" + (", rehashed" if rehash else "")
    elif how == "bytes":
        lines = log.lines(index, draw(byte_change()), rehash=rehash)
        what = f"bytes changed at line {index}" + (", rehashed" if rehash else "")
    else:
        lines = log.lines()
        what = "clean"
        if how == "lines":
            op = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "truncate"]))
            other = draw(st.integers(0, n - 1))
            if op == "delete":
                del lines[index]
            elif op == "duplicate":
                lines.insert(index, lines[index])
            elif op == "swap":
                lines[index], lines[other] = lines[other], lines[index]
            elif op == "insert":
                lines.insert(index, lines[other][: len(lines[other]) // 2 + 1])
            else:
                lines[-1] = lines[-1][: len(lines[-1]) // 2]
            what = f"line {op} at {index}"
    data = b"\n".join(lines)
    split = data.split(b"\n")  # what the collector hands to verify_block
    start: Head | None = None
    cut = draw(st.integers(0, 3))
    if cut and cut < len(split):
        try:
            before = parse(split[cut - 1])
            start = Head(before["seq"], before["hash"])
            split = split[cut:]
        except (ValueError, KeyError, TypeError):
            start = None
    return Case(split, start, what)


# -- the properties ---------------------------------------------------------------------------


def check_accepted(lines: list[bytes], report: VerifyReport) -> None:
    """Everything a verifier accepted is a canonical record with the spec's hash, and
    the syslog export can render it (the crash of issue 10)."""
    for line in lines[: report.records]:
        record = json.loads(line)
        assert canonical(record) == line
        claimed = record.pop("hash")
        assert record_hash(record) == claimed
        syslog_message(line, "collector")


@settings(PROPERTY, max_examples=700)
@given(hostile())
def test_fast_and_full_verifier_agree_on_hostile_logs(case: Case) -> None:
    full = verify_lines(case.lines, pins(), device=DEVICE, start=case.start)
    fast = verify_block(case.lines, pins(), device=DEVICE, start=case.start)
    assert fast == full, case.what
    check_accepted(case.lines, full)


@PROPERTY
@given(st.sampled_from(sorted(RENDERINGS)), _STEPS, st.data())
def test_every_hostile_rendering_is_refused_when_rehashed_and_signed(
    name: str, steps: list[Step], data: st.DataObject
) -> None:
    """The device writes the rendering with a matching hash and signs what follows: no
    verifier may accept the line (each rendering is non-canonical or not a record)."""
    log = Log(steps)
    index = data.draw(st.integers(0, len(steps) - 1), label="index")
    differs: list[bool] = []

    def render(record: Record) -> bytes:
        line = RENDERINGS[name](record)
        differs.append(line != record_line(record)[:-1])
        return line

    lines = b"\n".join(log.lines(index, render, rehash=True)).split(b"\n")
    full = verify_lines(lines, pins(), device=DEVICE)
    assert verify_block(lines, pins(), device=DEVICE) == full, name
    check_accepted(lines, full)
    if not differs[0] or "(canonical)" in name:
        return  # nothing to render differently in this record (say, no "1" in source)
    assert not full.ok and full.records <= index, name
    assert full.violations[0].kind in (ViolationKind.MALFORMED, ViolationKind.HASH_MISMATCH)


@PROPERTY
@given(_STEPS)
def test_generated_logs_verify_both_ways(steps: list[Step]) -> None:
    lines = Log(steps).lines()
    full = verify_lines(lines, pins(), device=DEVICE)
    assert full.ok and full.records == len(steps)
    assert verify_block(lines, pins(), device=DEVICE) == full
    check_accepted(lines, full)


@settings(PROPERTY, max_examples=700)
@given(hostile(_LONG_STEPS))
def test_fast_and_full_verifier_agree_on_long_unsigned_tails(case: Case) -> None:
    """The byte scan's verdict stands for every record it links, signed or not (the
    records after the last signature are not parsed again): a hostile change anywhere in
    a long run of common-shape records, with few or no signed records, gives the same
    report both ways."""
    full = verify_lines(case.lines, pins(), device=DEVICE, start=case.start)
    fast = verify_block(case.lines, pins(), device=DEVICE, start=case.start)
    assert fast == full, case.what
    check_accepted(case.lines, full)


@PROPERTY
@given(_LONG_STEPS)
def test_long_logs_without_a_final_checkpoint_verify_both_ways(steps: list[Step]) -> None:
    lines = Log(steps).lines()
    full = verify_lines(lines, pins(), device=DEVICE)
    assert full.ok and full.records == len(steps)
    assert verify_block(lines, pins(), device=DEVICE) == full
