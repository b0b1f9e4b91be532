"""sshd's log lines as the device daemon reads them (``sshd -E FILE``, LogLevel VERBOSE).

Every line here was recorded from a lab appliance's sshd-mgmt.log or sshd-data.log
(OpenSSH 9.2p1, Debian 12).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsmctl.appliance import paths, sshdlog, store
from hsmctl.appliance.sshdlog import Connections, LoginEvent, Tailer, parse

pytestmark = pytest.mark.unit

KEY = "SHA256:kMHt0bjBak1ONJtSw8rQPkL9qaLeX/j2H00OAw/C2G8"

# (recorded line, expected event as (event, user, source, outcome, reason, method))
LOGINS = [
    (
        f"Accepted publickey for audit from 198.19.1.4 port 56866 ssh2: ECDSA {KEY}",
        ("login", "audit", "198.19.1.4", "ok", "accepted", "publickey"),
    ),
    (
        "Accepted password for admin from 198.19.1.4 port 56828 ssh2",
        ("login", "admin", "198.19.1.4", "ok", "accepted", "password"),
    ),
    (
        "Failed password for admin from 198.19.9.4 port 52108 ssh2",
        ("login", "admin", "198.19.9.4", "failed", "wrong credential", "password"),
    ),
    (
        "Failed publickey for provider from 198.18.0.1 port 60850 ssh2: ED25519 "
        "SHA256:7VbUITViNrr7j2qCCWRigRq45cItZ87vZCDPmT380zk",
        ("login", "provider", "198.18.0.1", "failed", "wrong credential", "publickey"),
    ),
    (
        "Invalid user nosuchuser from 198.18.0.1 port 50446",
        ("login", "nosuchuser", "198.18.0.1", "denied", "no such account", None),
    ),
    (
        "User provider from 198.19.9.4 not allowed because not listed in AllowUsers",
        ("login", "provider", "198.19.9.4", "denied", "not listed in AllowUsers", None),
    ),
    (
        "User admin from 198.18.0.1 not allowed because not listed in AllowUsers",
        ("login", "admin", "198.18.0.1", "denied", "not listed in AllowUsers", None),
    ),
    (
        "Access denied for user monitor by PAM account configuration [preauth]",
        ("login", "monitor", "unknown", "denied", "account locked", None),
    ),
    (
        "Connection closed by authenticating user admin 198.19.1.4 port 36054 [preauth]",
        ("login", "admin", "198.19.1.4", "failed", "authentication not completed", None),
    ),
    (
        "subsystem request for sftp by user audit failed, subsystem not found",
        ("subsystem", "audit", "unknown", "denied", "subsystem sftp refused", None),
    ),
    (
        "refused local port forward: originator 127.0.0.1 port 40000, target 127.0.0.1 port 22",
        (
            "port-forward",
            "unknown",
            "unknown",
            "denied",
            "local forwarding to 127.0.0.1 port 22 refused",
            None,
        ),
    ),
]

# Lines that are not logins by themselves (the partial step of admin's key + password,
# the follow-up of a refusal already reported, session bookkeeping).
NOT_EVENTS = [
    f"Partial publickey for admin from 198.19.1.4 port 56828 ssh2: ECDSA {KEY}",
    f"Accepted key ECDSA {KEY} found at /etc/hsm/authorized_keys/admin:1",
    "Connection closed by invalid user provider 198.19.9.4 port 38738 [preauth]",
    'Connection from 198.19.1.4 port 56828 on 198.19.0.13 port 22 rdomain ""',
    "Starting session: command for admin from 198.19.1.4 port 56828 id 0",
    "Close session: user admin from 198.19.1.4 port 56828 id 0",
    "Connection closed by 198.19.1.4 port 56828",
    "kex_exchange_identification: Connection closed by remote host",
    "Server listening on 198.18.0.13 port 22.",
    "dispatch_protocol_error: type 90 seq 2 [preauth]",
    "",
]


def as_tuple(event: LoginEvent) -> tuple[str, str, str, str, str, str | None]:
    return (event.event, event.user, event.source, event.outcome, event.reason, event.method)


@pytest.mark.parametrize("line, expected", LOGINS, ids=[e[0] + "-" + e[3] for _, e in LOGINS])
def test_recorded_lines_parse(line: str, expected: tuple[str, ...]) -> None:
    event = parse(line)
    assert event is not None
    assert as_tuple(event) == expected


@pytest.mark.parametrize("line", NOT_EVENTS)
def test_other_lines_are_not_events(line: str) -> None:
    assert parse(line) is None


@pytest.mark.parametrize(
    "line, user, source",
    [
        # Recorded: a client that asked for the user "admin from 6.6.6.6 port 1".
        (
            "Invalid user admin from 6.6.6.6 port 1 from 198.18.0.1 port 58588",
            "admin from 6.6.6.6 port 1",
            "198.18.0.1",
        ),
        (
            "Failed password for invalid user admin from 6.6.6.6 port 1 ssh2 "
            "from 198.19.1.4 port 5 ssh2",
            "admin from 6.6.6.6 port 1 ssh2",
            "198.19.1.4",
        ),
    ],
)
def test_a_user_name_cannot_forge_the_account_or_the_address(
    line: str, user: str, source: str
) -> None:
    event = parse(line)
    assert event is not None
    assert (event.user, event.source) == (user, source)


def test_a_user_name_cannot_close_someone_elses_connection() -> None:
    conns = Connections()
    conns.feed("Accepted password for admin from 198.19.1.4 port 40354 ssh2")
    forged = (
        "Connection closed by invalid user x Connection closed by 198.19.1.4 port 40354 "
        "198.18.0.1 port 5 [preauth]"
    )
    assert parse(forged) is None
    conns.feed(forged)
    assert conns.open == {("198.19.1.4", "40354"): "admin"}


# A recorded stretch of sshd-data.log: two sequential connections, then an overlap.
SEQUENCE = f"""\
Connection from 198.19.1.4 port 40384 on 198.19.0.13 port 22 rdomain ""
Accepted publickey for audit from 198.19.1.4 port 40384 ssh2: ECDSA {KEY}
User child is on pid 1208
subsystem request for sftp by user audit failed, subsystem not found
Connection closed by 198.19.1.4 port 40384
Close session: user audit from 198.19.1.4 port 40384 id 0
Closing connection to 198.19.1.4 port 40384
Accepted password for admin from 198.19.1.4 port 40354 ssh2
refused local port forward: originator 127.0.0.1 port 40000, target 127.0.0.1 port 22
Read error from remote host 198.19.1.4 port 40354: Connection reset by peer
Accepted password for admin from 198.19.9.4 port 40360 ssh2
Accepted publickey for audit from 198.19.1.4 port 37932 ssh2: ECDSA {KEY}
refused local port forward: originator 127.0.0.1 port 40000, target 198.18.0.1 port 22
subsystem request for sftp by user audit failed, subsystem not found
Disconnected from user audit 198.19.1.4 port 37932
refused local port forward: originator 127.0.0.1 port 40000, target 127.0.0.1 port 22
"""


def attributed(lines: str) -> list[tuple[str, str, str]]:
    conns = Connections()
    out = []
    for line in lines.splitlines():
        conns.feed(line)
        event = parse(line)
        if event is not None and event.event != "login":
            event = conns.attribute(event)
            out.append((event.event, event.user, event.source))
    return out


def test_refusals_are_attributed_to_the_one_open_connection() -> None:
    assert attributed(SEQUENCE) == [
        ("subsystem", "audit", "198.19.1.4"),
        ("port-forward", "admin", "198.19.1.4"),
        # Two connections open (admin from .9.4, audit from .1.4): nobody can tell whose.
        ("port-forward", "unknown", "unknown"),
        # The user is in the line: of the open connections only audit's can be the one.
        ("subsystem", "audit", "198.19.1.4"),
        ("port-forward", "admin", "198.19.9.4"),
    ]


def test_connections_stay_bounded() -> None:
    conns = Connections()
    for port in range(sshdlog.MAX_OPEN + 50):
        conns.feed(f"Accepted publickey for audit from 198.19.1.4 port {port} ssh2")
    assert len(conns.open) == sshdlog.MAX_OPEN


# --- the tailer on real files ------------------------------------------------------------


@pytest.fixture
def logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    files = {"mgmt": tmp_path / "sshd-mgmt.log", "data": tmp_path / "sshd-data.log"}
    monkeypatch.setattr(paths, "SSHD_LOGS", files)
    monkeypatch.setattr(paths, "STATE", tmp_path / "state")
    return files


def tailer(seen: list[tuple[str, LoginEvent]]) -> Tailer:
    return Tailer(lambda iface, event: seen.append((iface, event)))


def test_tailer_follows_both_files_and_survives_a_restart(logs: dict[str, Path]) -> None:
    seen: list[tuple[str, LoginEvent]] = []
    logs["mgmt"].write_text(LOGINS[3][0] + "\n" + NOT_EVENTS[0] + "\n")
    logs["data"].write_text(LOGINS[1][0] + "\n" + LOGINS[0][0][:30])  # a half-written line
    assert tailer(seen).poll() == 2
    assert [(i, e.user, e.outcome) for i, e in seen] == [
        ("mgmt", "provider", "failed"),
        ("data", "admin", "ok"),
    ]
    # sshd finishes the line; a restarted daemon neither repeats nor loses anything.
    with logs["data"].open("a") as fh:
        fh.write(LOGINS[0][0][30:] + "\n")
    seen.clear()
    assert tailer(seen).poll() == 1
    assert [(i, e.user, e.method) for i, e in seen] == [("data", "audit", "publickey")]
    assert tailer(seen).poll() == 0


def test_tailer_starts_over_on_a_new_file(logs: dict[str, Path]) -> None:
    seen: list[tuple[str, LoginEvent]] = []
    t = tailer(seen)
    logs["mgmt"].write_text((LOGINS[2][0] + "\n") * 3)
    assert t.poll() == 3
    logs["mgmt"].write_text(LOGINS[4][0] + "\n")  # replaced by a shorter file
    assert t.poll() == 1
    assert seen[-1][1].user == "nosuchuser"


def test_tailer_reads_a_flood_in_bounded_turns(
    logs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A login flood is taken a bounded amount per poll, nothing lost; a line longer
    than a whole turn (sshd writes none) is skipped rather than stalling the tailer."""
    monkeypatch.setattr(sshdlog, "MAX_READ", 1024)
    seen: list[tuple[str, LoginEvent]] = []
    t = tailer(seen)
    line = LOGINS[2][0] + "\n"
    logs["mgmt"].write_text(line * 100)
    polls = 0
    while t.poll():
        polls += 1
    assert len(seen) == 100 and polls >= len(line) * 100 // 1024
    with logs["mgmt"].open("a") as fh:
        fh.write("x" * 5000 + "\n" + line)
    seen.clear()
    for _ in range(10):
        t.poll()
    assert len(seen) == 1


def test_only_a_read_that_logged_something_is_persisted(
    logs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key-only login comes in three bursts; only the one with the login is an fsynced
    offsets write. What was read without an event is read again after a restart and
    emits nothing; stopping persists everything read."""
    writes: list[dict[str, int]] = []
    real = store.write_json

    def counting(path: Path, data: dict[str, int], mode: int = 0o600) -> None:
        writes.append(dict(data))
        real(path, data, mode)

    monkeypatch.setattr(store, "write_json", counting)
    seen: list[tuple[str, LoginEvent]] = []
    t = tailer(seen)
    connect = 'Connection from 198.18.0.1 port 40000 on 198.18.0.31 port 22 rdomain ""\n'
    with logs["mgmt"].open("a") as fh:
        fh.write(connect)
    assert t.poll() == 0 and writes == []
    with logs["mgmt"].open("a") as fh:
        fh.write(LOGINS[3][0] + "\n")
    assert t.poll() == 1 and writes == [{"mgmt": logs["mgmt"].stat().st_size}]
    with logs["mgmt"].open("a") as fh:
        fh.write("Connection closed by 198.18.0.1 port 40000\n")
    assert t.poll() == 0 and len(writes) == 1
    # A restart now reads the closing line again, and finds nothing in it.
    again: list[tuple[str, LoginEvent]] = []
    assert tailer(again).poll() == 0 and again == []
    t.flush()
    assert writes[-1] == {"mgmt": logs["mgmt"].stat().st_size}
    t.flush()
    assert len(writes) == 2  # nothing new: no write


def test_a_long_run_without_events_is_persisted_every_slack(
    logs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a restart reads twice is bounded."""
    monkeypatch.setattr(sshdlog, "PERSIST_SLACK", 1000)
    t = tailer([])
    line = "Connection closed by 198.18.0.1 port 40000\n"
    for _ in range(100):
        with logs["mgmt"].open("a") as fh:
            fh.write(line)
        t.poll()
        on_disk = store.read_json(paths.STATE / "sshd-offsets.json", {}).get("mgmt", 0)
        assert logs["mgmt"].stat().st_size - on_disk <= 1000


_LINES = [line for line, _ in LOGINS] + [line for line in NOT_EVENTS if line]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    script=st.lists(
        st.tuples(
            st.sampled_from(["mgmt", "data"]),
            st.lists(st.sampled_from(_LINES), max_size=6),
            st.integers(min_value=0, max_value=40),  # of the next line, written early
            st.booleans(),  # the daemon restarts after this read
            st.booleans(),  # ... and stopped cleanly (flush) before it did
        ),
        max_size=25,
    ),
    slack=st.sampled_from([0, 64, 1 << 16]),
)
def test_restarts_at_any_point_neither_lose_nor_repeat_an_event(
    logs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    script: list[tuple[str, list[str], int, bool, bool]],
    slack: int,
) -> None:
    """Whatever is written when, half lines included, and wherever the daemon restarts
    (cleanly or killed), every event line is emitted exactly once, in order."""
    monkeypatch.setattr(sshdlog, "PERSIST_SLACK", slack)
    for f in [*logs.values(), paths.STATE / "sshd-offsets.json"]:
        f.unlink(missing_ok=True)
    seen: list[tuple[str, LoginEvent]] = []
    t = tailer(seen)
    pending = {"mgmt": "", "data": ""}  # the line sshd is half way through writing
    written = {"mgmt": 0, "data": 0}  # ... and how much of it is in the file
    expected: list[tuple[str, str]] = []

    def write(iface: str, text: str) -> None:
        with logs[iface].open("a") as fh:
            fh.write(text)

    def finish(iface: str) -> None:
        line = pending[iface]
        if line:
            write(iface, (line + "\n")[written[iface] :])
            if parse(line) is not None:
                expected.append((iface, line))
        pending[iface], written[iface] = "", 0

    for iface, lines, early, restart, clean in script:
        finish(iface)
        write(iface, "".join(line + "\n" for line in lines))
        expected += [(iface, line) for line in lines if parse(line) is not None]
        nxt = _LINES[early % len(_LINES)]
        pending[iface], written[iface] = nxt, early % (len(nxt) + 1)
        write(iface, nxt[: written[iface]])
        t.poll()
        if restart:
            if clean:
                t.flush()
            t = tailer(seen)
    finish("mgmt")
    finish("data")
    t.poll()

    # Compared without user and source: a restart forgets which connections were open,
    # and with them whom a refused forward belongs to (Connections.attribute).
    def key(iface: str, e: LoginEvent) -> tuple[str, str, str, str, str | None]:
        return (iface, e.event, e.outcome, e.reason, e.method)

    want = []
    for iface, line in expected:
        event = parse(line)
        assert event is not None
        want.append(key(iface, event))
    assert [key(i, e) for i, e in seen if i == "mgmt"] == [w for w in want if w[0] == "mgmt"]
    assert [key(i, e) for i, e in seen if i == "data"] == [w for w in want if w[0] == "data"]


# --- woken by the kernel, not by a clock ----------------------------------------------------


def test_changes_wake_for_the_logs_and_not_for_their_neighbours(tmp_path: Path) -> None:
    mgmt, data = tmp_path / "sshd-mgmt.log", tmp_path / "sshd-data.log"
    changes = sshdlog.Changes.watch([mgmt, data])
    assert changes is not None
    try:
        assert changes.wait(0.05) is False  # nothing yet
        (tmp_path / "audit.jsonl").write_text("the daemon's own log\n")
        assert changes.wait(0.2) is False  # a neighbour's write is no reason to read
        data.write_text("created\n")
        assert changes.wait(5) is True
        with mgmt.open("a") as fh:
            fh.write("appended\n")
        assert changes.wait(5) is True
        assert changes.wait(0.05) is False  # each write reported once
    finally:
        changes.close()


def test_the_tailer_logs_a_login_as_soon_as_sshd_writes_it(
    logs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the safety-net read an hour away, only the kernel's wake-up can deliver it."""
    monkeypatch.setattr(sshdlog, "IDLE_POLL", 3600.0)
    got = threading.Event()
    seen: list[tuple[str, LoginEvent]] = []

    def emit(iface: str, event: LoginEvent) -> None:
        seen.append((iface, event))
        got.set()

    t = Tailer(emit)
    runner = threading.Thread(target=t.run, daemon=True)
    runner.start()
    time.sleep(0.2)  # the tailer is waiting
    with logs["mgmt"].open("a") as fh:
        fh.write(LOGINS[3][0] + "\n")
    assert got.wait(10), "the login was not read"
    assert [(i, e.user) for i, e in seen] == [("mgmt", "provider")]
    t.stop()  # wakes the waiting tailer
    runner.join(10)
    assert not runner.is_alive()
