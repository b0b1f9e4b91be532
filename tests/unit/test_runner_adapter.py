"""The ansible-runner adapter and the Ansible side of provisioning (issue 4).

* ``build_run`` is pure: its exact output is pinned here.
* ``run`` really runs ansible-runner (a local two-host playbook, no device): the private
  data directory is 0700 while it runs and gone afterwards, on success and on failure;
  failures come back as host outcomes.
* Provisioning hands the run references only (the config path, a request id); the
  playbook's module arguments are references too.
* The dynamic inventory plugin shows a real SQLite store to ``ansible-inventory``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from hsmctl.errors import HsmctlError
from hsmctl.inventory import check_placement, load_inventory
from hsmctl.provider import provisioning
from hsmctl.runner import adapter
from hsmctl.runner.adapter import PLAYBOOKS, HostOutcome, HostStatus, RunSpec
from hsmctl.secret import Secret
from hsmctl.state.model import ApplianceState
from tests.provider_env import ProviderEnv, make_env

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
LOCAL = {
    "ansible_connection": "local",
    "ansible_python_interpreter": "{{ ansible_playbook_python }}",
}


# -- build_run -----------------------------------------------------------------------------


def test_build_run_exact_output() -> None:
    spec = adapter.build_run(
        "provision.yml",
        {"hsm02": {"hsm_request_id": "r1"}, "hsm01": {"hsm_request_id": "r1"}},
        {"hsmctl_config": "/etc/hsmctl/hsmctl.yaml", "dry": False, "n": 3},
        forks=8,
    )
    assert spec == RunSpec(
        playbook=PLAYBOOKS / "provision.yml",
        inventory={
            "all": {
                "hosts": {
                    "hsm01": {**LOCAL, "hsm_request_id": "r1"},
                    "hsm02": {**LOCAL, "hsm_request_id": "r1"},
                }
            }
        },
        extravars={"dry": False, "hsmctl_config": "/etc/hsmctl/hsmctl.yaml", "n": 3},
        forks=2,  # never more forks than hosts
    )
    # Sorted, so the same request always produces the same files.
    assert list(spec.inventory["all"]["hosts"]) == ["hsm01", "hsm02"]
    assert list(spec.extravars) == ["dry", "hsmctl_config", "n"]
    # Inside the package (the collection hsmctl.fleet), whatever the working directory.
    assert PLAYBOOKS == REPO / "hsmctl/ansible_collections/hsmctl/fleet/playbooks"
    assert spec.playbook.is_file()


@pytest.mark.parametrize(
    ("forks", "hosts", "expect"), [(0, 3, 1), (64, 3, 3), (2, 5, 2), (8, 0, 1)]
)
def test_build_run_forks_are_clamped(forks: int, hosts: int, expect: int) -> None:
    spec = adapter.build_run("provision.yml", {f"h{i}": {} for i in range(hosts)}, {}, forks=forks)
    assert spec.forks == expect


@pytest.mark.parametrize(
    "value", [Secret("s3cret-Passw0rd"), {"nested": "x"}, ["a"], b"bytes", 1.5], ids=repr
)
def test_extravars_must_be_plain_references(value: object) -> None:
    with pytest.raises(TypeError, match="must be a plain reference"):
        adapter.build_run("provision.yml", {"h": {}}, {"thing": value})


# -- run: a real ansible-runner run, no device ----------------------------------------------

PLAYBOOK = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: Say hello
      ansible.builtin.debug:
        msg: "hello {{ inventory_hostname }} {{ greeting }}"
    - name: Fail on the second host
      ansible.builtin.fail:
        msg: "{{ inventory_hostname }} fails on purpose"
      when: inventory_hostname == 'h2'
"""


class Recorder:
    """Progress that also checks the private data directory while the run is live."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.lines: list[str] = []
        self.modes: set[int] = set()

    def step(self, message: str) -> None:
        self.lines.append(message)
        for d in self.tmp.glob("hsmctl-run-*"):
            self.modes.add(stat.S_IMODE(d.stat().st_mode))

    def advance(self, done: int, total: int, message: str = "") -> None:
        pass


def test_run_reports_outcomes_and_removes_its_private_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    playbook = tmp_path / "play.yml"
    playbook.write_text(PLAYBOOK)
    base = adapter.build_run("provision.yml", {"h1": {}, "h2": {}}, {"greeting": "there"})
    spec = RunSpec(playbook, base.inventory, base.extravars, base.forks)
    progress = Recorder(tmp)
    outcomes = adapter.run(spec, progress)

    assert outcomes["h1"].status is HostStatus.OK
    assert outcomes["h1"].results["Say hello"]["msg"] == "hello h1 there"
    assert outcomes["h2"].status is HostStatus.FAILED
    assert outcomes["h2"].failed_task == "Fail on the second host"
    assert outcomes["h2"].message == "h2 fails on purpose"
    assert "task: Say hello" in progress.lines
    assert "h2: Fail on the second host: failed: h2 fails on purpose" in progress.lines
    assert progress.modes == {0o700}  # seen while running, and only ever private
    assert list(tmp.iterdir()) == []  # inventory, extravars, env, artifacts: all gone


def test_run_removes_its_private_dir_when_the_run_breaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    playbook = tmp_path / "broken.yml"
    playbook.write_text("- hosts: all\n  tasks: [ {not: a task} ]\n")
    base = adapter.build_run("provision.yml", {"h1": {}}, {})
    with pytest.raises(Exception, match="ansible-runner"):
        adapter.run(RunSpec(playbook, base.inventory, base.extravars, 1))
    assert list(tmp.iterdir()) == []


# -- provisioning passes references only ----------------------------------------------------


def test_provisioning_extravars_hold_only_references(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(tmp_path)
    seen: list[RunSpec] = []

    def fake_run(spec: RunSpec, progress: Any = None, serve: Any = None) -> dict[str, HostOutcome]:
        seen.append(spec)
        return {
            h: HostOutcome(h, HostStatus.FAILED, "Verify", "stopped by the test")
            for h in spec.inventory["all"]["hosts"]
        }

    monkeypatch.setattr(adapter, "run", fake_run)
    outcome = provisioning.provision(
        str(env.config), tenant="t1", vnet="v1", subnet="hsm", request_id="req-1", count=2
    )
    assert sorted(outcome.failures) == ["unit01", "unit03"]  # stamp anti-affinity
    (spec,) = seen
    assert spec.playbook == PLAYBOOKS / "provision.yml"
    assert spec.extravars == {"hsm_config": str(env.config)}
    assert spec.inventory == {
        "all": {
            "hosts": {
                "unit01": {**LOCAL, "hsm_request_id": "req-1"},
                "unit03": {**LOCAL, "hsm_request_id": "req-1"},
            }
        }
    }
    # The failure is recorded on the appliances, with the reason.
    with env.store() as store:
        rec = store.get_appliance("unit01")
    assert rec.state == ApplianceState.FAILED
    assert rec.failure_reason == "Verify: stopped by the test"


# -- the installed content is checked before anything is allocated ---------------------------


def test_required_modules_of_the_shipped_playbooks() -> None:
    def needs(name: str) -> set[str]:
        return adapter.required_modules(yaml.safe_load((PLAYBOOKS / name).read_text()))

    assert needs("provision.yml") == {"hsm_provision"}
    assert needs("takeover.yml") == {"hsm_takeover"}
    assert needs("collect_logs.yml") == set()
    for name in ("provision.yml", "takeover.yml", "collect_logs.yml"):
        assert adapter.check_playbook(name) == PLAYBOOKS / name
    nested = [{"hosts": "all", "pre_tasks": [{"block": [{"hsmctl.fleet.x": {}}]}],
               "handlers": [{"hsmctl.fleet.y": {}}], "module_defaults": {"hsmctl.fleet.z": {}},
               "tasks": [{"rescue": [{"ansible.builtin.debug": {}}]}]}]  # fmt: skip
    assert adapter.required_modules(nested) == {"x", "y", "z"}


@pytest.mark.parametrize("missing", ["playbook", "module"])
def test_provision_checks_the_installation_before_allocating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    """A missing playbook or module fails the request before the store changes (it used
    to leave the appliance in `provisioning`), and no run starts."""
    env = make_env(tmp_path / "env")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(adapter, "PLAYBOOKS" if missing == "playbook" else "MODULES", empty)
    runs: list[RunSpec] = []
    monkeypatch.setattr(adapter, "run", lambda spec, progress=None: runs.append(spec) or {})
    before = env.snapshot()
    with pytest.raises(HsmctlError, match="reinstall hsmctl") as info:
        provisioning.provision(
            str(env.config), tenant="t1", vnet="v1", subnet="hsm", request_id="req-x"
        )
    assert type(info.value) is HsmctlError and info.value.exit_code == 1
    assert ("provision.yml" if missing == "playbook" else "hsm_provision") in str(info.value)
    assert env.snapshot() == before
    assert runs == []
    with env.store() as store:
        assert store.get_request("req-x") is None
        assert {a.state for a in store.list_appliances()} == {ApplianceState.AVAILABLE}


def test_the_playbook_passes_references_only() -> None:
    """Every task of provision.yml calls hsm_provision with a step name; the module's
    other arguments are the config path, the appliance and the request id."""
    (play,) = yaml.safe_load((PLAYBOOKS / "provision.yml").read_text())
    assert play["module_defaults"] == {
        "hsmctl.fleet.hsm_provision": {
            "config": "{{ hsm_config }}",
            "appliance": "{{ inventory_hostname }}",
            "request_id": "{{ hsm_request_id }}",
        }
    }
    steps = []
    for task in play["tasks"]:
        args = task["hsmctl.fleet.hsm_provision"]
        assert set(args) == {"step"}, task
        steps.append((args["step"], task.get("tags")))
    # hsmctl provision's one task per appliance (only with its tag), then the five steps
    # that a plain ansible-playbook or AWX run runs (no tags).
    assert steps == [
        ("all", ["never", provisioning.SERVED_TAG]),
        *((s.value, None) for s in provisioning.STEPS),
    ]


# -- the dynamic inventory plugin ------------------------------------------------------------


def _plain(value: Any) -> Any:
    """ansible-inventory marks strings from a plugin unsafe (never templated)."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _ansible_inventory(env: ProviderEnv, *args: str) -> subprocess.CompletedProcess[str]:
    venv_bin = str(Path(sys.executable).parent)
    return subprocess.run(
        [str(Path(venv_bin) / "ansible-inventory"), "-i", "playbooks/inventory/hsmctl.yml", *args],
        cwd=REPO,
        env={
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            "HSMCTL_CONFIG": str(env.config),
            "HOME": str(env.root),
            "ANSIBLE_INVENTORY_UNPARSED_FAILED": "1",
        },
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_dynamic_inventory_lists_the_state_store(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    inv = load_inventory(env.inventory)
    with env.store() as store:
        (a,) = store.allocate("req-a", check_placement(inv, "t1", "v1", "hsm"))
        (b,) = store.allocate("req-b", check_placement(inv, "t1", "v1", "hsm"))
        (c,) = store.allocate("req-c", check_placement(inv, "t2", "v1", "hsm", ip="10.20.1.9"))
        store.set_state(b.appliance, ApplianceState.PROVISIONED)
        store.set_state(b.appliance, ApplianceState.CUSTOMER_OWNED)
    assert (a.appliance, b.appliance, c.appliance) == ("unit01", "unit03", "unit02")

    proc = _ansible_inventory(env, "--list")
    assert proc.returncode == 0, proc.stderr
    data = _plain(json.loads(proc.stdout))
    groups = {g: sorted(v.get("hosts", [])) for g, v in data.items() if g != "_meta"}
    assert groups["tenant_t1"] == ["unit01", "unit03"]
    assert groups["tenant_t2"] == ["unit02"]
    assert groups["stamp_s1"] == ["unit01", "unit02"]
    assert groups["stamp_s3"] == ["unit04"]
    assert groups["region_r2"] == ["unit04"]
    assert groups["state_provisioning"] == ["unit01", "unit02"]
    assert groups["state_customer_owned"] == ["unit03"]
    assert groups["state_available"] == ["unit04"]
    hv = data["_meta"]["hostvars"]
    assert hv["unit02"] == {
        "ansible_host": "127.0.0.12",  # compose in playbooks/inventory/hsmctl.yml
        "hsm_mgmt_ip": "127.0.0.12",
        "hsm_data_ip": "10.20.1.9",
        "hsm_tenant": "t2",
        "hsm_stamp": "s1",
        "hsm_region": "r1",
        "hsm_state": "provisioning",
        "hsm_serial": "UNIT0002",
        "hsm_model": "unit-test",
        "hsm_vnet": "v1",
        "hsm_subnet": "hsm",
        "hsm_request_id": "req-c",
        "hsm_config": str(env.config),
    }
    assert hv["unit04"]["hsm_tenant"] is None and hv["unit04"]["hsm_data_ip"] is None
    assert "hsm_request_id" not in hv["unit04"]


def test_dynamic_inventory_fails_loudly_without_a_config(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    env.config = tmp_path / "missing.yaml"
    proc = _ansible_inventory(env, "--list")
    assert proc.returncode != 0
    assert f"configuration file {env.config} does not exist" in proc.stderr


def test_results_are_found_by_the_step_the_module_returns() -> None:
    """Not by the task's title: a reworded playbook still yields its hand-off."""
    outcome = HostOutcome("hsm01")
    outcome.results = {
        "any title": {"step": "verify", "changed": False},
        "Write the bundle, reworded": {"step": "handoff", "handoff": "/x/hsm01-r.json"},
    }
    handoff = provisioning.step_result(outcome, provisioning.ProvisionStep.HANDOFF)
    assert handoff["handoff"] == "/x/hsm01-r.json"
    with pytest.raises(HsmctlError, match="hsm01: the playbook run reported no monitor step"):
        provisioning.step_result(outcome, provisioning.ProvisionStep.MONITOR)


# -- run: Ansible's settings and what lands in the artifact directory ----------------------

CONFIG_PLAYBOOK = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: Read the poll interval
      ansible.builtin.debug:
        msg: "{{ lookup('ansible.builtin.config', 'DEFAULT_INTERNAL_POLL_INTERVAL') }}"
    - name: Say hello
      ansible.builtin.debug:
        msg: "hello {{ inventory_hostname }}"
"""


class ArtifactWatcher(Recorder):
    """Notes every file of the run's private directory each time an event arrives."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.files: set[str] = set()

    def step(self, message: str) -> None:
        super().step(message)
        for d in self.tmp.glob("hsmctl-run-*"):
            self.files.update(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def test_ansible_cfg_exact_output() -> None:
    assert adapter.ansible_cfg() == "[defaults]\ninternal_poll_interval = 0.005\n"


def test_run_reads_only_its_own_config_and_writes_no_event_or_output_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    # An operator's configuration does not reach hsmctl's runs.
    operator = tmp_path / "operator.cfg"
    operator.write_text("[defaults]\ninternal_poll_interval = 0.5\n")
    monkeypatch.setenv("ANSIBLE_CONFIG", str(operator))
    playbook = tmp_path / "play.yml"
    playbook.write_text(CONFIG_PLAYBOOK)
    base = adapter.build_run("provision.yml", {"h1": {}, "h2": {}}, {})
    watcher = ArtifactWatcher(tmp)
    outcomes = adapter.run(RunSpec(playbook, base.inventory, base.extravars, 2), watcher)

    for host in ("h1", "h2"):
        assert outcomes[host].status is HostStatus.OK
        assert float(outcomes[host].results["Read the poll interval"]["msg"]) == 0.005
        assert outcomes[host].results["Say hello"]["msg"] == f"hello {host}"
    assert "h2: Say hello: ok" in watcher.lines
    assert "ansible.cfg" in watcher.files  # the run's own, in its private directory
    artifacts = {f for f in watcher.files if f.startswith("artifacts/")}
    assert artifacts  # the run's artifact directory was looked at while it ran ...
    names = {Path(f).name for f in artifacts}
    # ... and holds no event files (a result's data included), no copy of the output
    assert not any(f.split("/")[-2] == "job_events" and "partial" not in f for f in artifacts)
    assert not names & {"stdout", "stderr"}
    assert list(tmp.iterdir()) == []
