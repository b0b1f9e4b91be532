"""The backup file (hsmctl/keys/backup.py) without a device: a manifest signed with an
audit-like P-256 key verifies; every single flipped bit anywhere in the file is refused
as an integrity error (exit 3), as are an unpinned key and a digest that does not match."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from hsmctl.auditlog import key_id_for_pem
from hsmctl.errors import IntegrityError
from hsmctl.keys import backup

KEY = ec.generate_private_key(ec.SECP256R1())
PEM = (
    KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
KEY_ID = key_id_for_pem(PEM)


def signed_file(objects: list[dict[str, Any]]) -> bytes:
    manifest = {"appliance": "hsm45", "created": "2026-12-06T19:00:00Z",
                "domain": "ab" * 32, "objects": objects}  # fmt: skip
    signature: dict[str, Any] = {
        "type": backup.SIGNATURE_TYPE,
        "device": "hsm45",
        "manifest_sha256": backup.manifest_digest(manifest),
        "key_id": KEY_ID,
        "alg": backup.ALG,
    }
    der = KEY.sign(backup.signed_payload(signature), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    signature["sig"] = (r.to_bytes(32, "big") + s.to_bytes(32, "big")).hex()
    return backup.encode(manifest, signature)


OBJECTS = [
    {"class": "private-key", "key_type": "ec", "label": "k", "id": "01", "usage": ["sign"],
     "ec_params": "06082a8648ce3d030107", "wrapped": "00112233445566778899aabbccddeeff"},
    {"class": "public-key", "key_type": "ec", "label": "k", "id": "01", "usage": ["verify"],
     "public_sha256": "cd" * 32, "public": {"ec_params": "0608", "ec_point": "0441"}},
]  # fmt: skip


def test_a_genuine_file_verifies() -> None:
    raw = signed_file(OBJECTS)
    path = Path("x.backup")
    manifest = backup.verify(path, backup.parse(path, raw), {KEY_ID: PEM})
    assert manifest["objects"] == OBJECTS


def test_every_flipped_bit_anywhere_is_an_integrity_error() -> None:
    raw = signed_file(OBJECTS)
    path = Path("x.backup")
    for at in range(len(raw)):
        for bit in (0x01, 0x20, 0x80):
            bad = bytearray(raw)
            bad[at] ^= bit
            with pytest.raises(IntegrityError):
                backup.verify(path, backup.parse(path, bytes(bad)), {KEY_ID: PEM})


def test_an_unpinned_key_or_another_device_is_refused() -> None:
    raw = signed_file(OBJECTS)
    path = Path("x.backup")
    with pytest.raises(IntegrityError, match="not pinned"):
        backup.verify(path, backup.parse(path, raw), {})
    other = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(IntegrityError, match="does not verify"):
        backup.verify(path, backup.parse(path, raw), {KEY_ID: other})
    with pytest.raises(IntegrityError):
        backup.parse(path, raw.replace(b"}\n", b"} \n"))  # not canonical
    with pytest.raises(IntegrityError):
        backup.parse(path, raw[:-1])  # the final newline is part of the form
