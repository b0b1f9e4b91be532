"""The audit token (label ``hsm-audit``): its signing keys, managed through the helper,
and :class:`AuditSigner`, the one user of the library in the daemon's own process."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import PyKCS11

from hsmctl.appliance import tokenlock
from hsmctl.appliance.tokenhelper import call_helper
from hsmctl.appliance.tokenlib import (
    DEFAULT_LIB,
    LOCK,
    PinLike,
    TokenError,
    TokenStateError,
    TokenStatus,
    close_session,
    ec_public_pem,
    find_audit,
    list_slots,
    open_session,
    pkcs11_errors,
    reveal_pin,
    shared_library,
    translate,
)
from hsmctl.errors import UsageError
from hsmctl.secret import Secret

DIGEST_BYTES = 32
SIGNATURE_BYTES = 64


@dataclass(frozen=True)
class AuditKey:
    label: str  # "audit-3"; also its CKA_ID
    generation: int  # 3
    has_private: bool  # False once the private half was destroyed after rotation

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditKey:
        return cls(str(data["label"]), int(data["generation"]), bool(data["has_private"]))


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
            with LOCK, tokenlock.shared():
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
            with pkcs11_errors("audit token login"), tokenlock.exclusive():
                session.login(self._pin.reveal())  # rewrites the token's token.object
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
        with LOCK, tokenlock.shared():
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
        with LOCK, tokenlock.shared():
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
        with LOCK:
            if self._lib is None:
                return
            session, self._session = self._session, None
            self._keys.clear()
            self._lib = None
            if session is not None:
                with tokenlock.shared():
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
