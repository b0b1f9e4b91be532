"""Several device commands in one exec (``hsmsh -c batch``): the host's half
(:mod:`hsmctl.ssh.batch`, :meth:`DeviceConnection.run_batch`). The shell's half is in
test_shell.py; a real appliance runs both in tests/lab/test_ssh_transport.py.

The replies come from the device, so they are hostile input: whatever bytes arrive, the
parser returns results that match the commands or raises IntegrityError (exit 3), never
anything else."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsmctl.errors import IntegrityError, UsageError
from hsmctl.secret import Secret
from hsmctl.ssh import (
    DeviceConnection,
    DeviceDenied,
    DeviceUsageError,
    PinnedHostKeys,
    Result,
    batch,
)

pytestmark = pytest.mark.unit

COMMANDS = ["user otp set --expires-hours 72", "sysconf hostkey show", "audit key show"]


def reply(code: int, out: bytes = b"", err: str = "") -> bytes:
    body = base64.b64encode(out).decode()
    return json.dumps({"exit": code, "stdout": body, "stderr": err}).encode() + b"\n"


def test_the_payload_is_one_request_a_line_with_its_secrets() -> None:
    data = batch.payload([(COMMANDS[0], ["ssh-ed25519 AAAA t", Secret("One Time 1!")]),
                          (COMMANDS[1], [])])  # fmt: skip
    lines = [json.loads(x) for x in data.decode().splitlines()]
    assert lines == [
        {"line": COMMANDS[0], "secrets": ["ssh-ed25519 AAAA t", "One Time 1!"]},
        {"line": COMMANDS[1], "secrets": []},
    ]


@pytest.mark.parametrize(
    "requests",
    [
        [],
        [("hsm show", [])] * (batch.MAX_COMMANDS + 1),
        [("hsm show", "hunter2 as one string")],
        [("hsm show", Secret("hunter2"))],
        [(b"hsm show", [])],
        [("hsm show", [b"hunter2"])],
        [("user otp set", ["x" * (batch.MAX_INPUT + 1)])],
    ],
)
def test_what_the_shell_would_refuse_is_a_usage_error_that_shows_no_secret(
    requests: Any,
) -> None:
    with pytest.raises(UsageError) as info:
        batch.payload(requests)
    assert "hunter2" not in info.value.message
    assert "xxxx" not in info.value.message


def test_replies_in_order_up_to_the_first_failure() -> None:
    out = reply(0) + reply(0, b'{"active": []}\n') + reply(0, b'{"key_id": "k"}\n')
    got = batch.replies("hsm1", COMMANDS, 0, out, "")
    assert [(r.command, r.status, r.stdout) for r in got] == [
        (COMMANDS[0], 0, ""),
        (COMMANDS[1], 0, '{"active": []}\n'),
        (COMMANDS[2], 0, '{"key_id": "k"}\n'),
    ]
    failed = batch.replies("hsm1", COMMANDS, 64, reply(64, b"", "error: bad\n"), "")
    assert [(r.command, r.status, r.stderr) for r in failed] == [(COMMANDS[0], 64, "error: bad\n")]


def test_refused_before_the_first_command_is_that_commands_failure() -> None:
    got = batch.replies("hsm1", COMMANDS, 77, b"", "hsmsh: monitor may not use this interface\n")
    assert got == [Result(COMMANDS[0], 77, "", "hsmsh: monitor may not use this interface\n", 0)]


@pytest.mark.parametrize(
    ("status", "out"),
    [
        (0, b""),  # no reply at all, yet success
        (0, reply(0)),  # fewer replies than commands, yet success
        (1, reply(0) * 3),  # all succeeded, yet the batch failed
        (0, reply(0) * 4),  # more replies than commands
        (1, reply(1) + reply(0)),  # a reply after the failure
        (0, reply(0) * 2 + reply(0)[:-1]),  # the last line cut
        (0, b"not json\n"),
        (0, b"[1, 2]\n"),
        (0, b'{"exit": 0, "stdout": "", "stderr": "", "more": 1}\n'),
        (0, b'{"exit": "0", "stdout": "", "stderr": ""}\n'),
        (0, b'{"exit": true, "stdout": "", "stderr": ""}\n'),
        (0, b'{"exit": 0, "stdout": "not base64!", "stderr": ""}\n'),
        (0, b'{"exit": 0, "stdout": "\\u00e9", "stderr": ""}\n'),
        (0, b'{"exit": 0, "stdout": "", "stderr": 5}\n'),
    ],
)
def test_a_reply_that_is_not_a_batchs_is_an_integrity_error(status: int, out: bytes) -> None:
    with pytest.raises(IntegrityError):
        batch.replies("hsm1", COMMANDS, status, out, "")


def test_a_reply_over_the_output_bound_is_an_integrity_error() -> None:
    big = reply(0, b"x" * (batch.MAX_OUTPUT + 1))
    with pytest.raises(IntegrityError):
        batch.replies("hsm1", COMMANDS[:1], 0, big, "")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=8,
)
_LINE = st.one_of(
    st.builds(reply, st.integers(-3, 300), st.binary(max_size=40), st.text(max_size=20)),
    st.binary(max_size=60),
    st.builds(lambda v: json.dumps(v).encode() + b"\n", _JSON),
)


@settings(max_examples=300, deadline=None)
@given(
    status=st.integers(-1, 255),
    out=st.one_of(st.binary(max_size=400), st.lists(_LINE, max_size=6).map(b"".join)),
    err=st.text(max_size=50),
)
def test_any_bytes_give_matching_results_or_an_integrity_error(
    status: int, out: bytes, err: str
) -> None:
    try:
        got = batch.replies("hsm1", COMMANDS, status, out, err)
    except IntegrityError:
        return
    assert 1 <= len(got) <= len(COMMANDS)
    assert [r.command for r in got] == COMMANDS[: len(got)]
    assert all(r.ok for r in got[:-1])
    assert got[-1].status == status
    assert status != 0 or len(got) == len(COMMANDS)


# -- run_batch over a connection whose channel is faked --------------------------------------


class _Conn(DeviceConnection):
    """A DeviceConnection whose exec answers from a script (no network)."""

    def __init__(self, answers: dict[str, tuple[int, bytes, str]]) -> None:
        pins = PinnedHostKeys(fingerprints=["SHA256:" + "A" * 43])
        super().__init__("198.18.0.9", username="provider", pinned=pins, key="/nonexistent/key")
        self.answers = answers
        self.calls: list[tuple[str, bytes]] = []

    def _execute(self, command: str, stdin_lines: Any, on_stdout: Any, timeout: Any,
                 max_stdout: Any, stdin: bytes | None = None) -> tuple[int, str]:  # fmt: skip
        from hsmctl.ssh.channel import stdin_payload

        self.calls.append(
            (command, stdin if stdin is not None else stdin_payload(command, stdin_lines))
        )
        status, out, err = self.answers[command]
        on_stdout(out)
        return status, err


def test_run_batch_returns_every_result_and_raises_the_first_failure_as_run_would() -> None:
    conn = _Conn({"batch": (0, reply(0) + reply(0, b"{}\n") + reply(0, b"{}\n"), "")})
    got = conn.run_batch([(COMMANDS[0], [Secret("pw")]), (COMMANDS[1], []), (COMMANDS[2], [])])
    assert [r.status for r in got] == [0, 0, 0]
    assert [c for c, _ in conn.calls] == ["batch"]  # one exec; the secret only on stdin
    assert b"pw" in conn.calls[0][1] and "pw" not in conn.calls[0][0]
    denied = _Conn({"batch": (77, reply(0) + reply(77, b"", "error: denied\n"), "")})
    with pytest.raises(DeviceDenied) as info:
        denied.run_batch([(COMMANDS[0], []), (COMMANDS[1], []), (COMMANDS[2], [])])
    assert info.value.result.command == COMMANDS[1]


def test_an_older_shell_without_batch_gets_the_commands_one_by_one() -> None:
    old = {
        "batch": (64, b"", "error: unknown command 'batch'\n"),
        COMMANDS[0]: (0, b"", ""),
        COMMANDS[1]: (0, b'{"active": []}\n', ""),
    }
    conn = _Conn(old)
    got = conn.run_batch([(COMMANDS[0], ["k", Secret("pw")]), (COMMANDS[1], [])])
    assert [c for c, _ in conn.calls] == ["batch", COMMANDS[0], COMMANDS[1]]
    assert conn.calls[1][1] == b"k\npw\n"
    assert [r.stdout for r in got] == ["", '{"active": []}\n']


def test_a_batch_the_shell_could_not_read_is_not_retried_one_by_one() -> None:
    conn = _Conn({"batch": (64, b"", "hsmsh: batch: a batch holds 1 to 16 commands\n")})
    with pytest.raises(DeviceUsageError):
        conn.run_batch([(COMMANDS[1], [])])
    assert [c for c, _ in conn.calls] == ["batch"]
