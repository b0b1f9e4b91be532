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

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time
    from typing import Any

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
    if len(argv) >= 2 and argv[1] == "--session":
        return session_main(argv)
    only = len(argv) >= 2 and argv[1] == "--only"
    if only:  # a holder's link to one member: the holder keeps last-good
        argv = argv[:1] + argv[2:]
    if len(argv) < 3:
        sys.stderr.write("usage: connect.py [--only] KIT_DIR IP:PORT [IP:PORT ...]\n")
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
    if not only:
        _write_last_good(kit, member, previous)
    return 0


# -- the warm standby: ``connect.py --session`` is p11-kit's command ------------------------
#
# p11-kit runs the module's ``remote: |COMMAND`` at every C_Initialize on a fresh unix
# socketpair (stdin = stdout) and speaks its RPC over it: first one version byte each way
# (p11-kit 0.24: the client sends 0), then the calls. A new session used to be a new
# ssh, a new sshd session, ``hsm-p11``, ``hsmd`` starting ``p11-kit remote`` with the
# policy module and SoftHSM: 0.4 s to 2 s of a loaded device's CPU, paid again after a
# failover. Here the command hands its socket (SCM_RIGHTS) to a *holder*, one small
# process per application process and kit (started by the first session, double-forked,
# so p11-kit's C_Finalize never waits for it), and exits. The holder keeps:
#
# - the session's *link*: an ssh it started to one member (``--only``: this connector
#   for one member), whose device side answered the version byte the holder sent ahead;
#   it then answers the application's version byte with the device's and relays bytes
#   both ways (one process hop: the price of a session that can be opened ahead);
# - one *standby*: a link to another member, opened ahead the same way (ssh established,
#   authenticated, ``hsm-p11`` handed over, ``p11-kit remote`` running and past the
#   version byte, waiting for the first call). When the session's link fails (the device
#   side closed first: the member is lost), the member is marked down, the application's
#   call fails, and its next C_Initialize gets the standby at once; a new standby opens
#   in the background on a member not marked down (a member marked down is retried after
#   0.5, 1, 2 … 5 s). A session the application ended itself (a healthy reinitialise)
#   reopens on the same member, as without the holder.
#
# At most one standby per application and kit (none for a group of one); a standby that
# dies (its member lost: ssh's keepalive and TCP_USER_TIMEOUT end it) is replaced; the
# holder and its standby end with the application (pidfd) or after IDLE_EXIT s with no
# session. The holder's socket is abstract, named by uid, application pid and kit; both
# ends check SO_PEERCRED (same uid) before anything is handed over. No secret passes
# through the holder but inside the relayed PKCS#11 calls (C_Login's PIN), as through ssh.

SSH = "/usr/bin/ssh"
PYTHON = "/usr/bin/python3"
VERSION = b"\0"  # p11-kit 0.24.1's RPC version byte
IDLE_EXIT = 60.0
RETRY_FIRST = 0.5
RETRY_MAX = 5.0
_ACK = b"K"


def _fnv(text: str) -> str:
    h = 0xCBF29CE484222325
    for b in text.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def holder_name(kit: str, uid: int, app: int) -> bytes:
    """The holder's abstract unix socket name: one per user, application process and kit."""
    return f"\0hsm-group-standby/{uid}/{app}/{_fnv(kit)}".encode()


def ssh_argv(kit: str, alias: str, member: str | None = None,
             connector: str | None = None) -> list[str]:  # fmt: skip
    """The kit's ssh; with ``member``, through this connector to that member only."""
    argv = [SSH, "-F", os.path.join(kit, "ssh_config")]
    if member is not None:
        script = connector or os.path.abspath(__file__)
        argv += ["-o", f"ProxyCommand={PYTHON} -I -S {script} --only {kit} {member}"]
    return [*argv, "-T", alias]


def _unix() -> _socket.socket:
    return _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)


def _peer_uid(s: _socket.socket) -> int:
    cred = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)  # pid, uid, gid
    return int.from_bytes(cred[4:8], sys.byteorder)


def session_main(argv: list[str]) -> int:
    if len(argv) < 5:
        sys.stderr.write("usage: connect.py --session KIT_DIR ALIAS IP:PORT [IP:PORT ...]\n")
        return 2
    kit, alias, members = argv[2], argv[3], argv[4:]
    try:
        for m in members:
            parse_member(m)
    except ValueError as exc:
        sys.stderr.write(f"hsm group connector: {exc}\n")
        return 2
    try:
        if hand_over(kit, alias, members, os.getppid()):
            return 0
        why = "the holder did not take the session"
    except OSError as exc:
        why = str(exc)
    sys.stderr.write(f"hsm group connector: no standby holder ({why}); connecting directly\n")
    os.execv(SSH, ssh_argv(kit, alias))  # noqa: S606 - fixed path, the kit's own argv
    return 1  # not reached


def hand_over(kit: str, alias: str, members: list[str], app: int,
              fd: int = 0) -> bool:  # fmt: skip
    """Give ``fd`` (p11-kit's socket) to the application's holder, starting it if there
    is none; True once the holder has it."""
    name = holder_name(kit, os.getuid(), app)
    s = _unix()
    try:
        try:
            s.connect(name)
        except (ConnectionRefusedError, FileNotFoundError):
            start_holder(name, kit, alias, members, app)
            s.connect(name)
        if _peer_uid(s) != os.getuid():
            raise OSError("the standby holder's socket is another user's")
        rights = fd.to_bytes(4, sys.byteorder)
        s.sendmsg([b"S"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
        s.settimeout(CONNECT_TIMEOUT)
        return s.recv(1) == _ACK
    finally:
        s.close()


def start_holder(name: bytes, kit: str, alias: str, members: list[str], app: int) -> None:
    listener = _unix()
    try:
        listener.bind(name)
    except OSError as exc:
        listener.close()
        if exc.errno == 98:  # EADDRINUSE: another session of this application made one
            return
        raise
    listener.listen(8)
    app_fd = os.pidfd_open(app)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the holder's own processes
        code = 0
        try:
            os.setsid()
            if os.fork() == 0:
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, 0)  # never keep p11-kit's socket of this first session
                os.dup2(null, 1)
                keep = {0, 1, 2, listener.fileno(), app_fd}
                for fd in [int(f) for f in os.listdir("/proc/self/fd")]:
                    if fd not in keep:
                        try:  # noqa: SIM105 - no contextlib import (start-up time)
                            os.close(fd)
                        except OSError:  # the listing's own descriptor, gone already
                            pass
                Holder(listener, kit, alias, members, app_fd).run()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    listener.close()
    os.close(app_fd)
    os.waitpid(pid, 0)


class Link:
    """One ssh to one member, its stdin/stdout a socketpair whose other end is ``sock``."""

    def __init__(self, member: str, pid: int, sock: _socket.socket) -> None:
        self.member = member
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.sock = sock
        self.state = "warming"  # -> ready -> active; closing, dead
        self.reply = b""
        self.request: Request | None = None
        self.client: _socket.socket | None = None


class Request:
    """An application's socket waiting for a link."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.byte = b""
        self.link: Link | None = None
        self.tried: set[str] = set()


class Holder:
    def __init__(self, listener: _socket.socket, kit: str, alias: str, members: list[str],
                 app_fd: int, stop_fd: int | None = None) -> None:  # fmt: skip
        self.listener = listener
        self.kit = kit
        self.alias = alias
        self.members = list(members)
        self.app_fd = app_fd
        self.stop_fd = stop_fd
        self.links: list[Link] = []
        self.requests: list[Request] = []
        self.down: dict[str, tuple[float, float]] = {}  # member -> (retry at, next backoff)
        self.current: str | None = None
        self.current_ok = False
        self.last_used = time.monotonic()
        self.uid = os.getuid()

    # -- links ---------------------------------------------------------------------------

    def command(self, member: str) -> list[str]:
        return ssh_argv(self.kit, self.alias, member)

    def start(self, member: str, quiet: bool) -> Link:
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - becomes ssh
            try:
                os.dup2(theirs.fileno(), 0)
                os.dup2(theirs.fileno(), 1)
                if quiet:  # a standby's errors (a member down, retried) are not the app's
                    null = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(null, 2)
                argv = self.command(member)
                os.execv(argv[0], argv)  # noqa: S606 - fixed path, the kit's own argv
            finally:
                os._exit(127)
        theirs.close()
        link = Link(member, pid, ours)
        try:  # noqa: SIM105 - no contextlib import (start-up time)
            ours.sendall(VERSION)  # reaches p11-kit remote once the session is up
        except OSError:
            pass
        self.links.append(link)
        return link

    def close_link(self, link: Link, failed: bool) -> None:
        if link.state in ("closing", "dead"):
            return
        was_active = link.state == "active"
        link.state = "closing"
        link.sock.close()
        if link.client is not None:
            link.client.close()
            link.client = None
        if failed:
            retry = self.down.get(link.member, (0.0, RETRY_FIRST))[1]
            self.down[link.member] = (time.monotonic() + retry, min(retry * 2, RETRY_MAX))
            if was_active:
                self.current_ok = False
        elif was_active:
            self.current_ok = True
        req, link.request = link.request, None
        if req is not None:  # its link failed before it was ready: the next member
            req.link = None
            self.assign(req)

    def reaped(self, link: Link) -> None:
        try:  # noqa: SIM105 - no contextlib import (start-up time)
            os.waitpid(link.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        os.close(link.pidfd)
        self.close_link(link, failed=link.state != "closing")
        link.state = "dead"
        self.links.remove(link)

    # -- requests --------------------------------------------------------------------------

    def preference(self, tried: set[str]) -> list[str]:
        """Members to open a session on, best first: the current member after a healthy
        end, then the others (last good first) not marked down, then those marked down
        (a mark ends when a link to the member is ready)."""
        first = [self.current] if self.current_ok and self.current else []
        ordered = order(self.members, self.current or _read_last_good(self.kit))
        up = [m for m in ordered if m not in self.down]
        down = [m for m in ordered if m in self.down]
        seen: list[str] = []
        for m in (*first, *up, *down):
            if m not in tried and m not in seen:
                seen.append(m)
        return seen

    def assign(self, req: Request) -> None:
        cands = self.preference(req.tried)
        if not cands:
            self.drop(req)
            return
        spare = [lk for lk in self.links if lk.request is None
                 and lk.state in ("warming", "ready") and lk.member in cands]  # fmt: skip
        use = next((lk for lk in spare if lk.member == cands[0]), None)
        if use is None and not self.current_ok:  # a failover: the standby, ready or not
            up = [lk for lk in spare if lk.member not in self.down]
            use = next((lk for lk in up if lk.state == "ready"), up[0] if up else None)
        if use is None:
            use = self.start(cands[0], quiet=False)
        use.request = req
        req.link = use
        req.tried.add(use.member)
        self.handover(req)

    def drop(self, req: Request) -> None:
        if req in self.requests:
            self.requests.remove(req)
        if req.link is not None:
            req.link.request = None
            req.link = None
        req.sock.close()

    def handover(self, req: Request) -> None:
        link = req.link
        if link is None or link.state != "ready" or not req.byte:
            return
        if req.byte != VERSION:  # another protocol version: not what the link was opened for
            self.drop(req)
            return
        try:
            req.sock.sendall(link.reply)
        except OSError:
            self.drop(req)
            return
        self.requests.remove(req)
        link.request = None
        link.client = req.sock
        link.state = "active"
        self.down.pop(link.member, None)
        if link.member != self.current:
            _write_last_good(self.kit, link.member, _read_last_good(self.kit))
        self.current, self.current_ok = link.member, True
        self.last_used = time.monotonic()

    def accept(self) -> None:
        conn, _addr = self.listener._accept()  # type: ignore[attr-defined]
        s = _socket.socket(fileno=conn)
        try:
            if _peer_uid(s) != self.uid:
                return
            s.settimeout(CONNECT_TIMEOUT)
            # close-on-exec: no ssh started later may hold this session's socket open
            _msg, anc, _flags, _addr = s.recvmsg(1, _socket.CMSG_SPACE(4),
                                                 _socket.MSG_CMSG_CLOEXEC)  # fmt: skip
            fds = [int.from_bytes(data[:4], sys.byteorder) for level, kind, data in anc
                   if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS]  # fmt: skip
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                return
            req = Request(_socket.socket(fileno=fds[0]))
            s.sendall(_ACK)
        except OSError:
            return
        finally:
            s.close()
        self.requests.append(req)
        self.last_used = time.monotonic()
        self.assign(req)

    # -- the standby -------------------------------------------------------------------------

    def maintain(self) -> float | None:
        """Open the standby if there is none; seconds until a member marked down may be
        tried again (None: nothing to wait for)."""
        if self.requests:
            return None
        active = [lk.member for lk in self.links if lk.state == "active"]
        busy = active[-1] if active else self.current
        if busy is None:
            return None
        if any(lk.request is None and lk.state in ("warming", "ready") for lk in self.links):
            return None
        now = time.monotonic()
        waits = []
        for m in order(self.members, None):
            if m == busy:
                continue
            at = self.down.get(m, (0.0, 0.0))[0]
            if at <= now:
                self.start(m, quiet=True)
                return None
            waits.append(at - now)
        return min(waits) if waits else None

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        finally:
            for link in list(self.links):
                try:  # noqa: SIM105 - no contextlib import (start-up time)
                    os.kill(link.pid, 15)  # SIGTERM
                except OSError:
                    pass
                link.sock.close()
                if link.client is not None:
                    link.client.close()
            for req in self.requests:
                req.sock.close()
            self.listener.close()

    def _loop(self) -> None:
        while True:
            wait = self.maintain()
            if not self.requests and not any(lk.state == "active" for lk in self.links):
                idle = self.last_used + IDLE_EXIT - time.monotonic()
                if idle <= 0:
                    return
                wait = idle if wait is None else min(wait, idle)
            handlers: dict[int, Any] = {self.listener.fileno(): ("accept", None),
                                        self.app_fd: ("exit", None)}  # fmt: skip
            if self.stop_fd is not None:
                handlers[self.stop_fd] = ("exit", None)
            for link in self.links:
                handlers[link.pidfd] = ("reaped", link)
                if link.state in ("warming", "ready", "active"):
                    handlers[link.sock.fileno()] = ("link", link)
                if link.client is not None:
                    handlers[link.client.fileno()] = ("client", link)
            for req in self.requests:
                handlers[req.sock.fileno()] = ("request", req)
            ready, _w, _x = select.select(list(handlers), [], [], wait)
            for fd in ready:
                what, obj = handlers[fd]
                if what == "exit":
                    return
                if what == "accept":
                    self.accept()
                elif what == "reaped":
                    if obj in self.links:
                        self.reaped(obj)
                elif obj is not None and self._stale(what, obj):
                    continue
                elif what == "link":
                    self.from_link(obj)
                elif what == "client":
                    self.from_client(obj)
                elif what == "request":
                    self.from_request(obj)

    def _stale(self, what: str, obj: Any) -> bool:
        """An object closed by an earlier handler in this same round."""
        if what == "request":
            return obj not in self.requests
        if what == "client":
            return obj.client is None
        return obj.state not in ("warming", "ready", "active")

    def from_link(self, link: Link) -> None:
        try:
            data = link.sock.recv(65536 if link.state == "active" else 1)
        except OSError:
            data = b""
        if not data:  # the device side ended first: the member is lost
            self.close_link(link, failed=True)
            return
        if link.state == "warming":
            link.reply = data
            link.state = "ready"
            self.down.pop(link.member, None)
            if link.request is not None:
                self.handover(link.request)
            return
        if link.state == "ready":  # nothing may come before the first call: unusable
            self.close_link(link, failed=True)
            return
        assert link.client is not None
        try:
            link.client.sendall(data)
        except OSError:
            self.close_link(link, failed=False)

    def from_client(self, link: Link) -> None:
        assert link.client is not None
        try:
            data = link.client.recv(65536)
        except OSError:
            data = b""
        if not data:  # the application finalised: a healthy end
            self.last_used = time.monotonic()
            self.close_link(link, failed=False)
            return
        try:
            link.sock.sendall(data)
        except OSError:
            self.close_link(link, failed=True)

    def from_request(self, req: Request) -> None:
        try:
            data = req.sock.recv(1)
        except OSError:
            data = b""
        if not data or req.byte:  # gone, or talking before its answer: give up on it
            self.drop(req)
            return
        req.byte = data
        self.handover(req)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
