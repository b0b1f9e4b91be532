"""Login events from sshd's own log files (``sshd -E FILE``, LogLevel VERBOSE).

:func:`parse` is pure: one sshd line in, one :class:`LoginEvent` (or None) out. The
:class:`Tailer` follows both interfaces' files from a persisted offset, so a daemon
restart neither loses nor repeats a login.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hsmctl.appliance import paths, store

_USER = r"(?P<user>[A-Za-z0-9._-]{1,32})"
_FROM = r"(?P<ip>[0-9a-fA-F.:]+) port (?P<port>\d+)"

_PATTERNS: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(rf"Accepted (?P<method>\S+) for {_USER} from {_FROM}"), "ok", "accepted"),
    (
        re.compile(rf"Failed (?P<method>\S+) for (?:invalid user )?{_USER} from {_FROM}"),
        "failed",
        "wrong credential",
    ),
    (re.compile(rf"Invalid user {_USER} from {_FROM}"), "denied", "no such account"),
    (
        re.compile(rf"User {_USER} from (?P<ip>[0-9a-fA-F.:]+) not allowed because (?P<why>.+)"),
        "denied",
        "not allowed on this interface",
    ),
    (
        re.compile(rf"Access denied for user {_USER} by PAM account configuration"),
        "denied",
        "account locked",
    ),
    (
        re.compile(rf"Connection closed by authenticating user {_USER} {_FROM} \[preauth\]"),
        "failed",
        "authentication not completed",
    ),
    (
        re.compile(rf"Disconnected from authenticating user {_USER} {_FROM} \[preauth\]"),
        "failed",
        "authentication not completed",
    ),
]


@dataclass(frozen=True)
class LoginEvent:
    user: str
    source: str
    outcome: str
    reason: str
    method: str | None


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
    return None


class Tailer:
    """Follows the sshd logs of both interfaces and hands each login to ``emit``."""

    def __init__(self, emit: Callable[[str, LoginEvent], None], interval: float = 0.2) -> None:
        self.emit = emit
        self.interval = interval
        self.offsets_path = paths.STATE / "sshd-offsets.json"
        self.offsets: dict[str, int] = store.read_json(self.offsets_path, {})
        self._stop = threading.Event()
        self._lock = threading.Lock()

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
            data = fh.read(size - offset)
        end = data.rfind(b"\n")
        if end < 0:
            return 0
        for raw in data[: end + 1].splitlines():
            event = parse(raw.decode("utf-8", "replace"))
            if event is not None:
                self.emit(iface, event)
                count += 1
        self.offsets[iface] = offset + end + 1
        store.write_json(self.offsets_path, self.offsets)
        return count

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as exc:  # keep following; the error itself gets logged
                print(f"hsmd: sshd log tailer: {exc!r}", flush=True)
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
