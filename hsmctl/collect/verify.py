"""Offline re-verification of an appliance's archive (``logs verify``): from record 1,
with the pinned audit keys only, no device; and the cursor must say what the chain proves.

An archive of a log whose oldest records the device had deleted before this tenancy
starts at the base the takeover proved (``pins.log_base``): trust is carried there from
the initial key by the pinned key rotations, and the archive must hold the device's
deletion of the records before it (reported as ``retired``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsmctl.auditlog import GENESIS_HEAD
from hsmctl.auditlog.anchor import AnchorError, describe, retirement
from hsmctl.collect.appliances import archive_of, taken_over
from hsmctl.collect.collector import LogIntegrityError, based_trust
from hsmctl.collect.pipeline import ChunkedVerifier, Halted, Limits, TrustState, VerifyPool
from hsmctl.errors import IntegrityError


@dataclass
class ArchiveReport:
    """What ``logs verify`` found (its JSON output)."""

    appliance: str
    records: int
    last_seq: int
    last_checkpoint: int | None
    segments: int
    trusted_keys: list[str]
    retired_keys: list[str]
    first_seq: int = 1
    retired: dict[str, Any] | None = None
    """When the archive starts after records the device deleted before this tenancy:
    which, and by whose acknowledgement (:func:`hsmctl.auditlog.anchor.retirement`)."""

    def as_dict(self) -> dict[str, Any]:
        out = {
            "appliance": self.appliance,
            "verified": True,
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "last_checkpoint": self.last_checkpoint,
            "segments": self.segments,
            "trusted_keys": self.trusted_keys,
            "retired_keys": self.retired_keys,
        }
        if self.retired is not None:
            out["retired"] = self.retired
            out["message"] = describe(self.retired)
        return out


def verify_archive(
    state: Path, appliance: str, *, wait: float = 60.0, workers: int | None = None
) -> ArchiveReport:
    """Re-verify a whole archive from record 1 with the pinned keys only (no device), and
    check that the cursor says what the chain proves. Raises IntegrityError (exit 3)."""
    st = taken_over(state, appliance)
    pins = st.load_pins()
    base_keys, base_retired, base = based_trust(appliance, pins)
    deletions = _Deletions()
    archive = archive_of(st)
    n = (os.cpu_count() or 1) if workers is None else workers
    pool = VerifyPool(n) if n > 0 else None
    try:
        with archive.lock(exclusive=False, wait=wait):
            cursor = archive.cursor()
            if cursor.base is None:  # from record 1: the pinned keys
                retired = frozenset(pins.retired)
                keys = {k: v for k, v in pins.audit_keys.items() if k not in retired}
            elif cursor.base == base:  # from the base the takeover proved
                keys, retired = dict(base_keys), base_retired
            else:
                raise IntegrityError(
                    f"{appliance}: archive verification failed: the archive starts after "
                    f"record {cursor.base.seq} but the takeover proved the log from record "
                    f"{base.seq + 1 if base else 1}",
                    detail={"appliance": appliance},
                )
            trust = TrustState(keys, retired)
            # An archive holds only signed records, and one collected before the unsigned
            # bounds existed must not fail by them: only the record length applies.
            verifier = ChunkedVerifier(
                trust,
                cursor.base or GENESIS_HEAD,
                pool=pool,
                limits=Limits(unsigned_records=None, unsigned_bytes=None),
            )
            try:
                for block in archive.blocks(cursor):
                    if cursor.base is not None:
                        deletions.scan(block)
                    verifier.feed(block)
            except Halted:
                pass
            summary = verifier.finish()
    finally:
        if pool is not None:
            pool.close()
    if summary.violations:
        raise LogIntegrityError(appliance, summary.violations, cursor)
    problems = []
    if summary.head != cursor.head:
        problems.append(
            f"the segments end at record {summary.head.seq} but the cursor says {cursor.seq}"
        )
    if cursor.seq and summary.last_checkpoint_seq != cursor.seq:
        problems.append(
            f"records {(summary.last_checkpoint_seq or 0) + 1}..{cursor.seq} are not signed"
        )
    if set(summary.state.trusted) != set(cursor.trusted_keys) or summary.state.retired != set(
        cursor.retired_keys
    ):
        problems.append("the cursor's audit keys are not those the chain leads to")
    if cursor.seq and summary.state.device != cursor.device:
        problems.append(
            f"the cursor names device {cursor.device!r}, the chain {summary.state.device!r}"
        )
    found = None
    if cursor.base is not None:
        try:
            found = retirement(deletions.records, cursor.base.seq)
        except AnchorError as exc:
            problems.append(str(exc))
    if problems:
        raise IntegrityError(
            f"{appliance}: archive verification failed: {'; '.join(problems)}",
            detail={"appliance": appliance, "problems": problems},
        )
    return ArchiveReport(
        appliance=appliance,
        records=cursor.records,
        last_seq=cursor.seq,
        last_checkpoint=summary.last_checkpoint_seq,
        segments=len(cursor.segments),
        trusted_keys=sorted(summary.state.trusted),
        retired_keys=sorted(summary.state.retired),
        first_seq=cursor.base.seq + 1 if cursor.base else 1,
        retired=found,
    )


class _Deletions:
    """The records that explain a base (the device's deletions, the acks), picked out of
    the archive's blocks by their bytes; the chain verifier vouches for them."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self._tail = b""  # a line cut by the block boundary

    def scan(self, block: bytes) -> None:
        data = self._tail + block
        cut = data.rfind(b"\n") + 1
        whole, self._tail = data[:cut], data[cut:]
        if b"log-segment-deleted" not in whole and b"audit ack" not in whole:
            return
        for line in whole.splitlines():
            if b'"event":"log-segment-deleted"' in line or b'"command":"audit ack' in line:
                self.records.append(json.loads(line))
