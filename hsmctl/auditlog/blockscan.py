"""The fast path: a block of lines checked on their bytes, exactly as the full verifier
would check them (a property test in ``tests/unit/test_verify_property.py`` holds it to
that), with only the signed records verified in full."""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, cast

from hsmctl.auditlog import form
from hsmctl.auditlog.chain import GENESIS_HEAD, Head
from hsmctl.auditlog.form import ESCAPES, HASH_MEMBER, PLAIN, RECORD, increasing
from hsmctl.auditlog.report import Stop, VerifyReport
from hsmctl.auditlog.verifier import ChainVerifier, verify_lines

_PREV_MEMBER = b'"prev":"'
_SIGNED_EVENTS = (b'"event":"checkpoint"', b'"event":"key-rotation"')
_SIGNED_NAMES = (b'"checkpoint"', b'"key-rotation"')
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SEQ_LIMIT = 10**18
"""The compiled scan takes ``seq`` below this (18 digits, like :data:`RECORD`)."""


class ScanModule(Protocol):
    """``hsmctl.auditlog._scan`` (``_scan.c``): ``scan(lines, pos, running, first)``
    links ``lines[pos:end]`` of the common shape and returns ``end`` and the last hash."""

    def scan(
        self, lines: list[bytes], pos: int, running: bytes, first: int, /
    ) -> tuple[int, bytes]: ...

    def scan_buffer(
        self, data: bytes, pos: int, running: bytes, first: int, limit: int, /
    ) -> tuple[int, int, bytes]: ...


def _compiled() -> ScanModule | None:
    try:
        module = importlib.import_module("hsmctl.auditlog._scan")
    except ImportError:  # not built (no compiler when installed), or built for another system
        return None
    return cast(ScanModule, module)


SCAN: ScanModule | None = _compiled()
"""The compiled scan if it was built, else None: then :func:`_link_scan` is Python only."""


def _link_other(line: bytes, running: bytes, seq: int) -> tuple[bytes, bool] | None:
    """A line not of the common shape, after the record whose hash is ``running``: its
    hash and whether it is a signed record (to be verified in full), if it links by its
    bytes and (unless signed) is a canonical record; else None."""
    at = line.rfind(HASH_MEMBER)
    end = at + 73
    claimed = line[at + 9 : end]
    if (
        at < 0
        or line[end : end + 1] != b'"'
        or hashlib.sha256(line[:at] + line[end + 1 :]).hexdigest().encode() != claimed
        # outcome (at most 8 bytes) and prev follow the hash; role and seq follow prev
        or line.find(_PREV_MEMBER + running + b'"', end, end + 110) < 0
        or line.find(b',"seq":%d,' % seq, end + 90) < 0
    ):
        return None
    if line.endswith(_SIGNED_EVENTS, 0, at):
        return claimed, True
    if not _canonical_line(line, seq):
        return None
    return claimed, False


def _link_scan(
    lines: Sequence[bytes], start: Head, *, compiled: bool = True
) -> tuple[int, bytes, list[tuple[int, bytes]]]:
    """How many leading lines continue the chain from ``start``, each a record that
    :func:`verify_lines` would accept there, and the hash of the last of them; and, for
    every line that may be a checkpoint or a key rotation, its index and the hash before
    it (those it must still verify).

    A line of the common shape (:data:`RECORD`) is checked on its bytes alone: it is
    canonical JSON of a well-formed record (the pattern says which bytes a canonical line
    can have, then UTF-8 and the order of the detail's keys), its ``hash`` is SHA-256 of
    the line without the member, ``prev`` the previous hash and ``seq`` the next number —
    together exactly what the full verifier checks of a record that is not signed. Any
    other line is a signed record if its bytes say so (verified in full later), else it is
    parsed and re-encoded like :func:`verify_lines` does (:func:`_canonical_line`).

    With the compiled scan (:data:`SCAN`, unless ``compiled`` is false: Python only) the
    plain ASCII unsigned lines of the common shape — nearly every line a device
    writes — are linked in C, and every line it does not take is decided here, one at a
    time, exactly as without it (it takes a line only when this code would).
    """
    signed: list[tuple[int, bytes]] = []
    if not _HEX64.fullmatch(start.hash):  # not a hash: no line can link to it by its bytes
        return 0, b"", signed
    running = start.hash.encode("ascii")
    first, total = start.seq + 1, len(lines)
    scan = SCAN if compiled else None
    if (
        scan is None
        or type(lines) is not list
        or type(first) is not int  # a caller's Head may hold anything; "%d" takes 2.0
        or not 1 <= first <= _SEQ_LIMIT - total
    ):
        count, running = _scan_lines(lines, running, first, signed, 0)
        return count, running, signed
    count = 0
    while count < total:
        count, running = scan.scan(lines, count, running, first)
        if count == total:
            break
        taken, claimed = _scan_lines(
            lines[count : count + 1], running, first + count, signed, count
        )
        if not taken:
            break
        running = bytes(claimed)  # a slice of the line: bytearray if the line was one
        count += 1
    return count, running, signed


def _scan_lines(
    lines: Sequence[bytes],
    running: bytes,
    first: int,
    signed: list[tuple[int, bytes]],
    offset: int,
) -> tuple[int, bytes]:
    """:func:`_link_scan` in Python: how many leading ``lines`` link after ``running``
    (the first of them numbered ``first``), and the last one's hash; signed records are
    added to ``signed`` (their index plus ``offset``)."""
    sha256, plain, exact, escapes, signed_names = (
        hashlib.sha256,
        PLAIN.fullmatch,
        RECORD.fullmatch,
        ESCAPES,
        _SIGNED_NAMES,
    )  # locals: this loop runs once a record
    count = 0
    for line in lines:
        shape = (plain if len(line.translate(None, escapes)) == len(line) else exact)(line)
        if (
            shape is not None
            and (line.isascii() or _is_utf8(line))
            and ((g := shape.groups())[1] is None or increasing(g))
        ):
            at, claimed = shape.start(10), g[10]
            if (
                sha256(line[:at] + line[at + 74 :]).hexdigest().encode() != claimed
                or g[11] != running
                or g[12] != b"%d" % (first + count)
            ):
                break
            if g[8] in signed_names:
                signed.append((offset + count, running))
        else:
            linked = _link_other(line, running, first + count)
            if linked is None:
                break
            claimed, is_signed = linked
            if is_signed:
                signed.append((offset + count, running))
        running = claimed
        count += 1
    return count, running


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
    newline is no part of a line here: ``parse_record`` would strip it after it was hashed.)"""
    if line[-1:] == b"\n":
        return False
    try:
        record, raw, shape = form.parse_record(line, seq)
    except Stop:
        return False
    assert raw is not None
    return form.canonical_at(raw, shape, record, record["hash"]) >= 0


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
    only the signed records are verified in full, and the lines from where the scan
    stopped, if it stopped early. The report is then the one ``verify_lines`` gives,
    which is checked: if the last signed record of the scan did not verify as one, or any
    violation was found, the block is verified again the full way, and that report is
    returned (it names the first bad record exactly as before).
    """
    begin = start or GENESIS_HEAD
    retired = tuple(retired_keys)

    def full() -> VerifyReport:
        return verify_lines(lines, trusted_keys, device=device, start=begin, retired_keys=retired)

    count, last, signed = _link_scan(lines, begin)
    verifier = ChainVerifier(trusted_keys, device=device, start=begin, retired_keys=retired)
    done = 0
    for index, before in signed:
        if index > done:
            verifier._advance(index - done, Head(begin.seq + index, before.decode()))
        verifier.feed(lines[index])
        done = index + 1
        if verifier.done:
            return full()
    if count > done:  # linked by their bytes after the last signed record
        verifier._advance(count - done, Head(begin.seq + count, last.decode()))
        done = count
    for line in lines[done:]:
        verifier.feed(line)
        if verifier.done:
            break
    report = verifier.finish()
    if report.violations or (
        signed
        and (
            report.last_checkpoint_seq is None
            or report.last_checkpoint_seq < begin.seq + signed[-1][0] + 1
        )
    ):
        return full()
    return report


def verify_buffer(
    data: bytes,
    trusted_keys: Mapping[str, str],
    *,
    device: str | None,
    start: Head,
    retired_keys: Iterable[str],
    record_bytes: int,
) -> tuple[VerifyReport, int] | None:
    """:func:`verify_block` of ``data``'s lines, without splitting ``data`` into them,
    when the compiled scan is built and every line is whole (ends with a newline), at most
    ``record_bytes`` long, links and verifies: the report and how many bytes of ``data``
    end with its last verified checkpoint (0 if none). Otherwise None — the caller then
    splits the lines and verifies them (:func:`verify_block`), which also names what is
    wrong. Each line is decided as :func:`_link_scan` decides it (the compiled scan takes
    it, or the Python scan does), and the signed records are verified as in
    :func:`verify_block`, so a report given here is the one it gives."""
    scan = SCAN
    first, size = start.seq + 1, len(data)
    if (
        scan is None
        or type(data) is not bytes
        or not data.endswith(b"\n")
        or type(first) is not int
        or not 1 <= first <= _SEQ_LIMIT - size
        or not _HEX64.fullmatch(start.hash)
    ):
        return None
    running = start.hash.encode("ascii")
    pos = count = 0
    signed: list[tuple[int, bytes, int, int]] = []  # index, hash before, line start, end
    while True:
        pos, taken, running = scan.scan_buffer(data, pos, running, first + count, record_bytes)
        count += taken
        if pos == size:
            break
        end = data.index(b"\n", pos)
        if end - pos > record_bytes:
            return None
        found: list[tuple[int, bytes]] = []
        linked, claimed = _scan_lines((data[pos:end],), running, first + count, found, count)
        if not linked:
            return None
        if found:
            signed.append((count, running, pos, end))
        running = claimed
        count += 1
        pos = end + 1
    verifier = ChainVerifier(
        trusted_keys, device=device, start=start, retired_keys=tuple(retired_keys)
    )
    done = 0
    for index, before, lo, hi in signed:
        if index > done:
            verifier._advance(index - done, Head(start.seq + index, before.decode()))
        verifier.feed(data[lo:hi])
        done = index + 1
        if verifier.done:
            return None
    if count > done:
        verifier._advance(count - done, Head(start.seq + count, running.decode()))
    report = verifier.finish()
    last = report.last_checkpoint_seq
    if report.violations or (signed and (last is None or last < start.seq + signed[-1][0] + 1)):
        return None
    if last is None:
        return report, 0
    through = last - start.seq - 1  # the index of the last checkpoint's line
    ends = [hi + 1 for index, _, _, hi in signed if index == through]
    if not ends:
        return None
    return report, ends[0]
