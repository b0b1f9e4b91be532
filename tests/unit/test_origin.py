"""Which interface a session came in on, from the kernel's view of its SSH connection.

The table is recorded from a lab appliance (hsm03) with an admin session open: the
data sshd listening on 198.19.0.233, the management sshd on 198.18.0.13, and the admin's
connection (socket inode 1839187) from the tenant's client at 198.19.1.4.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest

from hsmctl.appliance import daemon, origin
from hsmctl.appliance.origin import LOCAL, Origin, decide, established, proc_address
from hsmctl.appliance.roles import Access, Role

pytestmark = pytest.mark.unit

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: E90013C6:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1838034 1 00000000cc6c3b59 100 0 0 10 0
   1: 0D0012C6:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1836042 1 00000000a9fc021f 100 0 0 10 0
   2: E90013C6:0016 040113C6:B202 01 00000000:00000000 02:000AFBD0 00000000     0        0 1839187 2 000000005fac5650 20 4 11 24 -1
"""  # noqa: E501

ADDRESSES = {"198.18.0.13": Access.MGMT, "198.19.0.233": Access.DATA}


def test_addresses_as_the_kernel_prints_them() -> None:
    assert proc_address("E90013C6:0016", "little") == "198.19.0.233"
    assert proc_address("C61300E9:0016", "big") == "198.19.0.233"
    mapped = "0000000000000000FFFF0000E90013C6:0016"
    assert proc_address(mapped, "little") == "198.19.0.233"
    assert proc_address("B80D0120000000000000000001000000:0016", "little") == "2001:db8::1"


def test_only_the_callers_established_connection_counts() -> None:
    assert established(TCP, {1839187}, "little") == [("198.19.0.233", "198.19.1.4")]
    # The listeners' sockets are not connections; another process's are not ours.
    assert established(TCP, {1838034, 1836042}, "little") == []
    assert established(TCP, {999}, "little") == []


def test_the_local_address_names_the_interface() -> None:
    conns = established(TCP, {1839187}, "little")
    assert decide(conns, ADDRESSES) == (Access.DATA, "198.19.1.4")
    assert decide([("198.18.0.13", "198.18.0.1")], ADDRESSES) == (Access.MGMT, "198.18.0.1")


@pytest.mark.parametrize(
    "conns",
    [
        [],  # the connection is gone or cannot be read
        [("198.19.0.233", "198.19.1.4"), ("198.18.0.13", "198.18.0.1")],  # ambiguous
        [("198.19.0.99", "198.19.1.4")],  # an address that is neither interface's
    ],
)
def test_anything_else_is_no_interface(conns: list[tuple[str, str]]) -> None:
    interface, _ = decide(conns, ADDRESSES)
    assert interface is None


def test_root_is_the_console_only_when_not_under_sshd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(origin, "origin_of", lambda pid: LOCAL)
    assert daemon.identify(1234, 0).role is Role.CONSOLE
    # Under sshd but unidentifiable (e.g. the connection cannot be found): no role at all.
    monkeypatch.setattr(origin, "origin_of", lambda pid: Origin(True, None, None))
    caller = daemon.identify(1234, 0)
    assert caller.role is None and caller.interface is None


def test_an_unidentified_session_has_no_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(origin, "origin_of", lambda pid: Origin(True, None, None))
    caller = daemon.identify(1234, _uid_of("nobody"))
    assert caller.interface is None and caller.source == "unknown"
    monkeypatch.setattr(origin, "origin_of", lambda pid: Origin(True, Access.DATA, "198.19.1.4"))
    caller = daemon.identify(1234, _uid_of("nobody"))
    assert caller.interface is Access.DATA and caller.source == "198.19.1.4"


def _uid_of(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


def test_a_socket_printed_twice_counts_once() -> None:
    """/proc/net/tcp is printed a page at a time while connections come and go: the same
    socket can appear twice; it is still one connection (else: refused as 'several')."""
    lines = TCP.splitlines()
    row = next(line for line in lines if line.split()[9:10] == ["1839187"])
    doubled = "\n".join([*lines, row])
    conns = established(doubled, {1839187}, "little")
    assert conns == [("198.19.0.233", "198.19.1.4")]
    assert decide(conns, ADDRESSES) == (Access.DATA, "198.19.1.4")


def _loopback_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=10)
    accepted, _ = server.accept()
    return server, client, accepted


def test_the_sockets_say_what_the_table_says() -> None:
    """A process holding a listening socket (not counted), a Unix socket pair (not TCP),
    and both ends of an established loopback connection: read from the sockets
    themselves (pidfd_getfd), the same connections as from /proc/net/tcp."""
    server, client, accepted = _loopback_pair()
    a, b = socket.socketpair()
    try:
        direct = origin._fd_connections(os.getpid())
        table = origin._table_connections(os.getpid())
        assert direct is not None, "pidfd_getfd is unavailable"
        assert sorted(direct) == sorted(table)
        assert sorted(direct) == [("127.0.0.1", "127.0.0.1")] * 2  # not the listener
    finally:
        for s in (server, client, accepted, a, b):
            s.close()


def test_a_closed_connection_is_not_established() -> None:
    """The peer hung up (CLOSE_WAIT on our end): not an established connection, as in
    the table's state column."""
    server, client, accepted = _loopback_pair()
    try:
        client.close()
        accepted.recv(1)  # the FIN has arrived
        assert origin._fd_connections(os.getpid()) == []
        assert origin._table_connections(os.getpid()) == []
    finally:
        server.close()
        accepted.close()


def test_without_pidfd_getfd_the_table_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    server, client, accepted = _loopback_pair()
    try:
        monkeypatch.setattr(origin, "_getfd", lambda pidfd, fd: -errno.ENOSYS)
        assert origin._fd_connections(os.getpid()) is None
        assert sorted(origin._connections(os.getpid())) == [("127.0.0.1", "127.0.0.1")] * 2
    finally:
        for s in (server, client, accepted):
            s.close()
