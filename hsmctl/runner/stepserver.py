"""Steps served by the process that runs the playbook (issue 15: speed at scale).

A module task of ``provision.yml`` is a new Python process: importing the hsmctl library
(the state store, SSH, cryptography) costs about 0.4 s of CPU, five times per appliance,
so twenty appliances spent most of their run importing. When ``hsmctl provision`` runs
the playbook, it also serves the steps itself: :class:`StepServer` listens on a Unix
socket in the run's private directory (0700) and runs each step in a thread of the
process that already has the library loaded; the module (``hsm_provision``) finds the
socket through :data:`SOCKET_ENV` and sends only what it was given (references: the
configuration file, the appliance, the request id, the step, check mode). Run by plain
``ansible-playbook`` or AWX, the variable is absent and the module runs the step in its
own process as before: same step function, same journal, same lock.

Lifecycle: create with the handler and the run's directory, ``with`` it around the run
(:meth:`start` / :meth:`close`); the socket is removed on close. A peer of another uid is
refused (``SO_PEERCRED``). The wire is one JSON object a line each way (see
:mod:`hsmctl.runner.stepclient`): ``{"ok": RESULT}`` or ``{"error": {"message",
"exit_code", "error"}}``; an exception outside the HsmctlError tree is exit 1 with its
type only (its text may hold anything).
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from hsmctl.errors import HsmctlError
from hsmctl.runner.stepclient import MAX_LINE, SOCKET_ENV

__all__ = ["SOCKET_ENV", "StepHandler", "StepServer"]

StepHandler = Callable[[Mapping[str, Any]], Mapping[str, Any]]

POLL_INTERVAL = 0.05
"""Seconds between the server loop's checks for :meth:`StepServer.close`: socketserver's
default, 0.5 s, kept every ``hsmctl provision`` waiting up to half a second at its end."""


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def answer(handler: StepHandler, line: bytes) -> dict[str, Any]:
    """The reply to one request line. Pure apart from what ``handler`` does."""
    try:
        request = json.loads(line)
        if not isinstance(request, dict):
            raise ValueError("not an object")
    except ValueError:
        return {
            "error": {"message": "malformed step request", "exit_code": 2, "error": "UsageError"}
        }
    try:
        return {"ok": dict(handler(request))}
    except HsmctlError as exc:
        return {
            "error": {"message": str(exc), "exit_code": exc.exit_code, "error": type(exc).__name__}
        }
    except Exception as exc:  # a bug must reach Ansible as a failed task, not a hang
        return {
            "error": {
                "message": f"internal error: {type(exc).__name__}",
                "exit_code": 1,
                "error": type(exc).__name__,
            }
        }


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    handler: StepHandler


class _Connection(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        if _peer_uid(sock) != os.getuid():
            return
        line = self.rfile.readline(MAX_LINE + 1)
        if not line or len(line) > MAX_LINE:
            return
        reply = answer(self.server.handler, line)
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class StepServer:
    def __init__(self, handler: StepHandler, directory: Path) -> None:
        self.path = directory / "steps.sock"
        self._server = _Server(str(self.path), _Connection, bind_and_activate=False)
        self._server.handler = handler
        self._thread: threading.Thread | None = None

    def start(self) -> StepServer:
        old = os.umask(0o177)
        try:
            self._server.server_bind()
        finally:
            os.umask(old)
        self._server.server_activate()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(POLL_INTERVAL,),
            name="hsmctl-steps",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> StepServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
