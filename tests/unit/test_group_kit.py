"""The HA group kit's pure parts and its connector, on loopback only (issue 12 item 3).

The connector is the file copied into a group kit: it is run here as the kit runs it
(``python3 -I -S connect.py KIT IP:PORT ...`` as ssh's ProxyCommand with
``ProxyUseFdpass``), handing a connected socket back over a socketpair."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    module = kit.group_module_file(k, "app", "g1", [("198.19.0.96", 22), ("198.19.0.97", 22)])
    assert kit.remote_line(module) == (f"|/usr/bin/python3 -I -S {k}/connect.py --session {k} "
                                       "hsm-group-g1 198.19.0.96:22 198.19.0.97:22")  # fmt: skip
    assert kit.group_ssh_command(k, "g1") == ["/usr/bin/ssh", "-F", f"{k}/ssh_config", "-T",
                                              "hsm-group-g1"]  # fmt: skip
    hosts = kit.group_known_hosts("g1", ["ssh-ed25519 AAAA1 c", "ecdsa-sha2-nistp256 BBBB"])
    assert hosts == "hsm-group-g1 ssh-ed25519 AAAA1\nhsm-group-g1 ecdsa-sha2-nistp256 BBBB\n"
    for bad in ("relative/kit", "/a b", "/a%h", "/a'b", "/a\nb"):
        with pytest.raises(ValueError):
            kit.check_kit_path(Path(bad))


# -- the warm standby (connect.py --session and its holder) ---------------------------------
#
# The holder runs for real (forked twice, as from p11-kit's command); only ssh is a stand-in
# (connector.SSH, inherited by the fork): it answers the version byte like p11-kit remote,
# then echoes each chunk prefixed with its member, and it records its pid per member.

_FAKE_SSH = r"""#!/usr/bin/python3
import os, sys
d = os.environ["FAKE_SSH_DIR"]
proxy = next(a for a in sys.argv if a.startswith("ProxyCommand="))
member = proxy.split()[-1]
if os.path.exists(os.path.join(d, "down-" + member)):
    sys.exit(255)
open(os.path.join(d, "pid-%s-%d" % (member, os.getpid())), "w").close()
if os.read(0, 1) != b"\0":
    sys.exit(3)
os.write(1, b"\0")
while True:
    data = os.read(0, 65536)
    if not data:
        sys.exit(0)
    os.write(1, member.encode() + b":" + data)
"""

M1, M2 = "10.255.0.1:22", "10.255.0.2:22"  # never contacted: the stand-in ssh answers


def _pids(d: Path, member: str) -> list[int]:
    return [int(p.name.rsplit("-", 1)[1]) for p in d.glob(f"pid-{member}-*")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _until(what: str, cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _session(kitdir: Path, app: int) -> socket.socket:
    """A new session as p11-kit opens one: a socketpair, the command's end handed over,
    the version byte exchanged."""
    ours, theirs = socket.socketpair()
    assert connector.hand_over(str(kitdir), "hsm-group-t", [M1, M2], app, theirs.fileno())
    theirs.close()
    ours.settimeout(30)
    ours.sendall(b"\0")
    assert ours.recv(1) == b"\0"
    return ours


def _call(s: socket.socket, data: bytes) -> bytes:
    s.sendall(data)
    return s.recv(100)


@pytest.fixture
def fake_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "fake"
    d.mkdir()
    script = d / "ssh"
    script.write_text(_FAKE_SSH)
    script.chmod(0o755)
    monkeypatch.setattr(connector, "SSH", str(script))
    monkeypatch.setenv("FAKE_SSH_DIR", str(d))
    return d


def test_the_standby_takes_over_a_lost_member_and_ends_with_the_application(
    tmp_path: Path, fake_ssh: Path
) -> None:
    kitdir = tmp_path / "kit"
    kitdir.mkdir()
    app = subprocess.Popen(["sleep", "300"])
    try:
        first = _session(kitdir, app.pid)
        assert _call(first, b"hello") == f"{M1}:hello".encode()  # the group's order
        _until("the standby on the other member", lambda: _pids(fake_ssh, M2))
        (standby,) = _pids(fake_ssh, M2)
        # the member is lost: its ssh dies; the application's session ends with it
        (fake_ssh / f"down-{M1}").touch()
        (lost,) = _pids(fake_ssh, M1)
        os.kill(lost, signal.SIGKILL)
        assert first.recv(100) == b""
        first.close()
        t = time.monotonic()
        second = _session(kitdir, app.pid)
        assert _call(second, b"again") == f"{M2}:again".encode()
        took = time.monotonic() - t
        assert _pids(fake_ssh, M2) == [standby], "the standby was used, not a new ssh"
        assert took < 5.0, took
        assert (kitdir / "last-good").read_text().strip() == M2
        # a healthy end (C_Finalize) reopens on the same member
        second.close()
        third = _session(kitdir, app.pid)
        assert _call(third, b"x") == f"{M2}:x".encode()
        third.close()
        # the lost member comes back: the standby is opened there again
        (fake_ssh / f"down-{M1}").unlink()
        _until("a standby on the returned member", lambda: _pids(fake_ssh, M1) != [lost])
        everyone = _pids(fake_ssh, M1) + _pids(fake_ssh, M2)
    finally:
        app.kill()
        app.wait()
    name = connector.holder_name(str(kitdir), os.getuid(), app.pid)

    def holder_gone() -> bool:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(name)
        except ConnectionRefusedError:
            return True
        finally:
            s.close()
        return False

    _until("the holder's end with the application", holder_gone)
    _until("its ssh processes' end", lambda: not [p for p in everyone if _alive(p)])


def test_session_mode_usage_and_a_bad_member_exit_2(tmp_path: Path) -> None:
    script = tmp_path / kit.CONNECTOR
    script.write_bytes(kit.connector_source())
    for args in ([], [str(tmp_path), "alias"], [str(tmp_path), "alias", "not-a-member"]):
        proc = subprocess.run(["/usr/bin/python3", "-I", "-S", str(script), "--session", *args],
                              capture_output=True, timeout=60, check=False)  # fmt: skip
        assert proc.returncode == 2, (args, proc.stderr)


def test_holder_names_differ_by_user_application_and_kit() -> None:
    base = connector.holder_name("/k", 1000, 42)
    assert base.startswith(b"\0hsm-group-standby/1000/42/")
    others = {connector.holder_name("/k", 1001, 42), connector.holder_name("/k", 1000, 43),
              connector.holder_name("/k2", 1000, 42)}  # fmt: skip
    assert base not in others and len(others) == 3
    assert len(base) < 108


def test_a_link_goes_to_one_member_through_the_connector() -> None:
    argv = connector.ssh_argv("/srv/kit", "hsm-group-g", M2, connector="/srv/kit/connect.py")
    assert argv == ["/usr/bin/ssh", "-F", "/srv/kit/ssh_config", "-o",
                    f"ProxyCommand=/usr/bin/python3 -I -S /srv/kit/connect.py --only /srv/kit {M2}",
                    "-T", "hsm-group-g"]  # fmt: skip


def test_a_standby_that_dies_is_replaced_and_the_session_goes_on(
    tmp_path: Path, fake_ssh: Path
) -> None:
    kitdir = tmp_path / "kit"
    kitdir.mkdir()
    app = subprocess.Popen(["sleep", "300"])
    try:
        s = _session(kitdir, app.pid)
        assert _call(s, b"a") == f"{M1}:a".encode()
        _until("the standby", lambda: _pids(fake_ssh, M2))
        (standby,) = _pids(fake_ssh, M2)
        os.kill(standby, signal.SIGKILL)  # its member lost while it waited
        _until("a new standby", lambda: [p for p in _pids(fake_ssh, M2) if p != standby])
        assert _call(s, b"b") == f"{M1}:b".encode()  # the session was not disturbed
        assert len(_pids(fake_ssh, M1)) == 1
        s.close()
    finally:
        app.kill()
        app.wait()
