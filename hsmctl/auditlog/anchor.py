"""Verifying a log whose oldest records were deleted (issue 15: retention, then a new owner).

A device deletes a log segment only after the customer's collector acknowledged the
records in it, and logs each deletion (``log-segment-deleted``, naming the ack). When the
device is then re-provisioned, its next owner pins only the device's *initial* audit key
(the hand-off bundle's) and cannot export from record 1. The chain is then verified from
its **base**, the head before the oldest record left:

* trust is carried from the initial key to the key that signs the base by the deleted
  segments' key-rotation records, which the device keeps (``audit key show``'s
  ``retired_key_rotations``); each is checked as in the log (canonical form, hash, both
  signatures, the old key trusted), in order (:func:`carry_trust`);
* the records from the base on are verified as a chain that starts at the base (the
  first must link to it); the first checkpoint after the base, signed by a trusted key,
  is the anchor: it signs a head the hash chain ties to the base;
* the records before the base must be explained: a ``log-segment-deleted`` record of the
  device in the verified records that deleted the segment ending at the base, naming the
  acknowledgement that allowed it (:func:`retirement`). Without one, the missing records
  are an integrity violation, never a silent drop.

Everything here is pure and needs only public keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hsmctl.auditlog.chain import KEY_ROTATION_EVENT, Head
from hsmctl.auditlog.verifier import verify_lines
from hsmctl.devicejson import parse

DELETION_EVENT = "log-segment-deleted"


class AnchorError(ValueError):
    """The base cannot be trusted: a rotation that does not verify, out of order, or
    records deleted without a logged deletion."""


@dataclass(frozen=True)
class LogBase:
    """Where a chain starts when records 1..``seq`` are gone: the head before its oldest
    record, and the deleted segments' key rotations (their lines, oldest first)."""

    seq: int
    hash: str
    key_rotations: tuple[str, ...] = ()
    retired: Mapping[str, Any] = field(default_factory=dict)
    """What :func:`retirement` found: which records were retired and by whose ack."""

    @property
    def head(self) -> Head:
        return Head(self.seq, self.hash)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "hash": self.hash,
            "key_rotations": list(self.key_rotations),
            "retired": dict(self.retired),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LogBase:
        seq, digest = d.get("seq"), d.get("hash")
        if type(seq) is not int or seq < 1 or type(digest) is not str or len(digest) != 64:
            raise AnchorError("log base: seq must be a positive integer and hash 64 hex digits")
        rotations = d.get("key_rotations") or []
        if not isinstance(rotations, list) or not all(isinstance(x, str) for x in rotations):
            raise AnchorError("log base: key_rotations must be a list of records")
        retired = d.get("retired") or {}
        if not isinstance(retired, dict):
            raise AnchorError("log base: retired must be an object")
        return cls(seq, digest, tuple(rotations), dict(retired))


def carry_trust(
    trusted_keys: Mapping[str, str],
    rotations: Sequence[str | bytes],
    *,
    device: str | None,
    base_seq: int,
    retired_keys: Iterable[str] = (),
) -> tuple[dict[str, str], frozenset[str]]:
    """The keys trusted and retired after the deleted ``rotations``, starting from
    ``trusted_keys`` (the pinned initial key). Each must be a key-rotation record before
    the base, after the previous one, whose old key is trusted and whose signatures both
    verify. Raises :class:`AnchorError`."""
    trusted, retired = dict(trusted_keys), frozenset(retired_keys)
    last = 0
    for line in rotations:
        try:
            record = parse(line)
            seq, prev = record["seq"], record["prev"]
        except (ValueError, KeyError, TypeError) as exc:
            raise AnchorError(f"a retired key rotation is not a record: {exc}") from None
        if type(seq) is not int or type(prev) is not str:
            raise AnchorError("a retired key rotation has no seq or prev")
        if record.get("event") != KEY_ROTATION_EVENT:
            raise AnchorError(f"retired record {seq} is not a key rotation")
        if not last < seq <= base_seq:
            raise AnchorError(
                f"retired key rotation {seq} is out of order (after {last}, base {base_seq})"
            )
        report = verify_lines(
            [line],
            trusted,
            device=device,
            start=Head(seq - 1, prev),
            retired_keys=retired,
        )
        if report.violations:
            raise AnchorError(f"retired key rotation {seq}: {report.violations[0].message}")
        trusted, retired = dict(report.trusted_keys), frozenset(report.retired_keys)
        last = seq
    return trusted, retired


def retirement(records: Iterable[Mapping[str, Any]], base_seq: int) -> dict[str, Any]:
    """Why records 1..``base_seq`` are missing, from verified records after the base: the
    device's deletion of the segment that ended at the base, and the acknowledgement that
    allowed it (its ``acked_seq``; who sent it, from the deletion record or else the
    ``audit ack`` command just before it). Raises :class:`AnchorError` if none is there."""
    last_ack: tuple[str, int] | None = None
    for r in records:
        detail = r.get("detail") or {}
        command = str(detail.get("command", "")) if isinstance(detail, dict) else ""
        if r.get("event") == "command" and command.startswith("audit ack"):
            last_ack = (str(r.get("actor")), int(r["seq"]))
        if (
            r.get("event") == DELETION_EVENT
            and r.get("actor") == "hsmd"
            and isinstance(detail, dict)
            and detail.get("last_seq") == base_seq
        ):
            acked = detail.get("acked_seq")
            if type(acked) is not int or acked <= base_seq:
                raise AnchorError(
                    f"record {r['seq']} deleted records through {base_seq} without an ack past them"
                )
            by = detail.get("acked_by")
            if not isinstance(by, str):
                by = last_ack[0] if last_ack is not None else None
            return {
                "first_seq": 1,
                "last_seq": base_seq,
                "acked_seq": acked,
                "acked_by": by,
                "ack_record": last_ack[1] if last_ack is not None else None,
                "deletion_seq": int(r["seq"]),
            }
    raise AnchorError(
        f"records 1..{base_seq} are missing and no deletion of them after an acknowledgement "
        "is in the log"
    )


def describe(retired: Mapping[str, Any]) -> str:
    """One line for a person: which records were retired, and by whose ack."""
    return (
        f"records {retired.get('first_seq', 1)}..{retired.get('last_seq')} were retired: "
        f"deleted by the device (record {retired.get('deletion_seq')}) after "
        f"{retired.get('acked_by') or 'the collector'} acknowledged records through "
        f"{retired.get('acked_seq')}"
    )
