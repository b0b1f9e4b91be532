"""The HA group kit's pure parts and its connector, on loopback only (issue 12 item 3).

The connector is the file copied into a group kit: it is run here as the kit runs it
(``python3 -I -S connect.py KIT IP:PORT ...`` as ssh's ProxyCommand with
``ProxyUseFdpass``), handing a connected socket back over a socketpair."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hsmctl.clients import connector, kit


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s
    s.close()


@pytest.fixture
def silent() -> Iterator[str]:
    """A loopback address that never completes a connection: a listener with a full
    backlog (further SYNs are dropped)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    port = s.getsockname()[1]
    filler = []
    for _ in range(2):  # the backlog's one place, and one more for good measure
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(("127.0.0.1", port))
        filler.append(f)
    time.sleep(0.2)
    probe = socket.socket()
    probe.setblocking(False)
    probe.connect_ex(("127.0.0.1", port))
    time.sleep(0.2)
    if _connected(probe):
        pytest.skip("this kernel accepts beyond the backlog: no silent loopback port")
    probe.close()
    yield f"127.0.0.1:{port}"
    for f in filler:
        f.close()
    s.close()


def _connected(s: socket.socket) -> bool:
    try:
        s.getpeername()
    except OSError:
        return False
    return True


def _closed_port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


def test_order_puts_the_last_good_member_first() -> None:
    ms = ["a:22", "b:22", "c:22"]
    assert connector.order(ms, None) == ms
    assert connector.order(ms, "c:22") == ["c:22", "a:22", "b:22"]
    assert connector.order(ms, "x:22") == ms


def test_parse_member() -> None:
    assert connector.parse_member("198.19.0.96:22") == ("198.19.0.96", 22)
    for bad in ("198.19.0.96", ":22", "h:0", "h:99999", "h:x"):
        with pytest.raises(ValueError):
            connector.parse_member(bad)


def test_a_refused_member_is_skipped_at_once(listener: socket.socket) -> None:
    up = f"127.0.0.1:{listener.getsockname()[1]}"
    t = time.monotonic()
    member, s = connector.connect([_closed_port(), up], stagger=5.0, timeout=10)
    assert member == up and time.monotonic() - t < 2.0
    assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == connector.USER_TIMEOUT_MS
    assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    s.close()


def test_a_silent_member_costs_the_stagger_not_a_timeout(
    silent: str, listener: socket.socket
) -> None:
    up = f"127.0.0.1:{listener.getsockname()[1]}"
    t = time.monotonic()
    member, s = connector.connect([silent, up], stagger=0.2, timeout=30)
    took = time.monotonic() - t
    s.close()
    assert member == up and 0.15 < took < 5.0, took


def test_nothing_answers_is_an_error_naming_each_member(silent: str) -> None:
    closed = _closed_port()
    with pytest.raises(OSError) as err:
        connector.connect([closed, silent], stagger=0.1, timeout=0.5)
    assert closed in str(err.value) and silent in str(err.value)


def test_the_connector_passes_the_socket_and_remembers_the_member(
    tmp_path: Path, listener: socket.socket
) -> None:
    """As ssh runs it: stdout is a unix socketpair, the fd arrives by SCM_RIGHTS."""
    up = f"127.0.0.1:{listener.getsockname()[1]}"
    script = tmp_path / kit.CONNECTOR
    script.write_bytes(kit.connector_source())
    ours, theirs = socket.socketpair()
    proc = subprocess.run(["/usr/bin/python3", "-I", "-S", str(script), str(tmp_path),
                           _closed_port(), up], stdout=theirs.fileno(),
                          stderr=subprocess.PIPE, timeout=60, check=False)  # fmt: skip
    theirs.close()
    assert proc.returncode == 0, proc.stderr
    _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
    got = socket.socket(fileno=fds[0])
    peer, _ = listener.accept()
    assert got.getpeername() == listener.getsockname()
    got.sendall(b"x")
    assert peer.recv(1) == b"x"
    got.close()
    peer.close()
    ours.close()
    assert (tmp_path / "last-good").read_text().strip() == up


def test_nothing_reachable_exits_1_with_a_message(tmp_path: Path) -> None:
    script = tmp_path / kit.CONNECTOR
    script.write_bytes(kit.connector_source())
    proc = subprocess.run(["/usr/bin/python3", "-I", "-S", str(script), str(tmp_path),
                           _closed_port()], capture_output=True, timeout=60,
                          check=False)  # fmt: skip
    assert proc.returncode == 1 and b"no member of the group answered" in proc.stderr


def test_ssh_config_and_module_name_the_kit_paths() -> None:
    k = Path("/srv/kits/app")
    text = kit.ssh_config(k, "app", "g1", [("198.19.0.96", 22), ("198.19.0.97", 22)])
    assert "Host hsm-group-g1\n" in text
    assert "HostKeyAlias hsm-group-g1" in text
    assert (f"ProxyCommand /usr/bin/python3 -I -S {k}/connect.py {k} 198.19.0.96:22 "
            "198.19.0.97:22") in text  # fmt: skip
    for line in ("ProxyUseFdpass yes", "StrictHostKeyChecking yes", "IdentitiesOnly yes",
                 "IdentityAgent none", "BatchMode yes",
                 "KexAlgorithms ecdh-sha2-nistp256,", f"IdentityFile {k}/app_key",
                 "User p11-app", f"UserKnownHostsFile {k}/known_hosts"):  # fmt: skip
        assert line in text
    module = kit.group_module_file(k, "app", "g1")
    assert kit.remote_line(module) == f"|/usr/bin/ssh -F {k}/ssh_config -T hsm-group-g1"
    hosts = kit.group_known_hosts("g1", ["ssh-ed25519 AAAA1 c", "ecdsa-sha2-nistp256 BBBB"])
    assert hosts == "hsm-group-g1 ssh-ed25519 AAAA1\nhsm-group-g1 ecdsa-sha2-nistp256 BBBB\n"
    for bad in ("relative/kit", "/a b", "/a%h", "/a'b", "/a\nb"):
        with pytest.raises(ValueError):
            kit.check_kit_path(Path(bad))
