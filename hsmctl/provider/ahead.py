"""TCP connections to the appliances opened ahead of their logins (``hsmctl health``).

A fleet poll of spares is one key-only login per appliance, and the device's sshd spends
about a third of that login's CPU before the key exchange starts: accepting, forking and
re-executing itself, sending its banner. The poll knows every address as soon as it has
read the inventory, but can log in only once it knows each appliance's state (the order of
its logins depends on it), after this host has imported and opened the state store, most
of its fixed cost, on one thread. :class:`OpenAhead` opens each appliance's first TCP
connection in a background thread at that point, so the devices do their part meanwhile
instead of afterwards.

Trust is unchanged: an opened-ahead socket is the TCP connection the login would have made
a moment later; the key exchange, the host-key check against the pins and the
authentication all happen on it at login, as on any other connection. The connections
open in poll order, :data:`WINDOW` at a time (each device's accept, fork and re-execution
done before the next starts); one whose login comes before the thread has opened it is
not opened ahead at all. A socket the device
has closed meanwhile (peeked just before use) gives way to a fresh connection; a
connection that failed ahead is reported as a direct connect would report it (the
appliance is unreachable; no second wait). Only an appliance's first login gets it.

Standard library only, so it can start before the heavier modules are imported.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import os
import selectors
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType

SSH_PORT = 22

MAX_AHEAD = 128
"""Connections opened ahead at most (the first appliances in poll order): bounds the file
descriptors, and the devices' idle pre-authentication connections, of a large fleet."""

WINDOW = 2
"""Connections the devices work on at once: the next opens when one has the device's
banner. Opening all at once made ~100 sshd runnable beside this host's single-threaded
imports, which got a hundredth of the CPU and finished ~0.3 s later, after the devices
had run out of work (one core idle): measured in docs/performance.md ("Stop 19"). Two keep
one core busy with the devices while this host imports on the other."""

BANNER_WAIT = 0.05
"""Seconds a connection holds its place in :data:`WINDOW` while its device has not sent
its banner: a slow device delays the next connection by this much at most (its login
waits for the banner itself, with the SSH banner timeout)."""

MAX_AGE = 20.0
"""Seconds an opened-ahead connection is used for at most: well inside the time a device's
sshd waits for a login before it hangs up (``LoginGraceTime``: 30 s on the appliances), so
that the device cannot close it between the check before use and the key exchange."""


class _Entry:
    """One appliance's connection: pending, then a socket or an error."""

    __slots__ = ("abandoned", "done", "error", "since", "sock", "started", "taken")

    def __init__(self) -> None:
        self.since = 0.0  # when it connected (time.monotonic())
        self.started = False
        self.done = False
        self.taken = False
        self.abandoned = False
        self.sock: socket.socket | None = None
        self.error: OSError | None = None


class _Pending:
    """A connection the background thread is opening: connecting until ``greeting`` is
    set, then waiting for the device's banner."""

    __slots__ = ("appliance", "deadline", "greeting", "sock")

    def __init__(self, appliance: str, sock: socket.socket, deadline: float) -> None:
        self.appliance = appliance
        self.sock = sock
        self.deadline = deadline  # of the connect
        self.greeting: float | None = None  # when it connected


def _due(p: _Pending) -> float:
    """When the thread stops waiting for it."""
    return p.deadline if p.greeting is None else p.greeting + BANNER_WAIT


class OpenAhead:
    """Lifecycle: create (no I/O) → :meth:`start` (returns at once; a background thread
    connects) → :meth:`take` from any thread, once per appliance (its socket, now owned by
    the caller) → :meth:`close` (closes what was never taken, waits for the thread;
    idempotent). Also a context manager."""

    def __init__(
        self, addresses: Mapping[str, str], *, port: int = SSH_PORT, timeout: float = 10.0
    ) -> None:
        self._addresses = dict(addresses)
        self.port = port
        self._timeout = timeout
        self._cond = threading.Condition()
        self._entries: dict[str, _Entry] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self.taken = 0
        """Sockets handed to a login (for tests and measurements)."""

    def start(self, appliances: Sequence[str]) -> None:
        """Connect to (up to :data:`MAX_AHEAD` of) ``appliances``; call once."""
        todo: list[tuple[str, str]] = []
        with self._cond:
            if self._closed or self._thread is not None:
                return
            for a in appliances:
                host = self._addresses.get(a)
                if host is None or a in self._entries or not _is_ip(host):
                    continue
                self._entries[a] = _Entry()
                todo.append((a, host))
                if len(todo) >= MAX_AHEAD:
                    break
            if not todo:
                return
            self._thread = threading.Thread(
                target=self._connect_all, args=(todo,), name="hsmctl-open-ahead", daemon=True
            )
        self._thread.start()

    def take(self, appliance: str, host: str, port: int, timeout: float) -> socket.socket | None:
        """The appliance's socket, connected and blocking with ``timeout``, the first time
        it is asked for at its own address; None if there is none (not opened yet: it
        never will be), or none younger than :data:`MAX_AGE` that the device still holds
        (connect afresh). Waits at most ``timeout`` for a connection being opened. Raises
        the OSError its connection failed with."""
        with self._cond:
            entry = self._entries.get(appliance)
            if (
                entry is None
                or entry.taken
                or (host, port) != (self._addresses[appliance], self.port)
            ):
                return None
            entry.taken = True
            if not entry.started:
                return None  # not opened yet: the login connects by itself
            if not self._cond.wait_for(lambda: entry.done, timeout=timeout):
                entry.abandoned = True  # the thread closes it when it connects
                return None
            sock, entry.sock = entry.sock, None
            if entry.error is not None:
                raise entry.error
        if sock is None:
            return None
        if time.monotonic() - entry.since > MAX_AGE or not _alive(sock):
            sock.close()
            return None
        sock.setblocking(True)
        sock.settimeout(timeout)
        with self._cond:
            self.taken += 1
        return sock

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._cond:
            for entry in self._entries.values():
                if entry.sock is not None:
                    entry.sock.close()
                    entry.sock = None

    def __enter__(self) -> OpenAhead:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the background thread -----------------------------------------------------------

    def _connect_all(self, todo: list[tuple[str, str]]) -> None:
        """Connect to ``todo`` in order, :data:`WINDOW` at a time. A connection is handed
        over (:meth:`_finish`) when the device's banner (or its close) is there, or after
        :data:`BANNER_WAIT`; a connect gets the whole timeout from when it started, as a
        direct one would. No new connection starts once the timeout has passed since the
        first (the poll's logins are under way and connect by themselves)."""
        stop_opening = time.monotonic() + self._timeout
        queue = collections.deque(todo)
        with selectors.DefaultSelector() as sel:
            while not self._is_closed():
                while queue and len(sel.get_map()) < WINDOW and time.monotonic() < stop_opening:
                    self._open(sel, *queue.popleft())
                if not sel.get_map():
                    break
                now = time.monotonic()
                wait = min(0.1, *(_due(k.data) - now for k in sel.get_map().values()))
                for key, _ in sel.select(max(0.0, wait)):
                    self._progress(sel, key.data, time.monotonic())
                now = time.monotonic()
                for key in list(sel.get_map().values()):
                    if _due(key.data) <= now:
                        sel.unregister(key.fileobj)
                        self._expire(key.data)
            for key in list(sel.get_map().values()):  # closed meanwhile
                sel.unregister(key.fileobj)
                self._expire(key.data)
        for appliance, _ in queue:  # never opened: their logins connect by themselves
            self._finish(appliance, None, None)

    def _open(self, sel: selectors.BaseSelector, appliance: str, host: str) -> None:
        """Start a non-blocking connect (unless the appliance's login came first)."""
        if not self._begin(appliance):
            return
        try:
            sock = socket.socket(_family(host), socket.SOCK_STREAM)
        except OSError as exc:
            self._finish(appliance, None, exc)
            return
        sock.setblocking(False)
        rc = sock.connect_ex((host, self.port))
        if rc in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
            deadline = time.monotonic() + self._timeout
            sel.register(sock, selectors.EVENT_WRITE, _Pending(appliance, sock, deadline))
        else:
            sock.close()
            self._finish(appliance, None, OSError(rc, os.strerror(rc)))

    def _progress(self, sel: selectors.BaseSelector, p: _Pending, now: float) -> None:
        """A connect completed (then wait for the banner), or the banner is there."""
        if p.greeting is not None:
            sel.unregister(p.sock)
            self._finish(p.appliance, p.sock, None)
            return
        rc = p.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if rc:
            sel.unregister(p.sock)
            p.sock.close()
            self._finish(p.appliance, None, OSError(rc, os.strerror(rc)))
        else:
            p.greeting = now
            sel.modify(p.sock, selectors.EVENT_READ, p)

    def _expire(self, p: _Pending) -> None:
        """Out of time: a connect fails as a direct one would; a connection still waiting
        for its banner is handed over all the same (its login waits for the banner)."""
        if p.greeting is not None:
            self._finish(p.appliance, p.sock, None)
        else:
            p.sock.close()
            self._finish(p.appliance, None, TimeoutError(errno.ETIMEDOUT, "timed out"))

    def _is_closed(self) -> bool:
        with self._cond:
            return self._closed

    def _begin(self, appliance: str) -> bool:
        """Mark the appliance's connection as started, unless its login took it first."""
        with self._cond:
            entry = self._entries[appliance]
            if entry.taken:
                entry.done = True
                return False
            entry.started = True
            return True

    def _finish(self, appliance: str, sock: socket.socket | None, error: OSError | None) -> None:
        with self._cond:
            entry = self._entries[appliance]
            if sock is not None and (entry.abandoned or self._closed):
                sock.close()
                sock = None
            entry.sock, entry.error, entry.done = sock, error, True
            entry.since = time.monotonic()
            self._cond.notify_all()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def _alive(sock: socket.socket) -> bool:
    """Whether the device still holds the connection: nothing to read yet, or its banner;
    not end-of-file, not reset."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
