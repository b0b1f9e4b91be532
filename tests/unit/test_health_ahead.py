"""A fleet poll's connections opened ahead (hsmctl.provider.ahead) and its logins
(hsmctl.provider.sessions.PollLogins): against plain TCP listeners the test owns on
127.0.0.1 (what the device does with the connection before any SSH byte: accept, close,
refuse) and a real OpenSSH sshd on loopback (:mod:`.loopback_sshd`, root: a login runs on
the opened-ahead socket, the host key is checked on it as on any other, an appliance's
second login connects afresh). The lab test (tests/lab/test_health.py) polls real
appliances through the command."""

from __future__ import annotations

import errno
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from hsmctl.errors import HostKeyMismatch, UnreachableError, UsageError
from hsmctl.provider import ahead as ah
from hsmctl.provider.ahead import OpenAhead
from hsmctl.provider.pollplan import plan_poll
from hsmctl.provider.sessions import PollLogins, load_key
from hsmctl.ssh import PinnedHostKeys, Timeouts
from tests.provider_env import make_env
from tests.unit.loopback_sshd import USER, Sshd, needs_root
from tests.unit.loopback_sshd import sshd as sshd  # the module-scoped fixture

pytestmark = pytest.mark.unit

OTHER_HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOj6sHZOpWmDf9yzSJGrBKBzwb7AYy3nhyw7ZuWXvK0z"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(30)
    yield srv
    srv.close()


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def settle(ahead: OpenAhead) -> None:
    """Until every connection ahead is open or failed (a login that comes before its
    connection was opened connects by itself)."""
    with ahead._cond:
        assert ahead._cond.wait_for(
            lambda: all(e.done for e in ahead._entries.values()), timeout=30
        )


def test_each_appliance_gets_its_socket_once_and_close_closes_the_rest(
    listener: socket.socket,
) -> None:
    port = port_of(listener)
    ahead = OpenAhead({"a1": "127.0.0.1", "a2": "127.0.0.1", "a3": "127.0.0.1"}, port=port)
    ahead.start(["a1", "a2", "a3"])
    accepted = [listener.accept()[0] for _ in range(3)]  # no banner: one by BANNER_WAIT
    try:
        settle(ahead)
        sock = ahead.take("a1", "127.0.0.1", port, 10.0)
        assert sock is not None and sock.gettimeout() == 10.0
        peer = {s.getpeername()[1]: s for s in accepted}
        peer[sock.getsockname()[1]].sendall(b"SSH-2.0-x\r\n")
        assert sock.recv(64) == b"SSH-2.0-x\r\n"  # the very connection the device accepted
        assert ahead.take("a1", "127.0.0.1", port, 10.0) is None  # once only
        assert ahead.take("a2", "127.0.0.1", port + 1, 10.0) is None  # another address
        assert ahead.taken == 1
        ahead.close()
        sock.close()
        for s in accepted:  # every connection ends: a1's by its taker, the rest by close()
            s.settimeout(10)
            assert s.recv(1) == b""
    finally:
        for s in accepted:
            s.close()
        ahead.close()


def test_a_connection_the_device_closed_meanwhile_gives_way_to_a_fresh_one(
    listener: socket.socket,
) -> None:
    port = port_of(listener)
    with OpenAhead({"a1": "127.0.0.1"}, port=port) as ahead:
        ahead.start(["a1"])
        conn, _ = listener.accept()
        conn.close()  # sshd gave up on it (LoginGraceTime, MaxStartups)
        settle(ahead)
        entry = ahead._entries["a1"]
        assert entry.sock is not None
        assert select.select([entry.sock], [], [], 30)[0]  # the device's FIN has arrived
        assert ahead.take("a1", "127.0.0.1", port, 10.0) is None
        assert ahead.taken == 0


def test_an_old_connection_gives_way_to_a_fresh_one(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = port_of(listener)
    with OpenAhead({"a1": "127.0.0.1", "a2": "127.0.0.1"}, port=port) as ahead:
        ahead.start(["a1", "a2"])
        accepted = [listener.accept()[0] for _ in range(2)]
        settle(ahead)
        first = ahead.take("a1", "127.0.0.1", port, 10.0)
        assert first is not None
        first.close()
        monkeypatch.setattr(ah, "MAX_AGE", -1.0)  # a2's is now too old to trust
        assert ahead.take("a2", "127.0.0.1", port, 10.0) is None
        assert ahead.taken == 1
        for s in accepted:
            s.close()


def test_a_refused_connection_is_reported_as_a_direct_connect_would(
    listener: socket.socket,
) -> None:
    port = port_of(listener)
    listener.close()  # nothing listens there now: refused
    with OpenAhead({"a1": "127.0.0.1"}, port=port) as ahead:
        ahead.start(["a1"])
        settle(ahead)
        with pytest.raises(OSError) as caught:
            ahead.take("a1", "127.0.0.1", port, 10.0)
        assert caught.value.errno == errno.ECONNREFUSED
        key = PinnedHostKeys.of(OTHER_HOST_KEY)
        logins = PollLogins(
            {"a1": "127.0.0.1"}, {"provider": paramiko.ECDSAKey.generate()}, None, port=port
        )
        # Through a login without the opened-ahead socket: the same verdict.
        with pytest.raises(UnreachableError, match="connection refused"):
            logins.connection("a1", "provider", key).connect()


def test_names_are_left_to_the_login_and_the_count_is_bounded(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ah, "MAX_AHEAD", 2)
    port = port_of(listener)
    addresses = {"a1": "127.0.0.1", "a2": "device.example", "a3": "127.0.0.1", "a4": "127.0.0.1"}
    with OpenAhead(addresses, port=port) as ahead:
        ahead.start(["a1", "a2", "a3", "a4", "unknown"])
        assert sorted(ahead._entries) == ["a1", "a3"]
        for _ in range(2):
            listener.accept()[0].close()


def test_connections_open_a_window_at_a_time_and_a_login_that_comes_first_skips_its_own(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The devices get WINDOW connections at a time: the next opens when one of them has
    its banner. A login that asks before its connection was opened gets None at once,
    and that connection is never opened."""
    monkeypatch.setattr(ah, "WINDOW", 2)
    monkeypatch.setattr(ah, "BANNER_WAIT", 60.0)  # only a banner frees a place
    port = port_of(listener)
    names = ["a1", "a2", "a3", "a4"]
    with OpenAhead(dict.fromkeys(names, "127.0.0.1"), port=port) as ahead:
        ahead.start(names)
        first = [listener.accept()[0] for _ in range(2)]
        listener.settimeout(0.5)
        with pytest.raises(TimeoutError):
            listener.accept()  # a3 waits for a place
        assert ahead.take("a4", "127.0.0.1", port, 10.0) is None  # its login came first
        first[0].sendall(b"SSH-2.0-device\r\n")  # a1's device greets: a3 opens
        listener.settimeout(30)
        third = listener.accept()[0]
        third.sendall(b"SSH-2.0-device\r\n")
        first[1].sendall(b"SSH-2.0-device\r\n")
        settle(ahead)
        listener.settimeout(0.5)
        with pytest.raises(TimeoutError):
            listener.accept()  # a4 was never opened
        opened = {e for e, entry in ahead._entries.items() if entry.sock is not None}
        assert opened == {"a1", "a2", "a3"}
        for a in ("a1", "a2", "a3"):
            sock = ahead.take(a, "127.0.0.1", port, 10.0)
            assert sock is not None and sock.recv(64) == b"SSH-2.0-device\r\n"
            sock.close()
        for s in [*first, third]:
            s.close()


def test_a_connection_opened_late_still_gets_the_whole_connect_timeout(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device that does not answer the connect (its accept queue full: the SYN is
    dropped) is given the whole timeout from when its connection started, not from when
    the first one did; then it is reported as a direct connect would report it."""
    monkeypatch.setattr(ah, "WINDOW", 1)
    monkeypatch.setattr(ah, "BANNER_WAIT", 1.5)  # a1 holds the only place this long
    port = port_of(listener)
    full = socket.socket()  # a2's device, at the same port on another loopback address
    full.bind(("127.0.0.2", port))
    full.listen(0)
    filler = socket.create_connection(("127.0.0.2", port), timeout=5)  # the queue is full
    try:
        with OpenAhead({"a1": "127.0.0.1", "a2": "127.0.0.2"}, port=port, timeout=2.0) as ahead:
            ahead.start(["a1", "a2"])
            device = listener.accept()[0]  # accepted, silent: a1 keeps its place 1.5 s
            settle(ahead)
            device.close()
            a1, a2 = ahead._entries["a1"], ahead._entries["a2"]
            assert isinstance(a2.error, TimeoutError)
            assert a2.since - a1.since >= 2.0 - 0.05  # opened after a1, then 2 s of its own
            with pytest.raises(TimeoutError):
                ahead.take("a2", "127.0.0.2", port, 10.0)
    finally:
        filler.close()
        full.close()


def test_the_connect_timeout_is_the_ssh_one() -> None:
    assert OpenAhead({})._timeout == Timeouts().connect


def test_a_plan_checks_its_input_before_any_connection(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    with pytest.raises(UsageError, match="no appliance 'nope'"):
        plan_poll(str(env.config), ["nope"])
    with plan_poll(str(env.config), None, open_ahead=False) as plan:
        assert plan.targets == ["unit01", "unit02", "unit03", "unit04"]
        assert plan.ahead is None


@needs_root()
def test_logins_run_on_the_opened_ahead_sockets_pinned_as_ever(sshd: Sshd) -> None:
    names = ["a1", "a2", "a3"]
    addresses = dict.fromkeys(names, "127.0.0.1")
    key = load_key(sshd.key)
    with OpenAhead(addresses, port=sshd.port) as ahead:
        ahead.start(names)
        settle(ahead)
        logins = PollLogins(addresses, {USER: key}, ahead, port=sshd.port)
        pinned = PinnedHostKeys.of(sshd.host_key)
        ports = []
        for a in names:
            with logins.connection(a, USER, pinned) as conn:
                client = conn.run("echo $SSH_CONNECTION").stdout.split()
                assert conn.local_address is not None
                assert int(client[1]) == conn.local_address[1]
                ports.append(conn.local_address[1])
        assert ahead.taken == 3 and len(set(ports)) == 3
        # A second login of an appliance: a connection of its own.
        with logins.connection("a1", USER, pinned) as conn:
            assert conn.run("true").ok
        assert ahead.taken == 3
    # The pins are checked on an opened-ahead socket as on any other.
    with OpenAhead(addresses, port=sshd.port) as ahead:
        ahead.start(["a1"])
        settle(ahead)
        logins = PollLogins(addresses, {USER: key}, ahead, port=sshd.port)
        with pytest.raises(HostKeyMismatch):
            logins.connection("a1", USER, PinnedHostKeys.of(OTHER_HOST_KEY)).connect()
        assert ahead.taken == 1
