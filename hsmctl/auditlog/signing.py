"""Signed records: checkpoints and key rotations, and the keys behind them.

The device signs with a non-extractable P-256 key through PKCS#11 ``CKM_ECDSA`` over a
SHA-256 digest, which returns raw ``r||s``; so a ``Signer`` only signs digests and every
signature in the log is 64 bytes of ``r||s`` in lowercase hex. Verification needs public
keys only. ``cryptography`` is imported inside the functions that need it, so the chain
code stays importable where only the stdlib exists; the API used exists since
cryptography 38 (Debian 12).

Signed payloads (the signature is over SHA-256 of their canonical JSON)::

    checkpoint:   {"type": "hsm-audit-checkpoint", "device": D, "seq": S, "hash": H,
                   "key_id": K}
    key rotation: {"type": "hsm-audit-key-rotation", "device": D,
                   "head": {"seq": S, "hash": H}, "old_key_id": O, "new_key_id": N,
                   "new_public_key": PEM}

``(S, H)`` is the record just before the signed record; ``D`` binds the signature to one
appliance so that a checkpoint cannot be spliced in from another device's log.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol

from hsmctl.auditlog.chain import (
    CHECKPOINT_EVENT,
    KEY_ROTATION_EVENT,
    Head,
    Outcome,
    Record,
    canonical,
    make_record,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import (
        EllipticCurvePrivateKey,
        EllipticCurvePublicKey,
    )

ALG = "ECDSA-P256-SHA256"
CHECKPOINT_TYPE = "hsm-audit-checkpoint"
KEY_ROTATION_TYPE = "hsm-audit-key-rotation"

_SIG_RE = re.compile(r"[0-9a-f]{128}")


class Signer(Protocol):
    """Signs audit checkpoints; the device's implementation wraps its PKCS#11 key."""

    @property
    def key_id(self) -> str:
        """Lowercase hex SHA-256 of the public key's DER SubjectPublicKeyInfo."""
        ...

    @property
    def public_key_pem(self) -> str: ...

    def sign_digest(self, digest: bytes) -> bytes:
        """ECDSA P-256 over a 32-byte SHA-256 digest; returns raw ``r||s`` (64 bytes)."""
        ...


def load_public_key(pem: str | bytes) -> EllipticCurvePublicKey:
    """Parse a PEM public key; anything but P-256 is refused (ValueError)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        data = pem.encode("ascii") if isinstance(pem, str) else pem
        key = load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("audit keys must be ECDSA P-256 public keys")
    return key


def _key_id(key: EllipticCurvePublicKey) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


@lru_cache(maxsize=64)
def _parsed(pem: str) -> tuple[EllipticCurvePublicKey, str]:
    key = load_public_key(pem)
    return key, _key_id(key)


def key_id_for_pem(pem: str) -> str:
    """The key id of a PEM public key, over its re-encoded DER so the PEM's form cannot matter."""
    return _parsed(pem)[1]


def verify_raw_signature(pem: str, sig_hex: str, payload: bytes) -> bool:
    """Whether ``sig_hex`` (raw ``r||s``) is a valid ECDSA P-256/SHA-256 signature of payload."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    from cryptography.hazmat.primitives.hashes import SHA256

    if not _SIG_RE.fullmatch(sig_hex):
        return False
    raw = bytes.fromhex(sig_hex)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        _parsed(pem)[0].verify(der, payload, ec.ECDSA(SHA256()))
    except InvalidSignature:
        return False
    return True


def checkpoint_payload(device: str, head: Head, key_id: str) -> bytes:
    return canonical(
        {
            "type": CHECKPOINT_TYPE,
            "device": device,
            "seq": head.seq,
            "hash": head.hash,
            "key_id": key_id,
        }
    )


def key_rotation_payload(
    device: str, head: Head, old_key_id: str, new_key_id: str, new_public_key: str
) -> bytes:
    return canonical(
        {
            "type": KEY_ROTATION_TYPE,
            "device": device,
            "head": head.as_dict(),
            "old_key_id": old_key_id,
            "new_key_id": new_key_id,
            "new_public_key": new_public_key,
        }
    )


def _sign(signer: Signer, payload: bytes) -> str:
    """Sign and check the result, so a mis-encoding token never writes a bad checkpoint."""
    if key_id_for_pem(signer.public_key_pem) != signer.key_id:
        raise ValueError(f"signer key id {signer.key_id} does not match its public key")
    sig = signer.sign_digest(hashlib.sha256(payload).digest())
    if len(sig) != 64:
        raise ValueError(f"signer returned {len(sig)} bytes, expected raw r||s (64)")
    sig_hex = sig.hex()
    if not verify_raw_signature(signer.public_key_pem, sig_hex, payload):
        raise ValueError(f"signature by key {signer.key_id} does not verify")
    return sig_hex


def make_checkpoint(
    prev: Head,
    signer: Signer,
    *,
    device: str,
    time: datetime | str,
    actor: str = "hsmd",
    role: str = "system",
    source: str = "console",
) -> Record:
    """The checkpoint record after ``prev``, signing ``prev`` as the head it vouches for."""
    if not device:
        raise ValueError("a checkpoint must name its device")
    payload = checkpoint_payload(device, prev, signer.key_id)
    detail = {
        "head": prev.as_dict(),
        "device": device,
        "key_id": signer.key_id,
        "alg": ALG,
        "sig": _sign(signer, payload),
    }
    return make_record(
        prev,
        time=time,
        actor=actor,
        role=role,
        source=source,
        event=CHECKPOINT_EVENT,
        outcome=Outcome.OK,
        detail=detail,
    )


def make_key_rotation(
    prev: Head,
    old_signer: Signer,
    new_signer: Signer,
    *,
    device: str,
    time: datetime | str,
    actor: str = "hsmd",
    role: str = "system",
    source: str = "console",
) -> Record:
    """The record handing trust from ``old_signer`` to ``new_signer``, signed by both.

    Both signatures are needed: the old key vouches for the new one, the new key proves
    its holder took part. Verifiers retire the old key from this record on.
    """
    if not device:
        raise ValueError("a key rotation must name its device")
    if old_signer.key_id == new_signer.key_id:
        raise ValueError("a key rotation needs a new key")
    new_pem = new_signer.public_key_pem
    payload = key_rotation_payload(device, prev, old_signer.key_id, new_signer.key_id, new_pem)
    detail: Mapping[str, Any] = {
        "head": prev.as_dict(),
        "device": device,
        "alg": ALG,
        "old_key_id": old_signer.key_id,
        "new_key_id": new_signer.key_id,
        "new_public_key": new_pem,
        "sig_old": _sign(old_signer, payload),
        "sig_new": _sign(new_signer, payload),
    }
    return make_record(
        prev,
        time=time,
        actor=actor,
        role=role,
        source=source,
        event=KEY_ROTATION_EVENT,
        outcome=Outcome.OK,
        detail=detail,
    )


class SoftwareSigner:
    """A P-256 key held in process memory: for tests, benchmarks and the lab only.

    Real appliances sign inside their audit token; this exists so the same code paths
    run where no token does.
    """

    def __init__(self, private_key: EllipticCurvePrivateKey) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError("audit keys must be P-256")
        self._key = private_key
        public = private_key.public_key()
        self.public_key_pem: str = public.public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")
        self.key_id: str = _key_id(public)

    @classmethod
    def generate(cls) -> SoftwareSigner:
        from cryptography.hazmat.primitives.asymmetric import ec

        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_pem(cls, pem: str | bytes, password: bytes | None = None) -> SoftwareSigner:
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        data = pem.encode("ascii") if isinstance(pem, str) else pem
        key = load_pem_private_key(data, password=password)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("audit keys must be ECDSA P-256 private keys")
        return cls(key)

    def sign_digest(self, digest: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import (
            Prehashed,
            decode_dss_signature,
        )
        from cryptography.hazmat.primitives.hashes import SHA256

        if len(digest) != 32:
            raise ValueError("sign_digest() takes a 32-byte SHA-256 digest")
        r, s = decode_dss_signature(self._key.sign(digest, ec.ECDSA(Prehashed(SHA256()))))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def __repr__(self) -> str:
        return f"SoftwareSigner(key_id={self.key_id[:16]}…)"
