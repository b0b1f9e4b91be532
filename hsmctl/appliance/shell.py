"""``hsmsh``: the restricted shell, login shell of every device account (like ``lunash``).

Lifecycle: sshd starts it either as ``hsmsh -c LINE`` (an exec request: one command, for
automation) or with no arguments (an interactive session: a prompt, ``help``, ``exit``).
It never runs a program: each line goes to the device daemon, which identifies the
caller from the socket, parses, authorises, executes and logs. Secrets a command needs
are read here from stdin (hidden at a terminal) when the daemon, having parsed the line,
names them (a ``secrets`` request), and passed to it, never on a command line. Before
the one-time password is changed, an interactive admin session goes straight to the
forced change.

Every device command is a new ``hsmsh`` process, so it imports only built-in modules
(``_socket``, ``_json``, ``os``, ``sys``: no ``socket``, ``json``, ``re``, ``pathlib``,
``typing``, no grammar): the grammar and the command table are the daemon's, which
parses every line anyway. This start used to cost ~40 ms of CPU, the daemon's import of
the grammar and ``json`` most of it. The messages are :mod:`protocol`'s encoding (one
JSON object a line), written and read with the C halves of :mod:`json`;
tests/unit/test_shell.py keeps the two equal.
"""

from __future__ import annotations

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

    def command(self, line: bytes) -> int:
        self.send({"type": "command", "line": line.decode("utf-8", "surrogateescape")})
        out = sys.stdout.buffer
        while True:
            msg = self.recv()
            if msg is None:
                print("hsmsh: the device daemon closed the connection", file=sys.stderr)
                return EXIT_UNAVAILABLE
            kind = msg.get("type")
            if kind == "secrets":  # the parsed command reads these from stdin
                names = [str(n) for n in msg.get("names") or []]
                values = read_secrets(names, self.interactive)
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
                    print(f"error: {msg['error']}", file=sys.stderr, flush=True)
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
            return session.command(os.fsencode(args[1]))
        except ValueError:
            print("hsmsh: the device daemon sent a malformed reply", file=sys.stderr)
            return EXIT_UNAVAILABLE
        finally:
            session.close()
    except KeyboardInterrupt:
        return 130
