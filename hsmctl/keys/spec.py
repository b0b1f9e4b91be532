"""Pure parts of ``hsmctl key``: the ``--type`` grammar, a key's listing row, and which
device policy rule a PKCS#11 refusal stands for. No I/O, no PKCS#11 library."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    RSA = "rsa"
    EC = "ec"
    AES = "aes"


# Curve names as customers write them -> the named curve (asn1crypto's name, the one
# python-pkcs11 encodes) and its size. Curves the device's policy refuses (secp224r1)
# are still spelled here: the device decides, and says which rule refused.
CURVES: Mapping[str, tuple[str, int]] = {
    "p-256": ("secp256r1", 256),
    "p256": ("secp256r1", 256),
    "secp256r1": ("secp256r1", 256),
    "prime256v1": ("secp256r1", 256),
    "p-384": ("secp384r1", 384),
    "p384": ("secp384r1", 384),
    "secp384r1": ("secp384r1", 384),
    "p-521": ("secp521r1", 521),
    "p521": ("secp521r1", 521),
    "secp521r1": ("secp521r1", 521),
    "secp256k1": ("secp256k1", 256),
    "p-224": ("secp224r1", 224),
    "secp224r1": ("secp224r1", 224),
}
# DER of the named curves' OIDs (CKA_EC_PARAMS) -> (display name, bits), for listing.
EC_PARAMS: Mapping[bytes, tuple[str, int]] = {
    bytes.fromhex("06082a8648ce3d030107"): ("P-256", 256),
    bytes.fromhex("06052b81040022"): ("P-384", 384),
    bytes.fromhex("06052b81040023"): ("P-521", 521),
    bytes.fromhex("06052b8104000a"): ("secp256k1", 256),
    bytes.fromhex("06052b81040021"): ("P-224", 224),
}
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


@dataclass(frozen=True)
class KeySpec:
    """What ``--type`` asked for: ``rsa:BITS``, ``ec:CURVE`` or ``aes:BITS``."""

    kind: Kind
    bits: int
    curve: str | None = None  # the named curve for EC

    def __str__(self) -> str:
        return f"{self.kind}:{self.curve if self.curve else self.bits}"


def parse_type(text: str) -> KeySpec:
    """``--type`` -> :class:`KeySpec`; ValueError with the reason. Only the syntax is
    checked here: sizes and curves are the device policy's to allow or refuse."""
    kind, _, arg = text.strip().lower().partition(":")
    if kind == Kind.EC:
        if arg not in CURVES:
            names = "P-256, P-384, P-521, secp256k1"
            raise ValueError(f"--type {text!r}: unknown curve (the policy allows {names})")
        curve, bits = CURVES[arg]
        return KeySpec(Kind.EC, bits, curve)
    if kind in (Kind.RSA, Kind.AES):
        if not arg.isdigit() or not 0 < int(arg) <= 16384:
            raise ValueError(f"--type {text!r}: {kind}:BITS with BITS a number of bits")
        return KeySpec(Kind(kind), int(arg))
    raise ValueError(f"--type {text!r}: expected rsa:BITS, ec:CURVE or aes:BITS")


def check_label(label: str) -> str:
    if not LABEL.fullmatch(label):
        raise ValueError(
            f"--label {label[:70]!r}: 1 to 64 characters from A-Z a-z 0-9 . _ : -, "
            "a letter or digit first"
        )
    return label


@dataclass(frozen=True)
class KeyRow:
    """One key as ``key list`` shows it (SPEC §11 names)."""

    label: str
    id: str
    type: str
    size: int | None
    local: bool | None
    extractable: bool | None
    sensitive: bool | None

    def as_dict(self) -> dict[str, object]:
        return {
            "label": self.label,
            "id": self.id,
            "type": self.type,
            "size": self.size,
            "local": self.local,
            "extractable": self.extractable,
            "sensitive": self.sensitive,
        }


def ec_size(params: bytes | None) -> int | None:
    known = EC_PARAMS.get(params or b"")
    return known[1] if known else None


def row(
    kind: Kind,
    label: str,
    key_id: bytes,
    *,
    modulus: bytes | None = None,
    ec_params: bytes | None = None,
    value_len: int | None = None,
    local: bool | None = None,
    extractable: bool | None = None,
    sensitive: bool | None = None,
) -> KeyRow:
    """A key's row from the attributes the device let us read. ``size`` is bits: the
    modulus for RSA, the curve's for EC, the value's for AES."""
    if kind is Kind.RSA:
        size = len(modulus.lstrip(b"\0")) * 8 if modulus else None
    elif kind is Kind.EC:
        size = ec_size(ec_params)
    else:
        size = value_len * 8 if value_len else None
    return KeyRow(label, key_id.hex(), str(kind), size, local, extractable, sensitive)


# A refusal of the device's policy module, recognised by its CKR code and the function
# that was refused (appliance/p11/README.md): (function, CKR name) -> rule.
_RULES: Mapping[tuple[str, str], str] = {
    ("generate-rsa", "CKR_KEY_SIZE_RANGE"): "rsa-size",
    ("generate-ec", "CKR_CURVE_NOT_SUPPORTED"): "ec-curve",
    ("generate-ec", "CKR_DOMAIN_PARAMS_INVALID"): "ec-curve",
    ("generate-aes", "CKR_KEY_SIZE_RANGE"): "aes-size",
    ("generate-rsa", "CKR_ACTION_PROHIBITED"): "role-crypto-user",
    ("generate-ec", "CKR_ACTION_PROHIBITED"): "role-crypto-user",
    ("generate-aes", "CKR_ACTION_PROHIBITED"): "role-crypto-user",
    ("destroy", "CKR_ACTION_PROHIBITED"): "role-crypto-user",
}


def policy_rule(operation: str, ckr: str) -> str | None:
    """The device policy rule a refusal stands for, or None if it is not one."""
    return _RULES.get((operation, ckr))
