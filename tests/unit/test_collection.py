"""The Ansible collection hsmctl.fleet (issue 13, SPEC §13), without the lab:
``ansible-galaxy collection build`` of the package's own directory and ``install`` into a
temporary collections path, then ``ansible-doc`` for every module and the inventory
plugin from there, with no project ``ansible.cfg`` (an empty ``ANSIBLE_CONFIG``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hsmctl.runner.adapter import COLLECTION, MODULES, PLAYBOOKS

pytestmark = pytest.mark.unit

BIN = Path(sys.executable).parent
MODULE_NAMES = sorted(p.stem for p in MODULES.glob("*.py"))
PLUGIN = "hsmctl.fleet.hsmctl_state"
# Task keywords that are not modules (the playbooks' tasks use only these and FQCNs).
KEYWORDS = {
    "name", "register", "when", "loop", "loop_control", "changed_when", "failed_when",
    "ignore_errors", "run_once", "vars", "check_mode", "diff", "no_log", "tags",
    "delegate_to", "environment", "block", "rescue", "always",
}  # fmt: skip


def ansible(tmp: Path, tool: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    empty = tmp / "empty.cfg"
    empty.touch()
    return subprocess.run(
        [str(BIN / tool), *args],
        cwd=tmp,  # not the repository: its ansible.cfg is not read
        env={
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(tmp),
            "ANSIBLE_CONFIG": str(empty),
            "ANSIBLE_NOCOLOR": "1",
            **env,
        },
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(the built tarball, the temporary collections path it was installed into)."""
    tmp = tmp_path_factory.mktemp("collection")
    built = ansible(tmp, "ansible-galaxy", "collection", "build", str(COLLECTION),
                    "--output-path", str(tmp / "built"))  # fmt: skip
    assert built.returncode == 0, built.stderr
    (tarball,) = (tmp / "built").glob("hsmctl-fleet-*.tar.gz")
    path = tmp / "collections"
    done = ansible(tmp, "ansible-galaxy", "collection", "install", str(tarball), "-p", str(path))
    assert done.returncode == 0, done.stderr
    yield tarball, path


def test_the_collection_is_the_package_directory(installed: tuple[Path, Path]) -> None:
    """One source of truth: the tarball holds the package's files, byte for byte."""
    tarball, path = installed
    with tarfile.open(tarball) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for name, member in members.items():
            if name in ("MANIFEST.json", "FILES.json"):
                continue
            extracted = tar.extractfile(member)
            assert extracted is not None
            assert extracted.read() == (COLLECTION / name).read_bytes(), name
    shipped = {
        str(p.relative_to(COLLECTION))
        for p in COLLECTION.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    # galaxy.yml becomes MANIFEST.json.
    assert set(members) - {"MANIFEST.json", "FILES.json"} == shipped - {"galaxy.yml"}
    manifest = json.loads((path / "ansible_collections/hsmctl/fleet/MANIFEST.json").read_text())
    assert manifest["collection_info"]["namespace"] == "hsmctl"
    assert manifest["collection_info"]["name"] == "fleet"
    runtime = yaml.safe_load((COLLECTION / "meta" / "runtime.yml").read_text())
    assert runtime["requires_ansible"].startswith(">=2.19")


def test_ansible_doc_lists_the_modules_and_the_plugin(installed: tuple[Path, Path]) -> None:
    _, path = installed
    env = {"ANSIBLE_COLLECTIONS_PATH": str(path)}
    tmp = path.parent
    modules = ansible(tmp, "ansible-doc", "--json", "-l", "hsmctl.fleet", **env)
    assert modules.returncode == 0, modules.stderr
    assert sorted(json.loads(modules.stdout)) == [f"hsmctl.fleet.{m}" for m in MODULE_NAMES]
    assert MODULE_NAMES == ["hsm_provision", "hsm_takeover"]
    plugins = ansible(tmp, "ansible-doc", "--json", "-t", "inventory", "-l", "hsmctl.fleet", **env)
    assert plugins.returncode == 0, plugins.stderr
    assert sorted(json.loads(plugins.stdout)) == [PLUGIN]


DOCUMENTED = [*(("module", f"hsmctl.fleet.{m}") for m in MODULE_NAMES), ("inventory", PLUGIN)]


@pytest.mark.parametrize(("kind", "name"), DOCUMENTED)
def test_ansible_doc_renders(installed: tuple[Path, Path], kind: str, name: str) -> None:
    _, path = installed
    env = {"ANSIBLE_COLLECTIONS_PATH": str(path)}
    tmp = path.parent
    text = ansible(tmp, "ansible-doc", "-t", kind, name, **env)
    assert text.returncode == 0, text.stderr
    assert "WARNING" not in text.stderr and "ERROR" not in text.stderr, text.stderr
    raw = ansible(tmp, "ansible-doc", "--json", "-t", kind, name, **env)
    assert raw.returncode == 0, raw.stderr
    entry: dict[str, Any] = json.loads(raw.stdout)[name]
    doc = entry["doc"]
    assert doc["short_description"] and doc["description"] and doc["author"], doc
    assert doc["options"], doc
    for option in doc["options"].values():
        assert option.get("description"), option
    assert entry["examples"].strip(), name
    examples = yaml.safe_load(entry["examples"])
    assert examples
    if kind == "module":
        assert entry["return"], name
        for value in entry["return"].values():
            assert value.get("description") and value.get("returned"), value
        for task in examples:
            assert name in task, task  # examples use the fully qualified name


@pytest.mark.parametrize("playbook", ["provision.yml", "takeover.yml", "collect_logs.yml"])
def test_playbooks_use_fully_qualified_names(playbook: str) -> None:
    (play,) = yaml.safe_load((PLAYBOOKS / playbook).read_text())
    for key in play.get("module_defaults", {}):
        assert key.startswith("hsmctl.fleet."), key
    for task in play["tasks"]:
        modules = [k for k in task if k not in KEYWORDS]
        assert len(modules) == 1, task
        assert modules[0].startswith(("hsmctl.fleet.", "ansible.builtin.")), modules
        if modules[0].startswith("hsmctl.fleet."):
            assert modules[0].removeprefix("hsmctl.fleet.") in MODULE_NAMES
