"""Whatever a device sends as JSON is parsed or refused as an integrity failure (exit 3),
never raised as RecursionError or another exception of the json module (issue 10,
defect 4): the parser itself, and every client-side place that parses device bytes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hsmctl import auditlog, devicejson
from hsmctl.auditlog import Head, ViolationKind
from hsmctl.collect.archive import Archive
from hsmctl.collect.collector import LogIntegrityError, ingest, trust_roots
from hsmctl.collect.pipeline import TrustState
from hsmctl.device import AUDIT_KEY, HSM_INFO
from hsmctl.errors import IntegrityError
from hsmctl.handoff import make_release, write_document
from hsmctl.handoff.signed import parse_document
from hsmctl.inventory import check_placement, load_inventory
from hsmctl.provider import deprovisioning as dep
from hsmctl.provider import health, provisioning
from hsmctl.state.model import ApplianceState
from hsmctl.takeover.session import AdminSession
from tests.provider_env import make_env

pytestmark = pytest.mark.unit

DEEP = "[" * 200_000
HOSTILE = {
    "200k [": DEEP,
    "200k { and [": '{"a":' * 100_000,
    "33 levels": "[" * 33 + "]" * 33,
    "not UTF-8": b'{"id":"\xff"}',
    "5000-digit int": '{"n":' + "9" * 5000 + "}",
    "NaN": '{"n":NaN}',
    "duplicate member": '{"id":"a","id":"b"}',
    "lone surrogate": '{"id":"\\ud800"}',
    "trailing garbage": '{"id":"a"} x',
    "empty": "",
}


# -- the parser -------------------------------------------------------------------------------


@pytest.mark.parametrize("data", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_json_is_an_integrity_error_naming_the_appliance(data: str | bytes) -> None:
    with pytest.raises(IntegrityError) as err:
        devicejson.loads(data, "reply to 'hsm show'", "hsm-7")
    assert err.value.exit_code == 3
    assert str(err.value).startswith("hsm-7: reply to 'hsm show': not valid JSON (")
    assert err.value.detail == {"appliance": "hsm-7", "what": "reply to 'hsm show'"}


def test_the_depth_bound_does_not_depend_on_the_stack() -> None:
    # json.loads gives up where the interpreter's recursion limit is hit, so the same
    # reply parsed or failed depending on the caller; the bound is the same everywhere.
    deepest: list[Any] = []
    for _ in range(devicejson.MAX_DEPTH - 1):
        deepest = [deepest]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(120)
    try:
        assert devicejson.loads("[" * 32 + "]" * 32, "x") == deepest
        with pytest.raises(IntegrityError, match="nested 33 levels deep"):
            devicejson.loads("[" * 33 + "]" * 33, "x")
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize(
    ("data", "depth"),
    [
        (b"", 0),
        (b"[" * 32 + b"]" * 32, 0),
        (b"[" * 33, 33),
        (b'{"a":' * 20 + b"[" * 13, 33),
        (b"[[]]" * 20, 0),  # 40 opening brackets, 2 deep
        (b'"' + b"[" * 40 + b'"', 0),  # in a string
        (b'["\\"' + b"[" * 40 + b'", [[]]]', 0),  # an escaped quote ends no string
        (b"[" * 40 + b'"' + b"[" * 40, 40),  # an unterminated string hides nothing
        (b"]]]" + b"[" * 40, 37),  # invalid anyway; still bounds the parser
    ],
    ids=[
        "empty", "32", "33", "objects-and-arrays", "wide", "in-string", "escaped-quote",
        "unterminated-string", "closers-first",
    ],
)  # fmt: skip
def test_depth_is_counted_outside_strings(data: bytes, depth: int) -> None:
    assert devicejson.too_deep(data) == depth


def test_good_replies_parse_as_before() -> None:
    reply = '{"id":"hsm-7","keys":["a","b"],"n":1.5,"ok":true,"x":null,"é":"\\u00e9"}'
    assert devicejson.loads_object(reply, "x", "hsm-7") == json.loads(reply)
    with pytest.raises(IntegrityError, match="not a JSON object"):
        devicejson.loads_object("[1]", "x", "hsm-7")


def test_a_hostile_line_costs_little() -> None:
    import time

    start = time.process_time()
    with pytest.raises(IntegrityError):
        devicejson.loads("[" * 4_000_000, "x")
    assert time.process_time() - start < 1.0


# -- the places that parse device bytes -------------------------------------------------------


class Conn:
    """A device connection that answers every command with ``reply``."""

    def __init__(self, reply: str) -> None:
        self.reply = reply

    def connect(self) -> None:
        pass

    def run(self, command: str, stdin: Any = ()) -> Any:
        return SimpleNamespace(stdout=self.reply, ok=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_health_reports_a_garbage_reply_as_exit_3() -> None:
    attempt = health.attempt(Conn(DEEP), HSM_INFO)  # type: ignore[arg-type]
    assert attempt.login is health.Login.FAILED and attempt.exit_code == 3
    assert "reply to 'hsm show': not valid JSON (nested" in (attempt.error or "")


def test_provisioning_refuses_a_garbage_hsm_show() -> None:
    ctx = SimpleNamespace(management=lambda appliance: Conn(DEEP))
    alloc = SimpleNamespace(appliance="unit01")
    with pytest.raises(IntegrityError, match="unit01: reply to 'hsm show'"):
        provisioning.step_verify(ctx, alloc, False)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["200k [", "duplicate member", "not UTF-8"])
def test_takeover_replies_are_checked(name: str) -> None:
    data = HOSTILE[name]
    reply = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data
    session = object.__new__(AdminSession)
    session.bundle = SimpleNamespace(appliance="hsm-7")  # type: ignore[assignment]
    session.run = lambda command, stdin=(): reply  # type: ignore[method-assign]
    with pytest.raises(IntegrityError, match="hsm-7: reply to 'audit key show'"):
        session.read(AUDIT_KEY)


def test_reset_record_search_skips_what_is_no_record() -> None:
    good = {"event": "result", "outcome": "ok", "detail": {"command": "sysconf factory-reset"}}
    good |= {"seq": 7, "hash": "h", "time": "t"}
    found = dep.find_reset_record([DEEP, json.dumps(good), '{"a":1,"a":2}'])
    assert found is not None and found["seq"] == 7


def test_a_signed_document_that_is_too_deep_is_tampering() -> None:
    for data in (DEEP.encode(), b'{"a":' + b"9" * 5000 + b"}", b'{"a":1,"a":2}'):
        with pytest.raises(IntegrityError, match="bundle: not valid JSON"):
            parse_document(data, what="bundle")


class HostileConsole:
    """The out-of-band console of a device that answers every command with 200k '['."""

    def run(self, appliance: str, line: str, stdin: bytes | None = None) -> Any:
        from hsmctl.provider.drivers import ConsoleResult

        return ConsoleResult(0, DEEP, "")


def test_deprovision_exits_3_on_a_garbage_console_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hsmctl.cli.main import main

    env = make_env(tmp_path)
    with env.store() as store:
        store.allocate("r1", check_placement(load_inventory(env.inventory), "t1", "v1", "hsm"))
        store.set_state("unit01", ApplianceState.PROVISIONED)
        store.set_state("unit01", ApplianceState.CUSTOMER_OWNED)
    monkeypatch.setattr(dep, "out_of_band_for", lambda kind: HostileConsole())
    release = env.root / "release.json"
    write_document(release, make_release("unit01", "t1", env.identities["t1"], reason="done"))
    argv = ["--config", str(env.config), "deprovision", "unit01", "--yes"]
    code = main([*argv, "--release", str(release)])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "unit01: console reply to 'audit key show': not valid JSON (nested" in err
    assert "unexpected" not in err


# -- collection: the archive stays as it was ---------------------------------------------------


def _log(signer: auditlog.SoftwareSigner, n: int) -> list[bytes]:
    lines, head = [], None
    for i in range(1, n + 1):
        time = f"2026-11-29T20:00:{i:02d}Z"
        if head is not None and i % 5 == 0:
            record = auditlog.make_checkpoint(head, signer, device="hsm-7", time=time)
        else:
            record = auditlog.make_record(
                head,
                time=time,
                actor="admin",
                role="admin",
                source="198.19.0.4",
                event="command",
                outcome="ok",
                detail={"command": "hsm show"},
            )
        lines.append(auditlog.record_line(record))
        head = Head.of(record)
    return lines


@pytest.mark.parametrize(
    "line", [b"[" * 30_000, b'{"actor":' + b"[" * 3000], ids=["30k-brackets", "in-record"]
)  # deep, but shorter than any line-length limit of the collector
def test_collection_of_a_deep_line_is_exit_3_and_archives_nothing_new(
    tmp_path: Path, line: bytes
) -> None:
    signer = auditlog.SoftwareSigner.generate()
    archive = Archive(tmp_path / "archive", "hsm-7")
    trust = TrustState({signer.key_id: signer.public_key_pem})
    lines = _log(signer, 15)  # one chain: checkpoints are signed afresh each time

    def stream(data: bytes) -> Any:
        return lambda after, sink: sink.write(data)

    with archive.lock(exclusive=True):
        cursor = ingest(archive, archive.recover(), trust, stream(b"".join(lines[:10])))
    assert cursor.seq == 10
    before = {p.name: p.read_bytes() for p in archive.dir.iterdir() if p.name != "lock"}
    more = [*lines[9:13], line + b"\n"]
    with archive.lock(exclusive=True), pytest.raises(LogIntegrityError) as err:
        start = archive.recover()
        ingest(archive, start, trust_roots(trust.trusted, (), start), stream(b"".join(more)))
    assert err.value.exit_code == 3
    (violation,) = err.value.violations
    assert (violation.kind, violation.seq) == (ViolationKind.MALFORMED, 14)
    assert "nested" in violation.message
    after = {p.name: p.read_bytes() for p in archive.dir.iterdir() if p.name != "lock"}
    assert after == before
