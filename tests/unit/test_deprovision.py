"""Deprovisioning without a lab: its refusals (exit 3 and 5, the store unchanged), its
pure decisions (where a run resumes, what proves a zeroization), and its journal (a failed
step, then a resume that needs no new authority), against a real SQLite store and the
console and fabric fakes of tests/fakes.py."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hsmctl.cli.main import main
from hsmctl.contract import OwnerState
from hsmctl.device import Switch
from hsmctl.handoff import make_release, write_document
from hsmctl.inventory import check_placement, load_inventory
from hsmctl.provider import deprovisioning as dep
from hsmctl.state.model import ApplianceState, Operation, StepStatus
from hsmctl.state.records import JournalEntry
from tests.fakes import FakeConsole, FakeFabric, hsm_info
from tests.provider_env import ProviderEnv, make_env

pytestmark = pytest.mark.unit

ALLOCATED = "unit01"  # allocated to t1 by request r-existing, provisioned


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> ProviderEnv:
    e = make_env(tmp_path_factory.mktemp("provider"))
    inv = load_inventory(e.inventory)
    with e.store() as store:
        (alloc,) = store.allocate("r-existing", check_placement(inv, "t1", "v1", "hsm"))
        assert alloc.appliance == ALLOCATED
        store.set_state(ALLOCATED, ApplianceState.PROVISIONED)
    return e


def D(*extra: str, appliance: str = ALLOCATED) -> list[str]:
    return ["deprovision", appliance, *extra]


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# -- refusals: nothing changes ---------------------------------


def test_release_signed_by_another_tenant_is_an_integrity_error(
    env: ProviderEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    path = env.root / "release-by-t2.json"
    write_document(path, make_release(ALLOCATED, "t1", env.identities["t2"]))
    before = env.snapshot()
    code, _, err = _run(capsys, ["--config", str(env.config), *D("--yes", "--release", str(path))])
    assert code == 3, err
    assert "expected" in err and str(path) in err
    assert env.snapshot() == before


def test_release_from_before_the_allocation_is_a_replay(
    env: ProviderEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    with env.store() as store:
        request = store.get_request("r-existing")
    assert request is not None
    old = request.created_at - timedelta(hours=1)
    path = env.root / "release-old.json"
    write_document(path, make_release(ALLOCATED, "t1", env.identities["t1"], now=old))
    before = env.snapshot()
    code, _, err = _run(capsys, ["--config", str(env.config), *D("--yes", "--release", str(path))])
    assert code == 3, err
    assert "a replayed release" in err
    assert env.snapshot() == before


def test_an_available_appliance_is_not_deprovisioned(
    env: ProviderEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    before = env.snapshot()
    argv = [
        "--config",
        str(env.config),
        *D("--yes", "--force", "--reason", "x", appliance="unit03"),
    ]
    code, _, err = _run(capsys, argv)
    assert code == 5, err
    assert "unit03 is available: nothing to deprovision" in err
    assert env.snapshot() == before


# -- pure decisions ------------------------------------------------------------------------------


def _entry(n: int, step: str, status: StepStatus, **detail: Any) -> JournalEntry:
    return JournalEntry(
        n, datetime.now(UTC), "a1", None, Operation.DEPROVISION, step, status, dict(detail)
    )


def test_runs_resume_where_the_journal_stops() -> None:
    ok = StepStatus.OK
    entries = [
        _entry(1, "authorize", ok, run="r1", authorization={"kind": "force"}),
        _entry(2, "snapshot", ok, run="r1", audit_key_id="k1"),
        _entry(3, "done", ok, run="r1"),
        _entry(4, "authorize", ok, run="r2", authorization={"kind": "release"}),
        _entry(5, "snapshot", ok, run="r2", audit_key_id="k2"),
        _entry(6, "zeroize", StepStatus.STARTED, run="r2"),
    ]
    run = dep.unfinished_run(entries)
    assert run is not None and run.run_id == "r2"
    assert run.authorization == {"kind": "release"}
    assert dep.pending(run)[0] is dep.DeprovisionStep.ZEROIZE
    assert dep.unfinished_run(entries[:3]) is None


def test_reset_record_and_checks() -> None:
    tail = [
        json.dumps({"event": "command", "outcome": "ok", "detail": {"command": "hsm show"}}),
        "not json",
        json.dumps(
            {
                "seq": 9,
                "hash": "h",
                "time": "t",
                "event": "result",
                "outcome": "ok",
                "detail": {
                    "command": "sysconf factory-reset",
                    "old_key_id": "k1",
                    "new_key_id": "k2",
                },
            }
        ),
    ]
    record = dep.find_reset_record(tail)
    assert record is not None and record["seq"] == 9 and record["new_audit_key_id"] == "k2"
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAj8cS8Flrb58gO9RO5hbk+jX3YFgjMFekG4fkhx/Xe9"
    hsm = hsm_info(OwnerState.FACTORY, monitor=Switch.DISABLED)
    checks = dep.zeroization_checks(
        before={"audit_key_id": "k1", "data_host_keys": ["SHA256:old"]},
        hsm=hsm,
        data_host_keys=[key],
        audit_key_id="k2",
        pinned_data=["SHA256:pinned"],
        reset_record=record,
    )
    assert all(checks.values()), checks
    stale = dep.zeroization_checks(
        before={"audit_key_id": "k2", "data_host_keys": dep.fingerprints([key])},
        hsm=dataclasses.replace(hsm, initialised=True),
        data_host_keys=[key],
        audit_key_id="k2",
        pinned_data=[],
        reset_record=None,
    )
    assert {k for k, v in stale.items() if not v} == {
        "token_not_initialised",
        "data_host_keys_new",
        "audit_key_new",
        "reset_in_device_log",
    }


# -- the journal: a failed step, then a resume that needs no new authority ------------------


def test_deprovision_resumes_a_failed_run_without_new_authority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = make_env(tmp_path)
    with env.store() as store:
        inv = load_inventory(env.inventory)
        store.allocate("r1", check_placement(inv, "t1", "v1", "hsm"))
        store.set_state("unit01", ApplianceState.PROVISIONED)
        store.set_state("unit01", ApplianceState.CUSTOMER_OWNED)
    device, fabric = FakeConsole(), FakeFabric()
    monkeypatch.setattr(dep, "out_of_band_for", lambda kind: device)
    monkeypatch.setattr(dep, "fabric_for", lambda kind: fabric)
    monkeypatch.setattr(dep._Executor, "_provider_logs_in", lambda self: True)
    release = env.root / "release.json"
    write_document(release, make_release("unit01", "t1", env.identities["t1"], reason="done"))
    conf = ["--config", str(env.config)]

    code, _, err = _run(
        capsys, [*conf, "deprovision", "unit01", "--yes", "--release", str(release)]
    )
    assert code == 1 and "verify" in err and "console: no answer" in err
    with env.store() as store:
        rec = store.get_appliance("unit01")
    assert rec.state == ApplianceState.FAILED
    assert (rec.failure_reason or "").startswith("deprovision: verify:")

    code, out, err = _run(capsys, [*conf, "deprovision", "unit01", "--yes", "--json"])
    assert code == 0, err
    assert json.loads(out) == {"appliance": "unit01", "state": "available"}
    assert "resuming deprovisioning run" in err and "done: snapshot, zeroize" in err
    assert device.resets == 1 and fabric.detached == ["unit01"]
    with env.store() as store:
        assert store.get_appliance("unit01").state == ApplianceState.AVAILABLE
        assert store.allocations() == []
        entries = store.journal(appliance="unit01", operation=Operation.DEPROVISION)
        (data_key,) = store.host_keys("unit01", "data")  # type: ignore[arg-type]
    ok = [e.step for e in entries if e.status == StepStatus.OK]
    assert ok == ["authorize", *[s.value for s in dep.STEPS], "done"]
    (record,) = [e.detail for e in entries if e.step == "zeroization" and e.status == StepStatus.OK]
    assert record["authorization"]["kind"] == "release"
    assert record["authorization"]["reason"] == "done"
    assert record["device_record"]["seq"] == 7
    assert record["before"]["audit_key_id"] == "k0" and record["after"]["audit_key_id"] == "k1"
    assert data_key.key_line.split()[:2] == device.keys[1].split()[:2]  # re-pinned
    # Finished: a third call has nothing to do (wrong state, exit 5).
    code, _, err = _run(capsys, [*conf, "deprovision", "unit01", "--yes"])
    assert code == 5 and "unit01 is available: nothing to deprovision" in err
