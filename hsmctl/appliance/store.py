"""The daemon's small root-only state files (JSON, written atomically and fsynced)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hsmctl import privatefiles
from hsmctl.appliance import paths
from hsmctl.appliance.roles import DeviceState
from hsmctl.contract import OwnerState


def write_json(path: Path, data: Any, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    privatefiles.write_atomic(path, text.encode(), mode=mode)


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


class OwnershipError(Exception):
    """A write that would undo the ownership transfer; the message is safe to show."""


def customer_owned_fact() -> bool:
    """The one-way fact: once written by the admin's first ``user password``, only the
    out-of-band factory reset (:func:`clear_ownership`) removes it. No ``owner.json``
    write can clear it, whatever that file says."""
    return paths.OWNED.exists()


def record_ownership(when: float) -> None:
    """Write the one-way fact, fsynced, before anything else of the transfer happens."""
    if paths.OWNED.exists():
        return
    write_json(paths.OWNED, {"since": when})


def clear_ownership() -> None:
    """Only for the out-of-band factory reset: the device goes back to the factory."""
    paths.OWNED.unlink(missing_ok=True)
    privatefiles.fsync_dir(paths.OWNED.parent)


def shadow_hash(user: str) -> str | None:
    """A digest of ``user``'s password hash in /etc/shadow (None: no such entry).

    The first password change is recognised by the hash moving away from the one-time
    password's, so a crash between ``chpasswd`` and the save of ``otp_changed`` cannot
    leave the customer's new password working while the device still asks for a change.
    """
    try:
        text = paths.SHADOW.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split(":")
        if fields[0] == user and len(fields) > 1:
            return hashlib.sha256(fields[1].encode()).hexdigest()
    return None


@dataclass
class Owner:
    """Who owns the device; the provider's powers follow from this alone.

    ``state`` is CUSTOMER_OWNED from the instant the admin's first ``user password``
    starts (the one-way fact on disk, provider locked), and ``otp_changed`` becomes true
    once the new password is in place. In between (a crash mid-change) the provider is
    already out and the admin may only finish the change, with the one-time password,
    which then never expires: nobody could issue another one.
    """

    state: OwnerState = OwnerState.FACTORY
    otp_expires: float | None = None
    provider_access: bool = True
    owned_since: float | None = None
    otp_changed: bool = False
    otp_hash: str | None = None  # shadow_hash("admin") right after ``user otp set``
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls) -> Owner:
        raw = read_json(paths.OWNER, {})
        owner = (
            cls()
            if not raw
            else cls(
                state=OwnerState(raw["state"]),
                otp_expires=raw.get("otp_expires"),
                provider_access=bool(raw.get("provider_access", True)),
                owned_since=raw.get("owned_since"),
                otp_changed=bool(raw.get("otp_changed", False)),
                otp_hash=raw.get("otp_hash"),
                history=list(raw.get("history", [])),
            )
        )
        if customer_owned_fact():
            owner.state = OwnerState.CUSTOMER_OWNED
            owner.provider_access = False
            owner.otp_expires = None
            if not owner.otp_changed and owner.otp_hash is not None:
                current = shadow_hash("admin")
                owner.otp_changed = current is not None and current != owner.otp_hash
        return owner

    def save(self) -> None:
        if customer_owned_fact() and self.state is not OwnerState.CUSTOMER_OWNED:
            raise OwnershipError("the device is customer-owned; only a factory reset undoes it")
        data = asdict(self)
        data["state"] = self.state.value
        write_json(paths.OWNER, data)

    @property
    def customer_owned(self) -> bool:
        return self.state is OwnerState.CUSTOMER_OWNED

    def device_state(self) -> DeviceState:
        return DeviceState(self.state, self.customer_owned and self.otp_changed)

    @property
    def otp_expired(self) -> bool:
        return (
            self.state is OwnerState.PROVISIONED
            and self.otp_expires is not None
            and time.time() > self.otp_expires
        )
