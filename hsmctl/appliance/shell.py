"""``hsmsh``: the restricted shell, login shell of every device account (like ``lunash``).

Lifecycle: sshd starts it either as ``hsmsh -c LINE`` (an exec request: one command, for
automation) or with no arguments (an interactive session: a prompt, ``help``, ``exit``).
It never runs a program: each line goes to the device daemon, which identifies the
caller from the socket, parses, authorises, executes and logs. Secrets a command needs
are read here from stdin (hidden at a terminal) when the daemon, having parsed the line,
names them (a ``secrets`` request), and passed to it, never on a command line. Before
the one-time password is changed, an interactive admin session goes straight to the
forced change.

``hsmsh -c batch`` (issue 15) runs several command lines in one session, for automation:
stdin holds up to :data:`MAX_BATCH` requests, one JSON object a line
(``{"line": "user enable monitor", "secrets": [...]}``, the secrets the daemon will name,
in its order, instead of stdin lines); stdout gets one JSON object a line for each command
run, in order (``{"exit": N, "stdout": BASE64, "stderr": TEXT}``); the first command
that fails ends the batch, and its status is the shell's. Each command is parsed,
authorised, logged and run by the daemon exactly as on its own; the batch saves the
device a channel, a shell process and a log session per command (~15 ms of its CPU).
A batch that cannot be read is exit 64 before anything runs.

Every device command is a new ``hsmsh`` process, so it imports only built-in modules
(``_socket``, ``_json``, ``os``, ``sys``: no ``socket``, ``json``, ``re``, ``pathlib``,
``typing``, no grammar): the grammar and the command table are the daemon's, which
parses every line anyway. This start used to cost ~40 ms of CPU, the daemon's import of
the grammar and ``json`` most of it. The messages are :mod:`protocol`'s encoding (one
JSON object a line), written and read with the C halves of :mod:`json`;
tests/unit/test_shell.py keeps the two equal.
"""

from __future__ import annotations

import _io
import _json
import _socket
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: typing costs milliseconds
    from typing import Any, BinaryIO

SOCKET = "/run/hsm/hsmd.sock"  # paths.SOCKET (not imported: pathlib)
MAX_MESSAGE = 1 << 20  # protocol.MAX_MESSAGE
# contract's device-shell exit statuses (not imported: enum, typing)
EXIT_FAILED = 1
EXIT_USAGE = 64
EXIT_UNAVAILABLE = 69
EXIT_DENIED = 77

BATCH = "batch"  # ``hsmsh -c batch``: not a device command (the daemon has no such word)
MAX_BATCH = 16  # commands in one batch
MAX_BATCH_INPUT = 256 * 1024  # bytes of batch requests
MAX_BATCH_OUTPUT = 1 << 20  # bytes of one command's output in a batch

_string = _json.encode_basestring_ascii  # what json.dumps uses for a str (ensure_ascii)


def encode(message: dict[str, Any]) -> bytes:
    """``protocol.send``'s bytes for a message of str, bool, int and lists of str."""
    parts = []
    for key, value in message.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, str):
            text = _string(value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            text = "[" + ",".join(_string(v) for v in value) + "]"
        else:
            raise TypeError(f"cannot encode {type(value).__name__}")
        parts.append(f"{_string(key)}:{text}")
    return ("{" + ",".join(parts) + "}\n").encode("ascii")


class _Decoding:
    """The settings :func:`json.loads` gives the C scanner (no hooks, strict strings)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> Any:
        return float(name)  # NaN, Infinity, -Infinity, as json.loads


# typeshed types the context as a scanner; the C code reads the attributes above.
_scan = _json.make_scanner(_Decoding())  # type: ignore[arg-type]


def decode(line: bytes) -> dict[str, Any]:
    """:func:`protocol.recv` on one line already read: ValueError if malformed."""
    if len(line) > MAX_MESSAGE or not line.endswith(b"\n"):
        raise ValueError("message too long or truncated")
    text = line.decode("utf-8")  # the daemon sends ASCII (json.dumps ensure_ascii)
    try:
        data, end = _scan(text, 0)
    except StopIteration as exc:
        raise ValueError("not a JSON message") from exc
    except RecursionError as exc:
        raise ValueError("message nested too deeply") from exc
    if text[end:].strip(" \t\n\r"):
        raise ValueError("extra data after the message")
    if not isinstance(data, dict):
        raise ValueError("message is not an object")
    return data


class DaemonClient:
    """One connection to the daemon for the whole shell session (one login, one log
    session, one checkpoint at its end)."""

    def __init__(self, interactive: bool, path: str | None = None) -> None:
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            self.sock.connect(path or SOCKET)
        except OSError:
            self.sock.close()
            raise
        self.reader: BinaryIO = os.fdopen(self.sock.fileno(), "rb", closefd=False)
        self.interactive = interactive
        # Who and where the caller is, the daemon reads from the kernel, not from here.
        self.send({"type": "hello", "interactive": interactive})
        self.info: dict[str, Any] = self.recv() or {}

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(encode(message))

    def recv(self) -> dict[str, Any] | None:
        line = self.reader.readline(MAX_MESSAGE + 1)
        return decode(line) if line else None

    def command(
        self,
        line: bytes,
        out: Any = None,
        err: Any = None,
        secrets: list[str] | None = None,
    ) -> int:
        """Run one line; its output to ``out`` (binary, default stdout), its error to
        ``err`` (text, default stderr). ``secrets``: the values for what the daemon names
        (a batch); None: read from stdin (hidden at a terminal)."""
        self.send({"type": "command", "line": line.decode("utf-8", "surrogateescape")})
        out = sys.stdout.buffer if out is None else out
        err = sys.stderr if err is None else err
        while True:
            msg = self.recv()
            if msg is None:
                print("hsmsh: the device daemon closed the connection", file=err)
                return EXIT_UNAVAILABLE
            kind = msg.get("type")
            if kind == "secrets":  # the parsed command reads these from stdin
                names = [str(n) for n in msg.get("names") or []]
                if secrets is None:
                    values = read_secrets(names, self.interactive)
                else:  # exactly what was named, or nothing (the daemon then refuses)
                    values = secrets if len(secrets) == len(names) else None
                    secrets = []
                self.send({"type": "secrets", "cancel": True} if values is None else
                          {"type": "secrets", "values": values})  # fmt: skip
            elif kind == "stream":
                remaining = int(msg["length"])
                while remaining:
                    chunk = self.reader.read(min(remaining, 1 << 20))
                    if not chunk:
                        return EXIT_UNAVAILABLE
                    out.write(chunk)
                    remaining -= len(chunk)
                out.flush()
            elif kind == "result":
                text = msg.get("output", "")
                if text:
                    out.write(text.encode("utf-8"))
                    if not text.endswith("\n"):
                        out.write(b"\n")
                    out.flush()
                if msg.get("error"):
                    print(f"error: {msg['error']}", file=err, flush=True)
                return int(msg.get("exit", EXIT_FAILED))

    def close(self) -> None:
        try:
            self.send({"type": "bye"})
            self.recv()
        except (OSError, ValueError):
            pass
        self.reader.close()
        self.sock.close()


def read_secrets(names: list[str], interactive: bool) -> list[str] | None:
    values = []
    for name in names:
        prompt = name.replace("_", " ") + ": "
        if interactive and sys.stdin.isatty():
            import getpass  # only at a terminal

            value = getpass.getpass(prompt)
            if name in ("new_password", "co_pin", "so_pin"):
                again = getpass.getpass(f"repeat {prompt}")
                if again != value:
                    print("they differ; nothing changed", file=sys.stderr)
                    return None
        else:
            raw = sys.stdin.buffer.readline(4096)
            value = raw.decode("utf-8", "replace").rstrip("\n").rstrip("\r")
        values.append(value)
    return values


class _Bounded:
    """A batch command's stdout, kept up to :data:`MAX_BATCH_OUTPUT` bytes."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.over = False

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_BATCH_OUTPUT:
            self.over = True
            self.parts = []
        elif not self.over:
            self.parts.append(bytes(data))

    def flush(self) -> None:
        pass


def read_batch(data: bytes) -> list[tuple[bytes, list[str]]]:
    """The requests of a batch (see the module docstring): ValueError if malformed."""
    if len(data) > MAX_BATCH_INPUT:
        raise ValueError(f"more than {MAX_BATCH_INPUT} bytes of requests")
    requests = []
    for raw in data.splitlines(keepends=True):
        if not raw.strip():
            continue
        message = decode(raw if raw.endswith(b"\n") else raw + b"\n")
        line, secrets = message.get("line"), message.get("secrets", [])
        if set(message) - {"line", "secrets"} or not isinstance(line, str):
            raise ValueError('each request is {"line": ..., "secrets": [...]}')
        if not (isinstance(secrets, list) and all(isinstance(v, str) for v in secrets)):
            raise ValueError("secrets must be a list of strings")
        requests.append((line.encode("utf-8", "surrogateescape"), secrets))
    if not 1 <= len(requests) <= MAX_BATCH:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH} commands")
    return requests


def run_batch(session: DaemonClient, requests: list[tuple[bytes, list[str]]]) -> int:
    from binascii import b2a_base64  # built in; only a batch needs it

    status = 0
    for line, secrets in requests:
        out, err = _Bounded(), _io.StringIO()
        status = session.command(line, out, err, secrets)
        if out.over and status == 0:
            status = EXIT_FAILED
            err.write(f"error: more than {MAX_BATCH_OUTPUT} bytes of output: not in a batch\n")
        body = b"" if out.over else b"".join(out.parts)
        reply = {"exit": status, "stdout": b2a_base64(body, newline=False).decode("ascii"),
                 "stderr": err.getvalue()}  # fmt: skip
        sys.stdout.buffer.write(encode(reply))
        sys.stdout.buffer.flush()
        if status != 0:
            break
    return status


def interactive_loop(session: DaemonClient) -> int:
    status = 0
    if session.info.get("must_change_password"):
        print("The one-time password must be changed before anything else.", flush=True)
        status = session.command(b"user password")
        if status != 0:
            return status
    print(session.info.get("banner", ""), flush=True)
    while True:
        try:
            line = input(session.info.get("prompt", "hsm> "))
        except EOFError:
            print()
            return status
        line = line.strip()
        if not line:
            continue
        if line in ("exit", "quit"):
            return status
        status = session.command(line.encode("utf-8", "surrogateescape"))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        interactive = not args
        if args and (args[0] != "-c" or len(args) != 2):
            print("hsmsh: usage: hsmsh [-c COMMAND]", file=sys.stderr)
            return EXIT_USAGE
        batch = None
        if args and args[1] == BATCH:
            try:  # all of it read and checked before the daemon hears of it
                batch = read_batch(sys.stdin.buffer.read(MAX_BATCH_INPUT + 1))
            except (ValueError, UnicodeDecodeError) as exc:
                print(f"hsmsh: batch: {exc}", file=sys.stderr)
                return EXIT_USAGE
        try:
            session = DaemonClient(interactive)
        except OSError as exc:
            print(f"hsmsh: the device daemon is unavailable ({exc.strerror})", file=sys.stderr)
            return EXIT_UNAVAILABLE
        except ValueError:
            print("hsmsh: the device daemon sent a malformed reply", file=sys.stderr)
            return EXIT_UNAVAILABLE
        try:
            if session.info.get("type") == "refused":
                print(f"hsmsh: {session.info.get('error', 'refused')}", file=sys.stderr)
                return EXIT_DENIED
            if interactive:
                return interactive_loop(session)
            if batch is not None:
                return run_batch(session, batch)
            return session.command(os.fsencode(args[1]))
        except ValueError:
            print("hsmsh: the device daemon sent a malformed reply", file=sys.stderr)
            return EXIT_UNAVAILABLE
        finally:
            session.close()
    except KeyboardInterrupt:
        return 130
