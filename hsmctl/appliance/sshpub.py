"""OpenSSH public key lines read in-process, for the key shapes the device makes and uses
most, so a command does not start ``ssh-keygen -l`` for each (~3 ms of the device's CPU
a key, four keys per provisioning).

:func:`fingerprint` answers only for a line it can prove ``ssh-keygen -l`` would accept
and fingerprint the same way: an Ed25519 or ECDSA P-256/P-384/P-521 key whose base64 is
canonical (``ssh-keygen`` rejects non-zero bits after the last byte; Python's decoder
does not) and whose blob is exactly the type's (the type named twice and equal, the
curve's name, a 32-byte Ed25519 key, an uncompressed EC point on the curve, nothing
after it). For anything else it returns None and the caller asks ``ssh-keygen`` as
before, so it is never more lenient than ``ssh-keygen``, only faster on the common case
(tests/unit/test_sshpub.py holds it to ``ssh-keygen`` on generated and mutated keys).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import NamedTuple

# OpenSSH's key type name -> (the curve's name in the blob, its point length), or None
# for Ed25519 (a 32-byte key).
_SHAPES: dict[str, tuple[str, int] | None] = {
    "ssh-ed25519": None,
    "ecdsa-sha2-nistp256": ("nistp256", 65),
    "ecdsa-sha2-nistp384": ("nistp384", 97),
    "ecdsa-sha2-nistp521": ("nistp521", 133),
}
_BITS = {"ssh-ed25519": 256, "ecdsa-sha2-nistp256": 256, "ecdsa-sha2-nistp384": 384,
         "ecdsa-sha2-nistp521": 521}  # fmt: skip
_KIND = {"ssh-ed25519": "ED25519"}  # ssh-keygen's name in "(...)"; ECDSA otherwise
_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


class KeyInfo(NamedTuple):
    """What ``ssh-keygen -l`` prints for a key: bits, ``SHA256:`` fingerprint, kind."""

    bits: int
    fingerprint: str
    kind: str  # ED25519, ECDSA


def _strings(blob: bytes) -> list[bytes] | None:
    """The blob as SSH wire strings (uint32 length + bytes), all of it, or None."""
    out, at = [], 0
    while at < len(blob):
        if at + 4 > len(blob):
            return None
        size = int.from_bytes(blob[at : at + 4], "big")
        at += 4
        if at + size > len(blob):
            return None
        out.append(blob[at : at + size])
        at += size
    return out


# The curves' group orders (SEC 2), for OpenSSH's own checks of a public point.
_ORDER = {
    "nistp256": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "nistp384": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
        "581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
    "nistp521": int(
        "01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFA"
        "51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409",
        16,
    ),
}


def _valid_point(curve: str, point: bytes) -> bool:
    """What ``sshkey_ec_validate_public`` asks of a point (OpenSSH 9), on a curve of
    cofactor 1: on the curve (cryptography checks), both coordinates longer than half
    the order's bits and below order - 1."""
    from cryptography.hazmat.primitives.asymmetric import ec

    curves = {"nistp256": ec.SECP256R1(), "nistp384": ec.SECP384R1(), "nistp521": ec.SECP521R1()}
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(curves[curve], point)
    except ValueError:
        return False
    size = (len(point) - 1) // 2
    x = int.from_bytes(point[1 : 1 + size], "big")
    y = int.from_bytes(point[1 + size :], "big")
    order = _ORDER[curve]
    half = order.bit_length() // 2
    return all(c.bit_length() > half and c < order - 1 for c in (x, y))


def key_info(line: str) -> KeyInfo | None:
    """``ssh-keygen -l`` of one ``TYPE BASE64 [COMMENT]`` line, when this module can
    prove it (see the module's docstring); None: ask ``ssh-keygen``."""
    fields = line.strip().split(None, 2)
    if len(fields) < 2:
        return None
    key_type, text = fields[0], fields[1]
    if key_type not in _SHAPES or not _B64.fullmatch(text) or len(text) % 4:
        return None
    try:
        blob = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(blob).decode("ascii") != text:  # non-canonical: ssh-keygen decides
        return None
    parts = _strings(blob)
    shape = _SHAPES[key_type]
    if parts is None or not parts or parts[0] != key_type.encode():
        return None
    if shape is None:
        if len(parts) != 2 or len(parts[1]) != 32:
            return None
    else:
        curve, size = shape
        if len(parts) != 3 or parts[1] != curve.encode() or len(parts[2]) != size:
            return None
        if parts[2][0] != 4 or not _valid_point(curve, parts[2]):
            return None
    digest = hashlib.sha256(blob).digest()
    fp = "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")
    return KeyInfo(_BITS[key_type], fp, _KIND.get(key_type, "ECDSA"))


def fingerprint(line: str) -> str | None:
    """The ``SHA256:`` fingerprint ``ssh-keygen -l`` gives ``line``, or None (ask it)."""
    info = key_info(line)
    return None if info is None else info.fingerprint
