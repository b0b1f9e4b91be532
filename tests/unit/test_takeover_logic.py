"""The takeover's pure decisions: fault-point parsing, input checks (``--client`` too),
the log window."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hsmctl.clients import kit
from hsmctl.clients.request import ClientRequest, check_client, parse_clients
from hsmctl.clients.workflow import kit_dir, new_key
from hsmctl.customer.store import ApplianceDir
from hsmctl.errors import UsageError
from hsmctl.secret import Secret
from hsmctl.takeover.actions import check_client_kits
from hsmctl.takeover.faults import parse
from hsmctl.takeover.options import check_client_set, client_set_change
from hsmctl.takeover.records import ClientKit
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


# -- --client NAME:ROLE (issue 11, item 5) ------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("app1:crypto-officer", ("app1", "crypto-officer")),
        ("a:crypto-user", ("a", "crypto-user")),
        ("billing-api-2:crypto-user", ("billing-api-2", "crypto-user")),
        ("a" * 28 + ":crypto-user", ("a" * 28, "crypto-user")),
    ],
)
def test_client_specs_parse(text: str, expected: tuple[str, str]) -> None:
    request = ClientRequest.parse(text)
    assert (request.name, request.role) == expected
    assert str(request) == text


@pytest.mark.parametrize(
    "text, message",
    [
        ("app1", "expected NAME:ROLE"),
        ("app1:", "expected NAME:ROLE"),
        (":crypto-user", "expected NAME:ROLE"),
        ("app1:admin", "unknown role 'admin'"),
        ("app1:crypto-user:x", "unknown role 'crypto-user:x'"),
        ("App1:crypto-user", "bad NAME: 1 to 28 characters"),
        ("1app:crypto-user", "bad NAME"),
        ("app_1:crypto-user", "bad NAME"),
        ("app-:crypto-user", "bad NAME"),
        ("a" * 29 + ":crypto-user", "bad NAME"),
        ("app 1:crypto-user", "bad NAME"),
    ],
)
def test_bad_client_specs_are_usage_errors(text: str, message: str) -> None:
    with pytest.raises(UsageError) as err:
        ClientRequest.parse(text)
    assert err.value.exit_code == 2
    assert str(err.value).startswith("--client ") and message in str(err.value), err.value


def test_the_name_rule_is_client_registers() -> None:
    # One rule for --client and client register --name (kit.check_name, the device's).
    for name in ("app1", "App1", "a" * 29, "app-"):
        try:
            kit.check_name(name)
            ok = True
        except ValueError:
            ok = False
        try:
            ClientRequest.parse(f"{name}:crypto-user")
            parsed = True
        except UsageError:
            parsed = False
        assert ok == parsed, name
    with pytest.raises(UsageError, match="--role must be one of"):
        check_client("app1", "admin")


def test_a_client_named_twice_is_refused() -> None:
    with pytest.raises(UsageError, match="app1 is given more than once"):
        parse_clients(["app1:crypto-user", "app2:crypto-user", "app1:crypto-officer"])
    assert parse_clients([]) == ()
    twice = (ClientRequest("app1", "crypto-user"),) * 2
    with pytest.raises(UsageError, match="more than once"):
        check_inputs(Options(handoff=HERE, clients=twice))


def _kits(*specs: str, keys: bool = False) -> list[ClientKit]:
    return [
        ClientKit(*s.split(":"), public_key=SOME_KEY if keys else None)  # type: ignore[arg-type]
        for s in specs
    ]


SOME_KEY = new_key("app1")[1]  # "ssh-ed25519 BASE64 p11-app1"


def test_a_resume_must_ask_for_the_clients_the_journal_holds() -> None:
    asked = parse_clients(["app1:crypto-officer", "app2:crypto-user"])
    # Nothing journaled yet (the step has not started): any set is taken.
    assert client_set_change(asked, None) is None
    assert client_set_change((), None) is None
    # The same set, in any order.
    assert client_set_change(asked[::-1], _kits("app1:crypto-officer", "app2:crypto-user")) is None
    assert client_set_change((), []) is None
    assert client_set_change(asked[:1], _kits("app1:crypto-officer", "app2:crypto-user")) == (
        "left out: app2:crypto-user"
    )
    assert client_set_change(asked, []) == ("not journaled: app1:crypto-officer, app2:crypto-user")
    assert client_set_change(parse_clients(["app1:crypto-user"]), _kits("app1:crypto-officer")) == (
        "not journaled: app1:crypto-user; left out: app1:crypto-officer"
    )
    with pytest.raises(UsageError) as err:
        check_client_set("hsm09", (), _kits("app1:crypto-officer"))
    assert err.value.exit_code == 2
    assert "committed to its clients (--client app1:crypto-officer)" in str(err.value)
    assert "left out: app1:crypto-officer" in str(err.value)


def test_a_kit_directory_taken_by_another_kit_is_refused(tmp_path: Path) -> None:
    state = ApplianceDir(tmp_path, "hsm09")
    asked = parse_clients(["app1:crypto-officer"])
    check_client_kits(state, asked, None)  # nothing there
    final = kit_dir(state, "app1")
    final.mkdir(parents=True)
    check_client_kits(state, asked, None)  # an empty directory is taken over
    (final / "app1_key.pub").write_text("ssh-ed25519 AAAA other\n")
    with pytest.raises(UsageError, match="exists and is not empty"):
        check_client_kits(state, asked, None)
    with pytest.raises(UsageError, match="exists and is not empty"):
        check_client_kits(state, asked, _kits("app1:crypto-officer", keys=True))
    # This takeover's own kit, renamed into place before an interruption, is no obstacle.
    (final / "app1_key.pub").write_text(SOME_KEY.rsplit(" ", 1)[0] + " another-comment\n")
    check_client_kits(state, asked, _kits("app1:crypto-officer", keys=True))
    done = _kits("app1:crypto-officer", keys=True)
    done[0].kit = str(final)
    (final / "app1_key.pub").write_text("ssh-ed25519 AAAA other\n")
    check_client_kits(state, asked, done)  # finished by an earlier run: not looked at


def test_bad_client_input_exits_2_before_the_config_or_the_bundle_is_read(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    conf = tmp_path / "hsmctl.yaml"
    conf.write_text(f"state_dir: {state}\n")
    argv = [str(Path(sys.executable).with_name("hsmctl")), "--config", str(conf), "takeover",
            "--handoff", str(tmp_path / "no-such-bundle.json"), "--json"]  # fmt: skip
    for bad, message in (
        (["--client", "app1"], "expected NAME:ROLE"),
        (["--client", "app1:root"], "unknown role"),
        (["--client", "Bad_Name:crypto-user"], "bad NAME"),
        (["--client", "app1:crypto-user", "--client", "app1:crypto-user"], "more than once"),
    ):
        proc = subprocess.run([*argv, *bad], capture_output=True, text=True, check=False)
        assert proc.returncode == 2, proc.stderr
        shown = json.loads(proc.stdout)["error"]
        assert shown["exit_code"] == 2 and message in shown["message"], shown
        assert not state.exists()
