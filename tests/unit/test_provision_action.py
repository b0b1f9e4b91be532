"""The action plugin hsmctl.fleet.hsm_provision (issue 15: provisioning speed): under
``hsmctl provision`` (a step server named by HSMCTL_STEP_SOCKET) each task's step is
forwarded from Ansible's worker and no module process starts; without a server the
module runs as before. Real ansible-runner runs of the shipped provision.yml, no lab: the
steps are answered by a handler in this process."""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from hsmctl.runner import adapter
from hsmctl.runner.adapter import COLLECTION, HostStatus, RunSpec

pytestmark = pytest.mark.unit

STEPS = ["verify", "attach", "network", "monitor", "handoff"]


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_h26_{path.parent.name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_action_checks_arguments_as_the_module_does() -> None:
    action = _load(COLLECTION / "plugins" / "action" / "hsm_provision.py")
    module = _load(COLLECTION / "plugins" / "modules" / "hsm_provision.py")
    assert action.ARGUMENT_SPEC == module.ARGUMENT_SPEC
    assert frozenset(module.ARGUMENT_SPEC) == action.ActionModule._VALID_ARGS


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def _spec(playbook: str | Path, interpreter: str | None) -> RunSpec:
    host: dict[str, Any] = {"hsm_request_id": "r-1"}
    extra: dict[str, Any] = {"hsm_config": "/nowhere/p.yaml"}
    if interpreter is not None:
        # An extra var: provision.yml's play vars set ansible_python_interpreter, over
        # an inventory variable.
        extra["ansible_python_interpreter"] = interpreter
    spec = adapter.build_run("provision.yml", {"hsm01": host, "hsm02": host}, extra)
    return RunSpec(Path(playbook) if isinstance(playbook, Path) else spec.playbook,
                   spec.inventory, spec.extravars, spec.forks)  # fmt: skip


def test_served_steps_start_no_module_process(private_tmp: Path) -> None:
    """The interpreter a module would run under is /bin/false: every task still
    succeeds, so no module ran; the handler saw each step once, in order, with only
    references; the results are the handler's, with the step and no diff (no --diff)."""
    seen: list[dict[str, Any]] = []

    def handler(request: Mapping[str, Any]) -> Mapping[str, Any]:
        seen.append(dict(request))
        extra = (
            {"handoff": f"/b/{request['appliance']}.json"} if request["step"] == "handoff" else {}
        )
        return {"changed": request["step"] != "verify", "diff": {"before": 1}, **extra}

    outcomes = adapter.run(_spec("provision.yml", "/bin/false"), serve=handler)
    assert {h: o.status for h, o in outcomes.items()} == dict.fromkeys(
        ("hsm01", "hsm02"), HostStatus.OK
    )
    for host in ("hsm01", "hsm02"):
        mine = [r for r in seen if r["appliance"] == host]
        assert [r["step"] for r in mine] == STEPS
        assert all(
            r == {"config": "/nowhere/p.yaml", "appliance": host, "request_id": "r-1",
                  "step": r["step"], "check": False, "reissue_otp": False}
            for r in mine
        )  # fmt: skip
        results = list(outcomes[host].results.values())
        assert [r["step"] for r in results] == STEPS
        assert [r["changed"] for r in results] == [False, True, True, True, True]
        assert all("diff" not in r for r in results)
        assert results[-1]["handoff"] == f"/b/{host}.json"
    assert list(private_tmp.iterdir()) == []


CHECKED = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: Attach, checked
      hsmctl.fleet.hsm_provision:
        step: attach
        config: "{{ hsm_config }}"
        appliance: "{{ inventory_hostname }}"
        request_id: "{{ hsm_request_id }}"
      check_mode: true
      diff: true
    - name: Not a step
      hsmctl.fleet.hsm_provision:
        step: zeroize
        config: "{{ hsm_config }}"
        appliance: "{{ inventory_hostname }}"
        request_id: "{{ hsm_request_id }}"
"""


def test_check_mode_diff_and_argument_errors(tmp_path: Path, private_tmp: Path) -> None:
    playbook = tmp_path / "checked.yml"
    playbook.write_text(CHECKED)
    seen: list[dict[str, Any]] = []

    def handler(request: Mapping[str, Any]) -> Mapping[str, Any]:
        seen.append(dict(request))
        return {"changed": True, "diff": {"before": {"attached": None}, "after": {"x": 1}}}

    outcomes = adapter.run(_spec(playbook, "/bin/false"), serve=handler)
    assert [(r["appliance"], r["step"], r["check"]) for r in sorted(seen, key=str)] == [
        ("hsm01", "attach", True),
        ("hsm02", "attach", True),
    ]
    for outcome in outcomes.values():
        assert outcome.results["Attach, checked"]["diff"]["after"] == {"x": 1}
        assert outcome.status is HostStatus.FAILED and outcome.failed_task == "Not a step"
        assert "zeroize" in str(outcome.message)


def test_a_served_failure_keeps_its_exit_code(private_tmp: Path) -> None:
    from hsmctl.errors import ConflictError

    def handler(request: Mapping[str, Any]) -> Mapping[str, Any]:
        if request["step"] == "network":
            raise ConflictError(f"{request['appliance']} is busy")
        return {"changed": False}

    outcomes = adapter.run(_spec("provision.yml", "/bin/false"), serve=handler)
    for host, outcome in outcomes.items():
        assert outcome.status is HostStatus.FAILED
        assert outcome.message == f"{host} is busy"
        failed = outcome.results[outcome.failed_task or ""]
        assert (failed["exit_code"], failed["error"]) == (5, "ConflictError")


def test_without_a_server_the_module_runs_the_step(private_tmp: Path) -> None:
    """Plain ansible-playbook / AWX: the module runs the step in its own process (here
    it reaches the library, which refuses the missing configuration file: exit 2)."""
    outcomes = adapter.run(_spec("provision.yml", None))
    for outcome in outcomes.values():
        assert outcome.status is HostStatus.FAILED
        assert outcome.failed_task is not None and outcome.failed_task.startswith("Verify")
        failed = outcome.results[outcome.failed_task]
        assert failed["exit_code"] == 2, failed
        assert "/nowhere/p.yaml" in str(outcome.message)


def test_served_steps_read_the_configuration_and_inventory_once_per_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each served step gets a context of its own (its own store) over the run's one
    parse of the configuration and the inventory."""
    from hsmctl.provider import context, provisioning
    from tests.provider_env import make_env

    env = make_env(tmp_path / "env")
    opened: list[str] = []
    real_open = provisioning.open_context

    def counting_open(path: str | None) -> context.ProviderContext:
        opened.append(str(path))
        return real_open(path)

    monkeypatch.setattr(provisioning, "open_context", counting_open)
    contexts: list[context.ProviderContext] = []

    def fake_run_step(config: str, appliance: str, request_id: str, step: str, **kw: Any) -> Any:
        ctx = kw["opener"](config)
        try:
            contexts.append(ctx)
            assert ctx.inventory.appliance(appliance).id == appliance
            ctx.store.get_appliance(appliance)  # a store of its own opens and reads
        finally:
            ctx.close()
        return {"changed": False}

    monkeypatch.setattr(provisioning, "run_step", fake_run_step)
    handle = provisioning.serve_steps({"unit01", "unit02"})
    for appliance in ("unit01", "unit02"):
        for step in STEPS:
            handle({"config": str(env.config), "appliance": appliance, "request_id": "r",
                    "step": step})  # fmt: skip
    assert opened == [str(env.config)]
    assert len({id(c) for c in contexts}) == 10
    assert len({id(c.inventory) for c in contexts}) == 1
    assert len({id(c.config) for c in contexts}) == 1


def _served_spec(interpreter: str = "/bin/false") -> RunSpec:
    """provision.yml as ``hsmctl provision`` runs it: only the task tagged
    SERVED_TAG (``step: all``)."""
    from hsmctl.provider.provisioning import SERVED_TAG

    spec = _spec("provision.yml", interpreter)
    return RunSpec(spec.playbook, spec.inventory, spec.extravars, spec.forks, (SERVED_TAG,))


def test_hsmctl_runs_one_task_per_appliance_that_serves_the_five_steps(
    private_tmp: Path,
) -> None:
    """Each host: one task (one event of a result), whose five steps reach the handler
    in order, each a request of its own with the same references; each step's result
    is in ``steps``, with its own ``changed``; no module process (interpreter
    /bin/false)."""
    seen: list[dict[str, Any]] = []

    def handler(request: Mapping[str, Any]) -> Mapping[str, Any]:
        seen.append(dict(request))
        extra = (
            {"handoff": f"/b/{request['appliance']}.json"} if request["step"] == "handoff" else {}
        )
        return {"changed": request["step"] in ("attach", "handoff"), "diff": {"x": 1}, **extra}

    outcomes = adapter.run(_served_spec(), serve=handler)
    for host in ("hsm01", "hsm02"):
        mine = [r for r in seen if r["appliance"] == host]
        assert [r["step"] for r in mine] == STEPS
        assert all(
            r == {"config": "/nowhere/p.yaml", "appliance": host, "request_id": "r-1",
                  "step": r["step"], "check": False, "reissue_otp": False}
            for r in mine
        )  # fmt: skip
        outcome = outcomes[host]
        assert outcome.status is HostStatus.OK
        (result,) = outcome.results.values()  # one task
        assert result["step"] == "all" and result["changed"] is True
        assert [(s["step"], s["changed"]) for s in result["steps"]] == [
            ("verify", False), ("attach", True), ("network", False), ("monitor", False),
            ("handoff", True),
        ]  # fmt: skip
        assert all("diff" not in s for s in result["steps"])
        assert result["steps"][-1]["handoff"] == f"/b/{host}.json"


def test_the_five_in_one_task_stop_at_the_first_failure(private_tmp: Path) -> None:
    from hsmctl.errors import ConflictError

    seen: list[str] = []

    def handler(request: Mapping[str, Any]) -> Mapping[str, Any]:
        seen.append(request["step"])
        if request["step"] == "network":
            raise ConflictError(f"{request['appliance']} is busy")
        return {"changed": True}

    outcomes = adapter.run(_served_spec(), serve=handler)
    assert seen.count("monitor") == seen.count("handoff") == 0
    assert seen.count("network") == 2
    for host, outcome in outcomes.items():
        assert outcome.status is HostStatus.FAILED
        assert outcome.message == f"network: {host} is busy"
        failed = outcome.results[outcome.failed_task or ""]
        assert (failed["exit_code"], failed["error"]) == (5, "ConflictError")
        assert failed["failed_step"] == "network"
        assert [s["step"] for s in failed["steps"]] == ["verify", "attach"]


def test_served_steps_migrate_and_sync_the_store_once_per_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's first step migrates the store and syncs it with the run's inventory;
    every step still gets a store of its own (its own engine), not migrated or synced
    again."""
    from hsmctl.provider import provisioning
    from hsmctl.state import engine
    from hsmctl.state.store import Store
    from tests.provider_env import make_env

    env = make_env(tmp_path / "env")
    calls: list[str] = []
    real_sync, real_migrate = Store.sync_inventory, engine.Database.migrate

    def sync(self: Store, inventory: Any) -> Any:
        calls.append("sync")
        return real_sync(self, inventory)

    def migrate(self: engine.Database, on_applied: Any) -> None:
        calls.append("migrate")
        real_migrate(self, on_applied)

    monkeypatch.setattr(Store, "sync_inventory", sync)
    monkeypatch.setattr(engine.Database, "migrate", migrate)
    stores: list[Store] = []

    def fake_run_step(config: str, appliance: str, request_id: str, step: str, **kw: Any) -> Any:
        ctx = kw["opener"](config)
        try:
            stores.append(ctx.store)
            assert ctx.store.get_appliance(appliance).id == appliance  # synced, readable
        finally:
            ctx.close()
        return {"changed": False}

    monkeypatch.setattr(provisioning, "run_step", fake_run_step)
    handle = provisioning.serve_steps({"unit01", "unit02"})
    for appliance in ("unit01", "unit02"):
        for step in STEPS:
            handle({"config": str(env.config), "appliance": appliance, "request_id": "r",
                    "step": step})  # fmt: skip
    assert calls == ["migrate", "sync"]
    assert len({id(s) for s in stores}) == 10
