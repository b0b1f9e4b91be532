"""``hsmsh``: the restricted shell, login shell of every device account (like ``lunash``).

Lifecycle: sshd starts it either as ``hsmsh -c LINE`` (an exec request: one command, for
automation) or with no arguments (an interactive session: a prompt, ``help``, ``exit``).
It never runs a program: each line goes to the device daemon, which identifies the
caller from the socket, parses, authorises, executes and logs. Secrets a command needs
are read here from stdin (hidden at a terminal) and passed to the daemon, never on a
command line. Before the one-time password is changed, an interactive admin session goes
straight to the forced change.
"""

from __future__ import annotations

import getpass
import os
import socket
import sys
from typing import Any

from hsmctl.appliance import grammar, paths, protocol


class DaemonClient:
    """One connection to the daemon for the whole shell session (one login, one log
    session, one checkpoint at its end)."""

    def __init__(self, interactive: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(paths.SOCKET))
        self.reader = self.sock.makefile("rb")
        self.interactive = interactive
        # Who and where the caller is, the daemon reads from the kernel, not from here.
        protocol.send(self.sock, {"type": "hello", "interactive": interactive})
        reply = protocol.recv(self.reader) or {}
        self.info: dict[str, Any] = reply

    def command(self, line: bytes, secrets: list[str]) -> int:
        protocol.send(
            self.sock,
            {"type": "command", "line": line.decode("utf-8", "surrogateescape"), "stdin": secrets},
        )
        out = sys.stdout.buffer
        while True:
            msg = protocol.recv(self.reader)
            if msg is None:
                print("hsmsh: the device daemon closed the connection", file=sys.stderr)
                return protocol.EXIT_UNAVAILABLE
            kind = msg.get("type")
            if kind == "stream":
                remaining = int(msg["length"])
                while remaining:
                    chunk = self.reader.read(min(remaining, 1 << 20))
                    if not chunk:
                        return protocol.EXIT_UNAVAILABLE
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
                return int(msg.get("exit", protocol.EXIT_FAILED))

    def close(self) -> None:
        try:
            protocol.send(self.sock, {"type": "bye"})
            protocol.recv(self.reader)
        except OSError:
            pass
        self.sock.close()


def _read_secrets(names: tuple[str, ...], interactive: bool) -> list[str] | None:
    values = []
    for name in names:
        prompt = name.replace("_", " ") + ": "
        if interactive and sys.stdin.isatty():
            value = getpass.getpass(prompt)
            if name in ("new_password", "co_pin", "so_pin") and name != "so_pin_current":
                again = getpass.getpass(f"repeat {prompt}")
                if again != value:
                    print("they differ; nothing changed", file=sys.stderr)
                    return None
        else:
            raw = sys.stdin.buffer.readline(4096)
            value = raw.decode("utf-8", "replace").rstrip("\n").rstrip("\r")
        values.append(value)
    return values


def _secrets_for(line: bytes) -> tuple[str, ...]:
    try:
        return grammar.parse(line).spec.stdin
    except grammar.ParseError:
        return ()


def run_line(session: DaemonClient, line: bytes, interactive: bool) -> int:
    secrets = _read_secrets(_secrets_for(line), interactive)
    if secrets is None:
        return protocol.EXIT_USAGE
    return session.command(line, secrets)


def interactive_loop(session: DaemonClient) -> int:
    status = 0
    if session.info.get("must_change_password"):
        print("The one-time password must be changed before anything else.", flush=True)
        status = run_line(session, b"user password", True)
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
        status = run_line(session, line.encode("utf-8", "surrogateescape"), True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        interactive = not args
        if args and (args[0] != "-c" or len(args) != 2):
            print("hsmsh: usage: hsmsh [-c COMMAND]", file=sys.stderr)
            return protocol.EXIT_USAGE
        try:
            session = DaemonClient(interactive)
        except OSError as exc:
            print(f"hsmsh: the device daemon is unavailable ({exc.strerror})", file=sys.stderr)
            return protocol.EXIT_UNAVAILABLE
        if session.info.get("type") == "refused":
            print(f"hsmsh: {session.info.get('error', 'refused')}", file=sys.stderr)
            session.close()
            return protocol.EXIT_DENIED
        try:
            if interactive:
                return interactive_loop(session)
            raw = os.fsencode(args[1])
            return run_line(session, raw, False)
        finally:
            session.close()
    except KeyboardInterrupt:
        return 130
