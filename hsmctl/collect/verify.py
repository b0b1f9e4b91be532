"""Offline re-verification of an appliance's archive (``logs verify``): from record 1,
with the pinned audit keys only, no device; and the cursor must say what the chain proves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsmctl.auditlog import GENESIS_HEAD
from hsmctl.collect.appliances import archive_of, taken_over
from hsmctl.collect.collector import LogIntegrityError
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "appliance": self.appliance,
            "verified": True,
            "records": self.records,
            "last_seq": self.last_seq,
            "last_checkpoint": self.last_checkpoint,
            "segments": self.segments,
            "trusted_keys": self.trusted_keys,
            "retired_keys": self.retired_keys,
        }


def verify_archive(
    state: Path, appliance: str, *, wait: float = 60.0, workers: int | None = None
) -> ArchiveReport:
    """Re-verify a whole archive from record 1 with the pinned keys only (no device), and
    check that the cursor says what the chain proves. Raises IntegrityError (exit 3)."""
    st = taken_over(state, appliance)
    pins = st.load_pins()
    retired = frozenset(pins.retired)
    trust = TrustState({k: v for k, v in pins.audit_keys.items() if k not in retired}, retired)
    archive = archive_of(st)
    n = (os.cpu_count() or 1) if workers is None else workers
    pool = VerifyPool(n) if n > 0 else None
    try:
        with archive.lock(exclusive=False, wait=wait):
            cursor = archive.cursor()
            # An archive holds only signed records, and one collected before the unsigned
            # bounds existed must not fail by them: only the record length applies.
            verifier = ChunkedVerifier(
                trust,
                GENESIS_HEAD,
                pool=pool,
                limits=Limits(unsigned_records=None, unsigned_bytes=None),
            )
            try:
                for block in archive.blocks(cursor):
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
    )
