"""``hsmd``: the device daemon. It owns the tokens, the account database, the host keys
and the activity log; every session asks it, over ``/run/hsm/hsmd.sock``.

Lifecycle: started by ``hsm-boot``; opens the activity log and the audit signer, writes
the personalisation record on a fresh device, then serves one thread per connection and
follows sshd's logs for logins. A connection is one shell session: the daemon reads the
caller's uid and pid from the socket (SO_PEERCRED), the interface from the SSH connection
the caller descends from (its local address, :mod:`origin`: it survives an sshd restart),
and from the uid the account and role; then for each request it parses, authorises
(:mod:`roles`), logs, executes, logs the result. The end of a session writes a signed
checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsmctl import auditlog
from hsmctl.appliance import (
    auditkey,
    grammar,
    origin,
    p11service,
    paths,
    protocol,
    sshdlog,
    store,
    tokenhelper,
)
from hsmctl.appliance.handlers import Context, Handlers, Reply
from hsmctl.appliance.logwriter import ActivityLog, LogUnavailable, close_pieces, load_config
from hsmctl.appliance.roles import READ_ONLY, Access, Role, allowed_interface, authorize

CHECKPOINT_INTERVAL = 60.0

# Commands whose records may use the log's reserve past its limit: what lets a collector
# free space (an export's checkpoint, an ack and the deletions it logs) must not be shut
# out by the full log it is meant to relieve.
LOG_RELIEF = frozenset({("audit", "export"), ("audit", "ack")})

# The accounts a non-root caller may be: the console role is only ever root's, and the
# client role belongs to the ``p11-NAME`` accounts, never to an account named "client".
SESSION_ROLES = {r.value: r for r in Role if r not in (Role.CONSOLE, Role.CLIENT)}
# Names a login record may carry as typed: the device's accounts and root.
KNOWN_LOGINS = frozenset({*SESSION_ROLES, "root"})


@dataclass(frozen=True)
class Caller:
    account: str
    role: Role | None
    interface: Access | None
    source: str
    pid: int


def identify(pid: int, uid: int) -> Caller:
    try:
        account = pwd.getpwuid(uid).pw_name
    except KeyError:
        account = f"uid-{uid}"
    came = origin.origin_of(pid)
    iface = came.interface
    source = came.remote or "unknown"
    if uid == 0:
        if not came.via_sshd:
            return Caller("root", Role.CONSOLE, Access.CONSOLE, "console", pid)
        return Caller("root", None, iface, source, pid)
    # The console is root with no sshd ancestor, never an account that is named so.
    role: Role | None = SESSION_ROLES.get(account)
    if account.startswith(paths.CLIENT_PREFIX):
        role = Role.CLIENT
    return Caller(account, role, iface, source if came.via_sshd else "local", pid)


class Daemon:
    def __init__(self) -> None:
        config, problem = load_config(paths.LOG_CONFIG)
        if problem:
            print(f"hsmd: log configuration ignored: {problem}", file=sys.stderr, flush=True)
        self.log = ActivityLog(paths.AUDIT_LOG, config)
        self.keys = auditkey.AuditKeys()
        self.handlers = Handlers(self)
        # One device-wide order for commands that change state: a command is approved
        # against the owner state and executed under the same lock, so a provider
        # command approved before the admin's first password change cannot finish
        # after it (and undo the transfer).
        self.order = threading.Lock()
        self.checkpoint_lock = threading.Lock()
        self.last_checkpoint_seq = 0
        self.failures: dict[str, list[float]] = {}
        self.failures_lock = threading.Lock()
        if self.log.head is None:
            self.record(
                "hsmd",
                "system",
                "console",
                "personalised",
                "ok",
                {
                    "device": self.keys.device,
                    "key_id": self.keys.current().key_id,
                    "public_key": self.keys.current().public_key_pem,
                },
            )
            self.checkpoint()
        if self.log.repaired_bytes:
            self.record(
                "hsmd",
                "system",
                "console",
                "log-repaired",
                "ok",
                {
                    "dropped_bytes": self.log.repaired_bytes,
                    "reason": "an incomplete last record (a write cut short) was removed",
                },
            )
        self.p11 = p11service.P11Service(self)
        self.tailer = sshdlog.Tailer(self.on_login)

    # -- log -------------------------------------------------------------------------------

    def record(
        self,
        actor: str,
        role: str,
        source: str,
        event: str,
        outcome: str,
        detail: dict[str, Any],
        *,
        urgent: bool = False,
    ) -> dict[str, Any]:
        return self.log.append(
            actor=actor,
            role=role,
            source=source,
            event=event,
            outcome=outcome,
            detail=detail,
            urgent=urgent,
        )

    def append_signed(
        self, build: Callable[[auditlog.Head, str], dict[str, Any]], then: Callable[[], None]
    ) -> dict[str, Any]:
        """Append a record that signs the head (a key rotation), run ``then`` before any
        other signed record can follow, and count it as the latest checkpoint."""
        with self.checkpoint_lock:
            record = self.log.append_record(build)
            then()
            self.last_checkpoint_seq = int(record["seq"])
            return record

    def checkpoint(self, force: bool = False, urgent: bool = False) -> dict[str, Any] | None:
        with self.checkpoint_lock:
            head = self.log.head
            if head is None:
                return None
            if not force and head.seq == self.last_checkpoint_seq:
                return None
            signer = self.keys.current()
            device = self.keys.device
            record = self.log.append_record(
                lambda prev, now: auditlog.make_checkpoint(prev, signer, device=device, time=now),
                urgent=urgent,
            )
            self.last_checkpoint_seq = int(record["seq"])
            return record

    def on_login(self, iface: str, event: sshdlog.LoginEvent) -> None:
        known = event.user in KNOWN_LOGINS
        role = event.user if event.user in SESSION_ROLES else "none"
        client = p11service.client_name_of(event.user)
        if client is not None:
            known = True
            role = str(p11service.load_clients().get(client, {}).get("role", Role.CLIENT.value))
        if event.event == "login" and event.outcome != "ok":  # back-off counts logins only
            with self.failures_lock:
                self.failures.setdefault(event.source, []).append(time.monotonic())
        try:
            # A name that is no account here is logged as such, not as typed: people type
            # passwords into the user name field, and SPEC §3 keeps them out of the log.
            self.record(
                event.user if known else "unknown-user",
                role,
                event.source,
                event.event,
                event.outcome,
                {"interface": iface, "method": event.method, "reason": event.reason},
            )
        except LogUnavailable as exc:
            print(f"hsmd: login not logged: {exc}", file=sys.stderr, flush=True)

    def backoff_delay(self, source: str) -> float:
        """Seconds a password attempt from ``source`` waits: doubles after 3 recent failures,
        capped at 8 s. Never locks the account (SPEC §3)."""
        now = time.monotonic()
        with self.failures_lock:
            recent = [t for t in self.failures.get(source, []) if now - t < 300]
            self.failures[source] = recent
        excess = len(recent) - 3
        return 0.0 if excess <= 0 else float(min(2 ** (excess - 1), 8))

    def periodic(self) -> None:
        while True:
            time.sleep(CHECKPOINT_INTERVAL)
            try:
                self.checkpoint()
            except Exception as exc:
                print(f"hsmd: periodic checkpoint failed: {exc!r}", file=sys.stderr, flush=True)


class Connection(socketserver.StreamRequestHandler):
    server: Server

    def handle(self) -> None:
        daemon = self.server.daemon
        sock: socket.socket = self.request
        pid, uid, _gid = protocol.peer_credentials(sock)
        try:
            first = protocol.recv(self.rfile)
        except ValueError:
            return
        if first is None:
            return
        if first.get("type") == "backoff":
            if uid != 0:
                return
            delay = daemon.backoff_delay(str(first.get("source", "")))
            protocol.send(sock, {"type": "result", "delay": delay})
            return
        if first.get("type") == "p11":
            daemon.p11.serve(sock, pid, uid)
            return
        caller = identify(pid, uid)
        session = ShellSession(daemon, caller, sock, bool(first.get("interactive")))
        session.run(self.rfile)


class SessionGone(Exception):
    """The shell went away (or broke the protocol) in the middle of a command."""


class ShellSession:
    """The daemon's side of one ``hsmsh`` session: who is calling (fixed at connect),
    then each command approved, logged, run and answered (:class:`DaemonClient` in
    :mod:`shell` is the other side)."""

    def __init__(self, daemon: Daemon, caller: Caller, sock: socket.socket, interactive: bool):
        self.daemon = daemon
        self.caller = caller
        self.sock = sock
        self.interactive = interactive
        self.started = False

    def log(
        self, event: str, outcome: str, detail: dict[str, Any], *, urgent: bool = False
    ) -> None:
        role = self.caller.role.value if self.caller.role else "none"
        self.daemon.record(
            self.caller.account, role, self.caller.source, event, outcome, detail, urgent=urgent
        )

    def refuse(self, message: str, detail: dict[str, Any]) -> None:
        with contextlib.suppress(LogUnavailable):
            self.log("session", "denied", {"reason": message, **detail})
        protocol.send(self.sock, {"type": "refused", "error": message})

    def run(self, rfile: Any) -> None:
        c = self.caller
        where = {"interface": c.interface.value if c.interface else None}
        if c.role is None:
            self.refuse("this account has no role on the device", where)
            return
        if c.role is Role.CLIENT:
            self.refuse("an application client has no shell; only the PKCS#11 service", where)
            return
        if c.role is not Role.CONSOLE and c.interface is not allowed_interface(c.role):
            self.refuse(f"{c.role.value} may not use this interface", where)
            return
        owner = store.Owner.load()
        if c.role is Role.ADMIN and owner.otp_expired:
            self.refuse("the one-time password has expired; ask the provider for a new one", where)
            return
        # An unwritable log does not refuse the session: each command then fails closed on
        # its own record, except ``audit export``, which must still work (SPEC §3).
        with contextlib.suppress(LogUnavailable):
            self.log("session-start", "ok", {**where, "interactive": self.interactive})
        self.started = True
        protocol.send(
            self.sock,
            {
                "type": "ready",
                "role": c.role.value,
                "state": owner.state.value,
                "must_change_password": c.role is Role.ADMIN
                and not owner.device_state().otp_changed,
                "prompt": f"{self._hostname()}:{c.account}> ",
                "banner": f"hsmctl appliance {self.daemon.keys.device}; type 'help'",
            },
        )
        try:
            while True:
                try:
                    msg = protocol.recv(rfile)
                except ValueError:
                    break
                if msg is None or msg.get("type") == "bye":
                    break
                if msg.get("type") == "command":
                    given = msg.get("stdin")  # a shell that parsed the line itself
                    secrets = None if given is None else list(given)
                    self.command(str(msg.get("line", "")), secrets, rfile)
        except SessionGone:
            pass
        finally:
            self.end()
            with contextlib.suppress(OSError):
                protocol.send(self.sock, {"type": "result", "exit": 0})

    def _hostname(self) -> str:
        return os.uname().nodename

    def end(self) -> None:
        if not self.started:
            return
        try:
            self.log("session-end", "ok", {})
            self.daemon.checkpoint()
        except LogUnavailable:
            pass

    def reply(self, result: Reply) -> None:
        if result.stream is not None:
            pieces = result.stream
            try:
                total = sum(p.end - p.start for p in pieces)
                protocol.send(self.sock, {"type": "stream", "length": total})
                for piece in pieces:  # one per segment the records span
                    self.sock.sendfile(piece.file, piece.start, piece.end - piece.start)
            finally:
                close_pieces(pieces)
        protocol.send(
            self.sock,
            {"type": "result", "exit": result.exit, "output": result.output, "error": result.error},
        )

    def ask_secrets(self, rfile: Any, names: tuple[str, ...]) -> list[str] | None:
        """The values a parsed command reads from the shell's stdin, asked for by name
        (the shell has no grammar: :mod:`shell`). None: the caller cancelled, or sent
        something else (answered, nothing run, nothing logged, as when a shell gave up
        before sending the command). :class:`SessionGone` if the shell went away."""
        if not names:
            return []
        protocol.send(self.sock, {"type": "secrets", "names": list(names)})
        try:
            msg = protocol.recv(rfile)
        except ValueError as exc:
            raise SessionGone from exc
        if msg is None:
            raise SessionGone
        values = msg.get("values") if msg.get("type") == "secrets" else None
        if (
            isinstance(values, list)
            and len(values) == len(names)
            and all(isinstance(v, str) for v in values)
        ):
            return values
        protocol.send(self.sock, {"type": "result", "exit": protocol.EXIT_USAGE, "output": ""})
        return None

    def command(self, text: str, secrets: list[str] | None, rfile: Any) -> None:
        c = self.caller
        assert c.role is not None
        raw = text.encode("utf-8", "surrogateescape")
        try:
            cmd = grammar.parse(raw)
        except grammar.ParseError as exc:
            event = "escape-attempt" if exc.reason.escape_attempt else "command"
            try:
                # Only the words the grammar knows: whatever else was typed may be a
                # password given as an argument by mistake (SPEC §3: never in the log).
                self.log(
                    event,
                    "denied",
                    {"line": grammar.loggable(raw), "reason": exc.reason.value},
                )
            except LogUnavailable as log_exc:
                self.reply(Reply.failure(str(log_exc)))
                return
            self.reply(Reply(exit=protocol.EXIT_USAGE, error=str(exc)))
            return
        if secrets is None:  # before the order lock: a person may be typing them
            secrets = self.ask_secrets(rfile, cmd.spec.stdin)
            if secrets is None:
                return
        if cmd.words in READ_ONLY:
            self.reply(self.execute(cmd, secrets))
            return
        with self.daemon.order:
            result = self.execute(cmd, secrets)
        self.reply(result)

    def execute(self, cmd: grammar.Command, secrets: list[str]) -> Reply:
        """Approve, log, run and log one parsed command; the caller holds the order lock
        for anything that changes state, so the approval still holds when it runs."""
        c = self.caller
        assert c.role is not None
        owner = store.Owner.load()
        decision = authorize(c.role, cmd.acl_words, owner.device_state())
        name = cmd.canonical()
        audit_export = cmd.words == ("audit", "export")
        urgent = cmd.words in LOG_RELIEF and decision.allowed
        try:
            self.log(
                "command",
                "ok" if decision.allowed else "denied",
                {"command": name, "rule": decision.rule.value}
                | ({} if decision.allowed else {"reason": decision.reason}),
                urgent=urgent,
            )
        except LogUnavailable as exc:
            if not (audit_export and decision.allowed):
                return Reply.failure(f"refused: {exc}")
        if not decision.allowed:
            return Reply(exit=protocol.EXIT_DENIED, error=decision.reason)
        ctx = Context(caller_account=c.account, role=c.role, source=c.source, owner=owner)
        try:
            result = self.daemon.handlers.run(ctx, cmd, secrets)
        except LogUnavailable as exc:
            result = Reply.failure(f"refused: {exc}")
        except Exception as exc:  # a handler bug must not leak details or kill the session
            print(f"hsmd: {name}: {exc!r}", file=sys.stderr, flush=True)
            result = Reply(exit=protocol.EXIT_FAILED, error="internal error", outcome="error")
        try:
            self.log(
                "result",
                result.outcome,
                {"command": name, "exit": result.exit, **result.log_detail}
                | ({"error": result.error} if result.error else {}),
                urgent=urgent,
            )
        except LogUnavailable as exc:
            if not audit_export:
                # The command ran (its approval is in the log): tell the caller what it
                # did, not that it failed, and that the result record is missing. The
                # log stays closed, so nothing else runs until it can be written.
                note = (
                    f"the command ran (exit {result.exit}), but its result could not be "
                    f"written to the activity log ({exc}); the device refuses further "
                    "commands until it can"
                )
                result.error = f"{result.error}; {note}" if result.error else note
        return result


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, path: Path, daemon: Daemon) -> None:
        self.daemon = daemon
        path.unlink(missing_ok=True)
        super().__init__(str(path), Connection)
        # Anyone may connect: who they are comes from SO_PEERCRED, not from the socket mode.
        os.chmod(path, 0o666)  # noqa: S103


def main() -> int:
    os.umask(0o077)
    paths.RUN.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.RUN, 0o755)  # noqa: S103 - sessions must reach the socket inside
    tokenhelper.prestart()  # its imports run beside ours, not in the first operation
    daemon = Daemon()
    threading.Thread(target=daemon.tailer.run, name="sshd-logs", daemon=True).start()
    threading.Thread(target=daemon.periodic, name="checkpoints", daemon=True).start()
    tmp = paths.SOCKET.with_name(".hsmd.sock")
    server = Server(tmp, daemon)
    os.replace(tmp, paths.SOCKET)

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    server.serve_forever(poll_interval=0.5)
    daemon.keys.close()
    daemon.log.close()
    return 0
