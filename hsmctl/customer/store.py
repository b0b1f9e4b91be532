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
from pathlib import Path
from typing import Any

from hsmctl.errors import UsageError
from hsmctl.privatefiles import fsync_dir, write_atomic
from hsmctl.secret import Secret

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, data)


class ApplianceState:
    """One appliance's corner of the customer's state directory."""

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
        return self.read("pins.json") or {"data_host_keys": [], "audit_keys": {}, "retired": []}

    def save_pins(self, pins: dict[str, Any]) -> None:
        self.write("pins.json", pins)
