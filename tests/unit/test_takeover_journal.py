"""The takeover journal's typed records read every journal the earlier code wrote (a
takeover interrupted before an upgrade must resume after it) and write it back to the
byte; the journal is opened or replaced per bundle as SPEC §7 says."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hsmctl.customer.store import ApplianceDir, Pins
from hsmctl.errors import ConflictError, HsmctlError
from hsmctl.handoff import BundleExpired
from hsmctl.progress import NullProgress
from hsmctl.ssh import PublicKey
from hsmctl.takeover.journal import JOURNAL, FileJournal, open_journal, read
from hsmctl.takeover.records import STEPS, PasswordState, TakeoverJournal, TakeoverStep

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data" / "device"


def _reply(name: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.loads((DATA / name).read_text())["output"])
    return out


OLD_KEYS = _reply("sysconf-hostkey-show.json")["active_keys"]
STAGED = _reply("sysconf-hostkey-show.staged.json")
NEW_KEYS, NEW_FPS = STAGED["staged_keys"], STAGED["staged"]

# Journals as the takeover wrote them before the typed records (workflow.py at c8d6a70):
# the keys it set at each point, in the order and shape it set them.
FRESH = {
    "bundle_id": "b" * 64,
    "appliance": "hsm09",
    "request_id": "req-1",
    "started_at": "2026-01-01T10:00:15.123456Z",
    "password": "one-time",
    "host_keys": {"current": OLD_KEYS, "staged": []},
    "done": [],
}
STAGED_NOT_ACTIVATED = FRESH | {
    "password": "committed",
    "first_login_at": "2026-01-01T10:00:16Z",
    "host_keys": {"current": OLD_KEYS, "staged": NEW_KEYS, "staged_fingerprints": NEW_FPS},
    "done": ["escrow", "password", "revoke"],
}
ROTATED = STAGED_NOT_ACTIVATED | {
    "host_keys": {
        "current": NEW_KEYS,
        "staged": [],
        "previous": OLD_KEYS,
        "rotated": True,
        "staged_fingerprints": NEW_FPS,
    },
    "hsm_init_sent": True,
    "audit_key_before": "a" * 64,
    "done": ["escrow", "hostkeys", "password", "revoke"],
}
CHECKS = [
    {"name": "key-and-password-work", "ok": True, "detail": None},
    {"name": "customer-owned", "ok": True, "detail": "customer-owned"},
    {"name": "log-holds-the-transfer", "ok": False, "detail": {"seq": None, "provisioned_seq": 4}},
]
PROVED_WITHOUT_TRANSFER = ROTATED | {
    "audit_key_id": "c" * 64,
    "checks": CHECKS,
    "log_head": {"seq": 51, "hash": "d" * 64},
    "transfer_seq": None,
    "provisioned_seq": 4,
    "done": sorted(s.value for s in STEPS if s not in (TakeoverStep.PROVE, TakeoverStep.RECEIPT)),
}
FINISHED = PROVED_WITHOUT_TRANSFER | {
    "checks": [dict(c, ok=True) for c in CHECKS],
    "transfer_seq": 40,
    "done": sorted(s.value for s in STEPS),
}
JOURNALS = {
    "fresh": FRESH,
    "staged": STAGED_NOT_ACTIVATED,
    "rotated": ROTATED,
    "proved-without-transfer": PROVED_WITHOUT_TRANSFER,
    "finished": FINISHED,
}


def _file(d: dict[str, Any]) -> str:
    return json.dumps(d, indent=2, sort_keys=True) + "\n"  # ApplianceDir.write


@pytest.mark.parametrize("old", list(JOURNALS.values()), ids=list(JOURNALS))
def test_earlier_journals_read_and_write_back_unchanged(old: dict[str, Any]) -> None:
    record = TakeoverJournal.from_dict(json.loads(_file(old)))
    assert _file(record.as_dict()) == _file(old)


def test_the_records_say_what_the_resume_needs() -> None:
    staged = TakeoverJournal.from_dict(STAGED_NOT_ACTIVATED)
    assert staged.password is PasswordState.COMMITTED
    assert staged.host_keys.pinned == OLD_KEYS + NEW_KEYS
    assert (
        staged.done == {TakeoverStep.ESCROW, TakeoverStep.PASSWORD, TakeoverStep.REVOKE}
        and not staged.finished
    )
    finished = TakeoverJournal.from_dict(FINISHED)
    assert finished.finished and finished.log_head is not None and finished.log_head.seq == 51


def test_a_staged_key_answering_completes_the_rotation() -> None:
    keys = TakeoverJournal.from_dict(STAGED_NOT_ACTIVATED).host_keys
    assert not keys.observe(PublicKey.parse(OLD_KEYS[0]))
    assert keys.as_dict() == STAGED_NOT_ACTIVATED["host_keys"]
    assert keys.observe(PublicKey.parse(NEW_KEYS[1]))
    assert keys.as_dict() == ROTATED["host_keys"]


@pytest.mark.parametrize(
    "damage",
    [{"password": "maybe"}, {"done": ["escrow", "dance"]}, {"host_keys": None}, {"done": 3}],
)
def test_a_damaged_journal_names_the_file(tmp_path: Path, damage: dict[str, Any]) -> None:
    state = ApplianceDir(tmp_path, "hsm09")
    state.write(JOURNAL, FRESH | damage)
    with pytest.raises(HsmctlError) as err:
        read(state)
    assert err.value.exit_code == 1
    assert str(state.dir / JOURNAL) in str(err.value) and "is damaged" in str(err.value)


def test_pins_read_and_write_back_unchanged(tmp_path: Path) -> None:
    state = ApplianceDir(tmp_path, "hsm09")
    assert state.load_pins() == Pins()
    pins = {
        "data_host_keys": NEW_KEYS,
        "audit_keys": {"a" * 64: "PEM-A", "c" * 64: "PEM-C"},
        "retired": [],
        "initial_audit_key_id": "a" * 64,
        "data_ip": "198.19.0.9",
        "audit_account_key": "ssh-ed25519 AAAA tenant1-collector",
    }
    state.write("pins.json", pins)
    loaded = state.load_pins()
    assert loaded.audit_keys["c" * 64] == "PEM-C"
    state.save_pins(loaded)
    assert state.pins() == pins  # what the collector reads


def _bundle(bundle_id: str = "b" * 64, *, expired: bool = False) -> Any:
    return SimpleNamespace(
        bundle_id=bundle_id,
        appliance="hsm09",
        request_id="req-2",
        data_ip="198.19.0.9",
        data_host_keys=OLD_KEYS,
        audit_key_id="a" * 64,
        audit_public_key="PEM-A",
        expired=expired,
        expires_at=datetime.now(UTC) - timedelta(hours=1),
    )


def test_a_new_journal_pins_the_bundle_before_anything_is_sent(tmp_path: Path) -> None:
    state = ApplianceDir(tmp_path, "hsm09")
    journal = open_journal(state, _bundle(), NullProgress())
    assert json.loads((state.dir / JOURNAL).read_text()) == journal.record.as_dict()
    assert journal.record.password is PasswordState.ONE_TIME and not journal.record.done
    pins = state.load_pins()
    assert (pins.data_ip, pins.data_host_keys, pins.audit_keys) == (
        "198.19.0.9",
        OLD_KEYS,
        {"a" * 64: "PEM-A"},
    )
    journal.ok(TakeoverStep.ESCROW, {})
    again = open_journal(state, _bundle(expired=True), NullProgress())  # expiry: fresh only
    assert again.record == journal.record and again.is_done(TakeoverStep.ESCROW)


def test_another_bundle_replaces_only_a_journal_that_committed_to_nothing(
    tmp_path: Path,
) -> None:
    state = ApplianceDir(tmp_path, "hsm09")
    state.write(JOURNAL, STAGED_NOT_ACTIVATED)
    with pytest.raises(ConflictError, match="unfinished takeover from another hand-off bundle"):
        open_journal(state, _bundle("e" * 64), NullProgress())
    state.write(JOURNAL, FRESH)
    from hsmctl.secret import Secret

    state.escrow("admin-password", Secret("Correct-Horse-42"))
    journal = open_journal(state, _bundle("e" * 64), NullProgress())
    assert journal.record.bundle_id == "e" * 64
    assert state.escrowed("admin-password") is None  # retired, not reused
    assert (state.dir / "retired" / ("b" * 16) / "admin-password").is_file()
    with pytest.raises(BundleExpired):
        open_journal(state, _bundle("f" * 64, expired=True), NullProgress())


def test_the_file_journal_is_the_runners_journal(tmp_path: Path) -> None:
    state = ApplianceDir(tmp_path, "hsm09")
    journal = FileJournal(state, TakeoverJournal.from_dict(FRESH))
    journal.started(TakeoverStep.ESCROW)
    journal.failed(TakeoverStep.ESCROW, HsmctlError("x"))
    assert not (state.dir / JOURNAL).exists()  # neither leaves a trace
    journal.ok(TakeoverStep.ESCROW, {})
    assert read(state) == journal.record and journal.is_done(TakeoverStep.ESCROW)


KIT_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIICoLTZNEKwWTYl1eyWtK2wCTeafZOYJz66mBQFkNOg p11-app1"
)
WITH_CLIENTS = FINISHED | {
    "clients": [
        {
            "name": "app1",
            "role": "crypto-officer",
            "public_key": KIT_KEY,
            "kit": "/state/appliances/hsm09/clients/app1",
        },
        {"name": "app2", "role": "crypto-user"},  # set journaled, key not made yet
    ],
}


def test_the_clients_step_comes_after_the_pins_and_before_the_proof() -> None:
    order = list(STEPS)
    assert (
        order.index(TakeoverStep.HSM_INIT)
        < order.index(TakeoverStep.CO_PIN)
        < order.index(TakeoverStep.CLIENTS)
        < order.index(TakeoverStep.PROVE)
        < order.index(TakeoverStep.RECEIPT)
    )


def test_journaled_clients_read_and_write_back() -> None:
    record = TakeoverJournal.from_dict(json.loads(_file(WITH_CLIENTS)))
    assert _file(record.as_dict()) == _file(WITH_CLIENTS)
    assert record.clients is not None
    app1, app2 = record.clients
    assert app1.fingerprint == PublicKey.parse(KIT_KEY).fingerprint
    assert (app2.public_key, app2.kit, app2.fingerprint) == (None, None, None)
    assert record.client_set == record.clients


def test_which_client_set_a_journal_is_committed_to() -> None:
    # Before the clients step: none yet (any --client set is taken).
    assert TakeoverJournal.from_dict(ROTATED).client_set is None
    # An earlier release's journal that went past the step's place: committed to none.
    assert TakeoverJournal.from_dict(PROVED_WITHOUT_TRANSFER).client_set == []
    old_finished = FINISHED | {
        "done": sorted(s.value for s in STEPS if s is not TakeoverStep.CLIENTS)
    }
    assert TakeoverJournal.from_dict(old_finished).client_set == []
    assert "clients" not in TakeoverJournal.from_dict(old_finished).as_dict()
