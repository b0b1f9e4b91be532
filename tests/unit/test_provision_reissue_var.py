"""``hsm_reissue_otp`` reaches the hand-off step as it did when provision.yml's
module_defaults templated ``{{ hsm_reissue_otp | default(false) }}`` (issue 15: the
filter made every task's worker load all of Ansible's filter plugins; the action plugin
hsmctl.fleet.hsm_provision now reads the variable itself): extra vars (``-e``) over
inventory variables, a template in the variable templated, undefined -> false, and an
explicit ``reissue_otp`` of the task over the variable.

Both paths, with the shipped playbook and real Ansible, no lab:

* plain ``ansible-playbook`` (AWX's path): the real action plugin runs the real module
  in a process of its own; the module's interpreter is a stand-in that records what the
  module hands to ``provisioning.run_step`` (the step itself is not run: it needs a
  device);
* ``hsmctl provision``'s path (ansible-runner with the step server): the handler in
  this process records the request the action plugin sends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from hsmctl.runner import adapter
from hsmctl.runner.adapter import COLLECTIONS_PATH, PLAYBOOKS, HostStatus, RunSpec

pytestmark = pytest.mark.unit

HANDOFF_TASK = "Install the tenant key and a one-time password, write the hand-off bundle"

# hsm01: the variable in the inventory (true); hsm02: not defined anywhere; hsm03: a
# template in the inventory ("{{ flag }}", flag "yes"); hsm04: false in the inventory.
INVENTORY_VARS: dict[str, dict[str, Any]] = {
    "hsm01": {"hsm_reissue_otp": True},
    "hsm02": {},
    "hsm03": {"hsm_reissue_otp": "{{ flag }}", "flag": "yes"},
    "hsm04": {"hsm_reissue_otp": False},
}
# (extra vars, what each host's hand-off must get)
CASES: list[tuple[dict[str, Any], dict[str, bool]]] = [
    ({}, {"hsm01": True, "hsm02": False, "hsm03": True, "hsm04": False}),
    ({"hsm_reissue_otp": "true"}, dict.fromkeys(INVENTORY_VARS, True)),
    ({"hsm_reissue_otp": "false"}, dict.fromkeys(INVENTORY_VARS, False)),
]

# The module's interpreter under plain ansible-playbook: records the module's call of
# provisioning.run_step (a stand-in module put in sys.modules first), then runs the
# AnsiballZ payload it is piped (pipelining) as the real interpreter would.
STAND_IN = """\
#!{python}
import json, os, sys, types

def run_step(config, appliance, request_id, step, *, check=False, reissue_otp=False):
    with open({record!r}, "a") as f:
        f.write(json.dumps({{"appliance": appliance, "step": step, "check": check,
                            "reissue_otp": reissue_otp, "pid": os.getpid()}}) + "\\n")
    return {{"changed": False, "handoff": "/b/" + appliance}}

fake = types.ModuleType("hsmctl.provider.provisioning")
fake.run_step = run_step
import hsmctl.provider
sys.modules["hsmctl.provider.provisioning"] = fake
hsmctl.provider.provisioning = fake
code = sys.stdin.buffer.read()
sys.argv = [""]
exec(compile(code, "<ansiballz>", "exec"), {{"__name__": "__main__"}})
"""


def _plain(
    tmp: Path,
    extravars: Mapping[str, Any],
    playbook: Path,
    args: tuple[str, ...] = ("--start-at-task", HANDOFF_TASK),
) -> list[dict[str, Any]]:
    record = tmp / "record.jsonl"
    record.unlink(missing_ok=True)
    stand_in = tmp / "python-stand-in"
    stand_in.write_text(STAND_IN.format(python=sys.executable, record=str(record)))
    stand_in.chmod(0o700)
    hosts = {
        h: {"hsm_request_id": "r-1", "ansible_connection": "local", **v}
        for h, v in INVENTORY_VARS.items()
    }
    inventory = tmp / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"hosts": hosts}}))
    (tmp / "empty.cfg").write_text("")
    argv = [str(Path(sys.executable).with_name("ansible-playbook")), str(playbook),
            "-i", str(inventory), "-e", "hsm_config=/nowhere/p.yaml",
            # over the play's own ansible_python_interpreter (extra vars win)
            "-e", f"ansible_python_interpreter={stand_in}", *args]  # fmt: skip
    for key, value in extravars.items():
        argv += ["-e", f"{key}={value}"]  # key=value: a string, as on a command line
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "HSMCTL_"))}
    env.update(
        ANSIBLE_CONFIG=str(tmp / "empty.cfg"),
        ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS_PATH),
        ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="0",
        ANSIBLE_PIPELINING="1",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-tmp"),
        ANSIBLE_HOME=str(tmp / "ansible-home"),
    )
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in record.read_text().splitlines()]


@pytest.mark.parametrize(("extravars", "expect"), CASES)
def test_plain_ansible_playbook_passes_the_variable_as_before(
    tmp_path: Path, extravars: dict[str, Any], expect: dict[str, bool]
) -> None:
    seen = _plain(tmp_path, extravars, PLAYBOOKS / "provision.yml")
    assert sorted((r["appliance"], r["step"], r["check"]) for r in seen) == [
        (h, "handoff", False) for h in sorted(INVENTORY_VARS)
    ]
    assert {r["appliance"]: r["reissue_otp"] for r in seen} == expect


EXPLICIT = """\
- hosts: all
  gather_facts: false
  module_defaults:
    hsmctl.fleet.hsm_provision:
      config: "{{ hsm_config }}"
      appliance: "{{ inventory_hostname }}"
      request_id: "{{ hsm_request_id }}"
  tasks:
    - name: Install the tenant key and a one-time password, write the hand-off bundle
      hsmctl.fleet.hsm_provision:
        step: handoff
        reissue_otp: "{{ mine }}"
      vars:
        mine: false
"""


def test_plain_an_explicit_argument_wins_over_the_variable(tmp_path: Path) -> None:
    playbook = tmp_path / "explicit.yml"
    playbook.write_text(EXPLICIT)
    seen = _plain(tmp_path, {"hsm_reissue_otp": "true"}, playbook)
    assert {r["appliance"]: r["reissue_otp"] for r in seen} == dict.fromkeys(INVENTORY_VARS, False)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def _served(playbook: Path, extravars: Mapping[str, Any]) -> dict[str, list[bool]]:
    """Each host's ``reissue_otp`` of every served step, in order (the interpreter
    a module would run under is /bin/false: no module process may start)."""
    seen: dict[str, list[bool]] = {}

    def handler(request: Mapping[str, Any]) -> Mapping[str, Any]:
        seen.setdefault(request["appliance"], []).append(request["reissue_otp"])
        return {"changed": False, "handoff": "/b"}

    hosts = {h: {"hsm_request_id": "r-1", **v} for h, v in INVENTORY_VARS.items()}
    spec = adapter.build_run("provision.yml", hosts, {"hsm_config": "/nowhere/p.yaml"})
    # An extra var, over the play's own ansible_python_interpreter.
    extra = {**spec.extravars, "ansible_python_interpreter": "/bin/false", **extravars}
    spec = RunSpec(playbook, spec.inventory, extra, spec.forks)
    outcomes = adapter.run(spec, serve=handler)
    assert {o.status for o in outcomes.values()} == {HostStatus.OK}, outcomes
    return seen


@pytest.mark.parametrize(("extravars", "expect"), CASES)
def test_served_steps_get_the_variable_as_before(
    private_tmp: Path, extravars: dict[str, Any], expect: dict[str, bool]
) -> None:
    seen = _served(PLAYBOOKS / "provision.yml", extravars)
    assert seen == {h: [want] * 5 for h, want in expect.items()}


def test_served_an_explicit_argument_wins_over_the_variable(
    tmp_path: Path, private_tmp: Path
) -> None:
    playbook = tmp_path / "explicit.yml"
    playbook.write_text(EXPLICIT)
    seen = _served(playbook, {"hsm_reissue_otp": "true"})
    assert seen == {h: [False] for h in INVENTORY_VARS}


STEPS = ["verify", "attach", "network", "monitor", "handoff"]


def test_plain_ansible_playbook_runs_five_tasks(tmp_path: Path) -> None:
    """Without tags (a plain run, AWX) the playbook is what it was: five tasks, each
    step in a module process of its own; hsmctl's one task (`never`) does not run."""
    seen = _plain(tmp_path, {}, PLAYBOOKS / "provision.yml", ())
    for host in INVENTORY_VARS:
        mine = [r for r in seen if r["appliance"] == host]
        assert [r["step"] for r in mine] == STEPS
        assert len({r["pid"] for r in mine}) == 5


def test_plain_ansible_playbook_with_hsmctls_tag_runs_the_five_in_one_task(
    tmp_path: Path,
) -> None:
    """`--tags hsmctl_served` without hsmctl's step server: the module runs the five
    steps in order in one process per host."""
    from hsmctl.provider.provisioning import SERVED_TAG

    seen = _plain(tmp_path, {}, PLAYBOOKS / "provision.yml", ("--tags", SERVED_TAG))
    for host in INVENTORY_VARS:
        mine = [r for r in seen if r["appliance"] == host]
        assert [r["step"] for r in mine] == STEPS
        assert len({r["pid"] for r in mine}) == 1
