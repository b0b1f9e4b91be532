"""The module's side of :mod:`hsmctl.runner.stepserver`: send a step to the process that
runs the playbook. Imports nothing of hsmctl's library (that is the point: a module
process that only asks costs a tenth of one that imports the state store and SSH)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from typing import Any

SOCKET_ENV = "HSMCTL_STEP_SOCKET"
MAX_LINE = 1 << 20


class StepFailed(Exception):
    """The served step failed: hsmctl's message, exit code and error class."""

    def __init__(self, message: str, exit_code: int, error: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.error = error


def served_socket() -> str | None:
    """The socket of the process that runs this playbook, if one serves the steps."""
    path = os.environ.get(SOCKET_ENV, "")
    return path if path and os.path.exists(path) else None


def call(path: str, request: Mapping[str, Any]) -> dict[str, Any]:
    """Send one step and wait for its result (a step may take minutes: no timeout; the
    server ends with the run, which closes the connection)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(json.dumps(dict(request)).encode() + b"\n")
        with sock.makefile("rb") as reply:
            line = reply.readline(MAX_LINE + 1)
    if not line or len(line) > MAX_LINE:
        raise StepFailed("the hsmctl process serving the steps ended", 1, "HsmctlError")
    body = json.loads(line)
    if "error" in body:
        err = body["error"]
        raise StepFailed(str(err["message"]), int(err["exit_code"]), str(err["error"]))
    result: dict[str, Any] = body["ok"]
    return result
