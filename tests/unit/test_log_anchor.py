"""A log whose oldest records were deleted after an ack, handed to a new owner (issue 15):
trust carried from the initial key through the retired key rotations, the chain verified
from its base, the deletion that explains records 1..base found (or its absence refused),
and a collection plus offline ``logs verify`` that start at the base. Real chains signed
with SoftwareSigner (tests/unit/logdevice.py); no device."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hsmctl import auditlog
from hsmctl.auditlog import Head
from hsmctl.auditlog.anchor import AnchorError, LogBase, carry_trust, describe, retirement
from hsmctl.auditlog.chain import record_hash
from hsmctl.collect.archive import Archive, Cursor
from hsmctl.collect.collector import ingest, load_target, plan_resume, start_cursor, target_trust
from hsmctl.collect.export import export_appliance
from hsmctl.collect.verify import verify_archive
from hsmctl.errors import IntegrityError
from tests.unit.logdevice import DEVICE, Device


@pytest.fixture(scope="module")
def keys() -> list[auditlog.SoftwareSigner]:
    return [auditlog.SoftwareSigner.generate() for _ in range(4)]


def _append(dev: Device, **fields: Any) -> None:
    dev._add(auditlog.make_record(dev.head, time=dev._time(), **fields))


@pytest.fixture
def trimmed(keys: list[auditlog.SoftwareSigner]) -> tuple[Device, int]:
    """k1 (initial) -> k2 (a takeover) -> k3 (a factory reset), 40 sessions, then the
    collector's ack of base + 3 and the device's deletion of records 1..base."""
    k1, k2, k3, _ = keys
    dev = Device(k1)
    dev.session(5)
    dev.rotate(k2)
    for _ in range(20):
        dev.session(6)
    dev.rotate(k3)
    for _ in range(20):
        dev.session(6)
    base = len(dev.lines) - 30
    acked = base + 3
    _append(dev, actor="audit", role="audit", source="198.19.0.4", event="command",
            outcome="ok", detail={"command": f"audit ack {acked}", "rule": "granted"})  # fmt: skip
    _append(dev, actor="hsmd", role="system", source="console", event="log-segment-deleted",
            outcome="ok", detail={"segment": "audit-000000000001.jsonl", "first_seq": 1,
            "last_seq": base, "acked_seq": acked, "acked_by": "audit", "bytes": 1,
            "last_hash": dev.lines[base - 1].decode()[-67:-3]})  # fmt: skip
    dev.session(3)
    return dev, base


def rotations(dev: Device, base: int) -> list[bytes]:
    return [x for x in dev.lines[:base] if b'"event":"key-rotation"' in x]


def initial(k: auditlog.SoftwareSigner) -> dict[str, str]:
    return {k.key_id: k.public_key_pem}


def base_head(dev: Device, base: int) -> Head:
    return Head(base, json.loads(dev.lines[base])["prev"])


def test_trust_reaches_the_base_and_the_rest_verifies(
    trimmed: tuple[Device, int], keys: list[auditlog.SoftwareSigner]
) -> None:
    dev, base = trimmed
    k1, k2, k3, _ = keys
    trusted, retired = carry_trust(initial(k1), rotations(dev, base), device=DEVICE, base_seq=base)
    assert set(trusted) == {k3.key_id} and retired == {k1.key_id, k2.key_id}
    report = auditlog.verify_lines(
        dev.lines[base:], trusted, device=DEVICE, start=base_head(dev, base), retired_keys=retired
    )
    assert report.ok and report.first_seq == base + 1 and report.last_checkpoint_seq
    # Without the retired rotations the initial key cannot verify the rest.
    alone = auditlog.verify_lines(
        dev.lines[base:], initial(k1), device=DEVICE, start=base_head(dev, base)
    )
    assert not alone.ok
    found = retirement([json.loads(x) for x in dev.lines[base:]], base)
    assert found["first_seq"] == 1 and found["last_seq"] == base
    assert found["acked_by"] == "audit" and found["acked_seq"] == base + 3
    assert f"records 1..{base} were retired" in describe(found)


def _edit(line: bytes) -> bytes:
    record = json.loads(line)
    del record["hash"]
    record["detail"]["device"] = "hsm-other"
    record["hash"] = record_hash(record)  # re-hashed: only the signatures can tell
    return auditlog.record_line(record)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda rs: rs[1:], "not trusted"),  # the first rotation withheld
        (lambda rs: rs[::-1], "not trusted"),
        (lambda rs: [rs[0], rs[0], rs[1]], "out of order"),
        (lambda rs: [rs[0].replace(b'"sig_new":"', b'"sig_new":"A'), rs[1]], "hash"),
        (lambda rs: [rs[0].replace(b'"hsmd"', b'"hsmx"'), rs[1]], "hash"),
    ],
)
def test_a_missing_reordered_or_edited_rotation_is_refused(
    trimmed: tuple[Device, int], keys: list[auditlog.SoftwareSigner], change: Any, message: str
) -> None:
    dev, base = trimmed
    with pytest.raises(AnchorError, match=message):
        carry_trust(initial(keys[0]), change(rotations(dev, base)), device=DEVICE, base_seq=base)


def test_a_rotation_signed_again_after_an_edit_is_refused(
    trimmed: tuple[Device, int], keys: list[auditlog.SoftwareSigner]
) -> None:
    dev, base = trimmed
    rs = rotations(dev, base)
    with pytest.raises(AnchorError, match="sig_old does not verify"):
        carry_trust(initial(keys[0]), [rs[0], _edit(rs[1])], device=None, base_seq=base)


def test_a_rotation_after_the_base_or_another_event_is_refused(
    trimmed: tuple[Device, int], keys: list[auditlog.SoftwareSigner]
) -> None:
    dev, base = trimmed
    rs = rotations(dev, base)
    with pytest.raises(AnchorError, match="out of order"):
        carry_trust(initial(keys[0]), rs, device=DEVICE, base_seq=5)
    with pytest.raises(AnchorError, match="not a key rotation"):
        carry_trust(initial(keys[0]), [dev.lines[0]], device=DEVICE, base_seq=base)


def test_records_missing_without_a_logged_deletion_are_refused(
    trimmed: tuple[Device, int],
) -> None:
    dev, base = trimmed
    records = [json.loads(x) for x in dev.lines[base:]]
    with pytest.raises(AnchorError, match=f"records 1..{base - 1} are missing"):
        retirement(records, base - 1)  # no deletion ends there
    without = [r for r in records if r["event"] != "log-segment-deleted"]
    with pytest.raises(AnchorError, match="no deletion"):
        retirement(without, base)
    early = [
        {**r, "detail": {**r["detail"], "acked_seq": base}}
        if r["event"] == "log-segment-deleted"
        else r
        for r in records
    ]
    with pytest.raises(AnchorError, match="without an ack past"):
        retirement(early, base)


def test_log_base_from_dict_is_checked() -> None:
    good = LogBase(7, "a" * 64, ("x",), {"first_seq": 1})
    assert LogBase.from_dict(good.as_dict()) == good
    for bad in ({"seq": 0, "hash": "a" * 64}, {"seq": 3, "hash": "short"},
                {"seq": 3, "hash": "a" * 64, "key_rotations": [1]}):  # fmt: skip
        with pytest.raises(AnchorError):
            LogBase.from_dict(bad)


# -- the collector and logs verify --------------------------------------------------------


def _state(
    tmp_path: Path, dev: Device, base: int, keys: list[auditlog.SoftwareSigner], **extra: Any
) -> tuple[Path, Archive]:
    state = tmp_path / "state"
    app = state / "appliances" / DEVICE
    app.mkdir(parents=True)
    k1, k4 = keys[0], keys[3]
    pins = {
        "audit_keys": {k1.key_id: k1.public_key_pem, k4.key_id: k4.public_key_pem},
        "retired": [],
        "initial_audit_key_id": k1.key_id,
        "data_ip": "127.0.0.1",
        "data_host_keys": ["ssh-ed25519 AAAA"],
        "log_base": LogBase(
            base,
            base_head(dev, base).hash,
            tuple(x.decode().rstrip("\n") for x in rotations(dev, base)),
        ).as_dict(),
        **extra,
    }
    (app / "pins.json").write_text(json.dumps(pins))
    (app / "secrets").mkdir()
    (app / "secrets" / "audit-collector-key").write_text("unused")
    (app / "secrets" / "audit-collector-key").chmod(0o600)
    return state, Archive(app / "archive", DEVICE, segment_bytes=3000)


def _collect(state: Path, archive: Archive, dev: Device) -> Cursor:
    target = load_target(state, DEVICE, None)
    with archive.lock(exclusive=True):
        before = start_cursor(archive.recover(), target.base)
        return ingest(archive, before, target_trust(target, before), dev.stream())


def test_collection_and_logs_verify_start_at_the_base(
    tmp_path: Path, trimmed: tuple[Device, int], keys: list[auditlog.SoftwareSigner]
) -> None:
    dev, base = trimmed
    state, archive = _state(tmp_path, dev, base, keys)
    assert plan_resume(start_cursor(Cursor(DEVICE), base_head(dev, base))).after == base
    first = _collect(state, archive, dev)
    assert first.base == base_head(dev, base) and first.seq == len(dev.lines)
    assert json.loads(b"".join(archive.blocks(first)).splitlines()[0])["seq"] == base + 1
    assert Cursor.from_dict(json.loads((archive.dir / "cursor.json").read_text())) == first
    dev.session(50, size=40)  # more, across archive segments
    second = _collect(state, archive, dev)
    assert second.seq == len(dev.lines) and second.base == first.base
    assert dev.exports[-1] == first.seq - 1  # incremental: from the archived head again
    report = verify_archive(state, DEVICE, workers=0).as_dict()
    assert report["first_seq"] == base + 1 and report["last_seq"] == second.seq
    assert report["retired"]["last_seq"] == base and report["retired"]["acked_by"] == "audit"
    assert f"records 1..{base} were retired" in report["message"]
    # logs export: from the base on, saying what came before was retired.
    out = tmp_path / "export.jsonl"
    whole = export_appliance(state, DEVICE, output=out).as_dict()
    assert whole["first_seq"] == base + 1 and whole["last_seq"] == second.seq
    assert whole["records"] == second.seq - base == len(out.read_bytes().splitlines())
    assert whole["retired"]["last_seq"] == base
    later = export_appliance(state, DEVICE, output=out, after=base + 5).as_dict()
    assert later["first_seq"] == base + 6 and "retired" not in later


def test_logs_verify_refuses_a_base_the_takeover_did_not_prove(
    tmp_path: Path, trimmed: tuple[Device, int], keys: list[auditlog.SoftwareSigner]
) -> None:
    dev, base = trimmed
    state, archive = _state(tmp_path, dev, base, keys)
    _collect(state, archive, dev)
    pins_path = state / "appliances" / DEVICE / "pins.json"
    pins = json.loads(pins_path.read_text())
    # The cursor edited to claim a later base (hiding records from the customer).
    doc = json.loads((archive.dir / "cursor.json").read_text())
    doc["base"]["seq"] += 1
    (archive.dir / "cursor.json").write_text(json.dumps(doc))
    with pytest.raises(IntegrityError):
        verify_archive(state, DEVICE, workers=0)
    doc["base"]["seq"] -= 1
    (archive.dir / "cursor.json").write_text(json.dumps(doc))
    verify_archive(state, DEVICE, workers=0)
    # Pins without the base (or with a rotation withheld) cannot vouch for the archive.
    pins_path.write_text(json.dumps({**pins, "log_base": None}))
    with pytest.raises(IntegrityError):
        verify_archive(state, DEVICE, workers=0)
    withheld = {**pins["log_base"], "key_rotations": pins["log_base"]["key_rotations"][1:]}
    pins_path.write_text(json.dumps({**pins, "log_base": withheld}))
    with pytest.raises(IntegrityError, match="log_base"):
        verify_archive(state, DEVICE, workers=0)


def test_an_archive_from_record_1_goes_on_from_its_head(
    tmp_path: Path, keys: list[auditlog.SoftwareSigner]
) -> None:
    """The same tenant re-provisioned: its archive from record 1 continues from its own
    head with the pinned keys, whatever base is pinned; logs verify starts at record 1."""
    k1, k2, k3, k4 = keys
    dev = Device(k1)
    dev.session(5)
    dev.rotate(k2)
    dev.session(5)
    state = tmp_path / "state"
    app = state / "appliances" / DEVICE
    (app / "secrets").mkdir(parents=True)
    (app / "secrets" / "audit-collector-key").write_text("unused")
    (app / "secrets" / "audit-collector-key").chmod(0o600)
    pins: dict[str, Any] = {
        "audit_keys": {k1.key_id: k1.public_key_pem, k2.key_id: k2.public_key_pem},
        "retired": [],
        "initial_audit_key_id": k1.key_id,
        "data_ip": "127.0.0.1",
        "data_host_keys": ["ssh-ed25519 AAAA"],
    }
    (app / "pins.json").write_text(json.dumps(pins))
    archive = Archive(app / "archive", DEVICE, segment_bytes=3000)
    first = _collect(state, archive, dev)
    assert first.base is None
    dev.rotate(k3)  # the factory reset
    dev.session(5)
    dev.rotate(k4)  # the second takeover
    dev.session(5)
    base = first.seq - 2
    pins["audit_keys"][k4.key_id] = k4.public_key_pem
    pins["log_base"] = LogBase(
        base, base_head(dev, base).hash, tuple(x.decode() for x in rotations(dev, base))
    ).as_dict()
    (app / "pins.json").write_text(json.dumps(pins))
    second = _collect(state, archive, dev)
    assert second.base is None and second.seq == len(dev.lines)
    report = verify_archive(state, DEVICE, workers=0).as_dict()
    assert report["first_seq"] == 1 and "retired" not in report
    assert report["trusted_keys"] == [k4.key_id]
