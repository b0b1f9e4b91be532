"""The helper process: each management operation in a fresh library context
(``python3 -m hsmctl.appliance.tokencli OP``, PINs on stdin only), its errors carried back
as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hsmctl import errors
from hsmctl.appliance.tokenforks import ForkServer, ServerBroken
from hsmctl.appliance.tokenlib import (
    TokenAuthError,
    TokenError,
    TokenLockedError,
    TokenPinError,
    TokenStateError,
)
from hsmctl.errors import CommandFailed, HsmctlError

HELPER_TIMEOUT = 120.0

# --- the helper process -----------------------------------------------------------------

_HELPER_LOCK = threading.Lock()  # one management operation at a time per process


def _error_types() -> dict[str, type[HsmctlError]]:
    found: list[type[HsmctlError]] = [
        TokenError,
        TokenAuthError,
        TokenPinError,
        TokenLockedError,
        TokenStateError,
    ]
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, HsmctlError):
            found.append(value)
    return {cls.__name__: cls for cls in found}


_ERROR_TYPES = _error_types()


def error_to_json(exc: HsmctlError) -> dict[str, object]:
    out: dict[str, object] = {"type": type(exc).__name__, "message": exc.message}
    if isinstance(exc, CommandFailed):
        out.update(argv=exc.argv, status=exc.status, output=exc.output_tail)
    else:
        out["detail"] = exc.detail
    return out


def error_from_json(data: Mapping[str, Any]) -> HsmctlError:
    cls = _ERROR_TYPES.get(str(data.get("type")), TokenError)
    message = str(data.get("message", "token operation failed"))
    if issubclass(cls, CommandFailed):
        return cls(
            message,
            argv=[str(a) for a in data.get("argv", [])],
            status=data.get("status"),
            output=str(data.get("output", "")),
        )
    detail = data.get("detail")
    return cls(message, detail=dict(detail) if isinstance(detail, dict) else None)


def _helper_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the directory holding hsmctl/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


_SERVER: ForkServer | None = None  # guarded by _HELPER_LOCK
USE_FORK_SERVER = True
"""Operations run in children of a fork server (:mod:`tokenforks`); False: a fresh
``python3 -m hsmctl.appliance.tokencli`` per operation (the same code, ~60 ms more CPU)."""


def _python() -> str:
    return sys.executable or "/usr/bin/python3"


def _server(env: dict[str, str]) -> ForkServer | None:
    """The running server for this environment (started if need be); None if none can
    start (the operation then runs in a fresh process). Hold _HELPER_LOCK."""
    global _SERVER
    if _SERVER is not None and (_SERVER.broken or _SERVER.env != env):
        _SERVER.close()
        _SERVER = None
    if _SERVER is None:
        try:
            _SERVER = ForkServer(env, _python())
        except OSError:
            return None
    return _SERVER


def prestart() -> None:
    """Start the fork server now (the device daemon, at start), so the first operation
    does not wait for its imports."""
    if USE_FORK_SERVER:
        with _HELPER_LOCK:
            _server(_helper_env())


def _via_server(server: ForkServer, env: dict[str, str], request: dict[str, Any]) -> Any:
    """(reply, status) from a child of ``server``; once more on a new server when the
    old one had died idle (nothing was sent, so nothing ran). Hold _HELPER_LOCK."""
    try:
        return server.call(request, HELPER_TIMEOUT)
    except ServerBroken as exc:
        retry = None if exc.sent else _server(env)
        if retry is None:
            raise
        return retry.call(request, HELPER_TIMEOUT)


def call_helper(op: str, args: Mapping[str, Any], lib_path: str) -> Any:
    """Run one operation in a fresh process and library; PINs travel on stdin only."""
    argv = [_python(), "-m", "hsmctl.appliance.tokencli", op]
    request = {"lib": lib_path, "args": dict(args)}
    with _HELPER_LOCK:
        env = _helper_env()
        server = _server(env) if USE_FORK_SERVER else None
        if server is not None:
            try:
                reply, status = _via_server(server, env, {"op": op, **request})
            except ServerBroken as exc:
                raise TokenError(f"token helper {op}: {exc}") from exc
            output = ""
        else:
            try:
                proc = subprocess.run(
                    argv,
                    input=json.dumps(request),
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=HELPER_TIMEOUT,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise TokenError(f"token helper {op}: {type(exc).__name__}") from exc
            status, output = proc.returncode, proc.stderr
            try:
                reply = json.loads(proc.stdout)
            except ValueError:
                reply = None
    if not isinstance(reply, dict) or ("result" not in reply and "error" not in reply):
        raise CommandFailed(f"token helper {op} failed", argv=argv, status=status, output=output)
    if "error" in reply:
        raise error_from_json(reply["error"])
    return reply["result"]
