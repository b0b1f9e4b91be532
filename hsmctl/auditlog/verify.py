"""Streaming verification of an activity log against pinned public keys.

The verifier reads one record at a time in constant memory and stops at the first
violation: after it, nothing can be vouched for, and the collector only needs to know
where trust ends. One exception: after a gap it keeps reading a bounded window, without
verifying anything, only to tell a deletion from a reordering.

Form: the device writes each record as its canonical JSON (``chain``), and a line is
accepted only if it is exactly that — parsed, it must encode back to the same bytes. A
line that is valid JSON in another form is refused even when its hash was made over its
own bytes: the device, not only a tamperer, is the adversary here, and a record must mean
the same to every reader (duplicate keys, say, do not). Lines nested deeper than
``devicejson.MAX_DEPTH`` are refused before they are parsed. Whatever a device sends is a
verdict, never an exception.

Trust: ``trusted_keys`` are the pinned audit keys. A valid ``key-rotation`` record (old
key trusted, both signatures good) trusts the new key and retires the old one, so a leaked
old key cannot sign later checkpoints. A collector that resumes from its archive passes
the resulting ``report.trusted_keys`` and ``report.retired_keys`` back in next time.

Resuming (SPEC §8): with ``start`` the first record must be ``start.seq + 1`` linked to
``start.hash``. To prove the device still holds the archived head, export from the record
before it and pass ``start=Head(head.seq - 1, head_record["prev"])`` with
``expect_at_least=head``: a different record there is a rollback, none is a truncation.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from os import PathLike
from typing import Any

from hsmctl.auditlog.chain import (
    CHECKPOINT_EVENT,
    FIELDS,
    GENESIS_HEAD,
    KEY_ROTATION_EVENT,
    OUTCOMES,
    TIME_RE,
    Head,
    canonical,
    canonical_text,
)
from hsmctl.auditlog.signing import (
    ALG,
    checkpoint_payload,
    key_id_for_pem,
    key_rotation_payload,
    verify_raw_signature,
)
from hsmctl.devicejson import MAX_DEPTH, parse, too_deep
from hsmctl.errors import ConfigError, IntegrityError

REORDER_WINDOW = 1024
"""Records read after a gap, unverified, to see whether the missing ones come later."""

_STRING_FIELDS = ("time", "actor", "role", "source", "event", "outcome", "prev", "hash")
_CHECKPOINT_KEYS = frozenset({"head", "device", "key_id", "alg", "sig"})
_ROTATION_KEYS = frozenset(
    {"head", "device", "alg", "old_key_id", "new_key_id", "new_public_key", "sig_old", "sig_new"}
)


class ViolationKind(StrEnum):
    MALFORMED = "malformed"  # not JSON, wrong keys or types, bad outcome, not canonical
    HASH_MISMATCH = "hash-mismatch"  # record edited after it was written
    GAP = "gap"  # records deleted
    DUPLICATE = "duplicate"  # a seq seen again: record inserted or replayed
    BROKEN_LINK = "broken-link"  # prev is not the previous hash: inserted or replaced
    REORDERED = "reordered"
    ROLLBACK = "rollback"  # differs from a known head: log rolled back or replaced
    TRUNCATED = "truncated"  # ends before a record known to exist
    HEAD_MISMATCH = "head-mismatch"  # a signed head is not the previous record
    MISSING_SIGNATURE = "missing-signature"
    BAD_SIGNATURE = "bad-signature"
    UNKNOWN_KEY = "unknown-key"
    RETIRED_KEY = "retired-key"  # signed by a key a rotation replaced
    WRONG_DEVICE = "wrong-device"  # signed for another appliance
    BAD_ROTATION = "bad-rotation"
    UNSIGNED_TAIL = "unsigned-tail"  # records after the last checkpoint, when one is required


@dataclass(frozen=True, slots=True)
class Violation:
    kind: ViolationKind
    seq: int
    """The record concerned or, for an unreadable line, the seq that was expected there."""
    message: str
    line: int | None = None

    def __str__(self) -> str:
        return f"record {self.seq}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "seq": self.seq,
            "message": self.message,
            "line": self.line,
        }


@dataclass(frozen=True)
class VerifyReport:
    """What was proven. Counts and heads cover only records before the first violation."""

    records: int
    first_seq: int | None
    last_seq: int | None
    head: Head
    """The last verified record (``start`` if none was)."""
    last_checkpoint_seq: int | None
    """The last verified checkpoint or key rotation; records before it are signed."""
    device: str | None
    keys_seen: tuple[str, ...]
    trusted_keys: Mapping[str, str]
    retired_keys: frozenset[str]
    violations: tuple[Violation, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.violations

    def check(self) -> VerifyReport:
        """Return self if clean, else raise ChainError naming the violations."""
        if self.violations:
            raise ChainError(self.violations, report=self)
        return self


class ChainError(IntegrityError):
    """The log failed verification (exit 3); the message names the sequence numbers."""

    def __init__(
        self, violations: Iterable[Violation], *, report: VerifyReport | None = None
    ) -> None:
        self.violations = tuple(violations)
        self.report = report
        text = "; ".join(str(v) for v in self.violations) or "no violations"
        super().__init__(
            f"activity log verification failed: {text}",
            detail={"violations": [v.as_dict() for v in self.violations]},
        )


class _Stop(Exception):
    """Internal: a record failed a check; carries the violation."""

    def __init__(self, kind: ViolationKind, seq: int, message: str) -> None:
        self.kind, self.seq, self.message = kind, seq, message


class ChainVerifier:
    """Verify one log stream.

    Lifecycle: create with the pinned keys (and the archive's head to resume from), call
    ``feed`` with every line or parsed record in order, then ``finish`` once. ``done``
    turns true when further input cannot change the result.
    """

    def __init__(
        self,
        trusted_keys: Mapping[str, str],
        *,
        device: str | None = None,
        start: Head | None = None,
        expect_at_least: Head | None = None,
        retired_keys: Iterable[str] = (),
    ) -> None:
        self._trusted: dict[str, str] = {}
        for key_id, pem in trusted_keys.items():
            try:
                actual = key_id_for_pem(pem)
            except ValueError as exc:
                raise ConfigError(f"pinned audit key {key_id}: {exc}") from exc
            if actual != key_id:
                raise ConfigError(f"pinned audit key {key_id} is really {actual}")
            self._trusted[key_id] = pem
        self._retired: dict[str, int | None] = dict.fromkeys(retired_keys)
        for key_id in self._retired:
            self._trusted.pop(key_id, None)
        self._start = start or GENESIS_HEAD
        if expect_at_least is not None and expect_at_least.seq <= self._start.seq:
            if expect_at_least.seq == self._start.seq and expect_at_least != self._start:
                raise ValueError("expect_at_least contradicts start")
            expect_at_least = None  # already inside what the caller verified
        self._anchor = expect_at_least
        self._device = device
        # The last verified record, kept as two fields: a Head per record costs too much.
        self._seq, self._hash = self._start.seq, self._start.hash
        self._records = 0
        self._first_seq: int | None = None
        self._last_checkpoint: int | None = None
        self._keys_seen: dict[str, None] = {}
        self._violations: list[Violation] = []
        self._line = 0
        self._halted = False
        self._finished = False
        self._gap: tuple[int, int] | None = None  # (first missing, seq found instead)
        self._lookahead = 0

    @property
    def done(self) -> bool:
        return self._halted and self._lookahead == 0

    @property
    def head(self) -> Head:
        """The last verified record so far."""
        return Head(self._seq, self._hash)

    def _advance(self, count: int, head: Head) -> None:
        """Internal, for :func:`verify_block`: ``count`` records ending at ``head`` continue
        the chain by their bytes alone; a signed record after them proves them."""
        if count:
            if self._first_seq is None:
                self._first_seq = self._seq + 1
            self._records += count
            self._line += count
            self._seq, self._hash = head.seq, head.hash

    def feed(self, item: bytes | str | Mapping[str, Any]) -> None:
        """Check the next line (bytes or str, trailing newline optional) or parsed record."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._line += 1
        if self._halted:
            if self._lookahead:
                self._look_for_reorder(item)
            return
        try:
            self._check(item)
        except _Stop as stop:
            self._violations.append(Violation(stop.kind, stop.seq, stop.message, self._line))
            self._halted = True
            if stop.kind is ViolationKind.GAP:
                self._lookahead = REORDER_WINDOW

    def finish(self, *, require_final_checkpoint: bool = False) -> VerifyReport:
        """End of input: check it reached the known head (and, if asked, ends signed)."""
        if not self._finished and not self._violations:
            self._finished = True
            last, anchor = self.head, self._anchor
            if anchor is not None and last.seq < anchor.seq:
                self._violations.append(
                    Violation(
                        ViolationKind.TRUNCATED,
                        anchor.seq,
                        f"missing: the log ends at record {last.seq} but record {anchor.seq}"
                        " is known to exist (truncated or rolled back)",
                    )
                )
            elif require_final_checkpoint and self._records and self._last_checkpoint != last.seq:
                first = (self._last_checkpoint or self._start.seq) + 1
                self._violations.append(
                    Violation(
                        ViolationKind.UNSIGNED_TAIL,
                        first,
                        f"records {first}..{last.seq} are not covered by a checkpoint",
                    )
                )
        self._finished = True
        return VerifyReport(
            records=self._records,
            first_seq=self._first_seq,
            last_seq=self._seq if self._records else None,
            head=self.head,
            last_checkpoint_seq=self._last_checkpoint,
            device=self._device,
            keys_seen=tuple(self._keys_seen),
            trusted_keys=dict(self._trusted),
            retired_keys=frozenset(self._retired),
            violations=tuple(self._violations),
        )

    # -- one record --------------------------------------------------------------------

    def _check(self, item: bytes | str | Mapping[str, Any]) -> None:
        expected = self._seq + 1
        record, raw, shape = _parse(item, expected)
        seq: int = record["seq"]
        claimed: str = record.pop("hash")
        if raw is None:
            _check_canonical_hash(record, claimed, None, seq)
        else:
            _check_line(raw, shape, record, claimed, seq)
        if seq != expected:
            if seq > expected:
                self._gap = (expected, seq)
                raise _Stop(
                    ViolationKind.GAP,
                    expected,
                    f"missing (deleted): expected record {expected}, got {seq}",
                )
            what = "a replayed copy" if claimed == self._hash else "inserted or replayed"
            raise _Stop(
                ViolationKind.DUPLICATE,
                seq,
                f"duplicate seq ({what}): expected record {expected}, got {seq} again",
            )
        if record["prev"] != self._hash:
            if self._seq and not self._records:
                raise _Stop(
                    ViolationKind.ROLLBACK,
                    seq,
                    f"prev does not match the known record {self._seq}"
                    " (log rolled back or replaced)",
                )
            raise _Stop(
                ViolationKind.BROKEN_LINK,
                seq,
                f"prev does not match the hash of record {self._seq}"
                " (record inserted, deleted or replaced)",
            )
        anchor = self._anchor
        if anchor is not None and seq == anchor.seq and claimed != anchor.hash:
            raise _Stop(
                ViolationKind.ROLLBACK,
                seq,
                f"differs from the known record {seq} (log rolled back or replaced)",
            )
        event = record["event"]
        if event == CHECKPOINT_EVENT:
            self._check_checkpoint(seq, record)
        elif event == KEY_ROTATION_EVENT:
            self._check_rotation(seq, record)
        self._seq, self._hash = seq, claimed
        self._records += 1
        if self._first_seq is None:
            self._first_seq = seq

    def _signed_head(self, seq: int, record: Mapping[str, Any], what: str) -> Head:
        head = record["detail"]["head"]
        if not (
            type(head) is dict
            and head.keys() == {"seq", "hash"}
            and type(head["seq"]) is int
            and type(head["hash"]) is str
        ):
            raise _Stop(ViolationKind.MALFORMED, seq, f"malformed {what}: bad head")
        signed = Head(head["seq"], head["hash"])
        if signed != Head(seq - 1, record["prev"]):
            raise _Stop(
                ViolationKind.HEAD_MISMATCH,
                seq,
                f"{what} signs head {signed.seq}/{signed.hash[:12]} but the previous record"
                f" is {seq - 1}/{record['prev'][:12]}",
            )
        return signed

    def _check_device(self, seq: int, device: str, what: str) -> None:
        if self._device is not None and device != self._device:
            raise _Stop(
                ViolationKind.WRONG_DEVICE,
                seq,
                f"{what} is for device {device!r}, expected {self._device!r}",
            )

    def _check_checkpoint(self, seq: int, record: Mapping[str, Any]) -> None:
        detail = record["detail"]
        if not detail.get("sig"):
            raise _Stop(ViolationKind.MISSING_SIGNATURE, seq, "checkpoint has no signature")
        _check_detail(seq, detail, _CHECKPOINT_KEYS, "checkpoint")
        head = self._signed_head(seq, record, "checkpoint")
        device, key_id = detail["device"], detail["key_id"]
        self._check_device(seq, device, "checkpoint")
        if detail["alg"] != ALG:
            raise _Stop(
                ViolationKind.BAD_SIGNATURE, seq, f"checkpoint alg {detail['alg']!r} unsupported"
            )
        pem = self._trusted.get(key_id)
        if pem is None:
            if key_id in self._retired:
                at = self._retired[key_id]
                when = f" at record {at}" if at is not None else ""
                raise _Stop(
                    ViolationKind.RETIRED_KEY,
                    seq,
                    f"checkpoint signed by key {key_id[:16]}, retired{when}",
                )
            raise _Stop(
                ViolationKind.UNKNOWN_KEY, seq, f"checkpoint signed by unknown key {key_id[:16]}"
            )
        if not verify_raw_signature(pem, detail["sig"], checkpoint_payload(device, head, key_id)):
            raise _Stop(
                ViolationKind.BAD_SIGNATURE,
                seq,
                f"checkpoint signature does not verify with key {key_id[:16]}",
            )
        self._device = device
        self._keys_seen[key_id] = None
        self._last_checkpoint = seq

    def _check_rotation(self, seq: int, record: Mapping[str, Any]) -> None:
        detail = record["detail"]
        for name in ("sig_old", "sig_new"):
            if not detail.get(name):
                raise _Stop(ViolationKind.MISSING_SIGNATURE, seq, f"key rotation has no {name}")
        _check_detail(seq, detail, _ROTATION_KEYS, "key rotation")
        head = self._signed_head(seq, record, "key rotation")
        device = detail["device"]
        old, new, new_pem = detail["old_key_id"], detail["new_key_id"], detail["new_public_key"]
        self._check_device(seq, device, "key rotation")

        def broken(why: str) -> _Stop:
            return _Stop(ViolationKind.BAD_ROTATION, seq, f"key rotation: {why}")

        if detail["alg"] != ALG:
            raise broken(f"alg {detail['alg']!r} unsupported")
        old_pem = self._trusted.get(old)
        if old_pem is None:
            state = "retired" if old in self._retired else "not trusted"
            raise broken(f"old key {old[:16]} is {state}")
        try:
            actual_new = key_id_for_pem(new_pem)
        except ValueError:
            raise broken("new_public_key is not a P-256 public key") from None
        if actual_new != new:
            raise broken(f"new_key_id {new[:16]} is not the id of new_public_key")
        if new == old or new in self._retired:
            raise broken(f"new key {new[:16]} is not new")
        payload = key_rotation_payload(device, head, old, new, new_pem)
        if not verify_raw_signature(old_pem, detail["sig_old"], payload):
            raise broken("sig_old does not verify with the old key")
        if not verify_raw_signature(new_pem, detail["sig_new"], payload):
            raise broken("sig_new does not verify with the new key")
        del self._trusted[old]
        self._retired[old] = seq
        self._trusted[new] = new_pem
        self._device = device
        self._keys_seen[old] = None
        self._keys_seen[new] = None
        self._last_checkpoint = seq

    def _look_for_reorder(self, item: bytes | str | Mapping[str, Any]) -> None:
        """After a gap: if a missing record turns up later, the log was reordered."""
        self._lookahead -= 1
        assert self._gap is not None
        missing, found_instead = self._gap
        try:
            seq = item.get("seq") if isinstance(item, Mapping) else parse(item).get("seq")
        except (ValueError, AttributeError):
            return
        if type(seq) is int and missing <= seq < found_instead:
            gap = self._violations[-1]
            self._violations[-1] = Violation(
                ViolationKind.REORDERED,
                missing,
                f"out of order: expected record {missing}, got {found_instead};"
                f" record {seq} comes later",
                gap.line,
            )
            self._lookahead = 0


# json.loads minus its whitespace handling: a canonical line has none around it.
_raw_decode = json.JSONDecoder().raw_decode


def _parse(
    item: bytes | str | Mapping[str, Any], expected: int
) -> tuple[dict[str, Any], bytes | None, re.Match[bytes] | None]:
    """The record as a fresh dict, the line's bytes without its newline (None if given
    parsed) and their :data:`_RECORD` match if any, or _Stop.

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
            raise _Stop(ViolationKind.MALFORMED, expected, "malformed: not UTF-8") from None
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
            raise _Stop(ViolationKind.MALFORMED, expected, "malformed: not UTF-8") from None
        shape = _shape(raw)
        if shape is None and (depth := too_deep(raw)):
            raise _Stop(
                ViolationKind.MALFORMED,
                expected,
                f"malformed: not JSON (nested {depth} levels deep, more than {MAX_DEPTH})",
            )
        record = _load(text, expected)
    r = record
    seq = r.get("seq")
    if type(seq) is not int or seq < 1:
        raise _Stop(ViolationKind.MALFORMED, expected, f"malformed: bad seq {seq!r}")
    if r.keys() != FIELDS:
        missing = ", ".join(sorted(FIELDS - r.keys()))
        extra = ", ".join(sorted(r.keys() - FIELDS))
        what = f"missing {missing}" if missing else f"unexpected {extra}"
        raise _Stop(ViolationKind.MALFORMED, seq, f"malformed: {what}")
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
        raise _Stop(ViolationKind.MALFORMED, seq, f"malformed: {name} is not a string")
    if type(r["detail"]) is not dict:
        raise _Stop(ViolationKind.MALFORMED, seq, "malformed: detail is not an object")
    if r["outcome"] not in OUTCOMES:
        raise _Stop(ViolationKind.MALFORMED, seq, f"malformed: outcome {r['outcome']!r}")
    if not TIME_RE.fullmatch(r["time"]):
        raise _Stop(ViolationKind.MALFORMED, seq, f"malformed: time {r['time']!r}")
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
            raise _Stop(ViolationKind.MALFORMED, expected, f"malformed: not JSON ({msg})") from None
    if type(record) is not dict:
        raise _Stop(ViolationKind.MALFORMED, expected, "malformed: not a JSON object")
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


def _check_line(
    raw: bytes, shape: re.Match[bytes] | None, record: Mapping[str, Any], claimed: str, seq: int
) -> None:
    """The line is the canonical JSON of ``record`` (with ``hash``: :func:`_canonical`)
    and its hash is the spec's: SHA-256 of the line without the ``hash`` member, which for
    a canonical line is the canonical record without ``hash``."""
    at = _canonical(raw, shape, record, claimed)
    if at < 0:
        _check_canonical_hash(record, claimed, raw, seq)
        return
    if hashlib.sha256(raw[:at] + raw[at + 74 :]).hexdigest() != claimed:
        raise _Stop(ViolationKind.HASH_MISMATCH, seq, "hash mismatch (edited)")


def _canonical(
    raw: bytes, shape: re.Match[bytes] | None, record: Mapping[str, Any], claimed: str
) -> int:
    """Where the ``hash`` member starts if ``raw`` is exactly the canonical JSON of the
    parsed ``record`` plus ``hash``, else -1 (checked by re-encoding only when the line is
    not of the common shape)."""
    if shape is not None and _increasing(shape.groups()):
        return shape.start(_MEMBER)
    try:
        if canonical({**record, "hash": claimed}) != raw:
            return -1
    except ValueError:  # NaN, lone surrogates: nothing canonical encodes them
        return -1
    # Canonical: a raw '"' only delimits strings, and only top-level scalars follow the
    # top-level member, so the last ',"hash":"' is that member.
    return raw.rfind(_HASH_MEMBER)


def _check_canonical_hash(
    record: Mapping[str, Any], claimed: str, raw: bytes | None, seq: int
) -> None:
    """The spec's hash over the re-encoded record; for a line (``raw``), which is not
    canonical JSON, which violation that is: an edit, or a rewrite of the device's line
    (the hash is right, or was made over the line's own bytes)."""
    try:
        actual = hashlib.sha256(canonical_text(record).encode("utf-8")).hexdigest()
    except ValueError as exc:  # NaN, lone surrogates
        raise _Stop(ViolationKind.MALFORMED, seq, f"malformed: not canonical JSON: {exc}") from None
    if raw is None:
        if actual != claimed:
            raise _Stop(ViolationKind.HASH_MISMATCH, seq, "hash mismatch (edited)")
        return
    if actual != claimed and not _line_hashes_to(raw, claimed):
        raise _Stop(ViolationKind.HASH_MISMATCH, seq, "hash mismatch (edited)")
    raise _Stop(ViolationKind.MALFORMED, seq, "malformed: line is not canonical JSON")


def _check_detail(seq: int, detail: Mapping[str, Any], keys: frozenset[str], what: str) -> None:
    if detail.keys() != keys:
        missing = ", ".join(sorted(keys - detail.keys())) or "-"
        extra = ", ".join(sorted(detail.keys() - keys)) or "-"
        raise _Stop(
            ViolationKind.MALFORMED, seq, f"malformed {what}: missing {missing}, unexpected {extra}"
        )
    for name in keys - {"head"}:
        if type(detail[name]) is not str:
            raise _Stop(ViolationKind.MALFORMED, seq, f"malformed {what}: {name} is not a string")


def verify_lines(
    lines: Iterable[bytes | str | Mapping[str, Any]],
    trusted_keys: Mapping[str, str],
    *,
    device: str | None = None,
    start: Head | None = None,
    expect_at_least: Head | None = None,
    retired_keys: Iterable[str] = (),
    require_final_checkpoint: bool = False,
) -> VerifyReport:
    """Verify a stream of lines; the report lists violations (``.check()`` raises them)."""
    verifier = ChainVerifier(
        trusted_keys,
        device=device,
        start=start,
        expect_at_least=expect_at_least,
        retired_keys=retired_keys,
    )
    for line in lines:
        verifier.feed(line)
        if verifier.done:
            break
    return verifier.finish(require_final_checkpoint=require_final_checkpoint)


_HASH_MEMBER = b',"hash":"'
_PREV_MEMBER = b'"prev":"'
_SIGNED_EVENTS = (b'"event":"checkpoint"', b'"event":"key-rotation"')
_SIGNED_NAMES = (b'"checkpoint"', b'"key-rotation"')

_FLAT_MEMBERS = 8
"""Members of ``detail`` the common shape names (a command record has three or four)."""


def _record_pattern(string: bytes, key: bytes, hash_hex: bytes) -> re.Pattern[bytes]:
    """The canonical line of a record whose ``detail`` is flat: up to ``_FLAT_MEMBERS``
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
    for _ in range(_FLAT_MEMBERS - 1):
        more = rb"(?:," + key + rb":" + value + more + rb")?"
    detail = rb"\{(?:" + key + rb":" + value + more + rb")?\}"
    outcomes = b"|".join(o.encode() for o in sorted(OUTCOMES))
    return re.compile(
        rb'\{"actor":' + string + rb',"detail":' + detail + rb',"event":(' + string + rb")"
        rb'(,"hash":"(' + hash_hex + rb')"),"outcome":"(?:' + outcomes + rb')"'
        rb',"prev":"(' + hash_hex + rb')","role":' + string + rb',"seq":([1-9][0-9]{0,17})'
        rb',"source":' + string + rb',"time":"' + TIME_RE.pattern.encode("ascii") + rb'"\}'
    )


_RECORD = _record_pattern(
    # Exactly what canonical JSON writes: escapes for '"', '\' and control characters
    # only, the short form where JSON has one, else \u00xx in lowercase.
    rb'"[^"\\\x00-\x1f]*(?:\\(?:["\\bfnrt]|u00(?:0[0-7bef]|1[0-9a-f]))[^"\\\x00-\x1f]*)*"',
    rb'"([^"\\\x00-\x1f]*)"',
    rb"[0-9a-f]{64}",
)
_PLAIN = _record_pattern(rb'"[^"]*"', rb'"([^"]*)"', rb'[^"]{64}')
""":data:`_RECORD` for a line without a backslash or a control byte, where any run of
bytes between quotes is a canonical string. Half the cost: sre matches ``[^"]`` byte by
byte in a tight loop, a class with ranges through a function call per byte. (Hashes
need not be hex here: a line whose ``hash`` is not its hex digest fails the hash check.)"""
_ESCAPES = bytes(range(0x20)) + b"\\"
_MEMBER = _FLAT_MEMBERS + 2
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _shape(line: bytes) -> re.Match[bytes] | None:
    """The match of a canonical line of the common shape (not yet: UTF-8, key order)."""
    if len(line.translate(None, _ESCAPES)) == len(line):
        return _PLAIN.fullmatch(line)
    return _RECORD.fullmatch(line)


def _increasing(groups: tuple[bytes | Any, ...]) -> bool:
    """The detail's keys in the groups of a :data:`_RECORD` match are strictly increasing
    (sorted, and no key twice: ``json.loads`` would keep one of two, ``canonical`` write
    one)."""
    keys = groups
    last = keys[0]
    for key in keys[1:_FLAT_MEMBERS]:
        if key is None:
            return True
        if key <= last:
            return False
        last = key
    return True


def _link_scan(lines: Sequence[bytes], start: Head) -> tuple[int, list[tuple[int, bytes]]]:
    """How many leading lines continue the chain from ``start``, each a record that
    :func:`verify_lines` would accept there; and, for every line that may be a checkpoint
    or a key rotation, its index and the hash before it (those it must still verify).

    A line of the common shape (:data:`_RECORD`) is checked on its bytes alone: it is
    canonical JSON of a well-formed record (the pattern says which bytes a canonical line
    can have, then UTF-8 and the order of the detail's keys), its ``hash`` is SHA-256 of
    the line without the member, ``prev`` the previous hash and ``seq`` the next number —
    together exactly what the full verifier checks of a record that is not signed. Any
    other line is a signed record if its bytes say so (verified in full later), else it is
    parsed and re-encoded like :func:`verify_lines` does (:func:`_canonical_line`).
    """
    sha256, plain, exact, escapes, hash_member, prev_member, signed_events, signed_names = (
        hashlib.sha256,
        _PLAIN.fullmatch,
        _RECORD.fullmatch,
        _ESCAPES,
        _HASH_MEMBER,
        _PREV_MEMBER,
        _SIGNED_EVENTS,
        _SIGNED_NAMES,
    )  # locals: this loop runs once a record
    signed: list[tuple[int, bytes]] = []
    if not _HEX64.fullmatch(start.hash):  # not a hash: no line can link to it by its bytes
        return 0, signed
    running = start.hash.encode("ascii")
    first, count = start.seq + 1, 0
    for line in lines:
        shape = (plain if len(line.translate(None, escapes)) == len(line) else exact)(line)
        if (
            shape is not None
            and (line.isascii() or _is_utf8(line))
            and ((g := shape.groups())[1] is None or _increasing(g))
        ):
            at, claimed = shape.start(10), g[10]
            if (
                sha256(line[:at] + line[at + 74 :]).hexdigest().encode() != claimed
                or g[11] != running
                or g[12] != b"%d" % (first + count)
            ):
                break
            if g[8] in signed_names:
                signed.append((count, running))
        else:
            at = line.rfind(hash_member)
            end = at + 73
            claimed = line[at + 9 : end]
            if (
                at < 0
                or line[end : end + 1] != b'"'
                or sha256(line[:at] + line[end + 1 :]).hexdigest().encode() != claimed
                # outcome (at most 8 bytes) and prev follow the hash; role and seq follow prev
                or line.find(prev_member + running + b'"', end, end + 110) < 0
                or line.find(b',"seq":%d,' % (first + count), end + 90) < 0
            ):
                break
            if line.endswith(signed_events, 0, at):
                signed.append((count, running))
            elif not _canonical_line(line, first + count):
                break
        running = claimed
        count += 1
    return count, signed


def _is_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _canonical_line(line: bytes, seq: int) -> bool:
    """A line of no common shape that links by its bytes (``hash`` over the line without
    the member, ``prev``, ``seq``): whether it is also a well-formed record that is the
    canonical JSON of itself — then the byte checks were exactly the full verifier's. (A
    newline is no part of a line here: ``_parse`` would strip it after it was hashed.)"""
    if line[-1:] == b"\n":
        return False
    try:
        record, raw, shape = _parse(line, seq)
    except _Stop:
        return False
    assert raw is not None
    return _canonical(raw, shape, record, record["hash"]) >= 0


def verify_block(
    lines: Sequence[bytes],
    trusted_keys: Mapping[str, str],
    *,
    device: str | None = None,
    start: Head | None = None,
    retired_keys: Iterable[str] = (),
) -> VerifyReport:
    """:func:`verify_lines` for a block of whole lines without their newlines (as
    ``bytes.split`` gives them), more than twice as fast on a clean log.

    Most records need no parsing. The device may be hostile — it holds the audit key and
    signs whatever it wrote — so a signature over a chain proves nothing about the form
    of the records in it; instead :func:`_link_scan` checks every record on its bytes for
    exactly what ``verify_lines`` would check of it (canonical JSON of a well-formed
    record, its hash, ``prev`` and ``seq``), parsing only lines of an unusual shape. Then
    only the signed records and what follows the last of them are verified in full. The
    report is then the one ``verify_lines`` gives, which is checked: if the last signed
    record of the scan did not verify as one, or any violation was found, the block is
    verified again the full way, and that report is returned (it names the first bad
    record exactly as before).
    """
    begin = start or GENESIS_HEAD
    retired = tuple(retired_keys)

    def full() -> VerifyReport:
        return verify_lines(lines, trusted_keys, device=device, start=begin, retired_keys=retired)

    _, signed = _link_scan(lines, begin)
    if not signed:
        return full()
    verifier = ChainVerifier(trusted_keys, device=device, start=begin, retired_keys=retired)
    done = 0
    for index, before in signed:
        if index > done:
            verifier._advance(index - done, Head(begin.seq + index, before.decode()))
        verifier.feed(lines[index])
        done = index + 1
        if verifier.done:
            return full()
    for line in lines[done:]:
        verifier.feed(line)
        if verifier.done:
            break
    report = verifier.finish()
    if (
        report.violations
        or report.last_checkpoint_seq is None
        or (report.last_checkpoint_seq < begin.seq + signed[-1][0] + 1)
    ):
        return full()
    return report


def verify_file(
    path: str | PathLike[str],
    trusted_keys: Mapping[str, str],
    *,
    device: str | None = None,
    start: Head | None = None,
    expect_at_least: Head | None = None,
    retired_keys: Iterable[str] = (),
    require_final_checkpoint: bool = False,
) -> VerifyReport:
    """Verify a log file line by line, in constant memory."""
    with open(path, "rb") as handle:
        return verify_lines(
            handle,
            trusted_keys,
            device=device,
            start=start,
            expect_at_least=expect_at_least,
            retired_keys=retired_keys,
            require_final_checkpoint=require_final_checkpoint,
        )
