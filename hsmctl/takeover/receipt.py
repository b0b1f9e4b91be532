"""SPEC §7 step 8: the receipt, signed with the tenant identity, and its verification.

The receipt is built from the journal and the pins alone (what was proved and pinned),
so writing it again after an interruption gives the same document but for its time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hsmctl import utc
from hsmctl.customer.store import Pins
from hsmctl.errors import HsmctlError, IntegrityError
from hsmctl.handoff import (
    OpenedBundle,
    read_document,
    sign_document,
    verify_document,
    write_document,
)
from hsmctl.handoff.identity import TenantIdentity
from hsmctl.ssh import PublicKey
from hsmctl.takeover.records import TakeoverJournal

RECEIPT = "receipt.json"
RECEIPT_FORMAT = "hsmctl-receipt/1"


def receipt_document(
    bundle: OpenedBundle, journal: TakeoverJournal, pins: Pins, *, keep_monitor: bool
) -> dict[str, Any]:
    """The unsigned receipt of a proved takeover."""
    if journal.checks is None or journal.log_head is None:
        raise HsmctlError(f"{bundle.appliance}: no proof in the journal to write a receipt of")
    keys = journal.host_keys.current
    return {
        "format": RECEIPT_FORMAT,
        "appliance": bundle.appliance,
        "tenant": bundle.tenant,
        "time": utc.stamp(),
        "bundle_id": bundle.bundle_id,
        "request_id": bundle.request_id,
        "data_ip": bundle.data_ip,
        "host_key_fingerprints": [PublicKey.parse(k).fingerprint for k in keys],
        "audit_key": {"initial": pins.initial_audit_key_id, "current": journal.audit_key_id},
        "keep_monitor": keep_monitor,
        # The clients registered by the takeover (public key fingerprints, never a key).
        "clients": [
            {"client": c.name, "role": c.role, "fingerprint": c.fingerprint}
            for c in journal.clients or ()
        ],
        "checks": [c.as_dict() for c in journal.checks],
        "log": {
            "provisioned_seq": journal.provisioned_seq,
            "transfer_seq": journal.transfer_seq,
            "head": journal.log_head.as_dict(),
        },
    }


def write_receipt(
    directory: Path,
    bundle: OpenedBundle,
    journal: TakeoverJournal,
    pins: Pins,
    *,
    keep_monitor: bool,
    identity: TenantIdentity,
) -> Path:
    doc = receipt_document(bundle, journal, pins, keep_monitor=keep_monitor)
    return write_document(directory / RECEIPT, sign_document(doc, identity))


def verify_receipt(path: Path, identity: Path) -> dict[str, Any]:
    """Check a receipt's signature (by this tenant's identity) and that every check
    passed; raise IntegrityError otherwise."""
    doc = read_document(path, what="receipt")
    if doc.get("format") != RECEIPT_FORMAT:
        raise IntegrityError(f"{path}: not a takeover receipt")
    ident = TenantIdentity.load(identity)
    verify_document(doc, ident.public_key_line)
    failed = [c["name"] for c in doc.get("checks", []) if not c.get("ok")]
    if failed or not doc.get("checks"):
        raise IntegrityError(f"{path}: checks failed: {', '.join(failed) or 'none recorded'}")
    return {
        "appliance": doc["appliance"],
        "verified": True,
        "checks": len(doc["checks"]),
        "time": doc["time"],
        "host_key_fingerprints": doc["host_key_fingerprints"],
        "audit_key": doc["audit_key"],
        "clients": doc.get("clients", []),  # absent from receipts of earlier releases
    }
