"""``hsmctl backup ID --output FILE`` and ``hsmctl restore ID --backup FILE`` (SPEC §12).

The backup file is one canonical JSON document (sorted keys, no whitespace, one final
newline)::

    {"format": "hsmctl-backup/1",
     "manifest": {"appliance", "created", "domain", "objects": [ENTRY...]},
     "signature": {"type": "hsmctl-backup-manifest", "device", "manifest_sha256",
                   "key_id", "alg", "sig"}}

An ENTRY names a key object (``class``, ``key_type``, ``label``, ``id``, ``usage``,
``public_sha256`` where it has public material) and carries it: ``wrapped`` (hex, the
private or secret key under the domain key, AES key wrap with padding) or ``public``
(hex attributes of a public key). ``manifest_sha256`` is the SHA-256 of the manifest's
canonical JSON, the blobs included, and the device's audit key signs it
(``hsm backup-sign``). Restore checks, before anything is sent to the target: the file
is exactly its own canonical form (a flipped byte anywhere is caught), the manifest
hashes to the signed digest, the signature verifies with an audit key this state
directory pinned for the source appliance, and the target's domain is the manifest's.
Any of those failing is exit 3 with nothing changed.

Restore adds only what is missing (matched by class, type, label, id and public-key
hash), one whole object at a time, so a killed restore reruns to completion with no
duplicates. Backup writes a temporary file and renames it into place (the output is
either absent, the previous file, or a complete verified backup).
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hsmctl import privatefiles
from hsmctl.auditlog import canonical
from hsmctl.auditlog.signing import verify_raw_signature
from hsmctl.customer.context import TenantContext
from hsmctl.customer.store import ApplianceDir
from hsmctl.errors import ConflictError, IntegrityError, UsageError
from hsmctl.keys import session
from hsmctl.keys.domain import CLASSES, KEY_TYPES, DomainToken, match_key

FORMAT = "hsmctl-backup/1"
SIGNATURE_TYPE = "hsmctl-backup-manifest"  # hsmctl/appliance/commands/hsm.py
ALG = "ECDSA-P256-SHA256"
_HEX = re.compile(r"(?:[0-9a-f]{2})*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --- the file (pure) --------------------------------------------------------------------


def manifest_digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(manifest)).hexdigest()


def encode(manifest: dict[str, Any], signature: dict[str, Any]) -> bytes:
    return canonical({"format": FORMAT, "manifest": manifest, "signature": signature}) + b"\n"


def signed_payload(signature: dict[str, Any]) -> bytes:
    """What the device signed (``hsm backup-sign``): canonical JSON of its own type."""
    return canonical(
        {
            "type": SIGNATURE_TYPE,
            "device": signature["device"],
            "manifest_sha256": signature["manifest_sha256"],
            "key_id": signature["key_id"],
        }
    )


def _damaged(path: Path, why: str) -> IntegrityError:
    return IntegrityError(f"--backup {path}: {why}; nothing was restored")


def _check_entry(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    if entry.get("class") not in CLASSES or entry.get("key_type") not in KEY_TYPES:
        return False
    if not isinstance(entry.get("label"), str) or not isinstance(entry.get("id"), str):
        return False
    if not _HEX.fullmatch(entry["id"]) or not isinstance(entry.get("usage"), list):
        return False
    if entry["class"] == "public-key":
        public = entry.get("public")
        return isinstance(public, dict) and all(
            isinstance(v, str) and _HEX.fullmatch(v) for v in public.values()
        )
    wrapped = entry.get("wrapped")
    return isinstance(wrapped, str) and bool(wrapped) and bool(_HEX.fullmatch(wrapped))


def parse(path: Path, raw: bytes) -> dict[str, Any]:
    """The document if it is exactly its canonical form with the expected shape (pure);
    else IntegrityError (a damaged or edited file)."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _damaged(path, "not a backup file (damaged: not JSON)") from exc
    if not isinstance(doc, dict) or set(doc) != {"format", "manifest", "signature"}:
        raise _damaged(path, "not an hsmctl backup")
    if doc["format"] != FORMAT:
        raise _damaged(path, f"format {str(doc['format'])[:40]!r}, expected {FORMAT}")
    if canonical(doc) + b"\n" != raw:
        raise _damaged(path, "the file is not as hsmctl wrote it (edited or damaged)")
    manifest, signature = doc["manifest"], doc["signature"]
    if (
        not isinstance(manifest, dict)
        or set(manifest) != {"appliance", "created", "domain", "objects"}
        or not isinstance(manifest["objects"], list)
        or not all(_check_entry(e) for e in manifest["objects"])
        or not isinstance(manifest["domain"], str)
        or not _SHA256.fullmatch(manifest["domain"])
        or not isinstance(manifest["appliance"], str)
    ):
        raise _damaged(path, "the manifest is malformed")
    if not isinstance(signature, dict) or set(signature) != {
        "type", "device", "manifest_sha256", "key_id", "alg", "sig"
    }:  # fmt: skip
        raise _damaged(path, "the signature block is malformed")
    return doc


def verify(path: Path, doc: dict[str, Any], pinned: dict[str, str]) -> dict[str, Any]:
    """The manifest once its digest and the audit key's signature check out (pure);
    ``pinned`` maps the source appliance's trusted audit key ids to their PEM."""
    manifest, signature = doc["manifest"], doc["signature"]
    if signature["type"] != SIGNATURE_TYPE or signature["alg"] != ALG:
        raise _damaged(path, "not a backup-manifest signature")
    if manifest_digest(manifest) != signature["manifest_sha256"]:
        raise _damaged(path, "the manifest does not hash to the signed digest (tampered)")
    if signature["device"] != manifest["appliance"]:
        raise _damaged(path, "signed by another device than the manifest names")
    pem = pinned.get(str(signature["key_id"]))
    if pem is None:
        raise _damaged(
            path,
            f"signed by audit key {str(signature['key_id'])[:16]}, which is not pinned for "
            f"{manifest['appliance']} in this state directory",
        )
    if not verify_raw_signature(pem, str(signature["sig"]), signed_payload(signature)):
        raise _damaged(path, "the audit key's signature does not verify (tampered)")
    return dict(manifest)


def trusted_audit_keys(ctx: TenantContext, appliance: str) -> dict[str, str]:
    state = ApplianceDir.taken_over(ctx.state_dir, appliance)
    if state is None:
        return {}
    pins = state.load_pins()
    return {k: v for k, v in pins.audit_keys.items() if k not in set(pins.retired)}


# --- the commands -----------------------------------------------------------------------


def _token(ctx: TenantContext, appliance: str, kit_dir: Path | None,
           pin_file: Path | None) -> DomainToken:  # fmt: skip
    plain = session._token(ctx, appliance, kit_dir, pin_file)
    return DomainToken(plain.appliance, plain.remote, plain.pin)


def foreign_kit_keys(known_hosts: str, pinned: list[str]) -> list[str]:
    """The host keys a kit's ``known_hosts`` accepts that are not among ``pinned`` (the
    target appliance's data host keys), as ``TYPE BASE64`` (pure). A kit whose ssh
    accepts only the target's pinned keys (``StrictHostKeyChecking yes``) can reach no
    other device; a group kit (every member's keys) or another appliance's kit can."""
    mine = {" ".join(k.split()[:2]) for k in pinned}
    accepted = [" ".join(line.split()[1:3]) for line in known_hosts.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]  # fmt: skip
    return [k for k in accepted if k not in mine] if accepted else ["(none)"]


def check_target(ctx: TenantContext, appliance: str, kit_dir: Path | None) -> None:
    """Refuse, before anything is read from or sent to a device, a target that is not
    this tenant's (its takeover receipt is not signed by this tenant's identity, or names
    another tenant: exit 5) or a ``--kit`` that may reach another device (exit 2)."""
    from hsmctl.takeover.receipt import RECEIPT, verify_receipt

    state = ApplianceDir(ctx.state_dir, appliance)
    receipt = state.dir / RECEIPT
    if not receipt.is_file():
        raise ConflictError(f"{appliance}: the takeover is not finished (no receipt); "
                            "nothing changed")  # fmt: skip
    try:
        verify_receipt(receipt, ctx.identity)
        tenant = json.loads(receipt.read_text(encoding="utf-8")).get("tenant")
    except (IntegrityError, OSError, ValueError) as exc:
        raise ConflictError(
            f"{appliance}: not this tenant's appliance (its takeover receipt is not signed "
            "by this tenant's identity); nothing changed"
        ) from exc
    if ctx.tenant is not None and tenant != ctx.tenant:
        raise ConflictError(
            f"{appliance}: taken over by tenant {str(tenant)[:40]!r}, not {ctx.tenant!r}; "
            "nothing changed"
        )
    if kit_dir is None:
        return  # hsmctl's own kit for this appliance: made from its pins
    pinned = [str(k) for k in state.pins().get("data_host_keys") or ()]
    try:
        text = (kit_dir.absolute() / "known_hosts").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--kit {kit_dir}: no readable known_hosts; nothing changed") from exc
    foreign = foreign_kit_keys(text, pinned)
    if foreign:
        raise UsageError(
            f"--kit {kit_dir}: its known_hosts accepts host keys that are not {appliance}'s "
            f"pinned data host keys ({len(foreign)}: another appliance's kit, or a group "
            "kit that reaches whichever member answers); give a kit of this appliance; "
            "nothing changed"
        )


def backup(
    ctx: TenantContext,
    appliance: str,
    output: Path,
    kit_dir: Path | None = None,
    pin_file: Path | None = None,
) -> dict[str, Any]:
    from hsmctl.clients.workflow import Appliance

    ApplianceDir(ctx.state_dir, appliance)  # validates the id (exit 2)
    output = output.absolute()
    if output.is_dir() or not output.parent.is_dir():
        raise UsageError(f"--output {output}: not a file in an existing directory")
    admin = Appliance(ctx, appliance)  # exit 5 unless taken over from here
    check_target(ctx, appliance, kit_dir)  # this tenant's, and the kit reaches it
    with _token(ctx, appliance, kit_dir, pin_file) as token:
        found = token.domain_key()
        if found is None:
            raise ConflictError(
                f"{appliance}: the token is in no cloning domain (hsmctl domain set); "
                "nothing written"
            )
        domain, fingerprint = found
        objects, skipped = token.export(domain)
    manifest = {
        "appliance": appliance,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "domain": fingerprint,
        "objects": objects,
    }
    digest = manifest_digest(manifest)
    with admin.connect() as conn:
        signature = admin.reply(conn, f"hsm backup-sign --digest {digest}")
    data = encode(manifest, signature)
    # Never write a backup that would not restore: check it as restore will.
    verify(output, parse(output, data), trusted_audit_keys(ctx, appliance))
    privatefiles.write_atomic(output, data)
    return {
        "appliance": appliance,
        "backup": str(output),
        "domain": fingerprint,
        "objects": len(objects),
        "bytes": len(data),
        "manifest_sha256": digest,
        "skipped": [{"label": e["label"], "id": e["id"], "class": e["class"]} for e in skipped],
    }


def load(ctx: TenantContext, path: Path) -> dict[str, Any]:
    """The verified manifest of a backup file (exit 2 unreadable, exit 3 not genuine)."""
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise UsageError(f"--backup {path}: cannot read it ({type(exc).__name__})") from exc
    doc = parse(path, raw)
    source = str(doc["manifest"]["appliance"])
    return verify(path, doc, trusted_audit_keys(ctx, source))


def restore(
    ctx: TenantContext,
    appliance: str,
    backup_file: Path,
    kit_dir: Path | None = None,
    pin_file: Path | None = None,
) -> dict[str, Any]:
    from hsmctl.clients.workflow import Appliance

    ApplianceDir(ctx.state_dir, appliance)  # validates the id (exit 2)
    Appliance(ctx, appliance)  # exit 5 unless taken over from here
    check_target(ctx, appliance, kit_dir)  # this tenant's, and the kit reaches it
    manifest = load(ctx, backup_file)
    with _token(ctx, appliance, kit_dir, pin_file) as token:
        found = token.domain_key()
        if found is None:
            raise IntegrityError(
                f"{appliance}: the token is in no cloning domain; the backup is of domain "
                f"{manifest['domain'][:16]}... (hsmctl domain set first); nothing restored"
            )
        domain, fingerprint = found
        if fingerprint != manifest["domain"]:
            raise IntegrityError(
                f"{appliance}: the token is in domain {fingerprint[:16]}..., the backup in "
                f"{manifest['domain'][:16]}...; nothing restored"
            )
        present = token.present()
        added = []
        for entry in manifest["objects"]:
            if match_key(entry) in present:
                continue
            token.put(domain, entry)
            present.add(match_key(entry))
            added.append({"label": entry["label"], "id": entry["id"], "class": entry["class"]})
    return {
        "appliance": appliance,
        "backup": str(backup_file.absolute()),
        "source": manifest["appliance"],
        "domain": manifest["domain"],
        "objects": len(manifest["objects"]),
        "restored": added,
        "present": len(manifest["objects"]) - len(added),
    }
