"""Who is who: the tenant identity (an OpenSSH P-256 key) and the provider's signing key.

The tenant identity is one OpenSSH-format private key file, ECDSA P-256
(``ssh-keygen -t ecdsa -b 256``). The same key logs in with ``ssh -i``, signs receipts and
releases, and is the target the one-time password is encrypted to. P-256 rather than
Ed25519 because one key must both sign and receive: P-256 gives ECDSA and ECDH from the
same key with ``cryptography``, which offers no Ed25519 -> X25519 conversion.

The provider signs bundles with an Ed25519 key kept as PKCS#8 PEM (0600) in its state
directory; only signing is needed there, and Ed25519 signatures are deterministic.

Key files are refused (exit 2) when group or others may access them, as OpenSSH refuses
them; key material never appears in a message or a repr.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import struct
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
    load_ssh_private_key,
)

from hsmctl.errors import UsageError
from hsmctl.privatefiles import read_private, write_atomic
from hsmctl.sshkeys import PublicKey

TENANT_KEY_TYPE = "ecdsa-sha2-nistp256"
PROVIDER_KEY_NAME = "signing_key.pem"
PROVIDER_PUBLIC_NAME = "signing_key.pub.pem"

_OPENSSH_BEGIN = b"-----BEGIN OPENSSH PRIVATE KEY-----"
_OPENSSH_END = b"-----END OPENSSH PRIVATE KEY-----"
_OPENSSH_MAGIC = b"openssh-key-v1\0"


# --- OpenSSH public keys and fingerprints --------------------------------------------


def ssh_key_blob(line: str) -> bytes:
    """The wire-format blob of an OpenSSH public key line; raises ``ValueError``
    (:class:`~hsmctl.sshkeys.KeyFormatError`)."""
    return PublicKey.parse(line).blob


def ssh_fingerprint(line: str) -> str:
    """OpenSSH's ``SHA256:`` fingerprint of a public key line, as ``ssh-keygen -lf`` shows
    it; raises ``ValueError`` (:class:`~hsmctl.sshkeys.KeyFormatError`)."""
    return PublicKey.parse(line).fingerprint


def check_ssh_public_key(line: str) -> str:
    """Validate any OpenSSH public key line (host keys: ed25519, ecdsa, rsa); return it
    normalised to ``type base64`` without the comment. Raises ``ValueError``."""
    key = PublicKey.parse(line).load()
    return key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode("ascii")


def tenant_public_key(line: str) -> ec.EllipticCurvePublicKey:
    """Parse a tenant's public key line; anything but ``ecdsa-sha2-nistp256`` is refused
    (``ValueError``) because the key must also be an ECDH target."""
    key = PublicKey.parse(line).load()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"tenant keys must be {TENANT_KEY_TYPE} (ECDSA P-256)")
    return key


def public_key_line(key: ec.EllipticCurvePublicKey) -> str:
    """The OpenSSH public key line of a P-256 key, without a comment."""
    return key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode("ascii")


# --- the tenant identity --------------------------------------------------------------


def _openssh_cipher(data: bytes) -> bytes | None:
    """The cipher name in an ``openssh-key-v1`` file, or ``None`` if it is not one.

    Read from the header ourselves so "encrypted" is told apart from "malformed" without
    depending on the wording of an exception from ``cryptography``.
    """
    text = data.strip()
    if not (text.startswith(_OPENSSH_BEGIN) and text.endswith(_OPENSSH_END)):
        return None
    body = b"".join(text[len(_OPENSSH_BEGIN) : -len(_OPENSSH_END)].split())
    try:
        raw = base64.b64decode(body)
    except binascii.Error:
        return None
    if not raw.startswith(_OPENSSH_MAGIC) or len(raw) < len(_OPENSSH_MAGIC) + 4:
        return None
    off = len(_OPENSSH_MAGIC)
    (n,) = struct.unpack(">I", raw[off : off + 4])
    return raw[off + 4 : off + 4 + n]


class TenantIdentity:
    """A tenant's private key, loaded from its OpenSSH key file.

    Lifecycle: ``TenantIdentity.load(path)`` (checks mode, format and algorithm), then
    any number of ``sign`` / ``exchange`` calls; the key lives in process memory only.
    """

    __slots__ = ("_key", "fingerprint", "path", "public_key", "public_key_line")

    def __init__(self, key: ec.EllipticCurvePrivateKey, path: Path | None = None) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("tenant identities must be ECDSA P-256")
        self._key = key
        self.path = path
        self.public_key: ec.EllipticCurvePublicKey = key.public_key()
        self.public_key_line: str = public_key_line(self.public_key)
        self.fingerprint: str = ssh_fingerprint(self.public_key_line)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TenantIdentity:
        p = Path(path)
        what = "identity file"
        data = read_private(p, what=what)
        cipher = _openssh_cipher(data)
        if cipher is None:
            raise UsageError(
                f"{what} {p}: not an OpenSSH private key (make one with "
                "ssh-keygen -t ecdsa -b 256; convert an old PEM key with ssh-keygen -p -f KEY)"
            )
        if cipher != b"none":
            raise UsageError(
                f"{what} {p}: the key is passphrase-protected; hsmctl cannot use encrypted "
                "identities yet (remove the passphrase with ssh-keygen -p -N '' -f KEY)"
            )
        try:
            key = load_ssh_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{what} {p}: unreadable OpenSSH private key") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise UsageError(
                f"{what} {p}: tenant identities must be ECDSA P-256 "
                "(ssh-keygen -t ecdsa -b 256); the key must both sign and receive encrypted "
                "secrets"
            )
        return cls(key, p)

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, comment: str = "") -> TenantIdentity:
        """Generate a new identity and write it (0600) plus ``PATH.pub``; refuse to overwrite.

        For the lab and tests; operators may equally use ``ssh-keygen -t ecdsa -b 256``.
        """
        p = Path(path)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())
        try:
            write_atomic(p, pem, exclusive=True)
        except FileExistsError as exc:
            raise UsageError(f"identity file {p}: already exists") from exc
        identity = cls(key, p)
        pub = identity.public_key_line + (f" {comment}" if comment else "") + "\n"
        pub_path = p.with_name(p.name + ".pub")
        write_atomic(pub_path, pub.encode("ascii"))
        os.chmod(pub_path, 0o644)  # as ssh-keygen leaves it: the public half is public
        return identity

    def sign(self, data: bytes) -> bytes:
        """ECDSA P-256 / SHA-256 over ``data``; DER-encoded, as ``cryptography`` returns it."""
        return self._key.sign(data, ec.ECDSA(SHA256()))

    def exchange(self, peer: ec.EllipticCurvePublicKey) -> bytes:
        """The ECDH shared secret with ``peer`` (the raw x coordinate, 32 bytes)."""
        return self._key.exchange(ec.ECDH(), peer)

    def __repr__(self) -> str:
        return f"TenantIdentity({self.fingerprint})"


# --- the provider's signing key -------------------------------------------------------


def ed25519_key_id(key: ed25519.Ed25519PublicKey) -> str:
    """Lowercase hex SHA-256 of the key's DER SubjectPublicKeyInfo (as audit key ids)."""
    der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _public_pem(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def load_provider_signing_key(path: str | os.PathLike[str]) -> ed25519.Ed25519PrivateKey:
    """The provider's Ed25519 private key from its PKCS#8 PEM file (mode checked)."""
    p = Path(path)
    data = read_private(p, what="provider signing key")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"provider signing key {p}: not an unencrypted PEM private key") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UsageError(f"provider signing key {p}: must be an Ed25519 key")
    return key


def load_provider_public_key(
    source: str | bytes | os.PathLike[str],
) -> ed25519.Ed25519PublicKey:
    """The provider's public signing key: PEM text, or the path of a PEM file.

    ``bytes`` and any ``str`` holding ``-----BEGIN`` are PEM text; other ``str`` and path
    objects name a file (a PEM always has that line, so the two cannot be confused).
    Public, so any file mode is fine. A key of another type is refused (exit 2): it is a
    configuration mistake, not an attack on a bundle.
    """
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "-----BEGIN" not in source):
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise UsageError(f"provider public key {source}: {exc.strerror}") from exc
    else:
        data = source.encode("ascii", "replace") if isinstance(source, str) else source
    try:
        key = load_pem_public_key(data)
    except ValueError as exc:
        raise UsageError("provider public key: not a PEM public key") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise UsageError("provider public key: must be an Ed25519 key")
    return key


def ensure_provider_signing_key(directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Create the provider's signing key in ``directory`` unless it exists; return
    ``(private_path, public_path)``.

    The private key is created with an exclusive link, so concurrent first runs agree on
    one key; the public PEM is always re-derived from the private key, so it cannot drift.
    """
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_path = d / PROVIDER_KEY_NAME
    public_path = d / PROVIDER_PUBLIC_NAME
    if not private_path.exists():
        fresh = ed25519.Ed25519PrivateKey.generate()
        pem = fresh.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        with contextlib.suppress(FileExistsError):
            write_atomic(private_path, pem, exclusive=True)
    key = load_provider_signing_key(private_path)
    public_pem = _public_pem(key.public_key())
    try:
        current = public_path.read_bytes()
    except FileNotFoundError:
        current = b""
    if current != public_pem:
        write_atomic(public_path, public_pem)
        os.chmod(public_path, 0o644)  # public: tenants receive a copy out of band
    return private_path, public_path
