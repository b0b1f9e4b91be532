"""Login events from sshd's own log files (``sshd -E FILE``, LogLevel VERBOSE).

:func:`parse` is pure: one sshd line in, one :class:`LoginEvent` (or None) out. Besides
logins it reports what sshd itself refuses after a login: a subsystem (sftp) and a
forwarding channel (``-L``/``-D``). Those lines name neither the user nor the address, so
:class:`Connections` follows which authenticated connections are open and names the one
the refusal belongs to when it is unambiguous (else ``unknown``). A refused ``-R``
(``tcpip-forward``) is logged by sshd only at DEBUG level and so never reaches us.
The :class:`Tailer` follows both interfaces' files from a persisted offset, so a daemon
restart neither loses nor repeats a login.

The offset is persisted (an fsynced atomic write) after a read that emitted an event, so
a restart never emits it again, and otherwise only every :data:`PERSIST_SLACK` bytes and
when the tailer stops. A read that emitted nothing need not be remembered: read again
after a restart, its lines emit nothing again (they only rebuild :class:`Connections`, as
they did the first time). A key-only login writes its lines in up to three bursts
(``Connection from``, ``Accepted``, ``Connection closed``) and only the middle one is an
event: one write per login instead of three.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import select
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from hsmctl.appliance import paths, store

# Every pattern is anchored at both ends. sshd prints a name it does not know exactly as
# the client sent it, spaces included ("Invalid user admin from 6.6.6.6 port 1 from ..."):
# such a name matches as a whole (greedy, so the address is sshd's own, the last one),
# never as an existing account or a forged address. Existing accounts match _USER.
_USER = r"(?P<user>[A-Za-z0-9._-]{1,32})"
_ANY_USER = r"(?P<user>.{1,100})"
_IP = r"[0-9a-fA-F.:]+"
_FROM = rf"(?P<ip>{_IP}) port (?P<port>\d+)"
_SSH2 = r" ssh2(?:: [A-Z0-9-]+ SHA256:\S+(?: .*)?)?"  # key type, fingerprint, certificate

_PATTERNS: list[tuple[re.Pattern[str], str, str]] = [
    (
        re.compile(rf"^Accepted (?P<method>\S+) for {_USER} from {_FROM}{_SSH2}$"),
        "ok",
        "accepted",
    ),
    (
        re.compile(
            rf"^Failed (?P<method>\S+) for (?:invalid user )?{_ANY_USER} from {_FROM}{_SSH2}$"
        ),
        "failed",
        "wrong credential",
    ),
    (re.compile(rf"^Invalid user {_ANY_USER} from {_FROM}$"), "denied", "no such account"),
    (
        re.compile(rf"^User {_USER} from (?P<ip>{_IP}) not allowed because (?P<why>.+)$"),
        "denied",
        "not allowed on this interface",
    ),
    (
        re.compile(
            rf"^Access denied for user {_USER} by PAM account configuration( \[preauth\])?$"
        ),
        "denied",
        "account locked",
    ),
    (
        re.compile(rf"^Connection closed by authenticating user {_USER} {_FROM} \[preauth\]$"),
        "failed",
        "authentication not completed",
    ),
    (
        re.compile(rf"^Disconnected from authenticating user {_USER} {_FROM} \[preauth\]$"),
        "failed",
        "authentication not completed",
    ),
]


def _forward_reason(g: dict[str, str]) -> str:
    where = g["path"] or f"{g['target']} port {g['port']}"
    return f"{g['kind']} forwarding to {where} refused"


# Refusals after login: (pattern, event, reason from the named groups).
_REFUSALS: list[tuple[re.Pattern[str], str, Callable[[dict[str, str]], str]]] = [
    (
        re.compile(
            rf"^subsystem request for (?P<what>.{{1,100}}) by user {_USER} failed, "
            r"subsystem not found$"
        ),
        "subsystem",
        lambda g: f"subsystem {g['what']} refused",
    ),
    (
        re.compile(
            r"^refused (?P<kind>local|streamlocal) port forward: originator .* port \d+, "
            r"(?:target (?P<target>.{1,100}) port (?P<port>\d+)|path (?P<path>.{1,100}))$"
        ),
        "port-forward",
        _forward_reason,
    ),
]

MAX_OPEN = 256
MAX_READ = 4 << 20  # bytes of sshd log taken per poll: a login flood is read in turns
_OPENED = _PATTERNS[0][0]
_CLOSED = re.compile(
    r"^(?:Connection closed by|Closing connection to|Connection reset by|Received disconnect from"
    r"|Read error from remote host|(?:Disconnected from|Timeout, client not responding from)"
    rf" user {_USER}) {_FROM}(?:[: ].*)?$"
)


@dataclass(frozen=True)
class LoginEvent:
    user: str
    source: str
    outcome: str
    reason: str
    method: str | None
    event: str = "login"


def parse(line: str) -> LoginEvent | None:
    for pattern, outcome, reason in _PATTERNS:
        m = pattern.search(line)
        if m:
            groups = m.groupdict()
            return LoginEvent(
                user=groups["user"],
                source=groups.get("ip") or "unknown",
                outcome=outcome,
                reason=groups.get("why") or reason,
                method=groups.get("method"),
            )
    for pattern, event, reason_of in _REFUSALS:
        m = pattern.search(line)
        if m:
            groups = {k: v or "" for k, v in m.groupdict().items()}
            return LoginEvent(
                user=groups.get("user") or "unknown",
                source="unknown",
                outcome="denied",
                reason=reason_of(groups),
                method=None,
                event=event,
            )
    return None


class Connections:
    """The authenticated connections one sshd log shows open, to name whose a refusal is."""

    def __init__(self) -> None:
        self.open: dict[tuple[str, str], str] = {}  # (address, port) -> user

    def feed(self, line: str) -> None:
        m = _OPENED.search(line)
        if m:
            self.open[(m["ip"], m["port"])] = m["user"]
            while len(self.open) > MAX_OPEN:  # a missed close line must not grow this
                del self.open[next(iter(self.open))]
            return
        m = _CLOSED.search(line)
        if m:
            self.open.pop((m["ip"], m["port"]), None)

    def attribute(self, event: LoginEvent) -> LoginEvent:
        """Fill in user and source when exactly one open connection can be the one."""
        if event.source != "unknown":
            return event
        candidates = {
            (addr, user)
            for (addr, _port), user in self.open.items()
            if event.user in ("unknown", user)
        }
        if len(candidates) != 1:
            return event
        ((addr, user),) = candidates
        return replace(event, user=user, source=addr)


IDLE_POLL = 2.0
"""Seconds between reads of the logs when no change is reported (a safety net only)."""

GATHER = 0.05
"""Seconds to let a login's lines arrive after the first: sshd writes four or five lines
a connection, and one read for all of them is one offsets write (fsynced) instead of
several."""

_IN_MODIFY, _IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE = 0x2, 0x8, 0x80, 0x100
_IN_Q_OVERFLOW = 0x4000  # events were dropped: anything may have changed
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


class Changes:
    """Writes to the sshd logs, from inotify on their directories (lifecycle:
    :meth:`watch` → :meth:`wait` from one thread → :meth:`close`).

    Why: 100 appliances' daemons each reading two files five times a second cost the lab
    ~6 % of a core while nothing happened, and a login waited up to 0.2 s to be logged.
    Only a wake-up: what is new is still found by reading the files from their offsets,
    so an event missed or merged loses nothing, and every :data:`IDLE_POLL` seconds the
    files are read anyway."""

    def __init__(self, fd: int, names: frozenset[bytes]) -> None:
        self.fd = fd
        self.names = names
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @classmethod
    def watch(cls, files: Iterable[Path]) -> Changes | None:
        """Watch the files' directories; None where inotify is not available."""
        files = list(files)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        except (OSError, AttributeError):
            return None
        if fd < 0:
            return None
        mask = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE
        for directory in {f.parent for f in files}:
            if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
                os.close(fd)
                return None
        return cls(fd, frozenset(os.fsencode(f.name) for f in files))

    def wait(self, timeout: float) -> bool:
        """Until one of the files changed (True) or ``timeout`` passed (False)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready = select.select([self.fd, self._wake_r], [], [], left)[0] if left > 0 else []
            if not ready:
                return False
            if self._wake_r in ready:
                return True
            if self._drain():
                return True

    def discard(self) -> None:
        """Forget the changes reported so far (the caller reads the files next)."""
        self._drain()

    def wake(self) -> None:
        """End a :meth:`wait` now (from another thread)."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _drain(self) -> bool:
        hit = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return hit
            at = 0
            while at + _EVENT.size <= len(data):
                _, mask, _, n = _EVENT.unpack_from(data, at)
                name = data[at + _EVENT.size : at + _EVENT.size + n].rstrip(b"\0")
                hit = hit or name in self.names or bool(mask & _IN_Q_OVERFLOW)
                at += _EVENT.size + n

    def close(self) -> None:
        for fd in (self.fd, self._wake_r, self._wake_w):
            os.close(fd)


PERSIST_SLACK = 64 << 10
"""Bytes of sshd log read without an event before the offset is persisted anyway: what a
restarted daemon reads a second time (and finds nothing in) is bounded by this."""


class Tailer:
    """Follows the sshd logs of both interfaces and hands each login to ``emit``.

    ``offsets`` is how far each file has been read; ``persisted`` what the offsets file
    says. Every line before ``persisted`` that is an event has been emitted; a line
    between the two is not an event (see the module docstring)."""

    def __init__(self, emit: Callable[[str, LoginEvent], None], interval: float = 0.2) -> None:
        self.emit = emit
        self.interval = interval
        self.offsets_path = paths.STATE / "sshd-offsets.json"
        self.offsets: dict[str, int] = store.read_json(self.offsets_path, {})
        self.persisted = dict(self.offsets)
        self._stop = threading.Event()
        self._changes: Changes | None = None
        self._lock = threading.Lock()
        self.connections = {iface: Connections() for iface in paths.SSHD_LOGS}

    def poll(self) -> int:
        """Read what is new in every file; returns the number of events emitted."""
        count = 0
        with self._lock:
            for iface, path in paths.SSHD_LOGS.items():
                count += self._poll_file(iface, path)
        return count

    def _poll_file(self, iface: str, path: Path) -> int:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return 0
        offset = self.offsets.get(iface, 0)
        if size < offset:
            offset = 0  # the file was replaced
        if size == offset:
            return 0
        count = 0
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(min(size - offset, MAX_READ))
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) == MAX_READ:  # no line is this long: skip it, do not stall
                self.offsets[iface] = offset + len(data)
                self._persist(force=False)
            return 0
        connections = self.connections.setdefault(iface, Connections())
        for raw in data[: end + 1].splitlines():
            line = raw.decode("utf-8", "replace")
            connections.feed(line)
            event = parse(line)
            if event is not None:
                self.emit(iface, connections.attribute(event))
                count += 1
        self.offsets[iface] = offset + end + 1
        self._persist(force=count > 0)
        return count

    def _persist(self, *, force: bool) -> None:
        """Write the offsets if an event was emitted (``force``) or the unpersisted
        distance of a file exceeds :data:`PERSIST_SLACK`."""
        if self.offsets == self.persisted:
            return
        if not force and all(
            0 <= n - self.persisted.get(iface, 0) <= PERSIST_SLACK
            for iface, n in self.offsets.items()
        ):
            return
        store.write_json(self.offsets_path, self.offsets)
        self.persisted = dict(self.offsets)

    def flush(self) -> None:
        """Persist how far every file has been read (the tailer stops)."""
        with self._lock:
            self._persist(force=True)

    def run(self) -> None:
        changes = self._changes = Changes.watch(paths.SSHD_LOGS.values())
        try:
            while not self._stop.is_set():
                try:
                    self.poll()
                except Exception as exc:  # keep following; the error itself gets logged
                    print(f"hsmd: sshd log tailer: {exc!r}", flush=True)
                if changes is None:
                    time.sleep(self.interval)
                elif changes.wait(IDLE_POLL) and not self._stop.is_set():
                    time.sleep(GATHER)
                    changes.discard()  # what the gathered lines reported: read next
        finally:
            self._changes = None
            if changes is not None:
                changes.close()
            try:
                self.flush()
            except OSError as exc:  # what was read is read again after a restart
                print(f"hsmd: sshd log tailer: {exc!r}", flush=True)

    def stop(self) -> None:
        self._stop.set()
        changes = self._changes
        if changes is not None:
            changes.wake()
