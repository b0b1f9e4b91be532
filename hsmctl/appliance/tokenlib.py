"""The PyKCS11 plumbing both tokens share (see :mod:`token` for the design): the
errors and their one translation from ``PyKCS11Error``, PIN and label checks, the
per-process library, slots and sessions; a token's status."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import PyKCS11

from hsmctl.appliance import tokenlock
from hsmctl.errors import ConflictError, HsmctlError, UsageError
from hsmctl.secret import Secret

DEFAULT_LIB = "/usr/lib/softhsm/libsofthsm2.so"
AUDIT_LABEL = "hsm-audit"
AUDIT_KEY_PREFIX = "audit-"
LABEL_BYTES = 32  # CK_TOKEN_INFO.label
PIN_MIN, PIN_MAX = 4, 255  # SoftHSM2's ulMinPinLen / ulMaxPinLen
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
    domain: str | None = None  # the cloning domain's fingerprint (hex), None when unset

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
            domain=str(data["domain"]) if data.get("domain") else None,
        )


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

LOCK = threading.RLock()  # SoftHSM is initialised without locking args: serialise calls
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
    Hold ``LOCK`` around calls made with it, and the token store's lock
    (:mod:`tokenlock`: shared to read, exclusive to write)."""
    with LOCK:
        entry = _LOADED.get(lib_path)
        if entry is None:
            lib = PyKCS11.PyKCS11Lib()
            with pkcs11_errors(f"loading {lib_path}"), tokenlock.shared():
                lib.load(lib_path)  # C_Initialize reads every token's files
            entry = _LOADED[lib_path] = [lib, 0]
        entry[1] += 1
    try:
        yield entry[0]
    finally:
        with LOCK:
            entry[1] -= 1
            if entry[1] == 0:
                del _LOADED[lib_path]
                with contextlib.suppress(PyKCS11.PyKCS11Error), tokenlock.shared():
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
