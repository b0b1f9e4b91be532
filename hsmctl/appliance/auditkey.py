"""The device's audit signing key: its token PINs, its generations, its signer.

The audit token's PINs are device-internal secrets kept root-only in
``/var/lib/hsm/state/audit-token.json``; nobody outside the daemon ever needs them.
Every generation's public key is remembered (key id -> PEM) so ``audit verify`` on the
device can check the whole log, rotations included.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from hsmctl import auditlog
from hsmctl.appliance import paths, store, token


def _load() -> dict[str, Any]:
    data: dict[str, Any] = store.read_json(paths.AUDIT_TOKEN_SECRETS, {})
    return data


def initialise(device_id: str) -> str:
    """Create the audit token and key ``audit-1`` if absent; return its public PEM."""
    state = _load()
    if not state:
        state = {
            "so_pin": secrets.token_urlsafe(24),
            "user_pin": secrets.token_urlsafe(24),
            "device": device_id,
            "keys": {},
            "current": None,
        }
        store.write_json(paths.AUDIT_TOKEN_SECRETS, state)
    token.audit_ensure_token(state["so_pin"], state["user_pin"])
    if not state.get("current"):
        existing = token.audit_list_keys(state["user_pin"])
        key = existing[-1] if existing else token.audit_generate_key(state["user_pin"])
        pem = token.audit_public_key_pem(key.label)
        state["keys"][key.label] = pem
        state["current"] = key.label
        store.write_json(paths.AUDIT_TOKEN_SECRETS, state)
    return str(state["keys"][state["current"]])


def key_id(pem: str) -> str:
    return auditlog.key_id_for_pem(pem)


class DeviceSigner:
    """A :class:`chain.Signer` backed by one audit key generation in the token."""

    def __init__(self, signer: token.AuditSigner, label: str, pem: str) -> None:
        self._signer = signer
        self.label = label
        self.public_key_pem = pem
        self.key_id = key_id(pem)

    def sign_digest(self, digest: bytes) -> bytes:
        return self._signer.sign_digest(self.label, digest)


class AuditKeys:
    """The daemon's handle on the audit key (lifecycle: open at start, close at exit)."""

    def __init__(self) -> None:
        self.state = _load()
        if not self.state.get("current"):
            raise RuntimeError("the device is not personalised (no audit key)")
        self.signer = token.AuditSigner(self.state["user_pin"])

    @property
    def device(self) -> str:
        return str(self.state["device"])

    def current(self) -> DeviceSigner:
        label = str(self.state["current"])
        return DeviceSigner(self.signer, label, str(self.state["keys"][label]))

    def trusted(self) -> dict[str, str]:
        """key id -> PEM of every generation (for verifying the device's own log)."""
        return {key_id(pem): pem for pem in self.state["keys"].values()}

    def rotate(self) -> tuple[DeviceSigner, DeviceSigner]:
        """Make the next generation; returns (old, new). The caller logs the rotation
        record signed by both, then calls :meth:`retire`."""
        old = self.current()
        new_key = token.audit_generate_key(self.state["user_pin"])
        pem = token.audit_public_key_pem(new_key.label)
        new = DeviceSigner(self.signer, new_key.label, pem)
        return old, new

    def commit(self, new: DeviceSigner) -> None:
        self.state["keys"][new.label] = new.public_key_pem
        old_label = self.state["current"]
        self.state["current"] = new.label
        store.write_json(paths.AUDIT_TOKEN_SECRETS, self.state)
        token.audit_destroy_private_key(self.state["user_pin"], old_label)

    def close(self) -> None:
        self.signer.close()


def key_digest(pem: str) -> str:
    """``SHA256:`` + hex SHA-256 of the PEM text: a digest of this file's text, not an
    OpenSSH fingerprint (those are :func:`hsmctl.sshkeys.fingerprint`) nor a key id."""
    return "SHA256:" + hashlib.sha256(pem.encode()).hexdigest()
