"""The full verifier: one log stream, record by record, against pinned public keys.

It reads one record at a time in constant memory and stops at the first violation:
after it, nothing can be vouched for, and the collector only needs to know where trust
ends. One exception: after a gap it keeps reading a bounded window, without verifying
anything, only to tell a deletion from a reordering. A record's form is checked by
``form``, its signatures by ``trust``.

Resuming (SPEC §8): with ``start`` the first record must be ``start.seq + 1`` linked to
``start.hash``. To prove the device still holds the archived head, export from the record
before it and pass ``start=Head(head.seq - 1, head_record["prev"])`` with
``expect_at_least=head``: a different record there is a rollback, none is a truncation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hsmctl.auditlog import form
from hsmctl.auditlog.chain import CHECKPOINT_EVENT, GENESIS_HEAD, KEY_ROTATION_EVENT, Head
from hsmctl.auditlog.report import Stop, VerifyReport, Violation, ViolationKind
from hsmctl.auditlog.trust import Trust
from hsmctl.devicejson import parse

REORDER_WINDOW = 1024
"""Records read after a gap, unverified, to see whether the missing ones come later."""


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
        self._trust = Trust(trusted_keys, device=device, retired_keys=retired_keys)
        self._start = start or GENESIS_HEAD
        if expect_at_least is not None and expect_at_least.seq <= self._start.seq:
            if expect_at_least.seq == self._start.seq and expect_at_least != self._start:
                raise ValueError("expect_at_least contradicts start")
            expect_at_least = None  # already inside what the caller verified
        self._anchor = expect_at_least
        # The last verified record, kept as two fields: a Head per record costs too much.
        self._seq, self._hash = self._start.seq, self._start.hash
        self._records = 0
        self._first_seq: int | None = None
        self._last_checkpoint: int | None = None
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
        except Stop as stop:
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
            device=self._trust.device,
            keys_seen=tuple(self._trust.keys_seen),
            trusted_keys=dict(self._trust.trusted),
            retired_keys=frozenset(self._trust.retired),
            violations=tuple(self._violations),
        )

    # -- one record --------------------------------------------------------------------

    def _check(self, item: bytes | str | Mapping[str, Any]) -> None:
        expected = self._seq + 1
        record, raw, shape = form.parse_record(item, expected)
        seq: int = record["seq"]
        claimed: str = record.pop("hash")
        if raw is None:
            form.check_canonical_hash(record, claimed, None, seq)
        else:
            form.check_line(raw, shape, record, claimed, seq)
        if seq != expected:
            if seq > expected:
                self._gap = (expected, seq)
                raise Stop(
                    ViolationKind.GAP,
                    expected,
                    f"missing (deleted): expected record {expected}, got {seq}",
                )
            what = "a replayed copy" if claimed == self._hash else "inserted or replayed"
            raise Stop(
                ViolationKind.DUPLICATE,
                seq,
                f"duplicate seq ({what}): expected record {expected}, got {seq} again",
            )
        if record["prev"] != self._hash:
            if self._seq and not self._records:
                raise Stop(
                    ViolationKind.ROLLBACK,
                    seq,
                    f"prev does not match the known record {self._seq}"
                    " (log rolled back or replaced)",
                )
            raise Stop(
                ViolationKind.BROKEN_LINK,
                seq,
                f"prev does not match the hash of record {self._seq}"
                " (record inserted, deleted or replaced)",
            )
        anchor = self._anchor
        if anchor is not None and seq == anchor.seq and claimed != anchor.hash:
            raise Stop(
                ViolationKind.ROLLBACK,
                seq,
                f"differs from the known record {seq} (log rolled back or replaced)",
            )
        event = record["event"]
        if event == CHECKPOINT_EVENT:
            self._trust.checkpoint(seq, record)
            self._last_checkpoint = seq
        elif event == KEY_ROTATION_EVENT:
            self._trust.rotation(seq, record)
            self._last_checkpoint = seq
        self._seq, self._hash = seq, claimed
        self._records += 1
        if self._first_seq is None:
            self._first_seq = seq

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
