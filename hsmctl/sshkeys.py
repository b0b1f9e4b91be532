"""OpenSSH public keys: the one parser, the one fingerprint.

Pure: no I/O. Host keys pinned by the SSH transport, host keys in the inventory, the
tenant identity and the host keys a hand-off bundle carries are all a :class:`PublicKey`
read by :meth:`PublicKey.parse`, so a line one part accepts no other part can read
differently.

A line is ``TYPE BASE64 [COMMENT]``; the blob is SSH wire format, and the type written
before it must be the type inside it, so a line cannot claim one algorithm and carry
another. Fingerprints are OpenSSH's: ``SHA256:`` + unpadded base64 of SHA-256 over the
blob, exactly what ``ssh-keygen -l`` and sshd's logs print, so operators can compare them
by eye.

:class:`KeyFormatError` is a :class:`~hsmctl.errors.UsageError` (exit 2) and also a
``ValueError``, which is what callers that add their own context catch.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from hsmctl.errors import UsageError

FINGERPRINT_PREFIX = "SHA256:"
FINGERPRINT_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")
MIN_RSA_BITS = 2048
_TYPE_NAME_RE = re.compile(r"[A-Za-z0-9@._-]+")


class KeyFormatError(UsageError, ValueError):
    """A public key, fingerprint or known_hosts line that does not parse (exit 2)."""


def _ssh_fields(blob: bytes) -> list[bytes]:
    """Split an SSH wire-format blob into its length-prefixed fields; all bytes must be used.

    Every public-key blob we pin (ed25519, ecdsa, rsa) is a sequence of ``string`` and
    ``mpint`` fields, which share this encoding, so this is a cheap structural check that
    catches truncated or padded keys.
    """
    fields: list[bytes] = []
    pos = 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise KeyFormatError("truncated key blob")
        (length,) = struct.unpack(">I", blob[pos : pos + 4])
        pos += 4
        if pos + length > len(blob):
            raise KeyFormatError("truncated key blob")
        fields.append(blob[pos : pos + length])
        pos += length
    return fields


def fingerprint(blob: bytes) -> str:
    """OpenSSH SHA256 fingerprint of a key blob, as ``ssh-keygen -l`` prints it."""
    digest = hashlib.sha256(blob).digest()
    return FINGERPRINT_PREFIX + base64.b64encode(digest).decode("ascii").rstrip("=")


def is_fingerprint(text: str) -> bool:
    """Exactly OpenSSH's form: ``SHA256:`` + 43 unpadded base64 characters."""
    return bool(FINGERPRINT_RE.match(text))


def normalize_fingerprint(text: str) -> str:
    """A ``SHA256:`` fingerprint in canonical (unpadded) form; anything else is refused.

    Padded base64 is accepted because some tools print it; MD5 (``MD5:aa:bb``) and bare
    hex are refused: they are weaker and ambiguous to compare.
    """
    value = text.strip()
    if not value.startswith(FINGERPRINT_PREFIX):
        raise KeyFormatError(f"not a SHA256 fingerprint: {value[:80]!r}")
    body = value[len(FINGERPRINT_PREFIX) :].rstrip("=")
    try:
        digest = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except binascii.Error as exc:
        raise KeyFormatError(f"not a SHA256 fingerprint: {value[:80]!r}") from exc
    if len(digest) != 32:
        raise KeyFormatError(f"not a SHA256 fingerprint (wrong length): {value[:80]!r}")
    return FINGERPRINT_PREFIX + base64.b64encode(digest).decode("ascii").rstrip("=")


@dataclass(frozen=True)
class PublicKey:
    """One SSH public key. Equality is by type and blob; the comment is only a label."""

    key_type: str
    blob: bytes
    comment: str = field(default="", compare=False)

    @classmethod
    def from_blob(cls, blob: bytes, comment: str = "") -> PublicKey:
        """The key a server presented (its wire-format blob), structurally checked."""
        fields = _ssh_fields(blob)
        if len(fields) < 2:
            raise KeyFormatError("key blob has no key material")
        try:
            key_type = fields[0].decode("ascii")
        except UnicodeDecodeError as exc:
            raise KeyFormatError("key blob has a non-ASCII type name") from exc
        if not key_type or not _TYPE_NAME_RE.fullmatch(key_type):
            raise KeyFormatError(f"bad key type name {key_type[:60]!r}")
        return cls(key_type, blob, comment)

    @classmethod
    def parse(cls, line: str, allowed: frozenset[str] | None = None) -> PublicKey:
        """Parse ``TYPE BASE64 [COMMENT]`` (a ``.pub`` file or authorized_keys line
        without options).

        With ``allowed``, the line is also held to the fleet's policy: its type must be
        one of ``allowed``, the key material must really decode (:meth:`load`), and an RSA
        key must have at least :data:`MIN_RSA_BITS` bits.
        """
        parts = line.strip().split(None, 2)
        if len(parts) < 2:
            raise KeyFormatError(
                f"not an OpenSSH public key line ('TYPE BASE64 [COMMENT]'): {line.strip()[:80]!r}"
            )
        key_type, b64 = parts[0], parts[1]
        if allowed is not None and key_type not in allowed:
            raise KeyFormatError(
                f"key type {key_type!r} is not accepted here (accepted: "
                f"{', '.join(sorted(allowed))})"
            )
        try:
            blob = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise KeyFormatError("key data is not valid base64") from exc
        try:
            key = cls.from_blob(blob, parts[2] if len(parts) > 2 else "")
        except KeyFormatError as exc:
            raise KeyFormatError(f"malformed {key_type} key: {exc.message}") from exc
        if key.key_type != key_type:
            raise KeyFormatError(
                f"malformed {key_type} key: the key line says {key_type!r} but the key "
                f"inside is {key.key_type!r}"
            )
        if allowed is not None:
            material = key.load()
            if isinstance(material, rsa.RSAPublicKey) and material.key_size < MIN_RSA_BITS:
                raise KeyFormatError(
                    f"RSA key of {material.key_size} bits; at least {MIN_RSA_BITS} required"
                )
        return key

    def load(self) -> PublicKeyTypes:
        """The key as ``cryptography`` reads it: the material really decodes (a point on
        the named curve, a well-formed modulus), not only the framing."""
        try:
            key = load_ssh_public_key(self.line.encode("ascii"))
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise KeyFormatError(f"malformed {self.key_type} key: {exc}") from exc
        if self.key_type == "ecdsa-sha2-nistp256" and not (
            isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
        ):
            raise KeyFormatError("not a P-256 key")
        return key

    @property
    def algorithm(self) -> str:
        """The key type (the inventory's and the state store's word for it)."""
        return self.key_type

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.blob)

    @property
    def base64(self) -> str:
        return base64.b64encode(self.blob).decode("ascii")

    @property
    def line(self) -> str:
        """``TYPE BASE64`` without the comment: what is compared, pinned and stored."""
        return f"{self.key_type} {self.base64}"

    def to_line(self) -> str:
        """``TYPE BASE64 [COMMENT]``: what ``ssh-keygen`` writes to a ``.pub`` file."""
        return f"{self.line} {self.comment}" if self.comment else self.line

    def __str__(self) -> str:
        return f"{self.key_type} {self.fingerprint}"

    def __repr__(self) -> str:
        return f"PublicKey({str(self)!r})"
