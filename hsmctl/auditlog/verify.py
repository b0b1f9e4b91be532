"""Verification of an activity log against pinned public keys, by concern:

- ``verifier``: the full verifier (``ChainVerifier``, :func:`verify_lines`), streaming
  and resumable;
- ``blockscan``: its fast path for a block of lines (:func:`verify_block`);
- ``form``: which lines are records (canonical JSON only);
- ``trust``: checkpoints, key rotations and the keys they trust or retire;
- ``report``: what was proven (``VerifyReport``, ``Violation``, ``ChainError``).

This module keeps the names the rest of the code imports, and verifies a file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from os import PathLike

from hsmctl.auditlog.blockscan import verify_block
from hsmctl.auditlog.chain import Head
from hsmctl.auditlog.report import ChainError, VerifyReport, Violation, ViolationKind
from hsmctl.auditlog.verifier import REORDER_WINDOW, ChainVerifier, verify_lines

__all__ = [
    "REORDER_WINDOW",
    "ChainError",
    "ChainVerifier",
    "VerifyReport",
    "Violation",
    "ViolationKind",
    "verify_block",
    "verify_file",
    "verify_lines",
]


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
