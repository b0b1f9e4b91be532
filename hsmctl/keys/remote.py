"""The PKCS#11 boundary of ``hsmctl key``: the customer token over the kit's remote path.

p11-kit's client module (``p11-kit-client.so``) runs the command it finds in
``P11_KIT_SERVER_ADDRESS`` when that starts with ``|`` (p11-kit 0.24.1
``p11_rpc_transport_new``: a socketpair on the command's stdin and stdout) and speaks
p11-kit's RPC over it. Given the kit's own ``remote:`` command, that is exactly the path
an application takes through ``p11-kit-proxy.so`` and the module file, without the
module file: p11-kit ignores user configuration for root, the environment works for any
user. The variable holds paths only, never a secret; it is set for the moment the module
is loaded (read once, in ``C_GetFunctionList``) and removed again.

Lifecycle: ``RemoteToken(remote, pin)`` as a context manager loads the module, which
starts the kit's ssh and opens one rw session logged in as ``CKU_USER``; the methods run
PKCS#11 calls and return plain data; leaving closes the session and finalises the
module (p11-kit ends the ssh). One at a time per process (a lock): the module reads the
address from the process environment. PKCS#11 errors are translated here only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import threading
from types import TracebackType
from typing import Any

from hsmctl.errors import ConflictError, HsmctlError, IntegrityError, UnreachableError, UsageError
from hsmctl.keys.spec import KeyRow, KeySpec, Kind, policy_rule, row
from hsmctl.secret import Secret

CLIENT_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
ADDRESS_ENV = "P11_KIT_SERVER_ADDRESS"
_ONE_AT_A_TIME = threading.Lock()

# python-pkcs11's exception classes -> the CKR names the device's README uses; codes it
# does not map arrive as "Unmapped error code 0x…".
_CKR_BY_CLASS = {
    "KeySizeRange": "CKR_KEY_SIZE_RANGE",
    "DomainParamsInvalid": "CKR_DOMAIN_PARAMS_INVALID",
    "TemplateInconsistent": "CKR_TEMPLATE_INCONSISTENT",
    "MechanismInvalid": "CKR_MECHANISM_INVALID",
    "AttributeReadOnly": "CKR_ATTRIBUTE_READ_ONLY",
    "PinIncorrect": "CKR_PIN_INCORRECT",
    "PinLocked": "CKR_PIN_LOCKED",
    "DeviceRemoved": "CKR_DEVICE_REMOVED",
    "DeviceError": "CKR_DEVICE_ERROR",
    "GeneralError": "CKR_GENERAL_ERROR",
    "TokenNotPresent": "CKR_TOKEN_NOT_PRESENT",
}
_CKR_BY_CODE = {0x1B: "CKR_ACTION_PROHIBITED", 0x140: "CKR_CURVE_NOT_SUPPORTED"}
_UNMAPPED = re.compile(r"Unmapped error code (0x[0-9a-f]+)")


def ckr_name(exc: BaseException) -> str:
    """The CKR name of a python-pkcs11 error (pure)."""
    name = _CKR_BY_CLASS.get(type(exc).__name__)
    if name:
        return name
    found = _UNMAPPED.search(str(exc))
    if found:
        code = int(found.group(1), 16)
        return _CKR_BY_CODE.get(code, f"CKR_0x{code:x}")
    return type(exc).__name__


def translate(exc: Exception, appliance: str, operation: str) -> HsmctlError:
    """A PKCS#11 error -> the error tree (pure). A policy refusal names its rule."""
    ckr = ckr_name(exc)
    rule = policy_rule(operation, ckr)
    if rule is not None:
        return UsageError(
            f"{appliance}: the device's key policy refused it (rule {rule}, {ckr}); "
            "nothing was changed",
            detail={"rule": rule, "ckr": ckr},
        )
    if ckr == "CKR_PIN_INCORRECT":
        return UsageError(f"{appliance}: the token refused the PIN (CKR_PIN_INCORRECT)")
    if ckr == "CKR_PIN_LOCKED":
        return ConflictError(f"{appliance}: the user PIN is locked (CKR_PIN_LOCKED)")
    if ckr in ("CKR_DEVICE_REMOVED", "CKR_DEVICE_ERROR", "CKR_TOKEN_NOT_PRESENT"):
        return UnreachableError(
            f"{appliance}: the PKCS#11 service over SSH did not answer ({ckr}; ssh's own "
            "message, if any, is above)",
            detail={"ckr": ckr},
        )
    return HsmctlError(f"{appliance}: {operation} failed: {ckr}", detail={"ckr": ckr})


SIZE_APPLICATION = "hsmctl key size"
_SIZE_RECORD = re.compile(r"([0-9a-f]{0,128}) (128|192|256)")


def size_record(key_id: bytes, bits: int) -> bytes:
    """The value of a key's size record: ``ID-HEX BITS`` (pure)."""
    return f"{key_id.hex()} {bits}".encode("ascii")


def parse_size_record(value: bytes) -> tuple[str, int] | None:
    """(id hex, bits) of a size record's value, None if it is not one (pure)."""
    found = _SIZE_RECORD.fullmatch(value.decode("ascii", "replace"))
    return (found.group(1), int(found.group(2))) if found else None


def _attr(obj: Any, attribute: Any) -> Any:
    import pkcs11

    try:
        return obj[attribute]
    except (pkcs11.AttributeTypeInvalid, pkcs11.AttributeSensitive, KeyError):
        return None


class RemoteToken:
    """The customer token through one kit, logged in as the user (see module doc)."""

    def __init__(self, appliance: str, remote: str, pin: Secret) -> None:
        if not remote.startswith("|"):
            raise UsageError(f"{appliance}: the kit's remote line is not a command ('|…')")
        self.appliance = appliance
        self.remote = remote
        self.pin = pin
        self._session: Any = None
        self._operation = "connect"
        self._holding = False
        self._domain: list[Any] | None = None  # the domain key, once looked for

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> RemoteToken:
        import pkcs11

        _ONE_AT_A_TIME.acquire()
        self._holding = True
        try:
            before = os.environ.get(ADDRESS_ENV)
            os.environ[ADDRESS_ENV] = self.remote
            try:
                lib = pkcs11.lib(CLIENT_MODULE)
            finally:
                if before is None:
                    os.environ.pop(ADDRESS_ENV, None)
                else:
                    os.environ[ADDRESS_ENV] = before
            try:
                tokens = list(lib.get_tokens())
                if len(tokens) != 1:
                    raise IntegrityError(
                        f"{self.appliance}: the PKCS#11 service shows {len(tokens)} tokens; "
                        "the device exposes exactly the customer token"
                    )
                self._operation = "login"
                self._session = tokens[0].open(user_pin=self.pin.reveal(), rw=True)
            except pkcs11.PKCS11Error as exc:
                raise translate(exc, self.appliance, self._operation) from exc
        except BaseException:
            self._unload()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._unload()

    def _unload(self) -> None:
        import pkcs11

        try:
            self._domain = None
            if self._session is not None:
                with contextlib.suppress(pkcs11.PKCS11Error):
                    self._session.close()
                self._session = None
            pkcs11.unload(CLIENT_MODULE)
        finally:
            if self._holding:
                self._holding = False
                _ONE_AT_A_TIME.release()

    # -- operations -------------------------------------------------------------------------

    def _keys(self, label: str | None = None) -> list[Any]:
        from pkcs11 import Attribute, ObjectClass

        found: list[Any] = []
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.SECRET_KEY):
            template: dict[Any, Any] = {Attribute.CLASS: cls}
            if label is not None:
                template[Attribute.LABEL] = label
            found.extend(self._session.get_objects(template))
        return found

    def _row(self, obj: Any) -> KeyRow | None:
        from pkcs11 import Attribute, KeyType

        kinds = {KeyType.RSA: Kind.RSA, KeyType.EC: Kind.EC, KeyType.AES: Kind.AES}
        kind = kinds.get(_attr(obj, Attribute.KEY_TYPE))
        if kind is None:
            return None
        return row(
            kind,
            str(_attr(obj, Attribute.LABEL) or ""),
            bytes(_attr(obj, Attribute.ID) or b""),
            modulus=_attr(obj, Attribute.MODULUS) if kind is Kind.RSA else None,
            ec_params=_attr(obj, Attribute.EC_PARAMS) if kind is Kind.EC else None,
            value_len=_attr(obj, Attribute.VALUE_LEN) if kind is Kind.AES else None,
            local=_attr(obj, Attribute.LOCAL),
            extractable=_attr(obj, Attribute.EXTRACTABLE),
            sensitive=_attr(obj, Attribute.SENSITIVE),
        )

    def keys(self, label: str | None = None) -> list[KeyRow]:
        import pkcs11

        self._operation = "list"
        try:
            rows = []
            recorded: dict[tuple[str, str], int] | None = None
            for obj in self._keys(label):
                r = self._row(obj)
                if r is not None and r.type == "aes" and r.size is None:
                    r = dataclasses.replace(r, size=self._wrapped_size(obj))
                if r is not None and r.type == "aes" and r.size is None:
                    if recorded is None:
                        recorded = self.recorded_sizes(label)
                    r = dataclasses.replace(r, size=recorded.get((r.label, r.id)))
                rows.append(r)
        except pkcs11.PKCS11Error as exc:
            raise translate(exc, self.appliance, "list") from exc
        return sorted((r for r in rows if r is not None), key=lambda r: (r.label, r.id))

    def _wrapped_size(self, obj: Any) -> int | None:
        """The bits of an AES key whose CKA_VALUE_LEN reads 0: SoftHSM 2.6.1 records none
        for an unwrapped key and refuses one at unwrap, set and copy (read-only). A key
        the domain key may wrap (restored, copied by ha sync) tells it that way: AES key
        wrap with padding adds 8 bytes to 16/24/32. Others (an imported key is never
        extractable) stay None. The wrap is an ordinary use of the domain key, counted in
        the session's operations; the blob is dropped."""
        import pkcs11
        from pkcs11 import Attribute, Mechanism, ObjectClass

        from hsmctl.appliance import domainkey

        if not (_attr(obj, Attribute.EXTRACTABLE) and _attr(obj, Attribute.WRAP_WITH_TRUSTED)):
            return None
        if self._domain is None:
            self._domain = list(self._session.get_objects({
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TRUSTED: True,
                Attribute.LABEL: domainkey.LABEL}))  # fmt: skip
        if not self._domain:
            return None
        try:
            blob = self._domain[0].wrap_key(obj, mechanism=Mechanism(0x400))  # KWP (domain.py)
        except pkcs11.PKCS11Error:
            return None
        size = (len(bytes(blob)) - 8) * 8
        return size if size in (128, 192, 256) else None

    # -- the size of an AES key SoftHSM does not tell -------------------------------------
    #
    # A key that is neither generated here nor wrappable by the domain key (a BYOK import:
    # never extractable) has no CKA_VALUE_LEN on SoftHSM 2.6.1 and no way to learn it by
    # use. Its importer records the size beside it on the token: a private CKO_DATA object
    # (CKA_APPLICATION ``SIZE_APPLICATION``, the key's label, value ``ID-HEX BITS``), which
    # every kit of the token reads, which ``destroy`` removes with the key, and which
    # backup and ha sync leave alone (they copy key objects only).

    def record_size(self, label: str, key_id: bytes, bits: int) -> None:
        import pkcs11
        from pkcs11 import Attribute, ObjectClass

        try:
            self._session.create_object({
                Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True,
                Attribute.PRIVATE: True, Attribute.LABEL: label,
                Attribute.APPLICATION: SIZE_APPLICATION,
                Attribute.VALUE: size_record(key_id, bits)})  # fmt: skip
        except pkcs11.PKCS11Error as exc:
            raise translate(exc, self.appliance, "import") from exc

    def _size_records(self, label: str | None) -> list[Any]:
        from pkcs11 import Attribute, ObjectClass

        template: dict[Any, Any] = {Attribute.CLASS: ObjectClass.DATA,
                                    Attribute.APPLICATION: SIZE_APPLICATION}  # fmt: skip
        if label is not None:
            template[Attribute.LABEL] = label
        return list(self._session.get_objects(template))

    def recorded_sizes(self, label: str | None = None) -> dict[tuple[str, str], int]:
        """(label, id hex) -> bits, from the size records on the token."""
        from pkcs11 import Attribute

        found: dict[tuple[str, str], int] = {}
        for obj in self._size_records(label):
            parsed = parse_size_record(bytes(_attr(obj, Attribute.VALUE) or b""))
            if parsed is not None:
                found[(str(_attr(obj, Attribute.LABEL) or ""), parsed[0])] = parsed[1]
        return found

    def generate(self, spec: KeySpec, label: str, key_id: bytes) -> KeyRow:
        """Make the key on the device: private/secret halves sensitive and never
        extractable, asked for explicitly (the device would add them anyway)."""
        import pkcs11
        from pkcs11 import Attribute, KeyType
        from pkcs11.util.ec import encode_named_curve_parameters

        operation = f"generate-{spec.kind}"
        hold = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}
        session = self._session
        try:
            if spec.kind is Kind.RSA:
                session.generate_keypair(KeyType.RSA, spec.bits, id=key_id, label=label,
                                         store=True, private_template=hold)  # fmt: skip
            elif spec.kind is Kind.EC:
                assert spec.curve is not None
                params = session.create_domain_parameters(
                    KeyType.EC,
                    {Attribute.EC_PARAMS: encode_named_curve_parameters(spec.curve)},
                    local=True,
                )
                params.generate_keypair(id=key_id, label=label, store=True,
                                        private_template=hold)  # fmt: skip
            else:
                session.generate_key(KeyType.AES, spec.bits, id=key_id, label=label,
                                     store=True, template=hold)  # fmt: skip
            made = [r for r in self.keys(label) if r.id == key_id.hex()]
        except pkcs11.PKCS11Error as exc:
            raise translate(exc, self.appliance, operation) from exc
        if len(made) != 1:
            raise IntegrityError(f"{self.appliance}: the key {label!r} is not there after "
                                 "it was generated")  # fmt: skip
        return made[0]

    def destroy(self, label: str) -> list[KeyRow]:
        """Destroy the one private or secret key labelled ``label`` and the public key of
        its pair (same label and id)."""
        import pkcs11
        from pkcs11 import Attribute, ObjectClass

        try:
            keys = self._keys(label)
            rows = [r for r in (self._row(k) for k in keys) if r is not None]
            if not keys:
                raise UsageError(f"{self.appliance}: no key labelled {label!r}; nothing changed")
            if len(keys) > 1:
                ids = ", ".join(sorted(r.id for r in rows))
                raise UsageError(f"{self.appliance}: {len(keys)} keys are labelled {label!r} "
                                 f"(ids {ids}); nothing changed")  # fmt: skip
            key_id = _attr(keys[0], Attribute.ID)
            publics = list(self._session.get_objects(
                {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: label}))  # fmt: skip
            records = [o for o in self._size_records(label)
                       if (parse_size_record(bytes(_attr(o, Attribute.VALUE) or b""))
                           or ("", 0))[0] == bytes(key_id or b"").hex()]  # fmt: skip
            keys[0].destroy()
            for pub in publics:
                if _attr(pub, Attribute.ID) == key_id:
                    pub.destroy()
            for record in records:
                record.destroy()
        except pkcs11.PKCS11Error as exc:
            raise translate(exc, self.appliance, "destroy") from exc
        return rows
