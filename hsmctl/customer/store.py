"""The customer's state directory: per-appliance pins, journals and the secret store.

Layout (all under ``state_dir``, 0700 directories, 0600 files)::

    appliances/ID/pins.json         data host keys, audit keys (pinned)
    appliances/ID/takeover.json     the takeover journal (keyed by bundle id)
    appliances/ID/receipt.json      the signed takeover receipt
    appliances/ID/secrets/NAME      escrowed secrets: admin password, SO/CO PIN, audit key
    appliances/ID/retired/TAG/NAME  the escrow of an earlier takeover of a re-provisioned
                                    appliance (moved aside, never deleted)
    appliances/ID/archive/          the verified activity-log archive (log collection)

Every write is atomic (temporary file, fsync, rename, fsync of the directory), so a
reader sees the old content or the new, and what was written before a crash is still
there after it. Secrets are written and fsynced *before* they are used.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsmctl.errors import UsageError
from hsmctl.privatefiles import fsync_dir, write_atomic
from hsmctl.secret import Secret

PINS = "pins.json"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, data)


class ApplianceDir:
    """One appliance's corner of the customer's state directory."""

    @classmethod
    def taken_over(cls, state_dir: Path, appliance: str) -> ApplianceDir | None:
        """The appliance's state if a takeover from ``state_dir`` pinned it (its
        ``pins.json`` exists), else None; creates nothing when there is none."""
        if not (state_dir / "appliances" / appliance / PINS).is_file():
            return None
        return cls(state_dir, appliance)

    @staticmethod
    def taken_over_ids(state_dir: Path) -> list[str]:
        """The appliances a takeover from ``state_dir`` pinned, sorted."""
        root = state_dir / "appliances"
        if not root.is_dir():
            return []
        return [e for e in sorted(os.listdir(root)) if (root / e / PINS).is_file()]

    def __init__(self, state_dir: Path, appliance: str) -> None:
        if not _ID.fullmatch(appliance):
            raise UsageError(f"not an appliance id: {appliance!r}")
        self.appliance = appliance
        self.dir = state_dir / "appliances" / appliance
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)

    # -- JSON documents ---------------------------------------------------------------------

    def read(self, name: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads((self.dir / name).read_text())
        except FileNotFoundError:
            return None
        return data

    def write(self, name: str, data: dict[str, Any]) -> Path:
        path = self.dir / name
        _write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
        return path

    # -- secrets ------------------------------------------------------------------------------

    @property
    def secrets_dir(self) -> Path:
        d = self.dir / "secrets"
        d.mkdir(exist_ok=True, mode=0o700)
        return d

    def secret_path(self, name: str) -> Path:
        return self.secrets_dir / name

    def escrow(self, name: str, value: Secret) -> Path:
        """Keep a secret (written and fsynced before the caller uses it)."""
        path = self.secret_path(name)
        _write(path, value.reveal().encode("utf-8") + b"\n")
        return path

    def retire_secrets(self, tag: str) -> Path | None:
        """Move the escrow of an earlier tenancy aside (kept, never deleted) so that a new
        takeover of the same appliance starts with its own secrets. Atomic (one rename)."""
        current = self.dir / "secrets"
        if not current.is_dir() or not any(current.iterdir()):
            return None
        retired = self.dir / "retired" / tag
        retired.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if retired.exists():
            retired = retired.with_name(f"{tag}.{os.getpid()}")
        os.rename(current, retired)
        fsync_dir(retired.parent)
        fsync_dir(self.dir)
        return retired

    def escrowed(self, name: str) -> Secret | None:
        path = self.secret_path(name)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return Secret(text[:-1] if text.endswith("\n") else text)

    # -- pins -----------------------------------------------------------------------------

    def pins(self) -> dict[str, Any]:
        """``pins.json`` as it is on disk (the log collector reads it so)."""
        return self.read(PINS) or Pins().as_dict()

    def load_pins(self) -> Pins:
        return Pins.from_dict(self.read(PINS) or {})

    def save_pins(self, pins: Pins) -> None:
        self.write(PINS, pins.as_dict())


@dataclass
class Pins:
    """What the customer trusts of one appliance (``pins.json``): its data address and
    host keys, the audit keys whose signatures the log must carry, the audit account's
    key for collection. Keys the takeover never set are left out of the file."""

    data_host_keys: list[str] = field(default_factory=list)
    audit_keys: dict[str, str] = field(default_factory=dict)  # key id -> PEM
    retired: list[str] = field(default_factory=list)  # audit key ids no longer trusted
    initial_audit_key_id: str | None = None
    data_ip: str | None = None
    audit_account_key: str | None = None
    data_port: int | None = None  # only where the device's SSH is not on 22 (tests, bench)
    # Where the log starts when its oldest records were deleted before this tenancy
    # (hsmctl.auditlog.anchor.LogBase, proved by the takeover); None: at record 1.
    log_base: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "data_host_keys": list(self.data_host_keys),
            "audit_keys": dict(self.audit_keys),
            "retired": list(self.retired),
        }
        optional = {
            "initial_audit_key_id": self.initial_audit_key_id,
            "data_ip": self.data_ip,
            "audit_account_key": self.audit_account_key,
            "data_port": self.data_port,
            "log_base": self.log_base,
        }
        return out | {k: v for k, v in optional.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Pins:
        return cls(
            data_host_keys=[str(k) for k in d.get("data_host_keys") or ()],
            audit_keys={str(k): str(v) for k, v in dict(d.get("audit_keys") or {}).items()},
            retired=[str(k) for k in d.get("retired") or ()],
            initial_audit_key_id=d.get("initial_audit_key_id"),
            data_ip=d.get("data_ip"),
            audit_account_key=d.get("audit_account_key"),
            data_port=d.get("data_port"),
            log_base=d.get("log_base"),
        )
