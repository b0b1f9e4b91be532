"""The device's hash-chained, signed activity log (SPEC §3, §8).

``chain`` is the record format and how records are made (stdlib only, used by the device
daemon); ``signing`` adds checkpoints and key rotations; ``verify`` checks a log stream
against pinned keys and names the first tampered record.
"""

from hsmctl.auditlog.chain import (
    GENESIS,
    GENESIS_HEAD,
    Head,
    Outcome,
    Record,
    canonical,
    make_record,
    record_hash,
    record_line,
    rfc3339,
)
from hsmctl.auditlog.signing import (
    Signer,
    SoftwareSigner,
    key_id_for_pem,
    load_public_key,
    make_checkpoint,
    make_key_rotation,
)
from hsmctl.auditlog.verify import (
    ChainError,
    ChainVerifier,
    VerifyReport,
    Violation,
    ViolationKind,
    verify_block,
    verify_file,
    verify_lines,
)

__all__ = [
    "GENESIS",
    "GENESIS_HEAD",
    "ChainError",
    "ChainVerifier",
    "Head",
    "Outcome",
    "Record",
    "Signer",
    "SoftwareSigner",
    "VerifyReport",
    "Violation",
    "ViolationKind",
    "canonical",
    "key_id_for_pem",
    "load_public_key",
    "make_checkpoint",
    "make_key_rotation",
    "make_record",
    "record_hash",
    "record_line",
    "rfc3339",
    "verify_block",
    "verify_file",
    "verify_lines",
]
