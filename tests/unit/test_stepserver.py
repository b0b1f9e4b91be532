"""Steps served by the process that runs the playbook (hsmctl.runner.stepserver): the
wire, the errors, the socket's privacy, a real ansible-runner run whose tasks reach the
server through the environment, and provisioning's handler refusing what is not its
run's. The lab tier (tests/lab/test_provision.py, test_scale.py) runs provisioning
through it end to end."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from hsmctl.errors import ConflictError, UsageError
from hsmctl.provider import provisioning
from hsmctl.runner import adapter, stepclient
from hsmctl.runner.adapter import HostStatus, RunSpec
from hsmctl.runner.stepserver import SOCKET_ENV, StepServer, answer

pytestmark = pytest.mark.unit


def test_answer_maps_results_and_errors() -> None:
    def handler(request: Mapping[str, Any]) -> Mapping[str, Any]:
        if request["step"] == "boom":
            raise ConflictError("busy")
        if request["step"] == "bug":
            raise KeyError("secret text that must not travel")
        return {"changed": True, "step": request["step"]}

    assert answer(handler, b'{"step": "verify"}') == {"ok": {"changed": True, "step": "verify"}}
    assert answer(handler, b'{"step": "boom"}') == {
        "error": {"message": "busy", "exit_code": 5, "error": "ConflictError"}
    }
    bug = answer(handler, b'{"step": "bug"}')
    assert bug["error"]["exit_code"] == 1 and "secret" not in str(bug)
    assert answer(handler, b"[1]")["error"]["exit_code"] == 2
    assert answer(handler, b"not json")["error"]["exit_code"] == 2


def test_round_trip_over_a_private_socket(tmp_path: Path) -> None:
    seen: list[Mapping[str, Any]] = []

    def handler(request: Mapping[str, Any]) -> Mapping[str, Any]:
        seen.append(request)
        if request["step"] == "handoff":
            raise UsageError("no")
        return {"changed": False}

    with StepServer(handler, tmp_path) as server:
        assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
        assert stepclient.call(str(server.path), {"step": "verify"}) == {"changed": False}
        with pytest.raises(stepclient.StepFailed) as failed:
            stepclient.call(str(server.path), {"step": "handoff"})
        assert (str(failed.value), failed.value.exit_code, failed.value.error) == (
            "no",
            2,
            "UsageError",
        )
    assert not server.path.exists()
    assert [r["step"] for r in seen] == ["verify", "handoff"]


def test_served_socket_only_when_named_and_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    assert stepclient.served_socket() is None
    monkeypatch.setenv(SOCKET_ENV, str(tmp_path / "gone.sock"))
    assert stepclient.served_socket() is None


PLAYBOOK = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: Ask the server
      ansible.builtin.command:
        argv:
          - "{{ ansible_playbook_python }}"
          - -c
          - >-
            import json; from hsmctl.runner import stepclient;
            print(json.dumps(stepclient.call(stepclient.served_socket(),
            {"appliance": "{{ inventory_hostname }}", "step": "verify"})))
"""


def test_a_playbook_run_reaches_the_server_through_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    playbook = tmp_path / "play.yml"
    playbook.write_text(PLAYBOOK)
    base = adapter.build_run("provision.yml", {"h1": {}, "h2": {}}, {})
    served: list[str] = []

    def handler(request: Mapping[str, Any]) -> Mapping[str, Any]:
        served.append(str(request["appliance"]))
        return {"pid": os.getpid()}

    outcomes = adapter.run(RunSpec(playbook, base.inventory, base.extravars, 2), serve=handler)
    assert {h: o.status for h, o in outcomes.items()} == dict.fromkeys(("h1", "h2"), HostStatus.OK)
    for outcome in outcomes.values():
        assert outcome.results["Ask the server"]["stdout"] == f'{{"pid": {os.getpid()}}}'
    assert sorted(served) == ["h1", "h2"]
    assert list(tmp.iterdir()) == []  # the socket went with the private directory


def test_provisioning_serves_only_its_runs_appliances_and_steps() -> None:
    handle = provisioning.serve_steps({"hsm01"})
    good = {"config": "/x.yaml", "appliance": "hsm01", "request_id": "r", "step": "verify"}
    for bad in (
        {**good, "appliance": "hsm02"},
        {**good, "step": "zeroize"},
        {**good, "config": None},
        {**good, "check": "yes"},
    ):
        with pytest.raises(UsageError):
            handle(bad)
