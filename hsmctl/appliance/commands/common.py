"""What every command family uses: the reply a handler returns, the caller's context,
JSON output, the device record and the signal to the appliance's init.

A handler takes the parsed command and the stdin secrets and returns a :class:`Reply`:
text for the caller, an exit status, an outcome for the activity log, and detail for the
log that never holds a secret.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from hsmctl.appliance import paths, protocol, store
from hsmctl.appliance.logwriter import Piece
from hsmctl.appliance.roles import Role


@dataclass
class Reply:
    exit: int = protocol.EXIT_OK
    output: str = ""
    error: str | None = None
    outcome: str = "ok"
    log_detail: dict[str, Any] = field(default_factory=dict)
    stream: list[Piece] | None = None  # open log ranges, sent raw (``audit export``)

    @classmethod
    def failure(cls, message: str, exit: int = protocol.EXIT_FAILED) -> Reply:
        return cls(exit=exit, error=message, outcome="failed")

    @classmethod
    def usage(cls, message: str) -> Reply:
        return cls(exit=protocol.EXIT_USAGE, error=message, outcome="failed")


@dataclass
class Context:
    caller_account: str
    role: Role
    source: str
    owner: store.Owner


def as_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True)


def device_record() -> dict[str, Any]:
    data: dict[str, Any] = store.read_json(paths.DEVICE, {})
    return data


def signal_boot() -> None:
    """Ask the appliance's init to reconcile the data-interface sshd."""
    try:
        pid = int(paths.BOOT_PID.read_text().split()[0])
        os.kill(pid, signal.SIGUSR1)
    except (OSError, ValueError, IndexError):
        pass
