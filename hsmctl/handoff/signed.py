"""Documents signed by the tenant identity (receipts, releases), and the encoding rules
every signed document here shares.

A signed document is a JSON object whose ``signature`` member covers the canonical JSON
(``hsmctl.auditlog.chain.canonical``: sorted keys, ``(",", ":")``, ``ensure_ascii=False``,
UTF-8) of every other member. Tenant signatures look like::

    "signature": {"alg": "ECDSA-P256-SHA256", "key": "ecdsa-sha2-nistp256 AAAA...",
                  "fingerprint": "SHA256:...", "sig": base64(DER)}

The key rides along so a document can be checked on its own, but a signature only means
something once its key is compared with one the verifier already trusts (the tenant
inventory, the customer's own identity): pass ``expected_public_key_line``.

Releases (``hsmctl release``) authorise the provider to zeroize one appliance::

    {"format": "hsmctl-release/1", "appliance", "tenant", "issued_at", "reason"?,
     "signature"}
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.hashes import SHA256

from hsmctl import devicejson, utc
from hsmctl.auditlog.chain import canonical
from hsmctl.errors import IntegrityError, UsageError
from hsmctl.handoff.identity import (
    TenantIdentity,
    ssh_fingerprint,
    ssh_key_blob,
    tenant_public_key,
)
from hsmctl.privatefiles import write_atomic

TENANT_SIG_ALG = "ECDSA-P256-SHA256"
RELEASE_FORMAT = "hsmctl-release/1"
MAX_DOCUMENT_BYTES = 1 << 20
"""Hand-off bundles, receipts and releases are a few KiB; anything huge is not one."""

_SIGNATURE_KEYS = frozenset({"alg", "key", "fingerprint", "sig"})
_RELEASE_KEYS = frozenset({"format", "appliance", "tenant", "issued_at", "reason", "signature"})

Document = dict[str, Any]


# --- encodings -----------------------------------------------------------------------


def signed_payload(doc: Mapping[str, Any]) -> bytes:
    """The bytes a document's signature covers: its canonical JSON without ``signature``."""
    return canonical({k: v for k, v in doc.items() if k != "signature"})


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode_strict(text: object, *, what: str) -> bytes:
    """Decode standard padded base64, accepting only the one canonical spelling.

    Python ignores the unused low bits of the last character (``"AR=="`` decodes like
    ``"AQ=="``), which would let an edited ``sig`` still verify; so the text must
    re-encode to itself. Raises ``IntegrityError``.
    """
    if not isinstance(text, str):
        raise IntegrityError(f"{what}: not a base64 string")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise IntegrityError(f"{what}: bad base64") from exc
    if b64encode(data) != text:
        raise IntegrityError(f"{what}: non-canonical base64")
    return data


def utc_timestamp(when: datetime) -> str:
    """RFC 3339 in UTC to the second, e.g. ``2025-01-31T12:00:00Z``."""
    return utc.stamp(when)


def parse_timestamp(text: object, *, what: str) -> datetime:
    """Parse an RFC 3339 UTC (``Z``) timestamp; anything else raises ``IntegrityError``."""
    if not isinstance(text, str) or not text.endswith("Z"):
        raise IntegrityError(f"{what}: not an RFC 3339 UTC timestamp")
    try:
        return utc.parse(text)
    except ValueError as exc:
        raise IntegrityError(f"{what}: not an RFC 3339 UTC timestamp") from exc


def _now(now: datetime | None) -> datetime:
    if now is None:
        return utc.now()
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


# --- files ---------------------------------------------------------------------------


def parse_document(data: bytes, *, what: str = "document") -> Document:
    """Parse one signed JSON document; malformed input is treated as tampering (exit 3).

    Strict (:mod:`hsmctl.devicejson`): no duplicate members — parsers disagree on which
    one wins, so a signed file with two ``appliance`` members could mean one thing to us
    and another to ``jq`` — no ``NaN``/``Infinity``, nothing nested deeper than
    ``MAX_DEPTH``.
    """
    if len(data) > MAX_DOCUMENT_BYTES:
        raise IntegrityError(f"{what}: larger than {MAX_DOCUMENT_BYTES} bytes")
    return devicejson.loads_object(data, what)


def read_document(path: str | os.PathLike[str], *, what: str = "document") -> Document:
    """Read a signed JSON document (bundle, receipt, release). Not verified yet."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = fh.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{what} {p}: {exc.strerror}") from exc
    return parse_document(data, what=f"{what} {p}")


def write_document(path: str | os.PathLike[str], doc: Mapping[str, Any]) -> Path:
    """Write a document as canonical JSON plus a newline: 0600, atomic, fsynced."""
    return write_atomic(path, canonical(doc) + b"\n")


# --- tenant signatures ---------------------------------------------------------------


def _identity(identity: str | os.PathLike[str] | TenantIdentity) -> TenantIdentity:
    return identity if isinstance(identity, TenantIdentity) else TenantIdentity.load(identity)


def sign_document(
    doc: Mapping[str, Any], identity: str | os.PathLike[str] | TenantIdentity
) -> Document:
    """A copy of ``doc`` with a tenant ``signature`` over everything else in it.

    ``identity`` is the identity file's path (or an already loaded identity). The result is
    verified before it is returned, so a broken signer never hands out a bad document.
    """
    if "signature" in doc:
        raise ValueError("the document is already signed")
    ident = _identity(identity)
    out: Document = dict(doc)
    out["signature"] = {
        "alg": TENANT_SIG_ALG,
        "key": ident.public_key_line,
        "fingerprint": ident.fingerprint,
        "sig": b64encode(ident.sign(signed_payload(out))),
    }
    verify_document(out, ident.public_key_line)
    return out


def verify_document(doc: Mapping[str, Any], expected_public_key_line: str | None = None) -> None:
    """Check a tenant signature; raise ``IntegrityError`` on any mismatch.

    Without ``expected_public_key_line`` this only proves the document is intact and was
    signed by the key it names; the caller must then trust that key some other way.
    """
    sig = doc.get("signature")
    if not isinstance(sig, dict) or set(sig) != _SIGNATURE_KEYS:
        raise IntegrityError("document signature: missing or malformed")
    if sig["alg"] != TENANT_SIG_ALG:
        raise IntegrityError(f"document signature: unsupported algorithm {sig['alg']!r}")
    key_line = sig["key"]
    if not isinstance(key_line, str):
        raise IntegrityError("document signature: malformed key")
    try:
        key = tenant_public_key(key_line)
        fingerprint = ssh_fingerprint(key_line)
    except ValueError as exc:
        raise IntegrityError(f"document signature: bad key ({exc})") from exc
    if sig["fingerprint"] != fingerprint:
        raise IntegrityError("document signature: the fingerprint does not match the key")
    if expected_public_key_line is not None:
        try:
            expected = ssh_key_blob(expected_public_key_line)
        except ValueError as exc:
            raise UsageError(f"expected public key: {exc}") from exc
        if expected != ssh_key_blob(key_line):
            raise IntegrityError(
                f"document signed by {fingerprint}, expected "
                f"{ssh_fingerprint(expected_public_key_line)}"
            )
    der = b64decode_strict(sig["sig"], what="document signature")
    try:
        key.verify(der, signed_payload(doc), ec.ECDSA(SHA256()))
    except InvalidSignature as exc:
        raise IntegrityError(
            f"document signature by {fingerprint} does not verify: the document was altered"
        ) from exc


# --- releases ------------------------------------------------------------------------


def make_release(
    appliance: str,
    tenant: str,
    identity_path: str | os.PathLike[str] | TenantIdentity,
    *,
    reason: str | None = None,
    now: datetime | None = None,
) -> Document:
    """The tenant's signed consent to deprovision (zeroize) ``appliance``."""
    if not appliance or not tenant:
        raise UsageError("a release must name its appliance and tenant")
    doc: Document = {
        "format": RELEASE_FORMAT,
        "appliance": appliance,
        "tenant": tenant,
        "issued_at": utc_timestamp(_now(now)),
    }
    if reason:
        doc["reason"] = reason
    return sign_document(doc, identity_path)


def verify_release(
    release: Mapping[str, Any],
    *,
    appliance: str,
    tenant: str,
    tenant_public_key_line: str,
    not_before: datetime | None = None,
) -> None:
    """Check a release before deprovisioning ``appliance``.

    The signature must be by the tenant's inventory key (else exit 3). A valid release for
    another appliance or tenant is a mix-up, not an attack (exit 2). ``not_before`` (the
    start of the current allocation) refuses a release replayed from an earlier one
    (exit 3).
    """
    verify_document(release, tenant_public_key_line)
    if release.get("format") != RELEASE_FORMAT or not set(release) <= _RELEASE_KEYS:
        raise IntegrityError("release: not an hsmctl-release/1 document")
    if release.get("appliance") != appliance:
        raise UsageError(
            f"this release is for appliance {release.get('appliance')!r}, not {appliance!r}"
        )
    if release.get("tenant") != tenant:
        raise UsageError(f"this release is from tenant {release.get('tenant')!r}, not {tenant!r}")
    issued = parse_timestamp(release.get("issued_at"), what="release issued_at")
    # issued_at has whole seconds; compare at that precision so a release made in the same
    # second the allocation began is not taken for a replay.
    if not_before is not None and issued < not_before.replace(microsecond=0):
        raise IntegrityError(
            f"release issued {utc_timestamp(issued)}, before the current allocation began "
            f"({utc_timestamp(not_before)}): a replayed release"
        )
