"""``hsm-p11`` (hsmctl.appliance.p11entry) against a stand-in daemon on a Unix socket: the
fixed bytes it uses agree with :mod:`protocol` and :mod:`paths`, the streams it hands
over are its stdin and stdout, refusals and odd replies end as before, and the way to
the hand-over imports no ``socket``, ``json`` or ``pathlib``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hsmctl.appliance import p11entry, paths, protocol

ROOT = Path(__file__).resolve().parents[2]
RUN = (
    "import sys; sys.path.insert(0, sys.argv[2]);"
    "import hsmctl.appliance.p11entry as e; e.SOCKET = sys.argv[1]; sys.exit(e.main())"
)


class _Buf:
    def __init__(self) -> None:
        self.data = b""

    def sendall(self, data: bytes) -> None:
        self.data += data


def _encoded(message: dict[str, str]) -> bytes:
    buf = _Buf()
    protocol.send(buf, message)  # type: ignore[arg-type]
    return buf.data


def test_fixed_bytes_agree_with_protocol_and_paths() -> None:
    assert str(paths.SOCKET) == p11entry.SOCKET
    assert _encoded({"type": "p11"}) == p11entry.REQUEST
    assert _encoded({"type": "send-fds"}) == p11entry.SEND_FDS
    assert protocol.MAX_MESSAGE + 1 == p11entry.MAX_LINE


Daemon = Callable[[socket.socket], None]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[[Daemon], str]]:
    threads: list[threading.Thread] = []
    servers: list[socket.socket] = []

    def start(serve: Daemon) -> str:
        path = str(tmp_path / "hsmd.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(1)
        servers.append(server)

        def run() -> None:
            conn, _ = server.accept()
            with conn:
                serve(conn)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        threads.append(t)
        return path

    yield start
    for t in threads:
        t.join(30)
    for s in servers:
        s.close()


def _run(path: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-I", "-c", RUN, path, str(ROOT)],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )


def _serve_session(send_fds: bytes, result: bytes, seen: dict[str, object]) -> Daemon:
    def serve(conn: socket.socket) -> None:
        with conn.makefile("rb") as replies:
            seen["request"] = protocol.recv(replies)
            conn.sendall(send_fds)
            msg, fds, _flags, _addr = socket.recv_fds(conn, 16, 4)
            seen["msg"] = msg
            seen["count"] = len(fds)
            stdin, stdout = fds
            with os.fdopen(stdin, "rb") as i, os.fdopen(stdout, "wb") as o:
                o.write(b"served:" + i.read())
            conn.sendall(result)

    return serve


@pytest.mark.parametrize("send_fds", [p11entry.SEND_FDS, b'{"type": "send-fds"}\n'])
def test_hands_its_stdin_and_stdout_to_the_daemon(
    daemon: Callable[[Daemon], str], send_fds: bytes
) -> None:
    seen: dict[str, object] = {}
    path = daemon(_serve_session(send_fds, b'{"type": "result", "exit": 0}\n', seen))
    proc = _run(path, b"rpc bytes")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"served:rpc bytes"
    assert seen == {"request": {"type": "p11"}, "msg": b"F", "count": 2}


@pytest.mark.parametrize(
    ("result", "code"),
    [
        (b'{"type":"result","exit":1}\n', 1),
        (b"", protocol.EXIT_FAILED),  # the daemon went away
        (b"not json\n", protocol.EXIT_FAILED),
        (b'{"type":"other"}\n', protocol.EXIT_FAILED),
    ],
)
def test_the_result_is_the_exit_status(
    daemon: Callable[[Daemon], str], result: bytes, code: int
) -> None:
    seen: dict[str, object] = {}
    path = daemon(_serve_session(p11entry.SEND_FDS, result, seen))
    assert _run(path).returncode == code


@pytest.mark.parametrize(
    ("reply", "shown"),
    [
        (b'{"type":"refused","error":"p11-x is not a registered client"}\n',
         "hsm-p11: p11-x is not a registered client"),
        (b"", "hsm-p11: refused"),
        (b"[1]\n", "hsm-p11: refused"),
        (b'{"type":"send-fds"', "hsm-p11: refused"),  # no newline: truncated
    ],
)  # fmt: skip
def test_a_refusal_or_odd_reply_is_denied(
    daemon: Callable[[Daemon], str], reply: bytes, shown: str
) -> None:
    def serve(conn: socket.socket) -> None:
        with conn.makefile("rb") as replies:
            assert protocol.recv(replies) == {"type": "p11"}
            conn.sendall(reply)

    proc = _run(daemon(serve))
    assert proc.returncode == protocol.EXIT_DENIED
    assert proc.stderr.decode().strip() == shown
    assert proc.stdout == b""


def test_no_daemon_is_unavailable(tmp_path: Path) -> None:
    proc = _run(str(tmp_path / "absent.sock"))
    assert proc.returncode == protocol.EXIT_UNAVAILABLE
    assert b"not available" in proc.stderr


def test_the_way_to_the_hand_over_imports_no_heavy_module() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); before = set(sys.modules);"
        "from hsmctl.appliance.p11entry import main;"
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code, str(ROOT)], capture_output=True,
                         check=True, timeout=60).stdout.decode().split()  # fmt: skip
    assert set(out) <= {"_socket", "hsmctl", "hsmctl.appliance", "hsmctl.appliance.p11entry"}, out
