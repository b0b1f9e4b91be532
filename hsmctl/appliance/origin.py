"""Where a session comes from, read from the kernel and never from the caller.

A shell session reaches the daemon from a process that descends from the privileged
sshd process of its SSH connection (``sshd: USER [priv]``, root, OpenSSH's monitor). That
process holds the connection's TCP socket for the connection's whole life, and the
socket's local address says which interface the client connected to: the management
address or the data address. Unlike the pid of the sshd that accepted the connection,
this survives a restart of that sshd (a host-key activation, ``network set``): the
connection goes on, and so does its interface.

Fails closed: a caller under sshd whose connection cannot be found, or whose local
address is neither interface's, has no interface (and is refused); only a caller that
does not descend from sshd at all is local (the console, when root).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsmctl.appliance import paths, store
from hsmctl.appliance.roles import Access

SSHD_EXES = frozenset({"/usr/sbin/sshd", "/usr/lib/openssh/sshd-session"})
ESTABLISHED = "01"  # the state column of /proc/net/tcp
TCP_ESTABLISHED = 1  # the same state, as TCP_INFO's first byte says it
PIDFD_GETFD = 438  # the syscall's number (one number on every architecture since 5.1)
MAX_DEPTH = 64
READ_ATTEMPTS = 3


@dataclass(frozen=True)
class Origin:
    via_sshd: bool  # the caller descends from an sshd connection
    interface: Access | None  # None under sshd: unidentifiable (refuse)
    remote: str | None  # the client's address


LOCAL = Origin(False, None, None)


def proc_address(field: str, byteorder: str = sys.byteorder) -> str:
    """``C0A80001:0016`` (an address as /proc/net/tcp{,6} prints it: 32-bit words in the
    host's byte order) -> ``192.168.0.1``; an IPv4-mapped IPv6 address as IPv4. Pure."""
    raw = bytes.fromhex(field.partition(":")[0])
    if byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    addr = ipaddress.ip_address(raw)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def established(
    table: str, inodes: Collection[int], byteorder: str = sys.byteorder
) -> list[tuple[str, str]]:
    """(local, remote) of the established connections in a /proc/net/tcp{,6} table whose
    socket is one of ``inodes``, one entry per socket. Pure.

    The kernel prints the table a page at a time and does not freeze it in between: a
    busy table can show a socket twice (counted once here, by its inode) or not at all
    (see :func:`_connections`)."""
    found: dict[int, tuple[str, str]] = {}
    for line in table.splitlines()[1:]:
        f = line.split()
        if len(f) > 9 and f[3] == ESTABLISHED and f[9].isdigit() and int(f[9]) in inodes:
            found[int(f[9])] = (proc_address(f[1], byteorder), proc_address(f[2], byteorder))
    return list(found.values())


def decide(
    connections: Iterable[tuple[str, str]], addresses: Mapping[str, Access]
) -> tuple[Access | None, str | None]:
    """The interface and client of the one connection an sshd monitor holds. Pure.

    Anything else (no connection, several, an address that is no interface's) is no
    interface: the caller is refused."""
    conns = list(connections)
    if len(conns) != 1:
        return None, None
    local, remote = conns[0]
    return addresses.get(local), remote


# -- reading /proc -----------------------------------------------------------------------------


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def _is_sshd_monitor(pid: int) -> bool:
    """A root sshd process: the connection's monitor (the one a user cannot touch)."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return False
    return uid == 0 and exe in SSHD_EXES


def _socket_inodes(pid: int) -> set[int]:
    found: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target.endswith("]"):
            found.add(int(target[8:-1]))
    return found


def _address(text: str) -> str:
    """``getsockname``'s host as /proc/net/tcp's is shown (IPv4-mapped as IPv4)."""
    addr = ipaddress.ip_address(text.partition("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


_LIBC: list[Any] = []


def _getfd(pidfd: int, fd: int) -> int:
    """pidfd_getfd(2): a duplicate of another process's descriptor; -errno on failure."""
    import ctypes

    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    dup = int(_LIBC[0].syscall(PIDFD_GETFD, pidfd, fd, 0))
    return dup if dup >= 0 else -ctypes.get_errno()


def _fd_connections(pid: int) -> list[tuple[str, str]] | None:
    """The established TCP connections among ``pid``'s sockets, asked of the sockets
    themselves: each is duplicated (pidfd_getfd), its state and addresses read, the
    duplicate closed (never shut down: the connection is the monitor's). The kernel
    prints /proc/net/tcp by walking its whole connection hash table, shared by all
    namespaces (~2.5 ms of system time per read here, twice a session); this is a few
    system calls. None when this kernel or process cannot (then the table is read)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None
    found: list[tuple[str, str]] = []
    try:
        for fd in _socket_fds(pid):
            dup = _getfd(pidfd, fd)
            if dup == -errno.EBADF:
                continue  # closed since it was listed
            if dup < 0:
                return None
            try:
                sock = socket.socket(fileno=dup)
            except OSError:  # the number was reused for something else meanwhile
                os.close(dup)
                raise
            with sock:
                if sock.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                if sock.type != socket.SOCK_STREAM:
                    continue
                state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
                if state != TCP_ESTABLISHED:
                    continue
                found.append((_address(sock.getsockname()[0]), _address(sock.getpeername()[0])))
    except (OSError, ValueError):
        return None
    finally:
        os.close(pidfd)
    return found


def _socket_fds(pid: int) -> list[int]:
    fds: list[int] = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            fds.append(int(fd))
    return fds


def _connections(pid: int) -> list[tuple[str, str]]:
    """The established TCP connections among ``pid``'s sockets: from the sockets
    (:func:`_fd_connections`), else from the kernel's table. The table is read again
    when the socket was missed (a concurrent change while the kernel printed it); a
    monitor whose one connection stays missing is refused, never guessed."""
    direct = _fd_connections(pid)
    if direct is not None:
        return direct
    return _table_connections(pid)


def _table_connections(pid: int) -> list[tuple[str, str]]:
    inodes = _socket_inodes(pid)
    found: list[tuple[str, str]] = []
    for _ in range(READ_ATTEMPTS):
        found = []
        for table in ("tcp", "tcp6"):
            try:
                text = Path(f"/proc/{pid}/net/{table}").read_text()
            except OSError:
                continue
            found += established(text, inodes)
        if found:
            return found
    return found


def interface_addresses() -> dict[str, Access]:
    """The management address (personalisation) and the data address (``network set``)."""
    mgmt = str(store.read_json(paths.DEVICE, {}).get("mgmt_ip") or "")
    data = str(store.read_json(paths.NETWORK, {}).get("address") or "").split("/")[0]
    found = {a: i for a, i in ((mgmt, Access.MGMT), (data, Access.DATA)) if a}
    if mgmt and mgmt == data:  # one address for both: neither can be told apart
        return {}
    return found


def origin_of(pid: int) -> Origin:
    """Where the session of process ``pid`` comes from: the nearest root sshd ancestor
    is its connection's monitor; that connection's local address is the interface."""
    for _ in range(MAX_DEPTH):
        if pid <= 1:
            return LOCAL
        if _is_sshd_monitor(pid):
            interface, remote = decide(_connections(pid), interface_addresses())
            return Origin(True, interface, remote)
        pid = _ppid(pid)
    return Origin(True, None, None)  # a chain this deep is no console: refuse it
