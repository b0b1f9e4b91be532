"""What a verification proved: the report, its violations, and the error that names them.

``Stop`` is internal to the verifier: a record failed a check.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hsmctl.auditlog.chain import Head
from hsmctl.errors import IntegrityError


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


class Stop(Exception):
    """Internal to the verifier: a record failed a check; carries the violation."""

    def __init__(self, kind: ViolationKind, seq: int, message: str) -> None:
        self.kind, self.seq, self.message = kind, seq, message
