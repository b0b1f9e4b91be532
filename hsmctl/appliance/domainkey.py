"""The cloning domain's key, derived from the customer's domain secret (SPEC §12).

Two devices given the same secret make the same AES-256 key, so they can exchange keys
wrapped under it; nothing else holds it. Derivation: HKDF-SHA256 (RFC 5869) with a fixed
salt, one ``info`` for the key and another for the fingerprint, so the fingerprint (what
``hsm show`` reports and a backup names) says which domain without saying anything of
the key. Stdlib only: firmware, and the customer's side computes the same fingerprint.

On the device the key is one SoftHSM object in the customer token, made by the SO:
label ``hsm-domain``, CKA_ID = the fingerprint's 32 bytes, AES, CKA_TRUSTED=true (only
the SO can set it), CKA_WRAP/CKA_UNWRAP=true and every other use false, sensitive,
non-extractable, not modifiable. SoftHSM lets the SO make public objects only
(``access.cpp``), so it is CKA_PRIVATE=false: visible without login, its value never
readable, and usable by remote clients only as the key-policy layer allows.
"""

from __future__ import annotations

import hashlib
import hmac

LABEL = "hsm-domain"
SALT = b"hsmctl cloning domain v1"
_KEY_INFO = b"domain key: AES-256"
_FINGERPRINT_INFO = b"domain fingerprint"
SECRET_MIN, SECRET_MAX = 16, 1024  # bytes of the secret's UTF-8 text


def check_secret(secret: str) -> bytes:
    """The secret's bytes; ValueError (no secret in it) when its length is out of range."""
    data = secret.encode("utf-8")
    if not SECRET_MIN <= len(data) <= SECRET_MAX:
        raise ValueError(f"the domain secret must be {SECRET_MIN} to {SECRET_MAX} bytes long")
    return data


def _hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    prk = hmac.new(SALT, secret, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def derive(secret: str) -> tuple[bytes, str]:
    """(the 32-byte AES key, the hex fingerprint) of a domain secret."""
    data = check_secret(secret)
    key = _hkdf(data, _KEY_INFO)
    fingerprint = hashlib.sha256(_hkdf(data, _FINGERPRINT_INFO)).hexdigest()
    return key, fingerprint


def fingerprint(secret: str) -> str:
    return derive(secret)[1]
