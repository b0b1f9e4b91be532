"""The takeover's pure decisions: fault-point parsing, input checks, the log window."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hsmctl.errors import UsageError
from hsmctl.secret import Secret
from hsmctl.takeover.faults import parse
from hsmctl.takeover.workflow import Options, check_inputs, transfer_window

pytestmark = pytest.mark.unit
HERE = Path(__file__)


@pytest.mark.parametrize(
    "wanted, expected",
    [
        ("before:escrow", ("before:escrow", "kill", 0.0)),
        ("before:escrow:kill", ("before:escrow", "kill", 0.0)),
        ("after:hostkeys:cut", ("after:hostkeys", "cut", 0.0)),
        ("send:hsm-init:kill@150", ("send:hsm-init", "kill", 0.15)),
        ("sent:sysconf-hostkey-show#2:cut@40", ("sent:sysconf-hostkey-show#2", "cut", 0.04)),
        ("pending:password", ("pending:password", "kill", 0.0)),
    ],
)
def test_fault_specs_parse(wanted: str, expected: tuple[str, str, float]) -> None:
    assert parse(wanted) == expected


@pytest.mark.parametrize(
    "opts",
    [
        Options(handoff=HERE, new_password=Secret("short-1A")),
        Options(handoff=HERE, new_password=Secret("onlylowercaseletters")),
        Options(handoff=HERE, so_pin=Secret("123")),
        Options(handoff=HERE, co_pin=Secret("x" * 256)),
    ],
)
def test_bad_inputs_are_refused(opts: Options) -> None:
    with pytest.raises(UsageError) as err:
        check_inputs(opts)
    for secret in (opts.new_password, opts.so_pin, opts.co_pin):
        if secret is not None:
            assert secret.reveal() not in str(err.value)


def test_good_inputs_pass() -> None:
    check_inputs(
        Options(
            handoff=HERE,
            new_password=Secret("Correct-Horse-42"),
            so_pin=Secret("1234"),
            co_pin=Secret("y" * 255),
        )
    )


def _rec(
    seq: int, event: str, actor: str = "admin", time: str = "", **detail: Any
) -> dict[str, Any]:
    return {
        "seq": seq,
        "event": event,
        "actor": actor,
        "outcome": "ok",
        "time": time or f"2026-01-01T10:00:{seq:02d}.000000Z",
        "detail": detail,
    }


def _otp_set(seq: int) -> dict[str, Any]:
    return _rec(seq, "result", "provider", command="user otp set --expires-hours 72")


def test_window_starts_at_the_last_provisioning_and_ignores_earlier_tenancies() -> None:
    records = [
        _otp_set(1),
        _rec(2, "login"),  # a previous tenant's takeover
        _rec(3, "ownership-transfer", "hsmd"),
        _otp_set(10),
        _rec(20, "session-start"),  # ours
        _rec(21, "login"),
        _rec(22, "ownership-transfer", "hsmd"),
        _rec(23, "session-start"),
    ]
    window = transfer_window(records, "2026-01-01T10:00:15.000000Z")
    assert window == {"provisioned_seq": 10, "transfer_seq": 22, "earlier_sessions": []}


def test_an_admin_session_before_the_takeover_started_is_reported() -> None:
    records = [
        _otp_set(10),
        _rec(11, "login"),  # someone used the one-time password before us
        _rec(20, "session-start"),
        _rec(22, "ownership-transfer", "hsmd"),
    ]
    window = transfer_window(records, "2026-01-01T10:00:15.000000Z")
    assert window["earlier_sessions"] == [11]


def test_our_own_sessions_of_an_interrupted_run_are_not_earlier() -> None:
    """A run killed after its one-time login leaves a session before the transfer: it is
    after the journal's start, so it is ours."""
    records = [
        _otp_set(10),
        _rec(16, "login"),
        _rec(17, "session-start"),
        _rec(30, "login"),
        _rec(31, "ownership-transfer", "hsmd"),
    ]
    assert transfer_window(records, "2026-01-01T10:00:15.5Z")["earlier_sessions"] == []


def test_no_transfer_means_no_window_end() -> None:
    window = transfer_window([_otp_set(5), _rec(6, "login")], "2026-01-01T10:00:00Z")
    assert window["transfer_seq"] is None
    assert window["earlier_sessions"] == []
