"""The hand-off bundle: what the provider gives a tenant to take an appliance over.

One JSON file, signed by the provider (Ed25519), carrying where the appliance is, how to
recognise it (data-interface host keys, audit key) and the one-time admin password
encrypted to the tenant's identity (ECIES on P-256). Layout (docs/crypto.md has the
reasoning)::

    {"format": "hsmctl-handoff/1", "appliance", "serial", "tenant", "data_ip",
     "data_host_keys": [OpenSSH lines], "data_host_key_fingerprints": ["SHA256:..."],
     "mgmt_ip"?, "audit_public_key": PEM, "audit_key_id": hex, "issued_at", "expires_at",
     "request_id", "recipient": "SHA256:...",
     "otp": {"alg": "ECIES-P256-HKDF-SHA256-AES256GCM", "epk", "nonce", "ct"},
     "signature": {"alg": "Ed25519", "key_id", "sig"}}

Opening checks, in this order, so that nothing from an unauthenticated file is acted on:
the provider signature (exit 3), then the contents, then expiry (``BundleExpired``,
exit 3), then that the bundle is for this identity (exit 2), then decryption (exit 3).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsmctl.auditlog.chain import canonical
from hsmctl.auditlog.signing import key_id_for_pem
from hsmctl.errors import IntegrityError, UsageError
from hsmctl.handoff.identity import (
    TenantIdentity,
    check_ssh_public_key,
    ed25519_key_id,
    load_provider_public_key,
    load_provider_signing_key,
    ssh_fingerprint,
    tenant_public_key,
)
from hsmctl.handoff.signed import (
    b64decode_strict,
    b64encode,
    parse_timestamp,
    read_document,
    signed_payload,
    utc_timestamp,
    write_document,
)
from hsmctl.secret import Secret

FORMAT = "hsmctl-handoff/1"
OTP_ALG = "ECIES-P256-HKDF-SHA256-AES256GCM"
PROVIDER_SIG_ALG = "Ed25519"
HKDF_INFO_PREFIX = b"hsmctl handoff v1"

Bundle = dict[str, Any]
ProviderKeySource = str | bytes | os.PathLike[str] | ed25519.Ed25519PublicKey

_STRING_FIELDS = (
    "format",
    "appliance",
    "serial",
    "tenant",
    "data_ip",
    "audit_public_key",
    "audit_key_id",
    "issued_at",
    "expires_at",
    "request_id",
    "recipient",
)
_REQUIRED = frozenset(
    (*_STRING_FIELDS, "data_host_keys", "data_host_key_fingerprints", "otp", "signature")
)
_OPTIONAL = frozenset({"mgmt_ip"})
_OTP_KEYS = frozenset({"alg", "epk", "nonce", "ct"})
_SIG_KEYS = frozenset({"alg", "key_id", "sig"})


class BundleExpired(IntegrityError):
    """The bundle is authentic but past ``expires_at``: a fresh takeover must not start.

    A takeover already under way may resume (``allow_expired``); SPEC §7.
    """


@dataclass(frozen=True)
class OpenedBundle:
    """A verified, decrypted bundle. ``otp`` is a :class:`Secret` and is left out of repr.

    ``bundle_id`` (hex SHA-256 of the canonical signed bundle) names this exact bundle,
    e.g. to key the takeover journal.
    """

    appliance: str
    serial: str
    tenant: str
    data_ip: str
    mgmt_ip: str | None
    data_host_keys: tuple[str, ...]
    data_host_key_fingerprints: tuple[str, ...]
    audit_public_key: str
    audit_key_id: str
    issued_at: datetime
    expires_at: datetime
    request_id: str
    recipient: str
    bundle_id: str
    expired: bool
    otp: Secret = field(repr=False)


# --- the one-time password's encryption ----------------------------------------------


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def _aead_key(shared: bytes, epk: bytes, rpk: bytes, appliance: str) -> bytes:
    """HKDF-SHA256: salt binds both public points, info binds the appliance."""
    hkdf = HKDF(
        algorithm=SHA256(),
        length=32,
        salt=epk + rpk,
        info=HKDF_INFO_PREFIX + appliance.encode("utf-8"),
    )
    return hkdf.derive(shared)


def _aad(bundle: Mapping[str, Any]) -> bytes:
    """Every non-secret member, so the ciphertext cannot be moved into another bundle."""
    return canonical({k: v for k, v in bundle.items() if k not in ("otp", "signature")})


def _encrypt_otp(
    otp: Secret, recipient: ec.EllipticCurvePublicKey, appliance: str, aad: bytes
) -> dict[str, str]:
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    epk = _point(ephemeral.public_key())
    key = _aead_key(ephemeral.exchange(ec.ECDH(), recipient), epk, _point(recipient), appliance)
    nonce = os.urandom(12)
    ct = AESGCM(key).encrypt(nonce, otp.reveal().encode("utf-8"), aad)
    return {"alg": OTP_ALG, "epk": b64encode(epk), "nonce": b64encode(nonce), "ct": b64encode(ct)}


def _decrypt_otp(bundle: Mapping[str, Any], identity: TenantIdentity) -> Secret:
    box = bundle["otp"]
    epk = b64decode_strict(box["epk"], what="bundle otp.epk")
    nonce = b64decode_strict(box["nonce"], what="bundle otp.nonce")
    ct = b64decode_strict(box["ct"], what="bundle otp.ct")
    if len(nonce) != 12 or len(ct) <= 16:
        raise IntegrityError("bundle otp: malformed nonce or ciphertext")
    try:
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), epk)
    except ValueError as exc:
        raise IntegrityError("bundle otp: the ephemeral key is not a P-256 point") from exc
    key = _aead_key(
        identity.exchange(ephemeral), epk, _point(identity.public_key), bundle["appliance"]
    )
    try:
        plain = AESGCM(key).decrypt(nonce, ct, _aad(bundle))
    except InvalidTag as exc:
        raise IntegrityError(
            "bundle otp: the one-time password does not decrypt with this identity "
            "(the ciphertext does not belong to this bundle)"
        ) from exc
    try:
        text = plain.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IntegrityError("bundle otp: the one-time password is not UTF-8") from exc
    if not text:
        raise IntegrityError("bundle otp: the one-time password is empty")
    return Secret(text)


# --- making ---------------------------------------------------------------------------


def _required(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise UsageError(f"hand-off bundle: {name} is required")
    return value


def make_bundle(
    *,
    appliance: str,
    serial: str,
    tenant: str,
    data_ip: str,
    data_host_keys: Sequence[str],
    audit_public_key: str,
    request_id: str,
    otp: Secret,
    tenant_public_key_line: str,
    provider_signing_key_path: str | os.PathLike[str],
    validity: timedelta,
    mgmt_ip: str | None = None,
    now: datetime | None = None,
) -> Bundle:
    """Build and sign a bundle; the OTP is encrypted to ``tenant_public_key_line``.

    Fingerprints and the audit key id are computed here, never taken from the caller, so
    a bundle cannot disagree with itself. Bad inputs raise ``UsageError``.
    """
    if validity <= timedelta(0):
        raise UsageError("hand-off bundle: validity must be positive")
    if not otp.reveal():
        raise UsageError("hand-off bundle: the one-time password is empty")
    try:
        recipient_key = tenant_public_key(tenant_public_key_line)
        recipient = ssh_fingerprint(tenant_public_key_line)
    except ValueError as exc:
        raise UsageError(f"hand-off bundle: tenant public key: {exc}") from exc
    if not data_host_keys:
        raise UsageError("hand-off bundle: at least one data-interface host key is required")
    try:
        host_keys = [check_ssh_public_key(line) for line in data_host_keys]
    except ValueError as exc:
        raise UsageError(f"hand-off bundle: data host key: {exc}") from exc
    try:
        audit_key_id = key_id_for_pem(audit_public_key)
    except ValueError as exc:
        raise UsageError(f"hand-off bundle: audit public key: {exc}") from exc
    signing_key = load_provider_signing_key(provider_signing_key_path)
    if now is None:
        now = datetime.now(UTC)
    body: Bundle = {
        "format": FORMAT,
        "appliance": _required("appliance", appliance),
        "serial": _required("serial", serial),
        "tenant": _required("tenant", tenant),
        "data_ip": _required("data_ip", data_ip),
        "data_host_keys": host_keys,
        "data_host_key_fingerprints": [ssh_fingerprint(line) for line in host_keys],
        "audit_public_key": audit_public_key,
        "audit_key_id": audit_key_id,
        "issued_at": utc_timestamp(now),
        "expires_at": utc_timestamp(now + validity),
        "request_id": _required("request_id", request_id),
        "recipient": recipient,
    }
    if mgmt_ip is not None:
        body["mgmt_ip"] = _required("mgmt_ip", mgmt_ip)
    body["otp"] = _encrypt_otp(otp, recipient_key, appliance, _aad(body))
    body["signature"] = {
        "alg": PROVIDER_SIG_ALG,
        "key_id": ed25519_key_id(signing_key.public_key()),
        "sig": b64encode(signing_key.sign(signed_payload(body))),
    }
    _check_signature(body, signing_key.public_key())  # never hand out what would not verify
    return body


def write_bundle(path: str | os.PathLike[str], bundle: Mapping[str, Any]) -> Path:
    """Write the bundle (0600, atomic, fsynced). It holds no plaintext secret, but it is
    still the key to a takeover until its OTP is changed, so it is kept private."""
    return write_document(path, bundle)


def read_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Parse a bundle file without verifying it (see :func:`open_bundle`)."""
    return read_document(path, what="hand-off bundle")


def bundle_id(bundle: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the canonical signed bundle: one name per bundle, stable on re-read."""
    return hashlib.sha256(canonical(bundle)).hexdigest()


# --- opening --------------------------------------------------------------------------


def _provider_key(source: ProviderKeySource) -> ed25519.Ed25519PublicKey:
    if isinstance(source, ed25519.Ed25519PublicKey):
        return source
    return load_provider_public_key(source)


def _check_signature(bundle: Mapping[str, Any], key: ed25519.Ed25519PublicKey) -> None:
    sig = bundle.get("signature")
    if not isinstance(sig, dict) or set(sig) != _SIG_KEYS:
        raise IntegrityError("hand-off bundle: the provider signature is missing or malformed")
    if sig["alg"] != PROVIDER_SIG_ALG:
        raise IntegrityError("hand-off bundle: unsupported signature algorithm")
    expected = ed25519_key_id(key)
    if sig["key_id"] != expected:
        raise IntegrityError(
            "hand-off bundle: signed by another provider key than the configured one "
            f"({expected[:16]}...); the bundle was altered or is not from this provider"
        )
    raw = b64decode_strict(sig["sig"], what="hand-off bundle signature")
    try:
        payload = signed_payload(bundle)
    except (TypeError, ValueError) as exc:
        raise IntegrityError("hand-off bundle: not canonical JSON") from exc
    try:
        key.verify(raw, payload)
    except InvalidSignature as exc:
        raise IntegrityError(
            "hand-off bundle: the provider signature does not verify; the bundle was altered"
        ) from exc


def _check_contents(bundle: Mapping[str, Any]) -> None:
    """Shape and self-consistency. Only run on signed bundles, so failures here mean the
    provider produced something wrong; it is still refused rather than half-trusted."""
    keys = set(bundle)
    if not keys >= _REQUIRED or not keys <= _REQUIRED | _OPTIONAL:
        missing = sorted(_REQUIRED - keys)
        extra = sorted(keys - _REQUIRED - _OPTIONAL)
        raise IntegrityError(f"hand-off bundle: missing {missing}, unexpected {extra}")
    if bundle["format"] != FORMAT:
        raise IntegrityError(f"hand-off bundle: unsupported format {bundle['format']!r}")
    for name in (*_STRING_FIELDS, *(k for k in _OPTIONAL if k in keys)):
        if not isinstance(bundle[name], str) or not bundle[name]:
            raise IntegrityError(f"hand-off bundle: {name} must be a non-empty string")
    lines, prints = bundle["data_host_keys"], bundle["data_host_key_fingerprints"]
    if not isinstance(lines, list) or not lines or not all(isinstance(x, str) for x in lines):
        raise IntegrityError("hand-off bundle: data_host_keys must be a non-empty list")
    try:
        computed = [ssh_fingerprint(check_ssh_public_key(line)) for line in lines]
    except ValueError as exc:
        raise IntegrityError(f"hand-off bundle: data host key: {exc}") from exc
    if prints != computed:
        raise IntegrityError("hand-off bundle: host key fingerprints do not match the keys")
    try:
        audit_key_id = key_id_for_pem(bundle["audit_public_key"])
    except ValueError as exc:
        raise IntegrityError(f"hand-off bundle: audit public key: {exc}") from exc
    if bundle["audit_key_id"] != audit_key_id:
        raise IntegrityError("hand-off bundle: audit_key_id does not match the audit key")
    box = bundle["otp"]
    if not isinstance(box, dict) or set(box) != _OTP_KEYS or box["alg"] != OTP_ALG:
        raise IntegrityError("hand-off bundle: the encrypted one-time password is malformed")
    issued = parse_timestamp(bundle["issued_at"], what="hand-off bundle issued_at")
    expires = parse_timestamp(bundle["expires_at"], what="hand-off bundle expires_at")
    if expires <= issued:
        raise IntegrityError("hand-off bundle: expires_at is not after issued_at")


def verify_bundle(
    bundle: Mapping[str, Any],
    provider_public_key: ProviderKeySource,
    *,
    now: datetime | None = None,
    allow_expired: bool = False,
) -> bool:
    """Signature, contents and expiry, without decrypting; returns whether it is expired
    (only possible with ``allow_expired``). Raises ``IntegrityError``/``BundleExpired``."""
    _check_signature(bundle, _provider_key(provider_public_key))
    _check_contents(bundle)
    expires = parse_timestamp(bundle["expires_at"], what="hand-off bundle expires_at")
    if now is None:
        now = datetime.now(UTC)
    expired = now >= expires
    if expired and not allow_expired:
        raise BundleExpired(
            f"hand-off bundle for {bundle['appliance']} expired at {bundle['expires_at']}; "
            "ask the provider for a new one",
            detail={"appliance": bundle["appliance"], "expires_at": bundle["expires_at"]},
        )
    return expired


def open_bundle_data(
    bundle: Mapping[str, Any],
    provider_public_key: ProviderKeySource,
    identity: str | os.PathLike[str] | TenantIdentity,
    *,
    now: datetime | None = None,
    allow_expired: bool = False,
) -> OpenedBundle:
    """:func:`open_bundle` for a bundle already in memory."""
    expired = verify_bundle(bundle, provider_public_key, now=now, allow_expired=allow_expired)
    ident = identity if isinstance(identity, TenantIdentity) else TenantIdentity.load(identity)
    if ident.fingerprint != bundle["recipient"]:
        raise UsageError(
            f"this bundle is for another tenant identity ({bundle['recipient']}); "
            f"the identity given is {ident.fingerprint}",
            detail={"recipient": bundle["recipient"], "identity": ident.fingerprint},
        )
    otp = _decrypt_otp(bundle, ident)
    return OpenedBundle(
        appliance=bundle["appliance"],
        serial=bundle["serial"],
        tenant=bundle["tenant"],
        data_ip=bundle["data_ip"],
        mgmt_ip=bundle.get("mgmt_ip"),
        data_host_keys=tuple(bundle["data_host_keys"]),
        data_host_key_fingerprints=tuple(bundle["data_host_key_fingerprints"]),
        audit_public_key=bundle["audit_public_key"],
        audit_key_id=bundle["audit_key_id"],
        issued_at=parse_timestamp(bundle["issued_at"], what="issued_at"),
        expires_at=parse_timestamp(bundle["expires_at"], what="expires_at"),
        request_id=bundle["request_id"],
        recipient=bundle["recipient"],
        bundle_id=bundle_id(bundle),
        expired=expired,
        otp=otp,
    )


def open_bundle(
    path: str | os.PathLike[str],
    provider_public_pem: ProviderKeySource,
    identity_path: str | os.PathLike[str] | TenantIdentity,
    now: datetime | None = None,
    allow_expired: bool = False,
) -> OpenedBundle:
    """Read, verify and decrypt a bundle file.

    ``provider_public_pem`` is the PEM text, a path to it, or a loaded key. Raises
    ``IntegrityError`` (altered, wrong provider key, undecryptable), ``BundleExpired``
    (unless ``allow_expired``), ``UsageError`` (another tenant's bundle, unusable identity
    file).
    """
    return open_bundle_data(
        read_bundle(path),
        provider_public_pem,
        identity_path,
        now=now,
        allow_expired=allow_expired,
    )
