"""The cloning domain on the customer's side (SPEC §12): ``hsmctl domain set`` and the
PKCS#11 half of backup and restore.

``set_domain`` reads the domain secret from an owner-only file, escrows it in the
customer's secret store (``domain-secret``, fsynced before the device hears of it), then
runs ``hsm domain set`` as ``admin`` with the escrowed SO PIN and the secret on stdin.

:class:`DomainToken` is the customer token through a kit (``RemoteToken``) with what a
backup needs: the domain key (found by CKA_TRUSTED and its label; its CKA_ID is the
domain fingerprint), each key object described as plain data, wrapped under the domain
key (private and secret keys) or read as public data (public keys), and the same data
put back. AES key wrap with padding travels as CKM_KEY_WRAP_LYNKS, which the device's
policy layer reads as CKM_AES_KEY_WRAP_PAD (p11-kit 0.24.1 does not carry KWP).
PKCS#11 errors are translated here (and in ``remote``) only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from hsmctl.appliance import domainkey
from hsmctl.customer.context import TenantContext
from hsmctl.errors import ConflictError, HsmctlError, UsageError
from hsmctl.keys.remote import RemoteToken, translate
from hsmctl.secret import Secret, read_secret_file

ESCROW = "domain-secret"
KWP_ON_THE_WIRE = 0x400  # CKM_KEY_WRAP_LYNKS: read as CKM_AES_KEY_WRAP_PAD by the device
CLASSES = ("private-key", "secret-key", "public-key")
KEY_TYPES = ("rsa", "ec", "aes")
# The usage flags kept per class (a private key has no ENCRYPT/VERIFY/WRAP, a public key
# no DECRYPT/SIGN/UNWRAP: SoftHSM refuses attributes a class does not have).
USAGE = {
    "private-key": ("sign", "decrypt", "unwrap", "derive"),
    "secret-key": ("encrypt", "decrypt", "sign", "verify", "wrap", "unwrap", "derive"),
    "public-key": ("verify", "encrypt", "wrap"),
}


def read_domain_secret(path: Path) -> Secret:
    secret = read_secret_file(path, what="--domain-file")
    try:
        domainkey.check_secret(secret.reveal())
    except ValueError as exc:
        raise UsageError(f"--domain-file {path}: {exc}") from exc
    return secret


def set_domain(ctx: TenantContext, appliance: str, domain_file: Path) -> dict[str, Any]:
    """Escrow the secret, then ``hsm domain set`` as admin with the escrowed SO PIN."""
    from hsmctl.clients.workflow import Appliance

    secret = read_domain_secret(domain_file)
    target = Appliance(ctx, appliance)  # exit 5 when not taken over from here
    so_pin = target.state.escrowed("so-pin")
    if so_pin is None:
        raise ConflictError(f"{appliance}: no SO PIN escrowed in {ctx.state_dir}")
    escrowed = target.state.escrowed(ESCROW)
    if escrowed is not None and escrowed.reveal() != secret.reveal():
        raise ConflictError(
            f"{appliance}: another domain secret is escrowed for it "
            f"({target.state.secret_path(ESCROW)}); nothing changed"
        )
    target.state.escrow(ESCROW, secret)
    with target.connect() as conn:
        reply = target.reply(conn, "hsm domain set", [so_pin.reveal(), secret.reveal()])
    return {"appliance": appliance, "domain": reply.get("domain"), "created": reply.get("created")}


def public_sha256(attrs: dict[str, str]) -> str:
    """The hash a backup matches public material by (pure): SHA-256 over the sorted
    ``name=hex`` pairs of the public attributes."""
    text = ";".join(f"{k}={attrs[k]}" for k in sorted(attrs))
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def match_key(entry: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """What makes two key objects the same for restore: class, type, label, id and the
    public-key hash where the object carries public material."""
    return (
        str(entry["class"]),
        str(entry["key_type"]),
        str(entry["label"]),
        str(entry["id"]),
        str(entry.get("public_sha256") or ""),
    )


class DomainToken(RemoteToken):
    """``RemoteToken`` plus the domain key and key objects as data (see module doc)."""

    def __enter__(self) -> DomainToken:
        super().__enter__()
        return self

    def _fail(self, exc: Exception, operation: str) -> HsmctlError:
        return translate(exc, self.appliance, operation)

    def domain_key(self) -> tuple[Any, str] | None:
        """(the domain key object, its fingerprint) or None when the token has none."""
        import pkcs11
        from pkcs11 import Attribute, ObjectClass

        try:
            found = list(self._session.get_objects({
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TRUSTED: True,
                Attribute.LABEL: domainkey.LABEL}))  # fmt: skip
            if not found:
                return None
            return found[0], bytes(found[0][Attribute.ID]).hex()
        except pkcs11.PKCS11Error as exc:
            raise self._fail(exc, "find the domain key") from exc

    def _objects(self) -> list[tuple[str, Any]]:
        from pkcs11 import Attribute, ObjectClass

        out: list[tuple[str, Any]] = []
        for name, cls in (("private-key", ObjectClass.PRIVATE_KEY),
                          ("secret-key", ObjectClass.SECRET_KEY),
                          ("public-key", ObjectClass.PUBLIC_KEY)):  # fmt: skip
            for obj in self._session.get_objects({Attribute.CLASS: cls}):
                out.append((name, obj))
        return out

    def describe(self, cls: str, obj: Any) -> dict[str, Any] | None:
        """A key object as plain data (None: not a key the backup carries: the domain
        key, or a type outside the policy)."""
        from pkcs11 import Attribute, KeyType

        get = _batch_getter(obj, cls)
        kinds = {KeyType.RSA: "rsa", KeyType.EC: "ec", KeyType.AES: "aes"}
        kind = kinds.get(get(Attribute.KEY_TYPE))
        if kind is None or (cls == "secret-key" and get(Attribute.TRUSTED)):
            return None
        entry: dict[str, Any] = {
            "class": cls,
            "key_type": kind,
            "label": str(get(Attribute.LABEL) or ""),
            "id": bytes(get(Attribute.ID) or b"").hex(),
            "usage": sorted(u for u in USAGE[cls] if get(getattr(Attribute, u.upper()))),
        }
        public: dict[str, str] = {}
        if kind == "rsa":
            public = {
                "modulus": bytes(get(Attribute.MODULUS) or b"").hex(),
                "public_exponent": bytes(get(Attribute.PUBLIC_EXPONENT) or b"").hex(),
            }
        elif kind == "ec" and cls == "public-key":
            public = {"ec_params": bytes(get(Attribute.EC_PARAMS) or b"").hex(),
                      "ec_point": bytes(get(Attribute.EC_POINT) or b"").hex()}  # fmt: skip
        elif kind == "ec":
            entry["ec_params"] = bytes(get(Attribute.EC_PARAMS) or b"").hex()
        if public:
            entry["public_sha256"] = public_sha256(public)
            if cls == "public-key":
                entry["public"] = public
        if cls != "public-key":
            entry["cloneable"] = bool(get(Attribute.WRAP_WITH_TRUSTED)) and bool(
                get(Attribute.EXTRACTABLE)
            )
        return entry

    def export(self, domain: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(every key object as data, wrapped blobs included; the keys that cannot leave
        because they were made outside the domain)."""
        import pkcs11
        from pkcs11 import Mechanism

        kept: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        try:
            for cls, obj in self._objects():
                entry = self.describe(cls, obj)
                if entry is None:
                    continue
                if cls != "public-key":
                    if not entry.pop("cloneable"):
                        skipped.append(entry)
                        continue
                    blob = domain.wrap_key(obj, mechanism=Mechanism(KWP_ON_THE_WIRE))
                    entry["wrapped"] = bytes(blob).hex()
                kept.append(entry)
        except pkcs11.PKCS11Error as exc:
            raise self._fail(exc, "backup") from exc
        kept.sort(key=lambda e: (CLASSES.index(e["class"]), e["label"], e["id"]))
        return kept, skipped

    def present(self) -> set[tuple[str, str, str, str, str]]:
        """The match keys of every key object on the token now."""
        import pkcs11

        try:
            found = (self.describe(cls, obj) for cls, obj in self._objects())
            return {match_key(e) for e in found if e is not None}
        except pkcs11.PKCS11Error as exc:
            raise self._fail(exc, "list") from exc

    def put(self, domain: Any, entry: dict[str, Any]) -> None:
        """Make one object from its backup entry: unwrap under the domain key (private and
        secret keys; the device keeps them cloneable) or create it (public keys)."""
        import pkcs11
        from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
        from pkcs11.constants import DEFAULT

        key_type = {"rsa": KeyType.RSA, "ec": KeyType.EC, "aes": KeyType.AES}[entry["key_type"]]
        label, key_id = str(entry["label"]), bytes.fromhex(entry["id"])
        usage = set(entry["usage"])
        try:
            if entry["class"] == "public-key":
                template: dict[Any, Any] = {
                    Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                    Attribute.KEY_TYPE: key_type,
                    Attribute.TOKEN: True,
                    Attribute.LABEL: label,
                    Attribute.ID: key_id,
                }
                for name in USAGE["public-key"]:
                    template[getattr(Attribute, name.upper())] = name in usage
                for name, value in entry["public"].items():
                    template[getattr(Attribute, name.upper())] = bytes.fromhex(value)
                self._session.create_object(template)
                return
            caps = 0
            for name in usage:
                caps |= getattr(MechanismFlag, name.upper())
            hold: dict[Any, Any] = {}
            if entry["class"] == "private-key":
                cls = ObjectClass.PRIVATE_KEY
                hold = {a: DEFAULT for a in (Attribute.ENCRYPT, Attribute.VERIFY, Attribute.WRAP)}
            else:
                cls = ObjectClass.SECRET_KEY
            domain.unwrap_key(cls, key_type, bytes.fromhex(entry["wrapped"]), id=key_id,
                              label=label, mechanism=Mechanism(KWP_ON_THE_WIRE), store=True,
                              capabilities=caps, template=hold)  # fmt: skip
        except pkcs11.PKCS11Error as exc:
            raise self._fail(exc, "restore") from exc


def _described(cls: str) -> list[Any]:
    """The attributes :meth:`DomainToken.describe` reads of an object of class ``cls``."""
    from pkcs11 import Attribute

    wanted = [Attribute.KEY_TYPE, Attribute.LABEL, Attribute.ID, Attribute.MODULUS,
              Attribute.PUBLIC_EXPONENT, Attribute.EC_PARAMS]  # fmt: skip
    wanted += [getattr(Attribute, u.upper()) for u in USAGE[cls]]
    if cls == "public-key":
        wanted.append(Attribute.EC_POINT)
    else:
        wanted += [Attribute.WRAP_WITH_TRUSTED, Attribute.EXTRACTABLE]
    if cls == "secret-key":
        wanted.append(Attribute.TRUSTED)
    return wanted


def _batch_getter(obj: Any, cls: str) -> Any:
    """Like :func:`_getter`, with every attribute ``describe`` needs read in one
    C_GetAttributeValue (two round trips over the kit's SSH instead of one per
    attribute: what made a sync or backup of 1,000 keys slow). Attributes the object does
    not have are absent (None), as in C_GetAttributeValue's answer; should the batch fail
    as a whole, the attributes are read one by one."""
    import pkcs11

    try:
        got = obj.get_attributes(_described(cls))
    except (pkcs11.AttributeTypeInvalid, pkcs11.AttributeSensitive, pkcs11.FunctionFailed):
        return _getter(obj)

    def get(attribute: Any) -> Any:
        return got.get(attribute)

    return get


def _getter(obj: Any) -> Any:
    import pkcs11

    def get(attribute: Any) -> Any:
        try:
            return obj[attribute]
        except (pkcs11.AttributeTypeInvalid, pkcs11.AttributeSensitive, KeyError):
            return None

    return get
