"""The appliance's two PKCS#11 tokens (SoftHSM2): the audit token and the customer token.

Both are found by label, never by slot id (SoftHSM renumbers slots per process and keeps
one uninitialised slot spare). The **audit token** (label ``hsm-audit``) is made at
personalisation and holds the activity-log signing keys ``audit-1``, ``audit-2``, ...
(EC P-256, non-extractable); its PINs are device-internal secrets the daemon keeps. The
**customer token** is the one initialised token that is not the audit token, or the spare
uninitialised slot when there is none; ``hsm init``/``hsm zeroize`` only ever touch it,
and the audit label is refused as a customer label, so the two cannot be confused.

Process and library lifetime (the design)
-----------------------------------------
SoftHSM reads its token directory once, at ``C_Initialize``: a process that keeps the
library loaded does not see tokens that another process or ``softhsm2-util`` creates or
deletes later. It does see new or destroyed *objects* in tokens it already knows (each
token is re-indexed when its generation file changes). Hence:

* Every management operation (customer: status, init, PINs, zeroize; audit: create,
  keygen, list, export, destroy) runs in a fresh library context, a short-lived child
  ``python3 -m hsmctl.appliance.tokencli OP`` that reads its arguments, PINs included,
  as JSON on stdin (never argv) and answers with JSON on stdout (0.1-0.2 s each).
  Its view is always current and nothing it does can disturb the daemon's library.
* Only :class:`AuditSigner` keeps the library in the calling process, with one logged-in
  session, because checkpoints are signed often. It touches the audit token only, whose
  objects stay visible, so a stale slot list does not matter to it. The library is loaded
  when the first signer opens and finalised when the last one closes (PyKCS11 1.5.12 has
  no per-instance reference count), so a signer opened later gets a fresh view.

Zeroize is the out-of-band factory reset: ``softhsm2-util --delete-token --serial`` (no
PIN), after which SoftHSM shows the spare uninitialised slot and a new init works.
``customer_status().objects`` counts the objects visible without login (public ones):
the daemon holds no customer PIN. SoftHSM never locks a PIN; a token that does
(``CKR_PIN_LOCKED``) gives :class:`TokenLockedError`.

Errors: ``PyKCS11Error`` is translated here and nowhere else (``raise ... from exc``)::

    HsmctlError
    └── TokenError (1)                      any other PKCS#11 failure; detail["ckr"]
        ├── TokenAuthError (1)              wrong PIN
        ├── TokenPinError (2, UsageError)   PIN length out of 4..255 or otherwise invalid
        ├── TokenLockedError (2, UsageError) PIN locked
        └── TokenStateError (5, ConflictError) token absent/ambiguous, PIN not set, busy

No message or detail ever holds a PIN.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import PyKCS11

from hsmctl import errors
from hsmctl.errors import CommandFailed, ConflictError, HsmctlError, UsageError
from hsmctl.secret import Secret

DEFAULT_LIB = "/usr/lib/softhsm/libsofthsm2.so"
AUDIT_LABEL = "hsm-audit"
AUDIT_KEY_PREFIX = "audit-"
LABEL_BYTES = 32  # CK_TOKEN_INFO.label
PIN_MIN, PIN_MAX = 4, 255  # SoftHSM2's ulMinPinLen / ulMaxPinLen
DIGEST_BYTES = 32
SIGNATURE_BYTES = 64
HELPER_TIMEOUT = 120.0
# DER of the OID prime256v1 / secp256r1, the CKA_EC_PARAMS of every audit key.
P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")

PinLike = Secret | str


class TokenError(HsmctlError):
    """A PKCS#11 operation failed."""


class TokenAuthError(TokenError):
    """Wrong PIN."""


class TokenPinError(TokenError, UsageError):
    """PIN malformed (length outside 4..255 bytes)."""


class TokenLockedError(TokenError, UsageError):
    """PIN locked by the token."""


class TokenStateError(TokenError, ConflictError):
    """The token is not in a state that allows the operation."""


@dataclass(frozen=True)
class TokenStatus:
    label: str  # "" when not initialised
    serial: str  # "" when not initialised
    initialised: bool
    objects: int  # objects visible without login (public ones)
    co_pin_set: bool  # CKF_USER_PIN_INITIALIZED
    firmware: str  # SoftHSM version, e.g. "2.6"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenStatus:
        return cls(
            label=str(data["label"]),
            serial=str(data["serial"]),
            initialised=bool(data["initialised"]),
            objects=int(data["objects"]),
            co_pin_set=bool(data["co_pin_set"]),
            firmware=str(data["firmware"]),
        )


@dataclass(frozen=True)
class AuditKey:
    label: str  # "audit-3"; also its CKA_ID
    generation: int  # 3
    has_private: bool  # False once the private half was destroyed after rotation

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditKey:
        return cls(str(data["label"]), int(data["generation"]), bool(data["has_private"]))


# --- validation ---------------------------------------------------------------------


def reveal_pin(pin: PinLike, what: str = "PIN") -> str:
    """The PIN's text, checked for SoftHSM's length limits (bytes, UTF-8)."""
    value = pin.reveal() if isinstance(pin, Secret) else pin
    if not isinstance(value, str):
        raise TokenPinError(f"{what} must be text")
    if not PIN_MIN <= len(value.encode("utf-8")) <= PIN_MAX:
        raise TokenPinError(f"{what} must be {PIN_MIN} to {PIN_MAX} bytes long")
    return value


def check_customer_label(label: str) -> str:
    """A customer token label: 1..32 bytes, printable, no edge blanks, not the audit one."""
    if not isinstance(label, str) or not label:
        raise UsageError("token label must not be empty")
    if label != label.strip() or not label.isprintable():
        raise UsageError("token label must be printable without leading/trailing blanks")
    if len(label.encode("utf-8")) > LABEL_BYTES:
        raise UsageError(f"token label must be at most {LABEL_BYTES} bytes")
    if label.casefold() == AUDIT_LABEL.casefold():
        raise UsageError(f"token label {label!r} is reserved for the audit token")
    return label


def padded_label(label: str) -> str:
    """CK_TOKEN_INFO labels are blank-padded to 32 bytes (PyKCS11 does not pad)."""
    return label + " " * (LABEL_BYTES - len(label.encode("utf-8")))


def key_generation(label: str) -> int | None:
    m = re.fullmatch(re.escape(AUDIT_KEY_PREFIX) + r"([1-9][0-9]*)", label)
    return int(m.group(1)) if m else None


# --- PKCS#11 error translation --------------------------------------------------------


def ckr_name(code: int) -> str:
    name = PyKCS11.CKR.get(code)
    return name if isinstance(name, str) else f"CKR_0x{code & 0xFFFFFFFF:08X}"


def translate(exc: PyKCS11.PyKCS11Error, what: str) -> TokenError:
    """The one map from a PKCS#11 return code to an hsmctl error."""
    code = int(exc.value)
    name = ckr_name(code)
    detail: dict[str, object] = {"ckr": name}
    if code == PyKCS11.CKR_PIN_INCORRECT:
        return TokenAuthError(f"{what}: wrong PIN", detail=detail)
    if code == PyKCS11.CKR_PIN_LOCKED:
        return TokenLockedError(f"{what}: PIN locked", detail=detail)
    if code in (PyKCS11.CKR_PIN_LEN_RANGE, PyKCS11.CKR_PIN_INVALID):
        return TokenPinError(f"{what}: PIN rejected by the token ({name})", detail=detail)
    if code == PyKCS11.CKR_USER_PIN_NOT_INITIALIZED:
        return TokenStateError(f"{what}: the user (CO) PIN is not set", detail=detail)
    if code in (
        PyKCS11.CKR_SESSION_EXISTS,
        PyKCS11.CKR_SESSION_READ_ONLY_EXISTS,
        PyKCS11.CKR_USER_ANOTHER_ALREADY_LOGGED_IN,
        PyKCS11.CKR_TOKEN_NOT_PRESENT,
        PyKCS11.CKR_TOKEN_NOT_RECOGNIZED,
        PyKCS11.CKR_DEVICE_REMOVED,
        PyKCS11.CKR_SLOT_ID_INVALID,
    ):
        return TokenStateError(f"{what}: token busy or absent ({name})", detail=detail)
    return TokenError(f"{what}: {name}", detail=detail)


@contextlib.contextmanager
def pkcs11_errors(what: str) -> Iterator[None]:
    try:
        yield
    except PyKCS11.PyKCS11Error as exc:
        raise translate(exc, what) from exc


# --- the per-process library ----------------------------------------------------------

_LOCK = threading.RLock()  # SoftHSM is initialised without locking args: serialise calls
_LOADED: dict[str, list[Any]] = {}  # lib path -> [PyKCS11Lib, users]


def _unload(lib: Any) -> None:
    if hasattr(lib, "unload"):  # PyKCS11 >= 1.5.13 counts users itself
        lib.unload()
    else:  # 1.5.12: C_Finalize + dlclose
        lib.lib.Unload()


@contextlib.contextmanager
def shared_library(lib_path: str = DEFAULT_LIB) -> Iterator[Any]:
    """This process's one PyKCS11 library, loaded (C_Initialize) by its first user and
    finalised by its last, so nobody finalises it under a live :class:`AuditSigner`.
    Hold ``_LOCK`` around calls made with it."""
    with _LOCK:
        entry = _LOADED.get(lib_path)
        if entry is None:
            lib = PyKCS11.PyKCS11Lib()
            with pkcs11_errors(f"loading {lib_path}"):
                lib.load(lib_path)
            entry = _LOADED[lib_path] = [lib, 0]
        entry[1] += 1
    try:
        yield entry[0]
    finally:
        with _LOCK:
            entry[1] -= 1
            if entry[1] == 0:
                del _LOADED[lib_path]
                with contextlib.suppress(PyKCS11.PyKCS11Error):
                    _unload(entry[0])


@dataclass(frozen=True)
class Slot:
    slot: int
    label: str
    serial: str
    flags: int
    firmware: str

    @property
    def initialised(self) -> bool:
        return bool(self.flags & PyKCS11.CKF_TOKEN_INITIALIZED)

    @property
    def user_pin_set(self) -> bool:
        return bool(self.flags & PyKCS11.CKF_USER_PIN_INITIALIZED)


def list_slots(lib: Any) -> list[Slot]:
    out = []
    with pkcs11_errors("listing tokens"):
        for slot in lib.getSlotList(tokenPresent=True):
            info = lib.getTokenInfo(slot)
            major, minor = info.firmwareVersion
            out.append(
                Slot(
                    slot=int(slot),
                    label=str(info.label).rstrip("\x00 "),
                    serial=str(info.serialNumber).rstrip("\x00 "),
                    flags=int(info.flags),
                    firmware=f"{major}.{minor}",
                )
            )
    return out


def find_audit(slots: list[Slot]) -> Slot | None:
    found = [s for s in slots if s.initialised and s.label == AUDIT_LABEL]
    if len(found) > 1:
        serials = ", ".join(s.serial for s in found)
        raise TokenStateError(f"more than one audit token ({serials})")
    return found[0] if found else None


def find_customer(slots: list[Slot]) -> Slot | None:
    """The initialised token that is not the audit token; None when there is none."""
    found = [s for s in slots if s.initialised and s.label != AUDIT_LABEL]
    if len(found) > 1:
        serials = ", ".join(s.serial for s in found)
        raise TokenStateError(f"more than one customer token ({serials})")
    return found[0] if found else None


def find_free(slots: list[Slot]) -> Slot:
    for s in slots:
        if not s.initialised:
            return s
    raise TokenStateError("no uninitialised slot")


def open_session(lib: Any, slot: Slot, what: str) -> Any:
    # Always read-write: a read-only session left by a failed login blocks SO login.
    with pkcs11_errors(what):
        return lib.openSession(slot.slot, PyKCS11.CKF_RW_SESSION)


def close_session(session: Any) -> None:
    with contextlib.suppress(PyKCS11.PyKCS11Error):
        session.closeSession()


def ec_public_pem(ec_params: bytes, ec_point: bytes) -> str:
    """SubjectPublicKeyInfo PEM from CKA_EC_PARAMS and CKA_EC_POINT (P-256 only)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if ec_params != P256_PARAMS:
        raise TokenError("audit key is not on P-256", detail={"ec_params": ec_params.hex()})
    point = ec_point
    if len(point) == 67 and point[:2] == b"\x04\x41":  # DER OCTET STRING around the point
        point = point[2:]
    if len(point) != 65 or point[0] != 0x04:
        raise TokenError("audit key has a malformed CKA_EC_POINT")
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode("ascii")


# --- the helper process -----------------------------------------------------------------

_HELPER_LOCK = threading.Lock()  # one management operation at a time per process


def _error_types() -> dict[str, type[HsmctlError]]:
    found: list[type[HsmctlError]] = [
        TokenError,
        TokenAuthError,
        TokenPinError,
        TokenLockedError,
        TokenStateError,
    ]
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, HsmctlError):
            found.append(value)
    return {cls.__name__: cls for cls in found}


_ERROR_TYPES = _error_types()


def error_to_json(exc: HsmctlError) -> dict[str, object]:
    out: dict[str, object] = {"type": type(exc).__name__, "message": exc.message}
    if isinstance(exc, CommandFailed):
        out.update(argv=exc.argv, status=exc.status, output=exc.output_tail)
    else:
        out["detail"] = exc.detail
    return out


def error_from_json(data: Mapping[str, Any]) -> HsmctlError:
    cls = _ERROR_TYPES.get(str(data.get("type")), TokenError)
    message = str(data.get("message", "token operation failed"))
    if issubclass(cls, CommandFailed):
        return cls(
            message,
            argv=[str(a) for a in data.get("argv", [])],
            status=data.get("status"),
            output=str(data.get("output", "")),
        )
    detail = data.get("detail")
    return cls(message, detail=dict(detail) if isinstance(detail, dict) else None)


def _helper_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the directory holding hsmctl/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def call_helper(op: str, args: Mapping[str, Any], lib_path: str) -> Any:
    """Run one operation in a fresh process and library; PINs travel on stdin only."""
    argv = [sys.executable or "/usr/bin/python3", "-m", "hsmctl.appliance.tokencli", op]
    request = json.dumps({"lib": lib_path, "args": dict(args)})
    with _HELPER_LOCK:
        try:
            proc = subprocess.run(
                argv,
                input=request,
                capture_output=True,
                text=True,
                env=_helper_env(),
                timeout=HELPER_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TokenError(f"token helper {op}: {type(exc).__name__}") from exc
    try:
        reply = json.loads(proc.stdout)
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or ("result" not in reply and "error" not in reply):
        raise CommandFailed(
            f"token helper {op} failed", argv=argv, status=proc.returncode, output=proc.stderr
        )
    if "error" in reply:
        raise error_from_json(reply["error"])
    return reply["result"]


# --- audit token ----------------------------------------------------------------------


def audit_ensure_token(
    so_pin: PinLike, user_pin: PinLike, *, lib_path: str = DEFAULT_LIB
) -> TokenStatus:
    """Create the audit token if absent (C_InitToken on the spare slot, then C_InitPIN);
    finish a half-made one; check the user PIN of an existing one."""
    args = {"so_pin": reveal_pin(so_pin, "SO PIN"), "user_pin": reveal_pin(user_pin)}
    return TokenStatus.from_dict(call_helper("audit_ensure", args, lib_path))


def audit_generate_key(user_pin: PinLike, *, lib_path: str = DEFAULT_LIB) -> AuditKey:
    """Make the next key generation ``audit-N`` (EC P-256, non-extractable, token objects)."""
    args = {"user_pin": reveal_pin(user_pin)}
    return AuditKey.from_dict(call_helper("audit_generate", args, lib_path))


def audit_list_keys(user_pin: PinLike, *, lib_path: str = DEFAULT_LIB) -> list[AuditKey]:
    """All key generations, oldest first, including those whose private half is gone."""
    args = {"user_pin": reveal_pin(user_pin)}
    return [AuditKey.from_dict(k) for k in call_helper("audit_list", args, lib_path)]


def audit_public_key_pem(key_label: str, *, lib_path: str = DEFAULT_LIB) -> str:
    """The public key of one generation as SubjectPublicKeyInfo PEM (no PIN needed)."""
    result = call_helper("audit_public", {"label": key_label}, lib_path)
    return ec_public_pem(bytes.fromhex(result["ec_params"]), bytes.fromhex(result["ec_point"]))


def audit_destroy_private_key(
    user_pin: PinLike, key_label: str, *, lib_path: str = DEFAULT_LIB
) -> None:
    """Destroy an old generation's private key after rotation; its public key stays so old
    checkpoints still verify. The newest private key is refused (TokenStateError)."""
    call_helper("audit_destroy", {"user_pin": reveal_pin(user_pin), "label": key_label}, lib_path)


class AuditSigner:
    """A long-lived logged-in session on the audit token, for the daemon.

    Lifecycle: ``AuditSigner(user_pin)`` loads the library (if this process has not),
    finds the audit token by label, opens a session and logs in; ``sign_digest`` and
    ``public_key_pem`` may then be called any number of times, from any thread;
    ``close()`` (or leaving a ``with`` block) logs out, closes the session and, for the
    last user, finalises the library. A session lost under it is reopened once.
    """

    def __init__(self, user_pin: PinLike, *, lib_path: str = DEFAULT_LIB) -> None:
        self._pin = Secret(reveal_pin(user_pin))
        self._lib_path = lib_path
        self._keys: dict[str, Any] = {}
        self._session: Any = None
        self._cm = shared_library(lib_path)
        self._lib = self._cm.__enter__()
        try:
            with _LOCK:
                audit = find_audit(list_slots(self._lib))
                if audit is None:
                    raise TokenStateError("the audit token does not exist")
                self._slot = audit
                self._login()
        except BaseException:
            self._cm.__exit__(None, None, None)
            raise

    def __enter__(self) -> AuditSigner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._lib is None

    def _login(self) -> None:
        session = open_session(self._lib, self._slot, "opening the audit token")
        try:
            with pkcs11_errors("audit token login"):
                session.login(self._pin.reveal())
        except BaseException:
            close_session(session)
            raise
        self._session = session
        self._keys.clear()

    def _private_key(self, key_label: str) -> Any:
        handle = self._keys.get(key_label)
        if handle is None:
            with pkcs11_errors("finding the audit key"):
                found = self._session.findObjects(
                    [
                        (PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY),
                        (PyKCS11.CKA_LABEL, key_label),
                    ]
                )
            if len(found) != 1:
                raise TokenStateError(
                    f"audit key {key_label!r}: {len(found)} private keys found",
                    detail={"key": key_label},
                )
            handle = self._keys[key_label] = found[0]
        return handle

    def sign_digest(self, key_label: str, digest: bytes) -> bytes:
        """ECDSA (CKM_ECDSA) over a 32-byte digest: the raw 64-byte r||s."""
        if not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
            raise UsageError(f"the digest must be {DIGEST_BYTES} bytes")
        with _LOCK:
            if self._lib is None:
                raise TokenStateError("the audit signer is closed")
            for attempt in (1, 2):
                try:
                    key = self._private_key(key_label)
                    sig = bytes(
                        self._session.sign(key, digest, PyKCS11.Mechanism(PyKCS11.CKM_ECDSA))
                    )
                    break
                except PyKCS11.PyKCS11Error as exc:
                    if attempt == 2 or not self._recover(int(exc.value)):
                        raise translate(exc, f"signing with {key_label}") from exc
        if len(sig) != SIGNATURE_BYTES:
            raise TokenError(f"signing with {key_label}: {len(sig)}-byte signature")
        return sig

    def _recover(self, code: int) -> bool:
        """After a stale handle or a lost session: forget handles, maybe log in again."""
        if code in (PyKCS11.CKR_KEY_HANDLE_INVALID, PyKCS11.CKR_OBJECT_HANDLE_INVALID):
            self._keys.clear()
            return True
        if code in (
            PyKCS11.CKR_SESSION_HANDLE_INVALID,
            PyKCS11.CKR_SESSION_CLOSED,
            PyKCS11.CKR_USER_NOT_LOGGED_IN,
        ):
            close_session(self._session)
            self._login()
            return True
        return False

    def public_key_pem(self, key_label: str) -> str:
        """Like :func:`audit_public_key_pem`, through this session."""
        with _LOCK:
            if self._lib is None:
                raise TokenStateError("the audit signer is closed")
            with pkcs11_errors("reading the audit public key"):
                found = self._session.findObjects(
                    [
                        (PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY),
                        (PyKCS11.CKA_LABEL, key_label),
                    ]
                )
                if len(found) != 1:
                    raise TokenStateError(f"audit key {key_label!r}: no public key")
                params, point = self._session.getAttributeValue(
                    found[0], [PyKCS11.CKA_EC_PARAMS, PyKCS11.CKA_EC_POINT], True
                )
        return ec_public_pem(bytes(params), bytes(point))

    def close(self) -> None:
        with _LOCK:
            if self._lib is None:
                return
            session, self._session = self._session, None
            self._keys.clear()
            self._lib = None
            if session is not None:
                with contextlib.suppress(PyKCS11.PyKCS11Error):
                    session.logout()
                close_session(session)
            self._cm.__exit__(None, None, None)


def audit_sign_digest(
    user_pin: PinLike, key_label: str, digest: bytes, *, lib_path: str = DEFAULT_LIB
) -> bytes:
    """One-shot :meth:`AuditSigner.sign_digest` (opens and closes a signer)."""
    with AuditSigner(user_pin, lib_path=lib_path) as signer:
        return signer.sign_digest(key_label, digest)


# --- customer token -------------------------------------------------------------------


def customer_status(*, lib_path: str = DEFAULT_LIB) -> TokenStatus:
    """Label, serial, initialised, public object count, whether the CO PIN is set."""
    return TokenStatus.from_dict(call_helper("customer_status", {}, lib_path))


def customer_init(
    label: str,
    so_pin: PinLike,
    current_so_pin: PinLike | None = None,
    *,
    lib_path: str = DEFAULT_LIB,
) -> TokenStatus:
    """Wipe and (re)initialise the customer token with a new label and SO PIN.

    An initialised token needs its current SO PIN (C_InitToken checks it, then the SO PIN
    is changed to ``so_pin``); without it: TokenStateError, wrong: TokenAuthError, and in
    both cases nothing changes. The CO PIN is unset afterwards.
    """
    args: dict[str, object] = {
        "label": check_customer_label(label),
        "so_pin": reveal_pin(so_pin, "SO PIN"),
        "current_so_pin": (
            None if current_so_pin is None else reveal_pin(current_so_pin, "current SO PIN")
        ),
    }
    return TokenStatus.from_dict(call_helper("customer_init", args, lib_path))


def customer_set_co_pin(so_pin: PinLike, co_pin: PinLike, *, lib_path: str = DEFAULT_LIB) -> None:
    """Set (or reset) the crypto-officer PIN as SO (C_InitPIN)."""
    args = {"so_pin": reveal_pin(so_pin, "SO PIN"), "co_pin": reveal_pin(co_pin, "CO PIN")}
    call_helper("customer_set_co_pin", args, lib_path)


def customer_change_co_pin(old: PinLike, new: PinLike, *, lib_path: str = DEFAULT_LIB) -> None:
    """Change the crypto-officer PIN as the crypto officer (C_SetPIN)."""
    args = {"old": reveal_pin(old, "current CO PIN"), "new": reveal_pin(new, "new CO PIN")}
    call_helper("customer_change_co_pin", args, lib_path)


def customer_check_co_pin(pin: PinLike, *, lib_path: str = DEFAULT_LIB) -> bool:
    """Whether ``pin`` is the crypto-officer PIN (a login and logout)."""
    result = call_helper("customer_check_co_pin", {"pin": reveal_pin(pin, "CO PIN")}, lib_path)
    return bool(result["match"])


def customer_zeroize(*, lib_path: str = DEFAULT_LIB) -> TokenStatus:
    """Delete the customer token (objects and PINs) without any PIN; the audit token stays.
    Any stray second non-audit token goes too, so a factory reset always ends in one
    known state. Idempotent. Returns the status afterwards (uninitialised)."""
    call_helper("customer_zeroize", {}, lib_path)
    status = customer_status(lib_path=lib_path)
    if status.initialised:
        raise TokenError("customer token still initialised after zeroize")
    return status
