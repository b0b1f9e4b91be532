"""The HA group kit's connector: ssh's ``ProxyCommand`` that picks a reachable member.

This file is copied as is into a group kit (``connect.py``) and run on the application's
host by ``/usr/bin/python3 -I -S`` (standard library only, no site packages, nothing of
hsmctl): ``connect.py KIT_DIR IP:PORT [IP:PORT ...]``. With ``ProxyUseFdpass yes`` ssh
gets the connected TCP socket itself back over its stdout (SCM_RIGHTS) and this process
exits, so ssh talks to the member directly (no relay process, TCP_NODELAY on the real
socket) and host-key checking stays ssh's (the kit's ``known_hosts``).

- Order: the member that answered last for this kit (``KIT_DIR/last-good``, if the kit
  is writable for the application's user) first, then the others in the group's order.
- Connection attempts are staggered (RFC 8305's "Happy Eyeballs" way): the next member's
  attempt starts when the one before failed or after ``STAGGER`` seconds without an
  answer, whichever comes first; the first to connect wins and the others are closed
  before they complete. A member whose port is gone costs ``STAGGER``, not a timeout.
  All attempts end after ``CONNECT_TIMEOUT``: then exit 1 (ssh reports it, the
  application's PKCS#11 call fails with ``CKR_DEVICE_ERROR``/``CKR_DEVICE_REMOVED``).
- ``TCP_USER_TIMEOUT`` on the socket: data the member has not acknowledged after
  ``USER_TIMEOUT_MS`` ends the connection (``ETIMEDOUT``), so a member that vanishes in
  the middle of a session fails the application's call within about half a second instead of
  after TCP's retransmissions (minutes) or ssh's keepalives (``ServerAliveInterval``:
  seconds, and it would also cut healthy idle sessions). Acknowledgements come from the
  member's kernel, not from a process, so load on the member does not trigger it; an
  idle session is not affected (nothing unacknowledged).
"""

from __future__ import annotations

# Only built-in modules: ``socket`` (enum, selectors, collections) alone costs 70 ms of
# start-up on a loaded host, paid by every new session.
import _socket
import os
import select
import sys
import time

STAGGER = 0.1
CONNECT_TIMEOUT = 5.0
USER_TIMEOUT_MS = 500
LAST_GOOD = "last-good"


def parse_member(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not IP:PORT: {text[:60]!r}")
    return host, int(port)


def order(members: list[str], last_good: str | None) -> list[str]:
    """``last_good`` first (if it is a member), then the rest in the group's order."""
    if last_good in members:
        return [last_good, *(m for m in members if m != last_good)]
    return list(members)


def _read_last_good(kit: str) -> str | None:
    try:
        with open(os.path.join(kit, LAST_GOOD), encoding="ascii") as f:
            return f.read(100).strip() or None
    except (OSError, ValueError):
        return None


def _write_last_good(kit: str, member: str, previous: str | None) -> None:
    if member == previous:
        return
    tmp = os.path.join(kit, f".{LAST_GOOD}.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(member + "\n")
        os.replace(tmp, os.path.join(kit, LAST_GOOD))
    except OSError:  # a read-only kit: no memory, the group's order every time
        try:  # noqa: SIM105 - no contextlib import: this runs once per session
            os.unlink(tmp)
        except OSError:
            pass


def _start(member: str) -> _socket.socket:
    host, port = parse_member(member)
    s = _socket.socket(_socket.AF_INET6 if ":" in host else _socket.AF_INET, _socket.SOCK_STREAM)
    s.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    s.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    s.setblocking(False)
    err = s.connect_ex((host, port))
    if err not in (0, 115):  # EINPROGRESS
        s.close()
        raise OSError(err, os.strerror(err))
    return s


def connect(members: list[str], stagger: float = STAGGER,
            timeout: float = CONNECT_TIMEOUT) -> tuple[str, _socket.socket]:  # fmt: skip
    """The first member to accept a TCP connection, attempts staggered; OSError naming
    every member's failure if none does within ``timeout``."""
    start = time.monotonic()
    deadline = start + timeout
    pending = list(members)
    trying: dict[int, tuple[str, _socket.socket]] = {}
    errors: dict[str, str] = {}
    next_at = start
    try:
        while True:
            now = time.monotonic()
            if pending and (now >= next_at or not trying):
                member = pending.pop(0)
                try:
                    s = _start(member)
                    trying[s.fileno()] = (member, s)
                except (OSError, ValueError) as exc:
                    errors[member] = str(exc)
                next_at = time.monotonic() + stagger
                continue
            if not trying:
                break
            if now >= deadline:
                for member, _s in trying.values():
                    errors[member] = "timed out"
                break
            wait = deadline - now
            if pending:
                wait = min(wait, max(0.0, next_at - now))
            _r, ready, _x = select.select([], list(trying), [], wait)
            for fd in ready:
                member, s = trying.pop(fd)
                err = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
                if err == 0:
                    return member, s
                errors[member] = os.strerror(err)
                s.close()
                next_at = time.monotonic()  # a refusal: the next member at once
    finally:
        for _member, s in trying.values():
            s.close()
    shown = "; ".join(f"{m}: {e}" for m, e in errors.items())
    raise OSError(f"no member of the group answered ({shown})")


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        sys.stderr.write("usage: connect.py KIT_DIR IP:PORT [IP:PORT ...]\n")
        return 2
    kit, members = argv[1], argv[2:]
    previous = _read_last_good(kit)
    try:
        member, s = connect(order(members, previous))
    except OSError as exc:
        sys.stderr.write(f"hsm group connector: {exc}\n")
        return 1
    s.setblocking(True)
    out = _socket.socket(fileno=1)  # ssh's end of a socketpair (ProxyUseFdpass)
    try:
        rights = s.fileno().to_bytes(4, sys.byteorder)  # one C int
        out.sendmsg([b"\0"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
    finally:
        out.detach()
        s.close()
    _write_last_good(kit, member, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
