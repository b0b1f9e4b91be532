"""``hsmsh`` (hsmctl.appliance.shell) without a device: its wire encoding is
:mod:`protocol`'s (property tests), it imports only built-in modules, and against a
stand-in daemon on a Unix socket it runs a command, answers the daemon's request for the
command's secrets from stdin, copies a stream, and ends refusals and odd replies with
the device's exit statuses. The daemon's side of the secrets request
(:meth:`daemon.ShellSession.ask_secrets`) runs over a socket pair."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hsmctl import contract
from hsmctl.appliance import daemon, paths, protocol, shell

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RUN = (
    "import sys; sys.path.insert(0, sys.argv[2]);"
    "import hsmctl.appliance.shell as s; s.SOCKET = sys.argv[1]; sys.exit(s.main(sys.argv[3:]))"
)


class _Buf:
    def __init__(self) -> None:
        self.data = b""

    def sendall(self, data: bytes) -> None:
        self.data += data


def _encoded(message: dict[str, Any]) -> bytes:
    buf = _Buf()
    protocol.send(buf, message)  # type: ignore[arg-type]
    return buf.data


def test_constants_agree_with_paths_protocol_and_contract() -> None:
    assert str(paths.SOCKET) == shell.SOCKET
    assert protocol.MAX_MESSAGE == shell.MAX_MESSAGE
    assert shell.EXIT_FAILED == contract.EXIT_FAILED
    assert shell.EXIT_USAGE == contract.EXIT_USAGE
    assert shell.EXIT_UNAVAILABLE == contract.EXIT_UNAVAILABLE
    assert shell.EXIT_DENIED == contract.EXIT_DENIED


_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF))  # surrogates too
_value = st.one_of(st.booleans(), st.integers(), _text, st.lists(_text, max_size=4))


@given(st.dictionaries(_text, _value, max_size=5))
def test_encode_is_protocol_send(message: dict[str, Any]) -> None:
    assert shell.encode(message) == _encoded(message)


def test_the_shells_messages_are_protocol_send() -> None:
    line = b"audit export --after 3 \xff".decode("utf-8", "surrogateescape")
    for message in (
        {"type": "hello", "interactive": False},
        {"type": "command", "line": line},
        {"type": "secrets", "values": ["p\u00e4ss", '\n"\\']},
        {"type": "secrets", "cancel": True},
        {"type": "bye"},
    ):
        assert shell.encode(message) == _encoded(message)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=10,
)


@given(st.dictionaries(_text, _json, max_size=5))
def test_decode_is_protocol_recv(message: dict[str, Any]) -> None:
    line = _encoded(message)
    assert shell.decode(line) == protocol.recv(io.BytesIO(line)) == message


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 200_000 + b"\n",
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"\n",
        b"x" * (protocol.MAX_MESSAGE + 10) + b"\n",
        b'{"type": "command"',  # no newline: truncated
        b"\xff\xfe\n",
        b"[1, 2]\n",
        b'{"a": 1} {"b": 2}\n',
        b"\n",
        b'{"a": "\x01"}\n',  # a control character inside a string (json's strict)
    ],
)
def test_malformed_replies_are_value_errors_as_in_protocol(raw: bytes) -> None:
    with pytest.raises(ValueError):
        protocol.recv(io.BytesIO(raw))
    with pytest.raises(ValueError):
        shell.decode(raw)


def test_the_shell_imports_only_built_in_modules() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); before = set(sys.modules);"
        "from hsmctl.appliance.shell import main;"
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code, str(ROOT)], capture_output=True,
                         check=True, timeout=60).stdout.decode().split()  # fmt: skip
    allowed = {"_json", "_socket", "hsmctl", "hsmctl.appliance", "hsmctl.appliance.shell"}
    assert set(out) <= allowed, out


# -- against a stand-in daemon ---------------------------------------------------------------

Serve = Callable[[socket.socket, Any], None]


@pytest.fixture
def daemon_at(tmp_path: Path) -> Iterator[Callable[[Serve], str]]:
    threads: list[threading.Thread] = []
    servers: list[socket.socket] = []
    errors: list[BaseException] = []

    def start(serve: Serve) -> str:
        path = str(tmp_path / "hsmd.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(1)
        servers.append(server)

        def run() -> None:
            conn, _ = server.accept()
            try:
                with conn, conn.makefile("rb") as rfile:
                    serve(conn, rfile)
            except BaseException as exc:  # reported by the test, not lost in a thread
                errors.append(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        threads.append(t)
        return path

    yield start
    for t in threads:
        t.join(30)
    for s in servers:
        s.close()
    assert not errors, errors


def _run(path: str, *argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-I", "-c", RUN, path, str(ROOT), *argv],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )


READY = {"type": "ready", "role": "provider", "prompt": "hsm> ", "banner": "hi"}


def _session(
    commands: Callable[[socket.socket, Any, dict[str, Any]], None], seen: list[Any]
) -> Serve:
    """A daemon that greets, hands each command to ``commands`` and answers ``bye``."""

    def serve(conn: socket.socket, rfile: Any) -> None:
        seen.append(protocol.recv(rfile))
        protocol.send(conn, READY)
        while True:
            msg = protocol.recv(rfile)
            seen.append(msg)
            if msg is None or msg.get("type") == "bye":
                protocol.send(conn, {"type": "result", "exit": 0})
                return
            commands(conn, rfile, msg)

    return serve


def test_a_command_without_secrets(daemon_at: Callable[[Serve], str]) -> None:
    seen: list[Any] = []

    def commands(conn: socket.socket, rfile: Any, msg: dict[str, Any]) -> None:
        protocol.send(conn, {"type": "result", "exit": 0, "output": "state: factory"})

    proc = _run(daemon_at(_session(commands, seen)), "-c", "hsm show", stdin=b"never read\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"state: factory\n"
    assert seen == [
        {"type": "hello", "interactive": False},
        {"type": "command", "line": "hsm show"},
        {"type": "bye"},
    ]


def test_the_secrets_the_daemon_names_are_read_from_stdin(
    daemon_at: Callable[[Serve], str],
) -> None:
    seen: list[Any] = []

    def commands(conn: socket.socket, rfile: Any, msg: dict[str, Any]) -> None:
        protocol.send(conn, {"type": "secrets", "names": ["ssh_public_key", "password"]})
        seen.append(protocol.recv(rfile))
        protocol.send(conn, {"type": "result", "exit": 0, "output": "set\n"})

    proc = _run(
        daemon_at(_session(commands, seen)), "-c", "user otp set",
        stdin=b"ssh-ed25519 AAAA k\r\nOne Time 1!\nnot read\n",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"set\n"
    assert seen[1:] == [
        {"type": "command", "line": "user otp set"},
        {"type": "secrets", "values": ["ssh-ed25519 AAAA k", "One Time 1!"]},
        {"type": "bye"},
    ]


def test_a_stream_then_the_result_and_its_error(daemon_at: Callable[[Serve], str]) -> None:
    seen: list[Any] = []
    body = bytes(range(256)) * 5000

    def commands(conn: socket.socket, rfile: Any, msg: dict[str, Any]) -> None:
        protocol.send(conn, {"type": "stream", "length": len(body)})
        conn.sendall(body)
        protocol.send(conn, {"type": "result", "exit": 65, "output": "", "error": "broken"})

    proc = _run(daemon_at(_session(commands, seen)), "-c", "audit export")
    assert proc.returncode == 65
    assert proc.stdout == body
    assert proc.stderr == b"error: broken\n"


def test_a_refused_session_is_denied(daemon_at: Callable[[Serve], str]) -> None:
    def serve(conn: socket.socket, rfile: Any) -> None:
        assert protocol.recv(rfile) == {"type": "hello", "interactive": False}
        protocol.send(conn, {"type": "refused", "error": "monitor may not use this interface"})

    proc = _run(daemon_at(serve), "-c", "hsm show")
    assert proc.returncode == contract.EXIT_DENIED
    assert proc.stderr == b"hsmsh: monitor may not use this interface\n"


@pytest.mark.parametrize("reply", [b"", b"not json\n", b'{"type":"result"'])
def test_a_daemon_that_goes_away_or_garbles_is_unavailable(
    daemon_at: Callable[[Serve], str], reply: bytes
) -> None:
    def serve(conn: socket.socket, rfile: Any) -> None:
        protocol.recv(rfile)
        protocol.send(conn, READY)
        assert protocol.recv(rfile) == {"type": "command", "line": "hsm show"}
        conn.sendall(reply)
        conn.shutdown(socket.SHUT_WR)
        rfile.read()  # until the shell is gone

    proc = _run(daemon_at(serve), "-c", "hsm show")
    assert proc.returncode == contract.EXIT_UNAVAILABLE
    assert b"Traceback" not in proc.stderr


def test_no_daemon_is_unavailable(tmp_path: Path) -> None:
    proc = _run(str(tmp_path / "absent.sock"), "-c", "hsm show")
    assert proc.returncode == contract.EXIT_UNAVAILABLE
    assert b"unavailable" in proc.stderr


def test_usage(tmp_path: Path) -> None:
    proc = _run(str(tmp_path / "absent.sock"), "-x", "hsm show")
    assert proc.returncode == contract.EXIT_USAGE


# -- hsmsh -c batch ---------------------------------------------------------------------------


def _batch(*requests: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in requests)


def _replies(stdout: bytes) -> list[tuple[int, bytes, str]]:
    out = []
    for line in stdout.splitlines():
        r = json.loads(line)
        out.append((r["exit"], base64.b64decode(r["stdout"]), r["stderr"]))
    return out


def test_a_batch_runs_its_commands_in_one_session_with_their_own_secrets(
    daemon_at: Callable[[Serve], str],
) -> None:
    seen: list[Any] = []
    body = bytes(range(256)) * 3

    def commands(conn: socket.socket, rfile: Any, msg: dict[str, Any]) -> None:
        if msg["line"] == "user otp set":
            protocol.send(conn, {"type": "secrets", "names": ["ssh_public_key", "password"]})
            seen.append(protocol.recv(rfile))
            protocol.send(conn, {"type": "result", "exit": 0, "output": "set"})
        elif msg["line"] == "audit export":
            protocol.send(conn, {"type": "stream", "length": len(body)})
            conn.sendall(body)
            protocol.send(conn, {"type": "result", "exit": 0, "output": ""})
        else:
            protocol.send(conn, {"type": "result", "exit": 0, "output": '{"k": 1}'})

    requests = _batch(
        {"line": "user otp set", "secrets": ["ssh-ed25519 AAAA k", "One Time 1!"]},
        {"line": "audit key show"},
        {"line": "audit export", "secrets": []},
    )
    proc = _run(daemon_at(_session(commands, seen)), "-c", "batch", stdin=requests)
    assert proc.returncode == 0, proc.stderr
    assert _replies(proc.stdout) == [(0, b"set\n", ""), (0, b'{"k": 1}\n', ""), (0, body, "")]
    assert seen == [
        {"type": "hello", "interactive": False},  # one session for the three
        {"type": "command", "line": "user otp set"},
        {"type": "secrets", "values": ["ssh-ed25519 AAAA k", "One Time 1!"]},
        {"type": "command", "line": "audit key show"},
        {"type": "command", "line": "audit export"},
        {"type": "bye"},
    ]


def test_a_batch_ends_at_the_first_failure_with_its_status(
    daemon_at: Callable[[Serve], str],
) -> None:
    seen: list[Any] = []

    def commands(conn: socket.socket, rfile: Any, msg: dict[str, Any]) -> None:
        if msg["line"].startswith("network set"):
            protocol.send(conn, {"type": "result", "exit": 64, "output": "", "error": "bad ip"})
        else:
            protocol.send(conn, {"type": "result", "exit": 0, "output": "ok"})

    requests = _batch({"line": "network show"}, {"line": "network set --ip x"},
                      {"line": "user enable monitor"})  # fmt: skip
    proc = _run(daemon_at(_session(commands, seen)), "-c", "batch", stdin=requests)
    assert proc.returncode == 64
    assert _replies(proc.stdout) == [(0, b"ok\n", ""), (64, b"", "error: bad ip\n")]
    assert [m.get("line") for m in seen if m.get("type") == "command"] == [
        "network show",
        "network set --ip x",
    ]


def test_secrets_that_do_not_match_what_the_daemon_names_are_not_sent(
    daemon_at: Callable[[Serve], str],
) -> None:
    seen: list[Any] = []

    def commands(conn: socket.socket, rfile: Any, msg: dict[str, Any]) -> None:
        protocol.send(conn, {"type": "secrets", "names": ["ssh_public_key", "password"]})
        seen.append(protocol.recv(rfile))
        protocol.send(conn, {"type": "result", "exit": 64, "output": ""})

    requests = _batch({"line": "user otp set", "secrets": ["only one"]})
    proc = _run(daemon_at(_session(commands, seen)), "-c", "batch", stdin=requests)
    assert proc.returncode == 64
    assert {"type": "secrets", "cancel": True} in seen
    assert b"only one" not in proc.stdout + proc.stderr


def test_a_commands_output_over_the_batch_bound_fails_it(
    daemon_at: Callable[[Serve], str],
) -> None:
    seen: list[Any] = []
    size = shell.MAX_BATCH_OUTPUT + 1

    def commands(conn: socket.socket, rfile: Any, msg: dict[str, Any]) -> None:
        protocol.send(conn, {"type": "stream", "length": size})
        conn.sendall(b"x" * size)
        protocol.send(conn, {"type": "result", "exit": 0, "output": ""})

    proc = _run(daemon_at(_session(commands, seen)), "-c", "batch",
                stdin=_batch({"line": "audit export"}, {"line": "hsm show"}))  # fmt: skip
    assert proc.returncode == contract.EXIT_FAILED
    [(code, out, err)] = _replies(proc.stdout)
    assert code == contract.EXIT_FAILED and out == b"" and "not in a batch" in err


@pytest.mark.parametrize(
    "stdin",
    [
        b"",
        b"not json\n",
        b'{"line": "hsm show", "stdin": ["x"]}\n',
        b'{"line": 5}\n',
        b'{"line": "hsm show", "secrets": "one"}\n',
        b'{"line": "hsm show", "secrets": [1]}\n',
        b'["hsm show"]\n',
        b'{"line": "hsm show"}\n' * (shell.MAX_BATCH + 1),
        b'{"line": "' + b"x" * shell.MAX_BATCH_INPUT + b'"}\n',
        b'{"line": "\xff"}\n',
    ],
    ids=lambda stdin: f"{len(stdin)}-bytes",
)
def test_a_batch_that_cannot_be_read_is_a_usage_error_before_the_daemon_hears_of_it(
    tmp_path: Path, stdin: bytes
) -> None:
    # No daemon at that path: a shell that got as far as connecting would say 69.
    proc = _run(str(tmp_path / "absent.sock"), "-c", "batch", stdin=stdin)
    assert proc.returncode == contract.EXIT_USAGE, proc.stderr
    assert proc.stderr.startswith(b"hsmsh: batch: ")
    assert proc.stdout == b""


# -- the daemon's side of the secrets request ------------------------------------------------


@contextlib.contextmanager
def _shell_session() -> Iterator[tuple[daemon.ShellSession, socket.socket, Any]]:
    ours, theirs = socket.socketpair()
    caller = daemon.Caller("admin", None, None, "198.18.0.1", 1)
    session = daemon.ShellSession(None, caller, ours, False)  # type: ignore[arg-type]
    with ours, theirs, ours.makefile("rb") as rfile:
        yield session, theirs, rfile


def test_the_daemon_asks_for_the_named_secrets() -> None:
    with _shell_session() as (session, shell_end, rfile):
        assert session.ask_secrets(rfile, ()) == []
        shell_end.sendall(shell.encode({"type": "secrets", "values": ["a", "b"]}))
        assert session.ask_secrets(rfile, ("so_pin", "co_pin")) == ["a", "b"]
        with shell_end.makefile("rb") as asked:
            assert protocol.recv(asked) == {"type": "secrets", "names": ["so_pin", "co_pin"]}


@pytest.mark.parametrize(
    "answer",
    [
        {"type": "secrets", "cancel": True},
        {"type": "secrets", "values": ["only one"]},
        {"type": "secrets", "values": [1, 2]},
        {"type": "command", "line": "hsm show"},
    ],
)
def test_a_cancelled_or_odd_answer_runs_nothing(answer: dict[str, Any]) -> None:
    with _shell_session() as (session, shell_end, rfile):
        shell_end.sendall(json.dumps(answer).encode() + b"\n")
        assert session.ask_secrets(rfile, ("so_pin", "co_pin")) is None
        with shell_end.makefile("rb") as replies:
            assert protocol.recv(replies) == {"type": "secrets", "names": ["so_pin", "co_pin"]}
            assert protocol.recv(replies) == {
                "type": "result",
                "exit": contract.EXIT_USAGE,
                "output": "",
            }


@pytest.mark.parametrize("answer", [b"", b"garbage\n"])
def test_a_shell_that_goes_away_ends_the_session(answer: bytes) -> None:
    with _shell_session() as (session, shell_end, rfile):
        shell_end.sendall(answer)
        shell_end.shutdown(socket.SHUT_WR)
        with pytest.raises(daemon.SessionGone):
            session.ask_secrets(rfile, ("new_password",))
