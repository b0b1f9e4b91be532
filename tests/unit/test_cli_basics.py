"""CLI skeleton, configuration lookup, exit codes, secrets (issue 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hsmctl import __version__, config
from hsmctl.cli.main import cli, main
from hsmctl.errors import (
    CommandFailed,
    ConflictError,
    HostKeyMismatch,
    IntegrityError,
    UnreachableError,
    UsageError,
    most_severe,
)
from hsmctl.lab.plan import make_plan
from hsmctl.secret import Secret, read_secret_file

pytestmark = pytest.mark.unit
HSMCTL = str(Path(sys.executable).with_name("hsmctl"))


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HSMCTL, *args], capture_output=True, text=True, env=env, check=False)


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0
    assert __version__ in proc.stdout


def _groups(group: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    import click

    found = [prefix]
    if isinstance(group, click.Group):
        for name, sub in group.commands.items():
            found += _groups(sub, (*prefix, name))
    return found


@pytest.mark.parametrize("path", _groups(cli))
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    proc = run(*path, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout
    if path:
        # a man-page quality help names what the command does, not just its flags
        assert len(proc.stdout.split("Options:")[0].strip().splitlines()) >= 3


@pytest.mark.parametrize("path", [p for p in _groups(cli) if len(p) == 2])
def test_every_leaf_command_accepts_json(path: tuple[str, ...]) -> None:
    proc = run(*path, "--help")
    assert "--json" in proc.stdout


def test_unknown_command_is_a_usage_error() -> None:
    proc = run("frobnicate")
    assert proc.returncode == 2
    assert "No such command" in proc.stderr


def test_json_error_object_on_stdout() -> None:
    assert main(["lab", "up", "--tenants", "0", "--json"]) == 2
    proc = run("lab", "up", "--tenants", "0", "--json")
    assert proc.returncode == 2
    body = json.loads(proc.stdout)
    assert body["error"]["exit_code"] == 2
    assert "--tenants" in body["error"]["message"]


def test_exit_codes_of_the_tree() -> None:
    assert UsageError("x").exit_code == 2
    assert IntegrityError("x").exit_code == 3
    assert HostKeyMismatch("x").exit_code == 3
    assert UnreachableError("x").exit_code == 4
    assert ConflictError("x").exit_code == 5
    assert CommandFailed("x", argv=["a"], status=3, output="tail").exit_code == 1


@pytest.mark.parametrize(
    "codes, expected",
    [([0, 0], 0), ([1, 5], 1), ([5, 4, 1], 4), ([1, 3, 4], 3), ([5, 0], 5), ([0, 4], 4)],
)
def test_most_severe(codes: list[int], expected: int) -> None:
    assert most_severe(codes) == expected


def test_config_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = tmp_path / "a.yaml"
    explicit.write_text("state_dir: /tmp/a\n")
    from_env = tmp_path / "b.yaml"
    from_env.write_text("state_dir: b-relative\n")
    monkeypatch.setenv("HSMCTL_CONFIG", str(from_env))
    assert config.load(str(explicit)).state_dir == Path("/tmp/a")
    assert config.load(None).state_dir == tmp_path / "b-relative"
    monkeypatch.delenv("HSMCTL_CONFIG")
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "missing.yaml")
    assert config.load(None).source is None


def test_config_rejects_unknown_keys(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("state_dri: /tmp\n")
    with pytest.raises(UsageError, match="unknown keys: state_dri"):
        config.load(str(bad))
    with pytest.raises(UsageError, match="does not exist"):
        config.load(str(tmp_path / "nope.yaml"))


def test_secret_never_prints() -> None:
    s = Secret("hunter2-Secret!")
    assert "hunter2" not in repr(s) + str(s) + f"{s}" + json.dumps({"v": str(s)})
    assert s.reveal() == "hunter2-Secret!"
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(s)


def test_secret_file_rules(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("Correct-Horse-9\n")
    os.chmod(f, 0o600)
    assert read_secret_file(f).reveal() == "Correct-Horse-9"
    f.write_text("two-newlines\n\n")
    assert read_secret_file(f).reveal() == "two-newlines\n"
    os.chmod(f, 0o640)
    with pytest.raises(UsageError, match="too open"):
        read_secret_file(f)
    os.chmod(f, 0o604)
    with pytest.raises(UsageError, match="too open"):
        read_secret_file(f)
    with pytest.raises(UsageError):
        read_secret_file(tmp_path / "missing")


def test_lab_plan_addresses() -> None:
    plan = make_plan(2, 4)
    assert [str(a.mgmt_ip) for a in plan.appliances] == [
        "198.18.0.11",
        "198.18.0.12",
        "198.18.0.13",
        "198.18.0.14",
    ]
    assert [a.stamp for a in plan.appliances] == ["stamp1", "stamp2", "stamp1", "stamp2"]
    t1, t2 = plan.tenants
    assert not t1.vnets[0].cidr.overlaps(t2.vnets[0].cidr)
    for t in plan.tenants:
        assert t.client_ip in t.vnets[0].cidr
        for s in t.vnets[0].subnets:
            assert s.cidr.subnet_of(t.vnets[0].cidr)
            assert s.cidr.subnet_of(plan.lab_range)
    big = make_plan(32, 64)
    ifnames = [a.mgmt_peer for a in big.appliances] + [a.data_peer for a in big.appliances]
    ifnames += [s.bridge for t in big.tenants for v in t.vnets for s in v.subnets]
    assert all(len(i) <= 15 for i in ifnames)  # IFNAMSIZ
    with pytest.raises(UsageError):
        make_plan(33, 1)
