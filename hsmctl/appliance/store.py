"""The daemon's small root-only state files (JSON, written atomically and fsynced)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hsmctl.appliance import paths
from hsmctl.appliance.roles import DeviceState, OwnerState


def write_json(path: Path, data: Any, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


@dataclass
class Owner:
    """Who owns the device; the provider's powers follow from this alone."""

    state: OwnerState = OwnerState.FACTORY
    otp_expires: float | None = None
    provider_access: bool = True
    owned_since: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls) -> Owner:
        raw = read_json(paths.OWNER, {})
        if not raw:
            return cls()
        return cls(
            state=OwnerState(raw["state"]),
            otp_expires=raw.get("otp_expires"),
            provider_access=bool(raw.get("provider_access", True)),
            owned_since=raw.get("owned_since"),
            history=list(raw.get("history", [])),
        )

    def save(self) -> None:
        data = asdict(self)
        data["state"] = self.state.value
        write_json(paths.OWNER, data)

    def device_state(self) -> DeviceState:
        return DeviceState(self.state, self.state is OwnerState.CUSTOMER_OWNED)

    @property
    def otp_expired(self) -> bool:
        return (
            self.state is OwnerState.PROVISIONED
            and self.otp_expires is not None
            and time.time() > self.otp_expires
        )
