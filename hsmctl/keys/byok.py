"""BYOK (SPEC §12, issue 12 item 4): ``hsmctl key wrapping-key`` and ``hsmctl key import``,
through the same remote PKCS#11 path as ``hsmctl key list|generate|destroy``.

The wrapped file is the CKM_RSA_AES_KEY_WRAP pattern in two steps, as OpenSSL makes it
on the customer's side (docs/keys.md, "BYOK")::

    RSA-OAEP(wrapping public key, ephemeral AES key)  ||  AES-KWP(ephemeral key, target)

the first part exactly as long as the wrapping key's modulus, the target the raw AES key
bytes or a PKCS#8 ``PrivateKeyInfo`` (DER) for a private key. On the device: the first
part is unwrapped with ``CKM_RSA_PKCS_OAEP`` (SHA-256 and MGF1-SHA-256 by default, SPEC
§12; SHA-1 with ``--oaep-hash sha1``) into a *session* AES key (sensitive, not
extractable, unwrap only), the second with AES key wrap with padding (RFC 5649) into a
token object (``CKA_SENSITIVE=true``, ``CKA_EXTRACTABLE=false``; ``CKA_LOCAL`` is false
for any unwrapped key), and the session key is destroyed.

What the lab's versions force (measured, docs/keys.md):

- SoftHSM 2.6.1 does RSA-OAEP with SHA-1 and MGF1-SHA1 only (``MechParamCheckRSAPKCSOAEP``
  refuses anything else with CKR_ARGUMENTS_BAD). So the wrapping key is *marked*
  (``CKA_ALLOWED_MECHANISMS={CKM_RSA_X_509}``, ``CKA_DECRYPT=true``) and the device's
  policy layer does the OAEP unwrap for it (appliance/p11/policy.c, ``byok_unwrap``): the
  raw RSA decrypt inside SoftHSM, OpenSSL's constant-time OAEP decoding, the AES key made
  inside SoftHSM; every other use of the key is refused to every client. A wrapping key
  made before the mark keeps SoftHSM's own OAEP: SHA-1 only (``--oaep-hash sha1``).
- p11-kit 0.24.1's RPC does not carry ``CKM_AES_KEY_WRAP_PAD``: the client refuses it
  before sending. hsmctl sends ``CKM_KEY_WRAP_LYNKS`` (parameterless, carried, not a
  SoftHSM mechanism) and the device's policy layer unwraps with ``CKM_AES_KEY_WRAP_PAD``
  (appliance/p11/policy.c, ``w_UnwrapKey``). The key material never leaves the device.

Errors: bad input (file, label, type, wrapping key, ``--oaep-hash sha256`` with a
wrapping key made before the mark) exits 2 before the device changes; a blob the device
cannot unwrap (a flipped byte, wrapped for another key, OAEP with another hash) exits 3
and nothing is imported; a refusal of the key policy exits 2 with its rule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsmctl.customer.context import TenantContext
from hsmctl.errors import HsmctlError, IntegrityError, UsageError
from hsmctl.keys import session, spec
from hsmctl.keys.remote import RemoteToken, ckr_name, translate
from hsmctl.keys.spec import Kind

WRAPPING_BITS = 3072
# CKM_KEY_WRAP_LYNKS: the number p11-kit 0.24.1 carries and the device's policy layer
# reads as CKM_AES_KEY_WRAP_PAD (see the module doc).
KWP_ON_THE_WIRE = 0x400
TRANSPORT_LABEL = "byok-transport"
# --oaep-hash: the OAEP hash (and MGF1 hash) of the RSA part -> the scheme's name.
OAEP_HASHES = ("sha256", "sha1")
SCHEMES = {h: f"RSA-OAEP-{h.upper()} + AES-KWP (RFC 5649)" for h in OAEP_HASHES}
SCHEME = SCHEMES["sha256"]
CKM_RSA_X_509 = 0x3  # the mark of a wrapping key (see the module doc)
# What a wrapped-key blob's unwrap failing means: it did not decrypt (SoftHSM reports a
# failed OAEP decoding or RFC 5649 integrity check as CKR_GENERAL_ERROR).
_DID_NOT_DECRYPT = {
    "CKR_GENERAL_ERROR",
    "CKR_ENCRYPTED_DATA_INVALID",
    "CKR_ENCRYPTED_DATA_LEN_RANGE",
    "CKR_WRAPPED_KEY_INVALID",
    "CKR_WRAPPED_KEY_LEN_RANGE",
    "CKR_DATA_LEN_RANGE",
    # python-pkcs11's class names, which remote.ckr_name passes through as they are
    "WrappedKeyInvalid",
    "WrappedKeyLenRange",
    "EncryptedDataInvalid",
    "EncryptedDataLenRange",
    "DataLenRange",
}
# OAEP parameters the device does not take (SoftHSM's own OAEP: SHA-1 only).
_PARAMS_REFUSED = {"CKR_ARGUMENTS_BAD", "CKR_MECHANISM_PARAM_INVALID", "ArgumentsBad",
                   "MechanismParamInvalid"}  # fmt: skip
# Policy refusals of an unwrap (appliance/p11/README.md): CKR -> rule.
_IMPORT_RULES = {
    "CKR_KEY_SIZE_RANGE": "size",
    "CKR_CURVE_NOT_SUPPORTED": "ec-curve",
    "CKR_ACTION_PROHIBITED": "role-crypto-user",
    "CKR_TEMPLATE_INCONSISTENT": "key-type",
}
# The largest AES key and the largest EC PKCS#8 (P-521 with its public key: 241 bytes)
# the KWP part can hold; anything longer is an RSA private key (>= 1,190 bytes).
_AES_MAX, _EC_MAX = 32, 400


@dataclass(frozen=True)
class Wrapped:
    """A wrapped-key file split at the wrapping key's modulus length."""

    transport: bytes  # RSA-OAEP of the ephemeral AES key
    kwp: bytes  # AES-KWP of the target key

    @property
    def kind(self) -> Kind:
        """The target's kind from the KWP part's length (RFC 5649: the plaintext padded
        to 8 bytes, plus 8): AES keys are at most 32 bytes, an EC PKCS#8 a few hundred,
        an RSA PKCS#8 over a thousand."""
        inner = len(self.kwp) - 8
        if inner <= _AES_MAX:
            return Kind.AES
        return Kind.EC if inner <= _EC_MAX else Kind.RSA


def split(data: bytes, modulus_len: int, path: Path) -> Wrapped:
    """The file's two parts (pure); UsageError when it cannot be a wrapped key for a
    wrapping key with a modulus of ``modulus_len`` bytes."""
    if not data:
        raise UsageError(f"--wrapped {path}: empty file")
    kwp = data[modulus_len:]
    if len(data) <= modulus_len or len(kwp) < 16 or len(kwp) % 8:
        raise UsageError(
            f"--wrapped {path}: {len(data)} bytes is not RSA-OAEP ({modulus_len} bytes for "
            "this wrapping key) followed by AES-KWP (a multiple of 8 bytes, at least 16); "
            "nothing changed"
        )
    return Wrapped(data[:modulus_len], kwp)


def fingerprint(spki_der: bytes) -> str:
    """Hex SHA-256 of the DER SubjectPublicKeyInfo (the audit key id's rule)."""
    return hashlib.sha256(spki_der).hexdigest()


_ULONG = struct.Struct("L")  # CK_ULONG / CK_MECHANISM_TYPE, as the platform's C has it


def pack_mechanisms(mechanisms: Any) -> bytes:
    """A ``CK_MECHANISM_TYPE`` array attribute's value (pure)."""
    return b"".join(_ULONG.pack(int(m)) for m in mechanisms)


def unpack_mechanisms(value: bytes) -> list[int]:
    """The mechanisms of a ``CK_MECHANISM_TYPE`` array attribute's value (pure)."""
    if len(value) % _ULONG.size:
        raise ValueError(f"{len(value)} bytes is not a CK_MECHANISM_TYPE array")
    return [m for (m,) in _ULONG.iter_unpack(value)]


def _register_allowed_mechanisms() -> None:
    """python-pkcs11 0.10 has no handler for ``CKA_ALLOWED_MECHANISMS``; each session's
    attribute mapper copies ``ATTRIBUTE_TYPES`` when the session opens, so the handler is
    added there before (idempotent)."""
    from pkcs11 import Attribute
    from pkcs11.attributes import ATTRIBUTE_TYPES

    ATTRIBUTE_TYPES.setdefault(Attribute.ALLOWED_MECHANISMS, (pack_mechanisms, unpack_mechanisms))


def _public_pem(modulus: bytes, exponent: bytes) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pub = rsa.RSAPublicNumbers(int.from_bytes(exponent), int.from_bytes(modulus)).public_key()
    der = pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode("ascii"), fingerprint(der)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise UsageError(f"--wrapped {path}: no such file") from exc
    except IsADirectoryError as exc:
        raise UsageError(f"--wrapped {path}: a directory, not a file") from exc
    except OSError as exc:
        raise UsageError(f"--wrapped {path}: {exc.strerror}") from exc


class ByokToken(RemoteToken):
    """The remote token with BYOK's operations."""

    def __enter__(self) -> ByokToken:
        _register_allowed_mechanisms()
        super().__enter__()
        return self

    # -- the wrapping key --------------------------------------------------------------

    def _private(self, label: str) -> list[Any]:
        from pkcs11 import Attribute, ObjectClass

        return list(self._session.get_objects(
            {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}))  # fmt: skip

    def _public_of(self, label: str, key_id: bytes) -> Any:
        from pkcs11 import Attribute, ObjectClass

        found = [p for p in self._session.get_objects(
            {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: label})
            if bytes(p[Attribute.ID]) == key_id]  # fmt: skip
        if len(found) != 1:
            raise UsageError(f"{self.appliance}: the wrapping key {label!r} has {len(found)} "
                             "public halves (same label and id); one expected")  # fmt: skip
        return found[0]

    def wrapping_key(self, label: str, *, usage_label: str = "--wrapping-key") -> Any:
        """The private key labelled ``label``, checked to be an RSA unwrap key."""
        import pkcs11
        from pkcs11 import Attribute, KeyType

        try:
            keys = self._private(label)
            if not keys:
                others = self.keys(label)
                what = f"a {others[0].type} secret key" if others else "no key"
                raise UsageError(f"{self.appliance}: {usage_label} {label!r}: {what} with that "
                                 "label, no RSA wrapping key (make one with `hsmctl key "
                                 "wrapping-key`); nothing changed")  # fmt: skip
            if len(keys) > 1:
                raise UsageError(f"{self.appliance}: {usage_label} {label!r}: {len(keys)} "
                                 "private keys with that label; nothing changed")  # fmt: skip
            key = keys[0]
            key_type = key[Attribute.KEY_TYPE]
            if key_type != KeyType.RSA or not key[Attribute.UNWRAP]:
                kind = "an RSA key without CKA_UNWRAP"
                if key_type != KeyType.RSA:
                    kind = f"a key of type {getattr(key_type, 'name', key_type)}"
                raise UsageError(f"{self.appliance}: {usage_label} {label!r} is {kind}, not "
                                 "an RSA wrapping key (make one with `hsmctl key "
                                 "wrapping-key`); nothing changed")  # fmt: skip
        except pkcs11.PKCS11Error as exc:
            raise translate(exc, self.appliance, "list") from exc
        return key

    def marked(self, key: Any) -> bool:
        """Whether the wrapping key carries the mark (``CKA_ALLOWED_MECHANISMS`` naming
        ``CKM_RSA_X_509``): the device's layer does OAEP-SHA256 and -SHA1 with it; without
        it, SoftHSM's own OAEP does SHA-1 only."""
        import pkcs11
        from pkcs11 import Attribute

        try:
            allowed = key[Attribute.ALLOWED_MECHANISMS]
        except (pkcs11.AttributeTypeInvalid, pkcs11.AttributeSensitive):
            return False
        except pkcs11.PKCS11Error as exc:
            raise translate(exc, self.appliance, "list") from exc
        return CKM_RSA_X_509 in allowed

    def describe_wrapping_key(self, label: str, key: Any) -> dict[str, Any]:
        import pkcs11
        from pkcs11 import Attribute

        try:
            key_id = bytes(key[Attribute.ID])
            pub = self._public_of(label, key_id)
            pem, fp = _public_pem(pub[Attribute.MODULUS], pub[Attribute.PUBLIC_EXPONENT])
            bits = len(bytes(pub[Attribute.MODULUS]).lstrip(b"\0")) * 8
        except pkcs11.PKCS11Error as exc:
            raise translate(exc, self.appliance, "list") from exc
        hashes = list(OAEP_HASHES) if self.marked(key) else ["sha1"]
        return {"label": label, "id": key_id.hex(), "bits": bits, "public_key": pem,
                "fingerprint": fp, "scheme": SCHEMES[hashes[0]],
                "oaep_hashes": hashes}  # fmt: skip

    def make_wrapping_key(self, label: str, key_id: bytes) -> Any:
        """An RSA-3072 pair whose private half is marked for the device's OAEP unwrap
        (``CKA_ALLOWED_MECHANISMS={CKM_RSA_X_509}``, ``CKA_DECRYPT=true`` for the device's
        own raw decrypt, ``CKA_UNWRAP=true``; no sign, no derive), sensitive, never
        extractable, a token object; the device's policy refuses every client use of it
        but the unwrap, and adds ``CKA_MODIFIABLE=false``/``CKA_COPYABLE=false``. Its
        public half wraps only."""
        import pkcs11
        from pkcs11 import Attribute, KeyType, MechanismFlag

        hold = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                Attribute.ALLOWED_MECHANISMS: [CKM_RSA_X_509]}  # fmt: skip
        try:
            _pub, priv = self._session.generate_keypair(
                KeyType.RSA, WRAPPING_BITS, id=key_id, label=label, store=True,
                capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP | MechanismFlag.DECRYPT,
                private_template=hold)  # fmt: skip
        except pkcs11.PKCS11Error as exc:
            raise translate(exc, self.appliance, "generate-rsa") from exc
        return priv

    # -- import --------------------------------------------------------------------------

    def modulus_len(self, wrapping: Any) -> int:
        import pkcs11
        from pkcs11 import Attribute

        try:
            key_id = bytes(wrapping[Attribute.ID])
            label = str(wrapping[Attribute.LABEL])
            return len(bytes(self._public_of(label, key_id)[Attribute.MODULUS]))
        except pkcs11.PKCS11Error as exc:
            raise translate(exc, self.appliance, "list") from exc

    def unwrap(self, wrapping: Any, blob: Wrapped, kind: Kind, label: str,
               key_id: bytes, oaep_hash: str = "sha256") -> spec.KeyRow:  # fmt: skip
        """The two unwraps; the transport key is destroyed whatever happens."""
        import pkcs11
        from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
        from pkcs11.constants import DEFAULT

        oaep = {"sha256": (Mechanism.SHA256, MGF.SHA256, None),
                "sha1": (Mechanism.SHA_1, MGF.SHA1, None)}[oaep_hash]  # fmt: skip
        try:
            transport = wrapping.unwrap_key(
                ObjectClass.SECRET_KEY, KeyType.AES, blob.transport, label=TRANSPORT_LABEL,
                mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=oaep,
                store=False, capabilities=MechanismFlag.UNWRAP,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})  # fmt: skip
        except pkcs11.PKCS11Error as exc:
            raise self._refusal(exc, "the RSA-OAEP part", kind, oaep_hash) from exc
        hold: dict[Any, Any] = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}
        if kind is Kind.AES:
            cls, key_type, caps = ObjectClass.SECRET_KEY, KeyType.AES, None
        else:
            cls = ObjectClass.PRIVATE_KEY
            key_type = KeyType.EC if kind is Kind.EC else KeyType.RSA
            caps = MechanismFlag.SIGN | MechanismFlag.DERIVE
            if kind is Kind.RSA:
                caps = MechanismFlag.SIGN | MechanismFlag.DECRYPT | MechanismFlag.UNWRAP
            # a private key has no CKA_ENCRYPT, CKA_VERIFY or CKA_WRAP: leave them out
            hold.update({a: DEFAULT for a in (Attribute.ENCRYPT, Attribute.VERIFY,
                                               Attribute.WRAP)})  # fmt: skip
        try:
            try:
                transport.unwrap_key(
                    cls, key_type, blob.kwp, id=key_id, label=label,
                    mechanism=Mechanism(KWP_ON_THE_WIRE), store=True, capabilities=caps,
                    template=hold)  # fmt: skip
            except pkcs11.PKCS11Error as exc:
                raise self._refusal(exc, "the AES-KWP part", kind, oaep_hash) from exc
        finally:
            with contextlib.suppress(pkcs11.PKCS11Error):  # a session object: gone anyway
                transport.destroy()
        made = [r for r in self.keys(label) if r.id == key_id.hex()]
        if len(made) != 1:
            raise IntegrityError(f"{self.appliance}: the key {label!r} is not there after "
                                 "it was imported")  # fmt: skip
        if kind is Kind.AES and made[0].size is None:
            # SoftHSM 2.6.1 keeps no CKA_VALUE_LEN for an unwrapped key (read-only but for
            # generate and derive): the size is the KWP part's, whose 16/24/32 key bytes
            # need no padding (the device's policy probed and allowed the same length).
            # Recorded beside the key (remote.record_size) so key list shows it later.
            bits = (len(blob.kwp) - 8) * 8
            if bits in (128, 192, 256):
                self.record_size(label, key_id, bits)
            return dataclasses.replace(made[0], size=bits)
        return made[0]

    def _refusal(
        self, exc: Exception, part: str, kind: Kind, oaep_hash: str = "sha256"
    ) -> HsmctlError:
        ckr = ckr_name(exc)
        if ckr in _DID_NOT_DECRYPT:
            return IntegrityError(
                f"{self.appliance}: {part} of the wrapped key did not unwrap ({ckr}): the file "
                "was altered, or wrapped for another wrapping key or with another scheme "
                f"(this import took {SCHEMES[oaep_hash]}; --oaep-hash names the RSA-OAEP "
                "hash); nothing was imported",
                detail={"ckr": ckr},
            )
        if ckr in _PARAMS_REFUSED and part.endswith("OAEP part"):
            return UsageError(
                f"{self.appliance}: the wrapping key does not take RSA-OAEP-"
                f"{oaep_hash.upper()} ({ckr}); nothing was imported",
                detail={"ckr": ckr},
            )
        if ckr in ("CKR_FUNCTION_FAILED", "FunctionFailed") and part.endswith("KWP part"):
            return UsageError(
                f"{self.appliance}: {part} unwrapped, but what it holds is not a {kind} key "
                f"(for a private key: PKCS#8 DER); give --type; nothing was imported",
                detail={"ckr": ckr},
            )
        rule = _IMPORT_RULES.get(ckr)
        if rule is not None:
            if rule == "size":
                rule = {Kind.AES: "aes-size", Kind.RSA: "rsa-size"}.get(kind, "key-type")
            return UsageError(
                f"{self.appliance}: the device's key policy refused the import of {part} "
                f"(rule {rule}, {ckr}); nothing was imported",
                detail={"rule": rule, "ckr": ckr},
            )
        return translate(exc, self.appliance, "import")


def _open(
    ctx: TenantContext, appliance: str, kit_dir: Path | None, pin_file: Path | None
) -> ByokToken:
    from hsmctl.customer.store import ApplianceDir

    ApplianceDir(ctx.state_dir, appliance)  # validates the id (exit 2)
    pin = session._pin(ctx, appliance, pin_file)
    remote = session.remote_of(session._kit_dir(ctx, appliance, kit_dir))
    return ByokToken(appliance, remote, pin)


def make_wrapping_key(
    ctx: TenantContext,
    appliance: str,
    label: str,
    kit_dir: Path | None = None,
    pin_file: Path | None = None,
    output: Path | None = None,
) -> dict[str, Any]:
    """``hsmctl key wrapping-key``: make the RSA-3072 import key, or show the one that
    has the label already (a rerun prints the same public key)."""
    try:
        spec.check_label(label)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if output is not None and output.exists():
        raise UsageError(f"--output {output}: exists; nothing changed")
    with _open(ctx, appliance, kit_dir, pin_file) as token:
        existing = token._private(label) or token.keys(label)
        created = not existing
        if created:
            key = token.make_wrapping_key(label, os.urandom(8))
        else:
            key = token.wrapping_key(label, usage_label="--label")
        shown = token.describe_wrapping_key(label, key)
    if output is not None:
        _write_new(output, shown["public_key"].encode("ascii"))
    return {"appliance": appliance, **shown, "created": created,
            **({"output": str(output)} if output is not None else {})}  # fmt: skip


def _write_new(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise UsageError(f"--output {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def import_key(
    ctx: TenantContext,
    appliance: str,
    label: str,
    wrapped: Path,
    wrapping_label: str,
    key_type: str | None = None,
    kit_dir: Path | None = None,
    pin_file: Path | None = None,
    oaep_hash: str = "sha256",
) -> dict[str, Any]:
    """``hsmctl key import``: see the module doc."""
    if oaep_hash not in OAEP_HASHES:
        raise UsageError(f"--oaep-hash {oaep_hash}: one of {', '.join(OAEP_HASHES)}")
    try:
        spec.check_label(label)
        spec.check_label(wrapping_label)
        wanted = spec.parse_type(key_type) if key_type else None
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    data = _read(wrapped)
    if not data:
        raise UsageError(f"--wrapped {wrapped}: empty file; nothing changed")
    with _open(ctx, appliance, kit_dir, pin_file) as token:
        if token.keys(label):
            raise UsageError(f"{appliance}: a key labelled {label!r} exists; nothing changed")
        wrapping = token.wrapping_key(wrapping_label)
        if oaep_hash != "sha1" and not token.marked(wrapping):
            raise UsageError(f"{appliance}: the wrapping key {wrapping_label!r} was made "
                             "before RSA-OAEP-SHA256 was supported and takes RSA-OAEP-SHA1 "
                             "only: wrap with SHA-1 and give --oaep-hash sha1, or make a new "
                             "wrapping key; nothing changed")  # fmt: skip
        blob = split(data, token.modulus_len(wrapping), wrapped)
        kind = blob.kind
        if wanted is not None and wanted.kind is not kind:
            size = len(blob.kwp)
            raise UsageError(f"--type {key_type}: the wrapped key's AES-KWP part ({size} "
                             f"bytes) holds a {kind} key; nothing changed")  # fmt: skip
        if wanted is not None and kind is Kind.AES and len(blob.kwp) - 8 != wanted.bits // 8:
            bits = (len(blob.kwp) - 8) * 8
            raise UsageError(f"--type {key_type}: the wrapped key holds a {bits}-bit AES key; "
                             "nothing changed")  # fmt: skip
        made = token.unwrap(wrapping, blob, kind, label, os.urandom(8), oaep_hash)
        if wanted is not None and made.size != wanted.bits:
            token.destroy(label)
            raise UsageError(f"--type {key_type}: the imported key is {made.type}:{made.size}; "
                             "it was destroyed again")  # fmt: skip
    return {"appliance": appliance, "key": made.as_dict(), "wrapping_key": wrapping_label,
            "scheme": SCHEMES[oaep_hash]}  # fmt: skip
