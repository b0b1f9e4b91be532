"""The activity-log chain: the pinned format, and one test per tamper class."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hsmctl.auditlog.chain import (
    GENESIS,
    Head,
    Outcome,
    Record,
    canonical,
    make_record,
    record_hash,
    record_line,
)
from hsmctl.auditlog.signing import (
    SoftwareSigner,
    checkpoint_payload,
    key_id_for_pem,
    make_checkpoint,
    make_key_rotation,
    verify_raw_signature,
)
from hsmctl.auditlog.verify import (
    ChainError,
    ChainVerifier,
    VerifyReport,
    ViolationKind,
    verify_block,
    verify_file,
    verify_lines,
)
from hsmctl.errors import ConfigError, IntegrityError

pytestmark = pytest.mark.unit

DEVICE = "hsm-0001"
T = "2026-11-29T20:01:02.123456Z"
K = ViolationKind


@pytest.fixture(scope="module")
def key_a() -> SoftwareSigner:
    return SoftwareSigner.generate()


@pytest.fixture(scope="module")
def key_b() -> SoftwareSigner:
    return SoftwareSigner.generate()


def pins(*signers: SoftwareSigner) -> dict[str, str]:
    return {s.key_id: s.public_key_pem for s in signers}


def event(prev: Head | None, n: int, **detail: Any) -> Record:
    return make_record(
        prev,
        time=T,
        actor="admin",
        role="admin",
        source="192.0.2.7",
        event="hsm show",
        outcome=Outcome.OK,
        detail={"n": n, **detail},
    )


def build(n: int, signer: SoftwareSigner, *, every: int = 5) -> list[Record]:
    """n records in all; after every `every` ordinary records a checkpoint."""
    records: list[Record] = []
    head: Head | None = None
    while len(records) < n:
        if head is not None and head.seq % (every + 1) == every:
            rec = make_checkpoint(head, signer, device=DEVICE, time=T)
        else:
            rec = event(head, len(records) + 1)
        records.append(rec)
        head = Head.of(rec)
    return records


def append_checkpoint(records: list[Record], signer: SoftwareSigner) -> None:
    records.append(make_checkpoint(Head.of(records[-1]), signer, device=DEVICE, time=T))


def append_events(records: list[Record], count: int) -> None:
    for _ in range(count):
        records.append(event(Head.of(records[-1]), len(records) + 1))


def lines(records: list[Record]) -> list[bytes]:
    return [record_line(r) for r in records]


def block(records: list[Record]) -> list[bytes]:
    """The lines as ``bytes.split`` gives them to verify_block: without their newline."""
    return [record_line(r)[:-1] for r in records]


def rehash_from(records: list[Record], index: int) -> None:
    """What a tamperer without keys can do: recompute seq, prev and hash from index on."""
    prev = Head.of(records[index - 1]) if index else Head(0, GENESIS)
    for rec in records[index:]:
        rec["seq"], rec["prev"] = prev.seq + 1, prev.hash
        del rec["hash"]
        rec["hash"] = record_hash(rec)
        prev = Head.of(rec)


def tampered(records: list[Record], seq: int, change: Callable[[Record], None]) -> list[Record]:
    """A copy with record `seq` changed and the chain recomputed from it."""
    copy: list[Record] = json.loads(json.dumps(records))
    change(copy[seq - 1])
    rehash_from(copy, seq - 1)
    return copy


def verify(
    records: list[Record], keys: dict[str, str], **kwargs: Any
) -> tuple[VerifyReport, tuple[ViolationKind, int] | None]:
    report = verify_lines(lines(records), keys, **kwargs)
    if not kwargs.keys() - {"device", "start", "retired_keys"}:
        # The fast path for whole blocks must reach exactly the same verdict.
        assert verify_block(block(records), keys, **kwargs) == report
    first = report.violations[0] if report.violations else None
    return report, (first.kind, first.seq) if first else None


# -- the format, pinned against hand-written bytes -------------------------------------


def test_hash_matches_hand_written_canonical_json() -> None:
    rec = make_record(
        None,
        time="2026-11-29T20:01:02.123456Z",
        actor="admin",
        role="admin",
        source="console",
        event="login",
        outcome="ok",
        detail={"z": 1, "a": "Zürich ✓", "ctl": "a\nb"},
    )
    body = (
        '{"actor":"admin","detail":{"a":"Zürich ✓","ctl":"a\\nb","z":1},"event":"login",'
        '"outcome":"ok","prev":"' + "0" * 64 + '","role":"admin","seq":1,"source":"console",'
        '"time":"2026-11-29T20:01:02.123456Z"}'
    )
    expected = hashlib.sha256(body.encode("utf-8")).hexdigest()
    assert rec["hash"] == expected
    assert rec["prev"] == GENESIS == "0" * 64
    whole = (
        body[: body.index(',"outcome"')]
        + f',"hash":"{expected}"'
        + body[body.index(',"outcome"') :]
    )
    assert record_line(rec) == whole.encode("utf-8") + b"\n"


def test_canonical_non_ascii_is_raw_utf8_sorted_and_compact() -> None:
    assert canonical({"b": "é€😀", "a": [1, {"y": None, "x": True}]}) == (
        '{"a":[1,{"x":true,"y":null}],"b":"é€😀"}'.encode()
    )
    assert canonical({"s": '\x00\t"\\'}) == b'{"s":"\\u0000\\t\\"\\\\"}'
    with pytest.raises(ValueError):
        canonical({"x": float("nan")})


def test_make_record_refuses_what_a_verifier_would_reject() -> None:
    with pytest.raises(ValueError):
        make_record(
            None, time=T, actor="a", role="r", source="s", event="e", outcome="maybe", detail={}
        )
    with pytest.raises(ValueError):
        make_record(
            None,
            time="2026-11-29 20:01",
            actor="a",
            role="r",
            source="s",
            event="e",
            outcome="ok",
            detail={},
        )


def test_signer_yields_raw_r_s_and_key_id_is_sha256_of_spki(key_a: SoftwareSigner) -> None:
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_pem_public_key,
    )

    der = load_pem_public_key(key_a.public_key_pem.encode()).public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )
    assert key_a.key_id == hashlib.sha256(der).hexdigest() == key_id_for_pem(key_a.public_key_pem)
    payload = checkpoint_payload(DEVICE, Head(4, "ab" * 32), key_a.key_id)
    assert (
        payload
        == (
            '{"device":"hsm-0001","hash":"'
            + "ab" * 32
            + '","key_id":"'
            + key_a.key_id
            + '","seq":4,"type":"hsm-audit-checkpoint"}'
        ).encode()
    )
    sig = key_a.sign_digest(hashlib.sha256(payload).digest())
    assert len(sig) == 64
    assert verify_raw_signature(key_a.public_key_pem, sig.hex(), payload)
    assert not verify_raw_signature(key_a.public_key_pem, sig.hex(), payload + b" ")


# -- clean logs -------------------------------------------------------------------------


def test_clean_log_with_checkpoints_verifies(key_a: SoftwareSigner) -> None:
    records = build(30, key_a)
    append_checkpoint(records, key_a)
    report, first = verify(records, pins(key_a), device=DEVICE, require_final_checkpoint=True)
    assert first is None and report.ok
    assert (report.records, report.first_seq, report.last_seq) == (31, 1, 31)
    assert report.head == Head.of(records[-1])
    assert report.last_checkpoint_seq == 31
    assert report.keys_seen == (key_a.key_id,)
    assert report.device == DEVICE
    assert report.check() is report


def test_verify_file_and_parsed_records(tmp_path: Path, key_a: SoftwareSigner) -> None:
    records = build(12, key_a)
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"".join(lines(records)))
    assert verify_file(path, pins(key_a)).records == 12
    assert verify_lines(records, pins(key_a)).records == 12


def test_resume_from_archive_head(key_a: SoftwareSigner) -> None:
    records = build(20, key_a)
    report = verify_lines(lines(records[10:]), pins(key_a), start=Head.of(records[9]))
    assert report.ok and (report.first_seq, report.last_seq) == (11, 20)
    # The collector's pattern: re-read its head record to prove the device still has it.
    head = records[14]
    resume = Head(head["seq"] - 1, head["prev"])
    report = verify_lines(
        lines(records[14:]), pins(key_a), start=resume, expect_at_least=Head.of(head)
    )
    assert report.ok and report.first_seq == 15


def test_key_rotation_moves_trust_and_retires_old_key(
    key_a: SoftwareSigner, key_b: SoftwareSigner
) -> None:
    records = build(8, key_a)
    records.append(make_key_rotation(Head.of(records[-1]), key_a, key_b, device=DEVICE, time=T))
    append_events(records, 3)
    append_checkpoint(records, key_b)
    report, first = verify(records, pins(key_a))
    assert first is None
    assert report.trusted_keys == pins(key_b)
    assert report.retired_keys == {key_a.key_id}
    assert report.keys_seen == (key_a.key_id, key_b.key_id)
    # Resuming later with the saved trust state carries the retirement forward.
    later = records[9:]
    again = verify_lines(
        lines(later),
        report.trusted_keys,
        start=Head.of(records[8]),
        retired_keys=report.retired_keys,
    )
    assert again.ok


# -- one test per tamper class ----------------------------------------------------------


def test_edited_record_is_a_hash_mismatch(key_a: SoftwareSigner) -> None:
    records = build(20, key_a)
    records[16]["actor"] = "mallory"
    report, first = verify(records, pins(key_a))
    assert first == (K.HASH_MISMATCH, 17)
    assert report.records == 16 and report.head == Head.of(records[15])
    with pytest.raises(ChainError, match=r"record 17: hash mismatch \(edited\)") as err:
        report.check()
    assert err.value.exit_code == 3 and isinstance(err.value, IntegrityError)
    assert [v.seq for v in err.value.violations] == [17]


def test_deleted_record_is_a_gap(key_a: SoftwareSigner) -> None:
    records = build(20, key_a)
    del records[6]
    report, first = verify(records, pins(key_a))
    assert first == (K.GAP, 7)
    assert "expected record 7, got 8" in str(report.violations[0])
    assert report.last_seq == 6


def test_deleted_tail_is_truncation_against_known_head(key_a: SoftwareSigner) -> None:
    records = build(20, key_a)
    known = Head.of(records[17])
    report, first = verify(records[:15], pins(key_a), expect_at_least=known)
    assert first == (K.TRUNCATED, 18)
    assert "ends at record 15" in report.violations[0].message


def test_inserted_record_with_duplicate_seq(key_a: SoftwareSigner) -> None:
    records = build(20, key_a)
    forged = event(Head.of(records[8]), 99)  # well-formed seq 10 after record 9
    records.insert(9, forged)
    _, first = verify(records, pins(key_a))
    assert first == (K.DUPLICATE, 10)


def test_replayed_copy_of_a_record(key_a: SoftwareSigner) -> None:
    records = build(20, key_a)
    records.insert(5, records[4])
    report, first = verify(records, pins(key_a))
    assert first == (K.DUPLICATE, 5)
    assert "replayed copy" in report.violations[0].message


def test_replaced_record_breaks_the_next_link(key_a: SoftwareSigner) -> None:
    records = build(20, key_a)
    records[3] = event(Head.of(records[2]), 1234)  # rehashed itself, successor not
    _, first = verify(records, pins(key_a))
    assert first == (K.BROKEN_LINK, 5)


def test_inserted_and_renumbered_caught_by_checkpoint(key_a: SoftwareSigner) -> None:
    records = build(20, key_a)  # checkpoints at 6, 12, 18
    records.insert(8, event(None, 0))
    rehash_from(records, 8)
    _, first = verify(records, pins(key_a))
    assert first == (K.HEAD_MISMATCH, 13)  # the old checkpoint 12, now at 13


def test_rewritten_checkpoint_head_fails_signature(key_a: SoftwareSigner) -> None:
    records = build(20, key_a)

    def forge(rec: Record) -> None:
        rec["detail"]["n"] = 666

    forged = tampered(records, 8, forge)
    forged[11]["detail"]["head"] = {"seq": 11, "hash": forged[10]["hash"]}
    rehash_from(forged, 11)
    _, first = verify(forged, pins(key_a))
    assert first == (K.BAD_SIGNATURE, 12)


def test_reordered_records(key_a: SoftwareSigner) -> None:
    records = build(20, key_a)
    records[9], records[10] = records[10], records[9]
    report, first = verify(records, pins(key_a))
    assert first == (K.REORDERED, 10)
    assert report.last_seq == 9
    records = build(20, key_a)
    records.insert(14, records.pop(9))  # record 10 moved after record 15
    _, first = verify(records, pins(key_a))
    assert first == (K.REORDERED, 10)


def test_rollback_against_known_head(key_a: SoftwareSigner) -> None:
    records = build(20, key_a)

    def rewrite(rec: Record) -> None:
        rec["detail"]["n"] = 0

    other = tampered(records, 14, rewrite)  # a rewritten log, self-consistent up to 17
    _, first = verify(other, pins(key_a), expect_at_least=Head.of(records[15]))
    assert first == (K.ROLLBACK, 16)
    _, first = verify(other, pins(key_a))
    assert first == (K.HEAD_MISMATCH, 18)  # without the known head, its checkpoint


def test_rollback_when_resuming_from_archive(key_a: SoftwareSigner) -> None:
    archive = build(20, key_a)
    replaced = build(20, key_a)  # a different log of the same length
    _, first = verify(replaced[10:], pins(key_a), start=Head.of(archive[9]))
    assert first == (K.ROLLBACK, 11)


def test_bad_checkpoint_signature(key_a: SoftwareSigner) -> None:
    records = build(20, key_a)

    def flip(rec: Record) -> None:
        sig = rec["detail"]["sig"]
        rec["detail"]["sig"] = ("0" if sig[0] != "0" else "1") + sig[1:]

    _, first = verify(tampered(records, 12, flip), pins(key_a))
    assert first == (K.BAD_SIGNATURE, 12)


def test_missing_signature(key_a: SoftwareSigner) -> None:
    records = build(20, key_a)

    def strip(rec: Record) -> None:
        del rec["detail"]["sig"]

    _, first = verify(tampered(records, 6, strip), pins(key_a))
    assert first == (K.MISSING_SIGNATURE, 6)


def test_checkpoint_by_unknown_key(key_a: SoftwareSigner, key_b: SoftwareSigner) -> None:
    records = build(20, key_a)
    _, first = verify(records, pins(key_b))
    assert first == (K.UNKNOWN_KEY, 6)


def test_checkpoint_head_not_the_previous_record(key_a: SoftwareSigner) -> None:
    records = build(10, key_a)
    records.append(make_checkpoint(Head.of(records[4]), key_a, device=DEVICE, time=T))
    records[-1] = tampered(records, 11, lambda r: None)[-1]  # relink to record 10
    _, first = verify(records, pins(key_a))
    assert first == (K.HEAD_MISMATCH, 11)


def test_checkpoint_from_another_device(key_a: SoftwareSigner) -> None:
    records = build(10, key_a)
    records.append(make_checkpoint(Head.of(records[-1]), key_a, device="hsm-0002", time=T))
    _, first = verify(records, pins(key_a), device=DEVICE)
    assert first == (K.WRONG_DEVICE, 11)
    # Without an expected device, the first checkpoint (record 6) fixes it for the rest.
    _, first = verify(records, pins(key_a))
    assert first == (K.WRONG_DEVICE, 11)


def test_old_key_is_refused_after_rotation(key_a: SoftwareSigner, key_b: SoftwareSigner) -> None:
    records = build(8, key_a)
    records.append(make_key_rotation(Head.of(records[-1]), key_a, key_b, device=DEVICE, time=T))
    append_events(records, 2)
    append_checkpoint(records, key_a)
    report, first = verify(records, pins(key_a))
    assert first == (K.RETIRED_KEY, 12)
    assert "retired at record 9" in report.violations[0].message


@pytest.mark.parametrize(
    ("field", "reason"),
    [("sig_old", "sig_old does not verify"), ("sig_new", "sig_new does not verify")],
)
def test_rotation_with_a_bad_signature(
    key_a: SoftwareSigner, key_b: SoftwareSigner, field: str, reason: str
) -> None:
    records = build(8, key_a)
    records.append(make_key_rotation(Head.of(records[-1]), key_a, key_b, device=DEVICE, time=T))

    def corrupt(rec: Record) -> None:
        rec["detail"][field] = key_b.sign_digest(b"\x00" * 32).hex()

    report, first = verify(tampered(records, 9, corrupt), pins(key_a))
    assert first == (K.BAD_ROTATION, 9)
    assert reason in str(report.violations[0])
    assert report.trusted_keys == pins(key_a)


def test_rotation_from_an_untrusted_key(key_a: SoftwareSigner, key_b: SoftwareSigner) -> None:
    mallory = SoftwareSigner.generate()
    records = build(8, key_a)
    records.append(make_key_rotation(Head.of(records[-1]), mallory, key_b, device=DEVICE, time=T))
    report, first = verify(records, pins(key_a))
    assert first == (K.BAD_ROTATION, 9)
    assert "not trusted" in report.violations[0].message


def test_rotation_whose_key_id_does_not_match_the_key(
    key_a: SoftwareSigner, key_b: SoftwareSigner
) -> None:
    records = build(8, key_a)
    records.append(make_key_rotation(Head.of(records[-1]), key_a, key_b, device=DEVICE, time=T))

    def swap(rec: Record) -> None:
        rec["detail"]["new_public_key"] = SoftwareSigner.generate().public_key_pem

    _, first = verify(tampered(records, 9, swap), pins(key_a))
    assert first == (K.BAD_ROTATION, 9)


def test_unsigned_tail_when_a_final_checkpoint_is_required(key_a: SoftwareSigner) -> None:
    records = build(15, key_a)  # last checkpoint at 12
    report, first = verify(records, pins(key_a), require_final_checkpoint=True)
    assert first == (K.UNSIGNED_TAIL, 13)
    assert "records 13..15" in report.violations[0].message
    assert verify(records, pins(key_a))[1] is None


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"{not json\n", "not JSON"),
        (b"[1,2]\n", "not a JSON object"),
        (b"\xff\xfe\n", "not UTF-8"),
    ],
)
def test_unreadable_line_names_the_expected_seq(
    key_a: SoftwareSigner, line: bytes, why: str
) -> None:
    data = lines(build(5, key_a))
    data.insert(3, line)
    report = verify_lines(data, pins(key_a))
    (violation,) = report.violations
    assert (violation.kind, violation.seq, violation.line) == (K.MALFORMED, 4, 4)
    assert why in violation.message and report.last_seq == 3


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda r: r.pop("role"), "missing role"),
        (lambda r: r.update(outcome="maybe"), "outcome 'maybe'"),
        (lambda r: r.update(extra=1), "unexpected extra"),
        (lambda r: r.update(detail=[1]), "detail is not an object"),
        (lambda r: r.update(time="yesterday"), "time 'yesterday'"),
    ],
)
def test_malformed_records_even_with_a_valid_hash(
    key_a: SoftwareSigner, change: Callable[[Record], Any], why: str
) -> None:
    report, first = verify(tampered(build(6, key_a), 4, change), pins(key_a))
    assert first == (K.MALFORMED, 4)
    assert why in report.violations[0].message


def test_non_canonical_line_is_refused(key_a: SoftwareSigner) -> None:
    data = lines(build(5, key_a))
    data[2] = json.dumps(json.loads(data[2]), indent=1).encode()
    report = verify_lines(data, pins(key_a))
    assert [(v.kind, v.seq) for v in report.violations] == [(K.MALFORMED, 3)]
    assert "not canonical" in report.violations[0].message


def test_nothing_after_the_first_violation_counts(key_a: SoftwareSigner) -> None:
    records = build(20, key_a)
    records[4]["actor"] = "x"
    records[14]["actor"] = "y"
    report, _ = verify(records, pins(key_a))
    assert len(report.violations) == 1 and report.records == 4
    assert report.last_checkpoint_seq is None


def test_pinned_key_must_match_its_id(key_a: SoftwareSigner, key_b: SoftwareSigner) -> None:
    with pytest.raises(ConfigError):
        ChainVerifier({key_a.key_id: key_b.public_key_pem})


def test_unencodable_string_is_malformed_not_a_crash(key_a: SoftwareSigner) -> None:
    data = lines(build(3, key_a))
    rec = event(Head.of(json.loads(data[-1])), 4)
    rec["detail"] = {"x": "\ud800"}  # a lone surrogate: valid JSON escape, not UTF-8
    data.append(json.dumps(rec, sort_keys=True, separators=(",", ":")).encode())
    (violation,) = verify_lines(data, {}).violations
    assert (violation.kind, violation.seq) == (K.MALFORMED, 4)


def test_record_time_from_datetime_is_utc_with_microseconds() -> None:
    from datetime import datetime, timedelta, timezone

    when = datetime(2026, 11, 29, 21, 1, 2, 5, tzinfo=timezone(timedelta(hours=1)))
    rec = make_record(
        None, time=when, actor="a", role="r", source="console", event="e", outcome="ok", detail={}
    )
    assert rec["time"] == "2026-11-29T20:01:02.000005Z"


# -- verify_block: the fast path (chain by bytes, parse only signed records) -----------------


def test_block_parses_only_signed_records(
    key_a: SoftwareSigner, key_b: SoftwareSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hsmctl.auditlog import form

    records = build(60, key_a)
    records.append(make_key_rotation(Head.of(records[-1]), key_a, key_b, device=DEVICE, time=T))
    append_events(records, 10)
    append_checkpoint(records, key_b)
    append_events(records, 3)  # unsigned tail: linked by their bytes, like the rest
    parsed: list[int] = []
    real = form.parse_record

    def counting(item: Any, expected: int) -> Any:
        parsed.append(expected)
        return real(item, expected)

    monkeypatch.setattr(form, "parse_record", counting)
    report = verify_block(block(records), pins(key_a), device=DEVICE)
    signed = [r["seq"] for r in records if r["event"] in ("checkpoint", "key-rotation")]
    assert parsed == signed
    parsed.clear()
    assert report == verify_lines(lines(records), pins(key_a), device=DEVICE)
    assert report.ok and report.records == len(records) and report.first_seq == 1
    assert report.last_checkpoint_seq == records[-4]["seq"]
    assert set(report.trusted_keys) == {key_b.key_id}


def test_block_resumes_from_a_head_like_verify_lines(key_a: SoftwareSigner) -> None:
    records = build(40, key_a)
    for cut in (0, 1, 5, 6, 17, 39):
        start = Head.of(records[cut - 1]) if cut else None
        fast = verify_block(block(records[cut:]), pins(key_a), start=start)
        assert fast == verify_lines(lines(records[cut:]), pins(key_a), start=start)
        assert fast.ok and fast.head == Head.of(records[-1])


def _forged_line(prev: Head, body: bytes) -> tuple[bytes, Head]:
    """A line a tamperer without keys can append: it links by its bytes, but is no record."""
    seq = prev.seq + 1
    tail = (
        f',"outcome":"ok","prev":"{prev.hash}","role":"x","seq":{seq},"source":"s","time":"{T}"}}'
    )
    without = body + tail.encode()
    claimed = hashlib.sha256(without).hexdigest()
    line = body + f',"hash":"{claimed}"'.encode() + tail.encode()
    return line, Head(seq, claimed)


def test_block_falls_back_when_a_forged_line_links_by_bytes(
    key_a: SoftwareSigner, key_b: SoftwareSigner
) -> None:
    # Not JSON at all, yet it passes the byte scan; the checkpoint after it is forged
    # (unknown key), so nothing vouches for it: the full verdict names the bad line.
    records = build(12, key_a)
    line, head = _forged_line(Head.of(records[-1]), b'{"actor":"x","detail":{"a":[}')
    forged = make_checkpoint(head, key_b, device=DEVICE, time=T)
    data = [*block(records), line, record_line(forged)[:-1]]
    report = verify_block(data, pins(key_a), device=DEVICE)
    assert report == verify_lines(data, pins(key_a), device=DEVICE)
    assert [(v.kind, v.seq) for v in report.violations] == [(K.MALFORMED, 13)]
    assert report.records == 12


def test_block_does_not_trust_a_line_that_only_looks_signed(key_a: SoftwareSigner) -> None:
    # Looks like a checkpoint to the scan (its event member says so) but is no record:
    # the lines before it must not be taken as covered by it.
    records = build(10, key_a)
    line, _ = _forged_line(Head.of(records[-1]), b'{"actor":"x","detail":{},"event":"checkpoint"')
    data = [*block(records), line]
    report = verify_block(data, pins(key_a))
    assert report == verify_lines(data, pins(key_a))
    assert not report.ok and report.violations[0].seq == 11


# -- a hostile device: it holds the key, so it can sign over any bytes (issue 10) -----------


def _signed_after(records: list[Record], line: bytes, signer: SoftwareSigner) -> list[bytes]:
    """The device appends ``line`` with a hash member made over its other bytes (what a
    byte-level check tests) and signs a checkpoint over it."""
    at = line.rindex(b',"hash":"')
    body = line[:at] + line[at + 74 :]
    claimed = hashlib.sha256(body).hexdigest()
    line = line[:at] + f',"hash":"{claimed}"'.encode() + line[at + 74 :]
    seq = records[-1]["seq"] + 1
    checkpoint = make_checkpoint(Head(seq, claimed), signer, device=DEVICE, time=T)
    return [*block(records), line, record_line(checkpoint)[:-1]]


def _moved(rec: Record, into: str) -> bytes:
    member = f',"hash":"{rec["hash"]}"'.encode()
    body = record_line(rec)[:-1].replace(member, b"")
    cut = body.index(b'},"event"') if into == "detail" else body.index(b'"event":"') + 12
    return body[:cut] + member + body[cut:]


@pytest.mark.parametrize("into", ["detail", "string"])
def test_a_hash_member_moved_into_detail_or_a_string_is_refused(
    key_a: SoftwareSigner, into: str
) -> None:
    # The fast path used to commit this (issue 10): the line minus the member hashes to
    # it and a valid checkpoint follows, but the record has no hash or is not JSON.
    records = build(9, key_a)
    data = _signed_after(records, _moved(event(Head.of(records[-1]), 10), into), key_a)
    report = verify_block(data, pins(key_a), device=DEVICE)
    assert report == verify_lines(data, pins(key_a), device=DEVICE)
    assert [(v.kind, v.seq) for v in report.violations] == [(K.MALFORMED, 10)]
    assert report.records == 9
    why = "missing hash" if into == "detail" else "not JSON"
    assert why in report.violations[0].message


def _dump(rec: Record, *, sort_keys: bool = True, separators: tuple[str, str] = (",", ":")) -> str:
    text = json.dumps(rec, sort_keys=sort_keys, separators=separators, ensure_ascii=False)
    return text.replace(', "hash":', ',"hash":')  # the member as a byte-level check finds it


@pytest.mark.parametrize(
    "render",
    [
        lambda r: _dump(r, separators=(", ", ":")),
        lambda r: _dump(r, sort_keys=False),
        lambda r: _dump(r) + " ",
        lambda r: _dump(r) + "\r",
        lambda r: _dump(r).replace("ü", "\\u00fc"),
        lambda r: _dump(r).replace('"show"', '"sh\\u006fw"'),
        lambda r: '{"actor":"x",' + _dump(r)[1:],
        lambda r: _dump(r).replace('"n":10', '"n":10.00'),
        lambda r: _dump(r).replace('"n":10', '"n":1e1'),
    ],
    ids=[
        "spaces",
        "unsorted",
        "trailing-space",
        "cr",
        "escaped-u",
        "escaped-o",
        "dup-key",
        "float",
        "exponent",
    ],
)
def test_a_self_hashed_line_that_is_not_canonical_is_refused(
    key_a: SoftwareSigner, render: Callable[[Record], str]
) -> None:
    # Valid JSON, its hash made over its own bytes and signed: both verifiers used to
    # accept it. A reader may see another record in it (with two "actor" members, which
    # one?), so only the canonical line is the record.
    records = build(9, key_a)
    rec = event(Head.of(records[-1]), 10)
    rec["detail"] = {"n": 10, "note": "ünicode"}
    rec["event"] = "show"
    rec["hash"] = record_hash({k: v for k, v in rec.items() if k != "hash"})
    data = _signed_after(records, render(rec).encode(), key_a)
    report = verify_lines(data, pins(key_a), device=DEVICE)
    assert verify_block(data, pins(key_a), device=DEVICE) == report
    assert [(v.kind, v.seq) for v in report.violations] == [(K.MALFORMED, 10)]
    assert "not canonical" in report.violations[0].message


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 200_000,
        b'{"actor":' + b"[" * 200_000,
        b"[" * 33 + b"]" * 33,
        b'{"detail":' + b'{"a":' * 40 + b"1" + b"}" * 41,
    ],
    ids=["200k-brackets", "200k-in-record", "33-levels", "40-levels-in-detail"],
)
def test_deep_nesting_is_a_violation_not_an_exception(key_a: SoftwareSigner, line: bytes) -> None:
    records = build(11, key_a)
    for data in ([*block(records[:8]), line, *block(records[8:])], [*lines(records[:8]), line]):
        report = verify_block(data, pins(key_a), device=DEVICE)
        assert report == verify_lines(data, pins(key_a), device=DEVICE)
        (violation,) = report.violations
        assert (violation.kind, violation.seq, violation.line) == (K.MALFORMED, 9, 9)
        assert "not JSON" in violation.message
    text = verify_lines([*lines(records[:8]), line.decode()], pins(key_a))
    assert [(v.kind, v.seq) for v in text.violations] == [(K.MALFORMED, 9)]


def test_a_deep_line_after_a_gap_is_only_skipped(key_a: SoftwareSigner) -> None:
    # After a gap the verifier reads on to tell a deletion from a reordering; a hostile
    # line there used to raise RecursionError.
    data = lines(build(10, key_a))
    del data[4]
    data.insert(6, b"[" * 200_000 + b"\n")
    report = verify_lines(data, pins(key_a))
    assert [(v.kind, v.seq) for v in report.violations] == [(K.GAP, 5)]


def test_make_record_refuses_a_detail_no_verifier_would_accept() -> None:
    deep: Any = 1
    for _ in range(31):
        deep = [deep]
    with pytest.raises(ValueError, match="deeper"):
        event(None, 1, deep=deep)
    event(None, 1, deep=deep[0])  # 31 levels in all: record, detail and 29 lists
