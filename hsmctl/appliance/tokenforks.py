"""The token helper's fork server: one process that has imported the helper
(:mod:`tokencli`, started as ``tokencli --fork-server``) and never loads a PKCS#11
library, forking a child per operation.

Why: each management operation runs in a fresh process with a fresh library context
(:mod:`tokenhelper`), and a fresh ``python3 -m hsmctl.appliance.tokencli`` spends ~55 of
its ~60 ms of the device's CPU starting Python and importing PyKCS11, ``json`` and the
helper's modules; the operation itself (a status read: loading SoftHSM, listing slots)
takes a few. A child forked from this server starts with all of that imported and
nothing else: it loads the library itself, as the fresh process did, so what it sees of
the token store is read afresh every time. About 1 ms of CPU per operation instead of 60.

The protocol, on the server's stdin and stdout (frames: a 4-byte big-endian length, then
that many bytes of JSON):

* the daemon writes ``g`` and then one request frame ``{"op", "lib", "args"}``;
* the server reads only the ``g`` and forks; the **child** reads the request (the PINs in
  it never pass through the server's memory), runs it with ``tokencli``'s own handler (the
  one its ``main`` uses), writes one reply frame (``{"result"}`` or ``{"error"}``) and
  exits;
* the server waits for the child and writes ``{"exit": STATUS}``.

A child that dies without a reply leaves the ``exit`` frame alone on the pipe. Anything
out of order, a timeout or a broken pipe, and the daemon kills the server's whole process
group and starts another for the next operation (:class:`ForkServer`); it never resends
an operation (it may have run). The server is single-threaded, so its ``fork`` is safe.
It ends when the daemon closes its stdin.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

_LEN = struct.Struct(">I")
MAX_FRAME = 1 << 22  # a reply is small JSON (an audit public key at most)
GO = b"g"


class ServerBroken(Exception):
    """The server answered out of order, too late or not at all: discard it.
    ``sent``: whether the request may have reached it (if not, nothing ran)."""

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


def frame(obj: object) -> bytes:
    data = json.dumps(obj).encode()
    return _LEN.pack(len(data)) + data


def _read_exact(fd: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return bytes(out)


def _read_frame(fd: int) -> Any:
    (n,) = _LEN.unpack(_read_exact(fd, _LEN.size))
    if n > MAX_FRAME:
        raise ValueError("frame too large")
    return json.loads(_read_exact(fd, n))


# -- the server (python3 -m hsmctl.appliance.tokencli --fork-server) -------------------

Handler = Callable[[Any], tuple[dict[str, object], int]]
"""tokencli's handling of one decoded request: (reply, exit status)."""


def _child(handle: Handler) -> int:
    """One operation, in the forked child."""
    try:
        request: Any = _read_frame(0)
    except (ValueError, EOFError):
        request = None  # the handler answers a usage error
    reply, code = handle(request)
    os.write(1, frame(reply))
    return code


def serve(handle: Handler) -> int:
    """The server's loop (its caller has imported everything ``handle`` needs and loaded
    no library)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            go = os.read(0, 1)
        except OSError:
            return 1
        if go != GO:
            return 0 if not go else 2
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(handle)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        try:
            os.write(1, frame({"exit": os.waitstatus_to_exitcode(status)}))
        except OSError:
            return 1


# -- the daemon's side -------------------------------------------------------------------


class ForkServer:
    """One running server (lifecycle: start → :meth:`call`, one at a time, from the
    holder of the helper lock → :meth:`close`; broken: closed, never reused)."""

    def __init__(self, env: Mapping[str, str], python: str) -> None:
        self.env = dict(env)
        self.proc = subprocess.Popen(
            [python, "-m", "hsmctl.appliance.tokencli", "--fork-server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self.env,
            start_new_session=True,  # its own process group: a timeout kills the child too
        )
        self.broken = False

    def call(self, request: Mapping[str, Any], timeout: float) -> tuple[Any, int]:
        """Run one request; its reply and the child's exit status. A child that died
        without a reply: (None, status). Raises ServerBroken (then closed)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        if self.proc.poll() is not None:  # it died while idle: nothing was sent
            self.close()
            raise ServerBroken("the server had exited", sent=False)
        try:
            self.proc.stdin.write(GO + frame(dict(request)))
            self.proc.stdin.flush()
        except OSError as exc:  # it died before reading the go: nothing ran
            self.close()
            raise ServerBroken(type(exc).__name__, sent=False) from exc
        try:
            first = self._frame(deadline)
            if isinstance(first, dict) and set(first) == {"exit"}:
                return None, int(first["exit"])
            last = self._frame(deadline)
            if not (isinstance(last, dict) and set(last) == {"exit"}):
                raise ServerBroken("no exit status after the reply")
            return first, int(last["exit"])
        except (OSError, ValueError, EOFError, TypeError, ServerBroken) as exc:
            self.close()
            raise ServerBroken(type(exc).__name__) from exc

    def _frame(self, deadline: float) -> Any:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = bytearray()
        need = _LEN.size
        header = True
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                while len(buf) < need:
                    left = deadline - time.monotonic()
                    if left <= 0 or not sel.select(left):
                        raise ServerBroken("timed out")
                    chunk = os.read(fd, need - len(buf))
                    if not chunk:
                        raise EOFError
                    buf += chunk
                if not header:
                    return json.loads(bytes(buf[_LEN.size :]))
                (n,) = _LEN.unpack(bytes(buf))
                if n > MAX_FRAME:
                    raise ValueError("frame too large")
                need, header = _LEN.size + n, False

    def close(self) -> None:
        self.broken = True
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                self.proc.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self.proc.wait()
