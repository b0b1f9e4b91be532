"""hsmctl as a new user meets it (issue 13, SPEC §13): ``pip install`` of the wheel into a
fresh virtualenv outside the checkout, then the whole service against the lab.

* the wheel is built from a copy of the checkout's files (tracked and new, nothing
  ignored), installed without dev extras into a virtualenv in a temporary directory, and
  run from another temporary directory with ``PYTHONPATH`` empty: ``hsmctl.__file__`` is
  inside the new virtualenv and nothing of the checkout is on ``sys.path``;
* ``hsmctl provision`` → ``hsmctl takeover`` (from the tenant's client namespace) →
  ``hsmctl logs collect`` on hsm29, with that installation only;
* the collection: ``ansible-galaxy collection build`` and ``install`` into a temporary
  collections path, then ``provision.yml`` on hsm30 with plain ``ansible-playbook`` (the
  new virtualenv's), no project ``ansible.cfg`` (``ANSIBLE_CONFIG`` is an empty file), the
  inventory from the collection's plugin reading the provider's store; modules that tell
  the truth: ``--check`` changes neither the journal nor the device, a second run reports
  ``changed=0`` and keeps the bundle (no new one-time password); then ``takeover.yml``
  the same way from the tenant's client namespace.

Appliances: ``APPLIANCE_SETS["distribution"]`` (hsm29, hsm30), factory-reset first.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from hsmctl.inventory import check_placement, load_inventory
from hsmctl.lab.rig import data_ip
from hsmctl.state.model import ApplianceState, Operation, StepStatus
from hsmctl.state.store import DB_FILE, Store
from tests.checkout_copy import copy_checkout
from tests.conftest import (
    APPLIANCE_SETS,
    REPO,
    client_netns,
    console,
    ensure_lab,
    factory_reset,
    provider_config,
    tenant_config,
)

pytestmark = pytest.mark.lab

BY_PIP, BY_PLAYBOOK = APPLIANCE_SETS["distribution"]
TENANT = "tenant1"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Installed:
    venv: Path
    cwd: Path  # outside the checkout
    env: dict[str, str]
    collections: Path  # ansible-galaxy collection install -p

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(
        self, *argv: str, netns: str | None = None, timeout: float = 600, **env: str
    ) -> subprocess.CompletedProcess[str]:
        full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
        return subprocess.run(
            full,
            cwd=self.cwd,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def hsmctl(self, *args: str, netns: str | None = None) -> dict[str, Any]:
        proc = self.run(self.bin("hsmctl"), *args, "--json", netns=netns)
        assert proc.returncode == 0, f"hsmctl {' '.join(args)}: {proc.stderr}"
        return dict(json.loads(proc.stdout))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("distribution")
    assert not root.resolve().is_relative_to(REPO.resolve())
    src, dist, venv, cwd, home = (root / n for n in ("src", "dist", "venv", "cwd", "home"))
    for d in (cwd, home):
        d.mkdir()
    copy_checkout(src)
    base = {"PATH": SYSTEM_PATH, "HOME": str(home), "PYTHONPATH": "", "LANG": "C.UTF-8"}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "-w", str(dist), str(src)],
        cwd=cwd, env={**os.environ, **base}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("hsmctl-*.whl")
    python = Path(sys.base_prefix) / "bin" / "python3"
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True, cwd=cwd, env=base)
    inst = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
        cwd=cwd, env=base, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert inst.returncode == 0, inst.stderr
    env = {**base, "PATH": f"{venv / 'bin'}{os.pathsep}{SYSTEM_PATH}"}
    yield Installed(venv, cwd, env, root / "collections")


def test_the_installed_package_is_not_the_checkout(installed: Installed) -> None:
    probe = (
        "import json, sys, hsmctl, hsmctl.runner.adapter as a; "
        "print(json.dumps({'file': hsmctl.__file__, 'path': sys.path, "
        "'playbooks': str(a.PLAYBOOKS)}))"
    )
    proc = installed.run(installed.bin("python"), "-c", probe)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    venv = installed.venv.resolve()
    assert Path(seen["file"]).resolve().is_relative_to(venv), seen["file"]
    assert Path(seen["playbooks"]).resolve().is_relative_to(venv)
    repo = REPO.resolve()
    for entry in seen["path"]:
        assert not Path(entry or installed.cwd).resolve().is_relative_to(repo), entry
    assert not any(str(repo) in p.read_text() for p in installed.venv.rglob("*.pth")), (
        "a .pth file points into the checkout"
    )
    for name in ("provision.yml", "takeover.yml", "collect_logs.yml", "inventory/hsmctl.yml"):
        assert (Path(seen["playbooks"]) / name).is_file(), name


def test_provision_takeover_collect_with_the_installed_package(
    installed: Installed, tmp_path: Path
) -> None:
    lab = ensure_lab()
    factory_reset(BY_PIP)
    conf = provider_config(tmp_path / "provider", [BY_PIP])
    ip = data_ip(lab, BY_PIP, TENANT)
    provisioned = installed.hsmctl(
        "--config", str(conf), "provision", "--tenant", TENANT, "--vnet", "vnet1",
        "--subnet", "hsm", "--ip", ip,
    )  # fmt: skip
    assert provisioned["appliance"] == BY_PIP and provisioned["ip"] == ip
    assert Path(provisioned["handoff"]).is_file()
    fleet = installed.hsmctl("--config", str(conf), "fleet", "list")
    (row,) = fleet["appliances"]
    assert (row["id"], row["state"], row["ip"]) == (BY_PIP, "provisioned", ip)

    tconf = tenant_config(tmp_path / "tenant", lab, TENANT)
    netns = client_netns(lab, TENANT)
    owned = installed.hsmctl(
        "--config", str(tconf), "takeover", "--handoff", provisioned["handoff"], netns=netns
    )
    assert owned["appliance"] == BY_PIP and owned["state"] == "customer-owned"
    assert Path(owned["receipt"]).is_file()

    collected = installed.hsmctl(
        "--config", str(tconf), "logs", "collect", "--appliance", BY_PIP, netns=netns
    )
    (report,) = collected["appliances"]
    assert report["appliance"] == BY_PIP and report["verified"] is True
    assert report["new_records"] > 0 and report["last_seq"] >= report["new_records"]


def device_picture(appliance: str) -> dict[str, Any]:
    """What provisioning may change on the device and the fabric, read out of band."""
    from hsmctl.lab import control

    shown = json.loads(console(appliance, "hsmsh", "-c", "hsm show").stdout)
    network = json.loads(console(appliance, "hsmsh", "-c", "network show").stdout)
    users = json.loads(console(appliance, "hsmsh", "-c", "user list").stdout)
    attachment = control.fabric().attachment(appliance)
    return {
        "owner_state": shown["owner_state"],
        "monitor": shown["monitor"],
        "network": network["data"],
        "interfaces": sorted(line.split("@")[0] + " " + " ".join(line.split()[2:])
                             for line in network["interfaces"]),
        "users": users,
        "attached": (attachment.tenant, attachment.vnet, attachment.subnet),
    }  # fmt: skip


def recap(stdout: str, host: str) -> dict[str, int]:
    """The PLAY RECAP line of ``host``: {"ok": 5, "changed": 0, ...}."""
    match = re.search(rf"^{re.escape(host)}\s+:\s+(.*)$", stdout, re.MULTILINE)
    assert match, stdout
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


@pytest.fixture(scope="module")
def collection(installed: Installed, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hsmctl.fleet built (the new virtualenv's ansible-galaxy, from the installed package)
    and installed into a temporary collections path, which is returned."""
    tmp = tmp_path_factory.mktemp("collection")
    empty = {"ANSIBLE_CONFIG": str(tmp / "empty.cfg")}
    (tmp / "empty.cfg").write_text("")
    source = installed.run(
        installed.bin("python"), "-c", "import hsmctl.runner.adapter as a; print(a.COLLECTION)"
    ).stdout.strip()
    assert Path(source).resolve().is_relative_to(installed.venv.resolve())
    built = installed.run(
        installed.bin("ansible-galaxy"), "collection", "build", source,
        "--output-path", str(tmp / "built"), **empty,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (tarball,) = (tmp / "built").glob("hsmctl-fleet-*.tar.gz")
    path = tmp / "collections"
    done = installed.run(
        installed.bin("ansible-galaxy"), "collection", "install", str(tarball),
        "-p", str(path), **empty,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (path / "ansible_collections/hsmctl/fleet/MANIFEST.json").is_file()
    return path


def plain_playbook(
    installed: Installed,
    collections: Path,
    tmp: Path,
    playbook: str,
    *args: str,
    netns: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """The new virtualenv's ansible-playbook, no project ansible.cfg (an empty file), the
    collection from the temporary collections path only."""
    empty = tmp / "empty.cfg"
    empty.write_text("")
    return installed.run(
        installed.bin("ansible-playbook"),
        str(collections / "ansible_collections/hsmctl/fleet/playbooks" / playbook),
        *args,
        netns=netns,
        ANSIBLE_CONFIG=str(empty),
        ANSIBLE_COLLECTIONS_PATH=str(collections),
        ANSIBLE_INVENTORY_ENABLED="hsmctl.fleet.hsmctl_state,yaml",
        ANSIBLE_INVENTORY_UNPARSED_FAILED="1",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_DEPRECATION_WARNINGS="0",
    )


def test_the_collection_provisions_and_takes_over_truthfully_with_plain_ansible_playbook(
    installed: Installed, collection: Path, tmp_path: Path
) -> None:
    """provision.yml from the installed collection with plain ansible-playbook and the
    collection's inventory plugin: --check first (journal and device unchanged), then
    twice (the second changed=0), --check again (changed=0); the same for takeover.yml
    in the tenant's client namespace."""
    lab = ensure_lab()
    factory_reset(BY_PLAYBOOK)
    conf = provider_config(tmp_path / "provider", [BY_PLAYBOOK])
    state_dir = Path(yaml.safe_load(conf.read_text())["state_dir"])
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ip = data_ip(lab, BY_PLAYBOOK, TENANT)
    # Allocate hsm30 in the provider's store (what `hsmctl provision` does before its run).
    inv = load_inventory(Path(yaml.safe_load(conf.read_text())["inventory"]))
    with Store.open(state_dir / DB_FILE) as store:
        store.sync_inventory(inv)
        (alloc,) = store.allocate(
            "req-collection", check_placement(inv, TENANT, "vnet1", "hsm", ip=ip)
        )
    assert alloc.appliance == BY_PLAYBOOK
    source = tmp_path / "fleet.hsmctl.yml"
    source.write_text(yaml.safe_dump({"plugin": "hsmctl.fleet.hsmctl_state", "config": str(conf)}))

    def provision(*args: str) -> dict[str, int]:
        proc = plain_playbook(installed, collection, tmp_path, "provision.yml",
                              "-i", str(source), "-l", BY_PLAYBOOK, *args)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "[WARNING]" not in proc.stderr, proc.stderr
        return recap(proc.stdout, BY_PLAYBOOK)

    def journal() -> list[tuple[str, str]]:
        with Store.open(state_dir / DB_FILE) as store:
            rows = store.journal(appliance=BY_PLAYBOOK, operation=Operation.PROVISION)
        return [(e.step, e.status.value) for e in rows]

    device = device_picture(BY_PLAYBOOK)
    checked = provision("--check", "--diff")
    assert checked["failed"] == 0 and checked["changed"] == 4, checked  # all but verify
    assert journal() == []
    assert device_picture(BY_PLAYBOOK) == device
    assert not (state_dir / "handoff").exists()

    first = provision()
    assert first["changed"] == 4, first
    steps_ok = [step for step, status in journal() if status == StepStatus.OK.value]
    assert steps_ok == ["verify", "attach", "network", "monitor", "handoff"], steps_ok
    (bundle,) = (state_dir / "handoff" / TENANT).glob(f"{BY_PLAYBOOK}-req-collection.json")
    handed = bundle.read_bytes()
    device = device_picture(BY_PLAYBOOK)
    assert device["owner_state"] == "provisioned" and device["monitor"] == "enabled"
    with Store.open(state_dir / DB_FILE) as store:  # the playbook alone finished it
        assert store.get_appliance(BY_PLAYBOOK).state == ApplianceState.PROVISIONED

    second = provision("--diff")
    assert second["changed"] == 0 and second["failed"] == 0, second
    assert bundle.read_bytes() == handed  # the one-time password was not re-issued
    assert device_picture(BY_PLAYBOOK) == device
    rows = journal()
    again = provision("--check")
    assert again["changed"] == 0, again
    assert journal() == rows and device_picture(BY_PLAYBOOK) == device

    # takeover.yml, customer side, from the same installed collection.
    tconf = tenant_config(tmp_path / "tenant", lab, TENANT)
    hosts = tmp_path / "hosts.yml"
    hosts.write_text(yaml.safe_dump({"all": {"hosts": {BY_PLAYBOOK: {
        "hsm_handoff": str(bundle), "hsmctl_config": str(tconf)}}}}))  # fmt: skip
    netns = client_netns(lab, TENANT)
    customer = Path(yaml.safe_load(tconf.read_text())["state_dir"])

    def takeover(*args: str) -> dict[str, int]:
        proc = plain_playbook(installed, collection, tmp_path, "takeover.yml",
                              "-i", str(hosts), *args, netns=netns)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "[WARNING]" not in proc.stderr, proc.stderr
        return recap(proc.stdout, BY_PLAYBOOK)

    checked = takeover("--check")
    assert checked["changed"] == 1, checked
    assert not (customer / "appliances" / BY_PLAYBOOK).exists()
    assert device_picture(BY_PLAYBOOK) == device
    assert takeover()["changed"] == 1
    assert device_picture(BY_PLAYBOOK)["owner_state"] == "customer-owned"
    receipt = customer / "appliances" / BY_PLAYBOOK / "receipt.json"
    signed = receipt.read_bytes()
    assert takeover()["changed"] == 0
    assert takeover("--check")["changed"] == 0
    assert receipt.read_bytes() == signed
