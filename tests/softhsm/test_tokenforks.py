"""The token helper's fork server (hsmctl.appliance.tokenforks) against real SoftHSM2:
the same answers as a fresh helper process, a fresh library context per operation, a
child that dies or hangs, and PINs that never reach the server."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

PyKCS11 = pytest.importorskip("PyKCS11")

from hsmctl.appliance import token as tok  # noqa: E402
from hsmctl.appliance import tokenhelper  # noqa: E402
from hsmctl.appliance.tokenforks import GO, ForkServer, ServerBroken  # noqa: E402
from tests.softhsm import test_token as base  # noqa: E402
from tests.softhsm.test_token import softhsm  # noqa: E402, F401 - the token store fixture

pytestmark = base.pytestmark

AUDIT_SO, AUDIT_USER = "forks-audit-so-1", "forks-audit-user-1"
SO, CO = "forks-cust-so-pin-7", "forks-cust-co-pin-7"


@pytest.fixture(autouse=True)
def fork_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper's operations through the fork server, in a token store of the test's
    own (``softhsm``, test_token's autouse fixture, imported above)."""
    monkeypatch.setattr(tokenhelper, "USE_FORK_SERVER", True)


def _server() -> ForkServer:
    server = tokenhelper._SERVER
    assert server is not None and not server.broken
    return server


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def _wait_for_child(pid: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kids = _children(pid)
        if kids:
            return kids[0]
        time.sleep(0.01)
    raise AssertionError("the server forked no child")


def test_answers_are_those_of_a_fresh_helper_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each operation through the server, then read back by a fresh process (and the
    other way round): the same token, the same status, nothing cached anywhere."""
    tok.audit_ensure_token(AUDIT_SO, AUDIT_USER)
    first = tok.audit_generate_key(AUDIT_USER)
    server_pid = _server().proc.pid
    tok.customer_init("forks", SO)
    via_server = tokenhelper.call_helper("customer_status", {}, tok.DEFAULT_LIB)
    monkeypatch.setattr(tokenhelper, "USE_FORK_SERVER", False)
    via_process = tokenhelper.call_helper("customer_status", {}, tok.DEFAULT_LIB)
    assert via_server == via_process
    assert via_process["initialised"] and via_process["label"] == "forks"
    # A change made by a fresh process is seen by the server's next child.
    tok.customer_set_co_pin(SO, CO)
    monkeypatch.setattr(tokenhelper, "USE_FORK_SERVER", True)
    assert tokenhelper.call_helper("customer_status", {}, tok.DEFAULT_LIB)["co_pin_set"]
    assert tokenhelper.call_helper("customer_check_co_pin", {"pin": CO}, tok.DEFAULT_LIB) == {
        "match": True
    }
    # Errors travel as they do from a fresh process: a wrong SO PIN is TokenAuthError.
    with pytest.raises(tok.TokenAuthError):
        tok.customer_init("forks", SO, current_so_pin="not-the-so-pin")
    # Keys generated in two children differ: each child's random generator is its own
    # (OpenSSL reseeds after fork), not a copy of the server's.
    second = tok.audit_generate_key(AUDIT_USER)
    assert second.label != first.label
    assert tok.audit_public_key_pem(second.label) != tok.audit_public_key_pem(first.label)
    assert _server().proc.pid == server_pid  # one server served all of it


def test_a_child_that_dies_without_a_reply_is_reported_and_the_server_goes_on() -> None:
    tokenhelper.prestart()
    server = _server()
    assert server.proc.stdin is not None
    server.proc.stdin.write(GO + b"\x00\x00")  # half a frame header: the child waits
    server.proc.stdin.flush()
    child = _wait_for_child(server.proc.pid)
    os.kill(child, signal.SIGKILL)
    assert server._frame(time.monotonic() + 10) == {"exit": -signal.SIGKILL}
    # The pipe is clean again (the child took its two bytes): the next call works.
    result, status = server.call({"op": "customer_status", "lib": tok.DEFAULT_LIB}, 30)
    assert status == 0 and result["result"]["initialised"] is False


def test_a_hung_operation_times_out_and_takes_the_server_and_child_with_it() -> None:
    tokenhelper.prestart()
    server = _server()
    assert server.proc.stdin is not None
    server.proc.stdin.write(GO + b"\x00\x00\x00\x10{")  # a frame that never completes
    server.proc.stdin.flush()
    child = _wait_for_child(server.proc.pid)
    with pytest.raises(ServerBroken):
        server._frame(time.monotonic() + 0.3)
    server.close()
    assert server.broken and server.proc.returncode is not None
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # reaped by init once the group is killed
    assert not Path(f"/proc/{child}/status").exists() or "Z" in _state(child)
    # The helper starts a new server for the next operation.
    status = tokenhelper.call_helper("customer_status", {}, tok.DEFAULT_LIB)
    assert status["initialised"] is False
    assert tokenhelper._SERVER is not server


def _state(pid: int) -> str:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "Z"
    m = re.search(r"^State:\s+(\S)", text, re.M)
    return m.group(1) if m else "Z"


def test_a_server_that_died_idle_is_replaced_and_the_operation_runs() -> None:
    """Nothing was sent to a dead server, so the operation runs once, on a new one."""
    tokenhelper.prestart()
    old = _server()
    os.killpg(old.proc.pid, signal.SIGKILL)
    old.proc.wait()
    tok.customer_init("forks", SO)
    assert tokenhelper.call_helper("customer_status", {}, tok.DEFAULT_LIB)["label"] == "forks"
    assert old.broken and _server() is not old


def test_an_environment_change_starts_a_new_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server runs with the environment it was started with (SOFTHSM2_CONF names
    the token store): another environment is another server."""
    tokenhelper.prestart()
    old = _server()
    other = tmp_path / "other"
    other.mkdir()
    conf = tmp_path / "other.conf"
    conf.write_text(f"directories.tokendir = {other}\nobjectstore.backend = file\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    tokenhelper.call_helper("customer_status", {}, tok.DEFAULT_LIB)
    assert _server() is not old and old.broken


def _memory(pid: int) -> bytes:
    """Every readable, writable mapping of a process (its heap and stacks)."""
    out = bytearray()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            lo, hi = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(lo)
                out += mem.read(hi - lo)
            except (OSError, ValueError, OverflowError):
                continue
    return bytes(out)


def test_pins_never_reach_the_server() -> None:
    """The child reads the request (PINs included) from the pipe itself: the long-lived
    server's memory never holds a PIN."""
    tok.audit_ensure_token(AUDIT_SO, AUDIT_USER)
    tok.customer_init("forks", SO)
    tok.customer_set_co_pin(SO, CO)
    assert tokenhelper.call_helper("customer_check_co_pin", {"pin": CO}, tok.DEFAULT_LIB)
    memory = _memory(_server().proc.pid)
    assert len(memory) > 1_000_000  # really read its heap
    assert b"customer_check_co_pin" in memory  # and it is the server (its op table)
    for pin in (AUDIT_SO, AUDIT_USER, SO, CO):
        assert pin.encode() not in memory
