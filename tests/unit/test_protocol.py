"""The shell-daemon wire treats a session's bytes as hostile: bounded, and anything
malformed (deep nesting included) is a ValueError the daemon handles, never a crash."""

from __future__ import annotations

import io

import pytest

from hsmctl.appliance import protocol

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 200_000 + b"\n",
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"\n",
        b"x" * (protocol.MAX_MESSAGE + 10) + b"\n",
        b'{"type": "command"',  # no newline: truncated
        b"\xff\xfe\n",
        b"[1, 2]\n",
    ],
)
def test_malformed_messages_are_value_errors(raw: bytes) -> None:
    with pytest.raises(ValueError):
        protocol.recv(io.BytesIO(raw))


def test_a_message_round_trips() -> None:
    assert protocol.recv(io.BytesIO(b'{"type":"bye"}\n')) == {"type": "bye"}
    assert protocol.recv(io.BytesIO(b"")) is None
