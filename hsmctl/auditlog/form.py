"""The form of a record: a line is accepted only as the device writes it.

The device writes each record as its canonical JSON (``chain``), and a line is accepted
only if it is exactly that — parsed, it must encode back to the same bytes. A line that is
valid JSON in another form is refused even when its hash was made over its own bytes: the
device, not only a tamperer, is the adversary here, and a record must mean the same to
every reader (duplicate keys, say, do not). Lines nested deeper than
``devicejson.MAX_DEPTH`` are refused before they are parsed. Whatever a device sends is a
verdict, never an exception.

The common shape (:data:`RECORD`) lets most lines be checked on their bytes alone; the
full verifier and the byte scan (``blockscan``) both use it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from hsmctl.auditlog.chain import FIELDS, OUTCOMES, TIME_RE, canonical, canonical_text
from hsmctl.auditlog.report import Stop, ViolationKind
from hsmctl.devicejson import MAX_DEPTH, too_deep

_STRING_FIELDS = ("time", "actor", "role", "source", "event", "outcome", "prev", "hash")

# json.loads minus its whitespace handling: a canonical line has none around it.
_raw_decode = json.JSONDecoder().raw_decode


def parse_record(
    item: bytes | str | Mapping[str, Any], expected: int
) -> tuple[dict[str, Any], bytes | None, re.Match[bytes] | None]:
    """The record as a fresh dict, the line's bytes without its newline (None if given
    parsed) and their :data:`RECORD` match if any, or Stop.

    Nothing deeper than ``MAX_DEPTH`` reaches the JSON parser: it recurses per level, and
    where it would give up depends on the caller's stack, so the same line could be a
    violation here and an exception there. A line of the common shape is two deep.
    """
    raw: bytes | None
    shape: re.Match[bytes] | None = None
    if type(item) is bytes:
        raw = item
    elif isinstance(item, str):
        try:
            raw = item.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            raise Stop(ViolationKind.MALFORMED, expected, "malformed: not UTF-8") from None
    elif isinstance(item, Mapping):
        raw, record = None, dict(item)
    else:
        raise TypeError(f"cannot verify a {type(item).__name__}")
    if raw is not None:
        if raw[-1:] == b"\n":
            raw = raw[:-2] if raw[-2:] == b"\r\n" else raw[:-1]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Stop(ViolationKind.MALFORMED, expected, "malformed: not UTF-8") from None
        shape = _shape(raw)
        if shape is None and (depth := too_deep(raw)):
            raise Stop(
                ViolationKind.MALFORMED,
                expected,
                f"malformed: not JSON (nested {depth} levels deep, more than {MAX_DEPTH})",
            )
        record = _load(text, expected)
    r = record
    seq = r.get("seq")
    if type(seq) is not int or seq < 1:
        raise Stop(ViolationKind.MALFORMED, expected, f"malformed: bad seq {seq!r}")
    if r.keys() != FIELDS:
        missing = ", ".join(sorted(FIELDS - r.keys()))
        extra = ", ".join(sorted(r.keys() - FIELDS))
        what = f"missing {missing}" if missing else f"unexpected {extra}"
        raise Stop(ViolationKind.MALFORMED, seq, f"malformed: {what}")
    if not (
        type(r["time"]) is str
        and type(r["actor"]) is str
        and type(r["role"]) is str
        and type(r["source"]) is str
        and type(r["event"]) is str
        and type(r["outcome"]) is str
        and type(r["prev"]) is str
        and type(r["hash"]) is str
    ):
        name = next(n for n in _STRING_FIELDS if type(r[n]) is not str)
        raise Stop(ViolationKind.MALFORMED, seq, f"malformed: {name} is not a string")
    if type(r["detail"]) is not dict:
        raise Stop(ViolationKind.MALFORMED, seq, "malformed: detail is not an object")
    if r["outcome"] not in OUTCOMES:
        raise Stop(ViolationKind.MALFORMED, seq, f"malformed: outcome {r['outcome']!r}")
    if not TIME_RE.fullmatch(r["time"]):
        raise Stop(ViolationKind.MALFORMED, seq, f"malformed: time {r['time']!r}")
    return record, raw, shape


def _load(text: str, expected: int) -> dict[str, Any]:
    try:
        record, end = _raw_decode(text)
        if end != len(text):
            record = None
    except ValueError:
        record = None
    if record is None:  # let json.loads explain, or accept surrounding whitespace
        try:
            record = json.loads(text)
        except ValueError as exc:
            msg = getattr(exc, "msg", str(exc))
            raise Stop(ViolationKind.MALFORMED, expected, f"malformed: not JSON ({msg})") from None
    if type(record) is not dict:
        raise Stop(ViolationKind.MALFORMED, expected, "malformed: not a JSON object")
    return record


def _line_hashes_to(raw: bytes, claimed: str) -> bool:
    """Whether the line without (the first copy of) its ``hash`` member hashes to the
    claimed hash: how a line that is not canonical JSON was made, if it was made to look
    linked. Only names the violation; no line is accepted for this alone."""
    needle = f',"hash":"{claimed}"'.encode()
    cut = raw.find(needle)
    if cut < 0:
        return False
    return hashlib.sha256(raw[:cut] + raw[cut + len(needle) :]).hexdigest() == claimed


def check_line(
    raw: bytes, shape: re.Match[bytes] | None, record: Mapping[str, Any], claimed: str, seq: int
) -> None:
    """The line is the canonical JSON of ``record`` (with ``hash``: :func:`canonical_at`)
    and its hash is the spec's: SHA-256 of the line without the ``hash`` member, which for
    a canonical line is the canonical record without ``hash``."""
    at = canonical_at(raw, shape, record, claimed)
    if at < 0:
        check_canonical_hash(record, claimed, raw, seq)
        return
    if hashlib.sha256(raw[:at] + raw[at + 74 :]).hexdigest() != claimed:
        raise Stop(ViolationKind.HASH_MISMATCH, seq, "hash mismatch (edited)")


def canonical_at(
    raw: bytes, shape: re.Match[bytes] | None, record: Mapping[str, Any], claimed: str
) -> int:
    """Where the ``hash`` member starts if ``raw`` is exactly the canonical JSON of the
    parsed ``record`` plus ``hash``, else -1 (checked by re-encoding only when the line is
    not of the common shape)."""
    if shape is not None and increasing(shape.groups()):
        return shape.start(_MEMBER)
    try:
        if canonical({**record, "hash": claimed}) != raw:
            return -1
    except ValueError:  # NaN, lone surrogates: nothing canonical encodes them
        return -1
    # Canonical: a raw '"' only delimits strings, and only top-level scalars follow the
    # top-level member, so the last ',"hash":"' is that member.
    return raw.rfind(HASH_MEMBER)


def check_canonical_hash(
    record: Mapping[str, Any], claimed: str, raw: bytes | None, seq: int
) -> None:
    """The spec's hash over the re-encoded record; for a line (``raw``), which is not
    canonical JSON, which violation that is: an edit, or a rewrite of the device's line
    (the hash is right, or was made over the line's own bytes)."""
    try:
        actual = hashlib.sha256(canonical_text(record).encode("utf-8")).hexdigest()
    except ValueError as exc:  # NaN, lone surrogates
        raise Stop(ViolationKind.MALFORMED, seq, f"malformed: not canonical JSON: {exc}") from None
    if raw is None:
        if actual != claimed:
            raise Stop(ViolationKind.HASH_MISMATCH, seq, "hash mismatch (edited)")
        return
    if actual != claimed and not _line_hashes_to(raw, claimed):
        raise Stop(ViolationKind.HASH_MISMATCH, seq, "hash mismatch (edited)")
    raise Stop(ViolationKind.MALFORMED, seq, "malformed: line is not canonical JSON")


HASH_MEMBER = b',"hash":"'

FLAT_MEMBERS = 8
"""Members of ``detail`` the common shape names (a command record has three or four)."""


def _record_pattern(string: bytes, key: bytes, hash_hex: bytes) -> re.Pattern[bytes]:
    """The canonical line of a record whose ``detail`` is flat: up to ``FLAT_MEMBERS``
    members with keys free of escapes, values strings, small integers, booleans or null.

    Every field is written the one way ``canonical`` writes it: keys in their sorted
    order, no whitespace, strings as ``string`` says, integers without sign of zero or
    leading zeros, the outcome one of ``OUTCOMES``, the time ``TIME_RE``. What a pattern
    cannot say is checked after a match: that the line is UTF-8 and the detail's keys
    increase — as bytes, which for UTF-8 without escapes is their code-point order, the
    order ``sort_keys`` gives. Integers have at most 18 digits so that no limit of
    ``int()`` can make ``json.loads`` disagree: a match is always JSON it can read back.

    Groups: 1-8 the detail's keys (None past the last), 9 the event, 10 the ``hash``
    member, 11 the hash, 12 ``prev``, 13 ``seq``.
    """
    value = rb"(?:" + string + rb"|0|-?[1-9][0-9]{0,17}|true|false|null)"
    more = b""
    for _ in range(FLAT_MEMBERS - 1):
        more = rb"(?:," + key + rb":" + value + more + rb")?"
    detail = rb"\{(?:" + key + rb":" + value + more + rb")?\}"
    outcomes = b"|".join(o.encode() for o in sorted(OUTCOMES))
    return re.compile(
        rb'\{"actor":' + string + rb',"detail":' + detail + rb',"event":(' + string + rb")"
        rb'(,"hash":"(' + hash_hex + rb')"),"outcome":"(?:' + outcomes + rb')"'
        rb',"prev":"(' + hash_hex + rb')","role":' + string + rb',"seq":([1-9][0-9]{0,17})'
        rb',"source":' + string + rb',"time":"' + TIME_RE.pattern.encode("ascii") + rb'"\}'
    )


RECORD = _record_pattern(
    # Exactly what canonical JSON writes: escapes for '"', '\' and control characters
    # only, the short form where JSON has one, else \u00xx in lowercase.
    rb'"[^"\\\x00-\x1f]*(?:\\(?:["\\bfnrt]|u00(?:0[0-7bef]|1[0-9a-f]))[^"\\\x00-\x1f]*)*"',
    rb'"([^"\\\x00-\x1f]*)"',
    rb"[0-9a-f]{64}",
)
PLAIN = _record_pattern(rb'"[^"]*"', rb'"([^"]*)"', rb'[^"]{64}')
""":data:`RECORD` for a line without a backslash or a control byte, where any run of
bytes between quotes is a canonical string. Half the cost: sre matches ``[^"]`` byte by
byte in a tight loop, a class with ranges through a function call per byte. (Hashes
need not be hex here: a line whose ``hash`` is not its hex digest fails the hash check.)"""
ESCAPES = bytes(range(0x20)) + b"\\"
_MEMBER = FLAT_MEMBERS + 2


def _shape(line: bytes) -> re.Match[bytes] | None:
    """The match of a canonical line of the common shape (not yet: UTF-8, key order)."""
    if len(line.translate(None, ESCAPES)) == len(line):
        return PLAIN.fullmatch(line)
    return RECORD.fullmatch(line)


def increasing(groups: tuple[bytes | Any, ...]) -> bool:
    """The detail's keys in the groups of a :data:`RECORD` match are strictly increasing
    (sorted, and no key twice: ``json.loads`` would keep one of two, ``canonical`` write
    one)."""
    keys = groups
    last = keys[0]
    for key in keys[1:FLAT_MEMBERS]:
        if key is None:
            return True
        if key <= last:
            return False
        last = key
    return True
