"""Driving the lab from a test or a benchmark: configurations for a subset of the lab,
the out-of-band console, and a :class:`Rig` — one appliance provisioned through the real
``hsmctl provision`` (ansible-runner), quickly brought back to a fresh hand-off.

The lab tests and the benchmarks share this, so both drive the lab the same way. Only a
lab that is up (``hsmctl lab up``) and root can use it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hsmctl.errors import HsmctlError
from hsmctl.lab import control as lab_mod
from hsmctl.lab import workdir

HSMCTL = str(Path(sys.executable).with_name("hsmctl"))
HOST_CONFIG = Path("/etc/hsmctl/hsmctl.yaml")


class RigError(HsmctlError):
    """The lab did not do what a test or a benchmark needed from it."""


def provider_config(directory: Path, appliances: Sequence[str]) -> Path:
    """A provider configuration like the lab's whose inventory holds only ``appliances``
    and whose state (database, bundles) lives in ``directory``."""
    inv = yaml.safe_load((workdir.LAB_DIR / "provider" / "inventory.yaml").read_text())
    for region in inv["regions"]:
        for stamp in region["stamps"]:
            stamp["appliances"] = [a for a in stamp["appliances"] if a["id"] in appliances]
        region["stamps"] = [s for s in region["stamps"] if s["appliances"]]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "inventory.yaml").write_text(yaml.safe_dump(inv, sort_keys=False))
    conf = yaml.safe_load(HOST_CONFIG.read_text())
    conf["inventory"] = str(directory / "inventory.yaml")
    conf["state_dir"] = str(directory / "state")
    path = directory / "provider.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def tenant_config(directory: Path, lab: dict[str, Any], tenant: str) -> Path:
    """The tenant's lab configuration with its customer state in ``directory``."""
    t = next(x for x in lab["tenants"] if x["name"] == tenant)
    conf = yaml.safe_load(
        (Path("/etc/netns") / t["client_netns"] / "hsmctl" / "hsmctl.yaml").read_text()
    )
    conf["state_dir"] = str(directory / f"{tenant}-state")
    path = directory / f"{tenant}.yaml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(conf))
    return path


def client_netns(lab: dict[str, Any], tenant: str) -> str:
    return str(next(x for x in lab["tenants"] if x["name"] == tenant)["client_netns"])


def data_ip(lab: dict[str, Any], appliance: str, tenant: str) -> str:
    """``.200 + N`` in the tenant's ``hsm`` subnet for appliance ``hsmN``: one address per
    appliance, whichever provider database provisions it."""
    t = next(x for x in lab["tenants"] if x["name"] == tenant)
    subnet = next(
        s for v in t["vnets"] if v["name"] == "vnet1" for s in v["subnets"] if s["name"] == "hsm"
    )
    octets = subnet["cidr"].split("/")[0].split(".")
    return ".".join([*octets[:3], str(200 + int(appliance.removeprefix("hsm")))])


# -- the device, out of band ------------------------------------------------------------------


def console(appliance: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """A root command inside the appliance (the lab's out-of-band path), in-process."""
    proc = lab_mod.console(appliance, list(argv))
    if check and proc.returncode != 0:
        raise RigError(f"console {appliance} {argv}: {proc.stderr.decode()}")
    return proc


def restart_hsmd(appliance: str) -> None:
    """Kill the device daemon by its pid; the appliance's init restarts it (about 1 s).
    Clears its per-source back-off memory of failed logins."""

    def pids() -> list[int]:
        proc = console(appliance, "pgrep", "-f", "/usr/local/sbin/hsmd", check=False)
        return [int(p) for p in proc.stdout.split()]

    old = pids()
    if len(old) != 1:
        raise RigError(f"{appliance}: expected one hsmd, found {old}")
    console(appliance, "kill", str(old[0]))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = pids()
        if now and old[0] not in now:
            ready = console(appliance, "hsmsh", "-c", "help", check=False)
            if ready.returncode == 0:
                return
        time.sleep(0.1)
    raise RigError(f"hsmd on {appliance} did not come back")


def factory_reset(*appliances: str) -> None:
    """Back to factory state out of band, data port detached."""
    fabric = lab_mod.fabric()
    for appliance in appliances:
        console(appliance, "hsmsh", "-c", "sysconf factory-reset")
        fabric.detach(appliance)


# -- one appliance, provisioned -------------------------------------------------------------------


@dataclass
class Rig:
    """One appliance with its own provider configuration, provisioned to ``tenant``."""

    lab: dict[str, Any]
    appliance: str
    tenant: str
    directory: Path
    request_id: str = ""
    handoff: Path = field(default_factory=Path)

    @property
    def provider_conf(self) -> Path:
        return self.directory / "provider" / "provider.yaml"

    @property
    def netns(self) -> str:
        return client_netns(self.lab, self.tenant)

    @property
    def ip(self) -> str:
        return data_ip(self.lab, self.appliance, self.tenant)

    @property
    def mgmt_ip(self) -> str:
        return str(next(a for a in self.lab["appliances"] if a["id"] == self.appliance)["mgmt_ip"])

    @property
    def identity(self) -> Path:
        t = next(x for x in self.lab["tenants"] if x["name"] == self.tenant)
        return Path(t["identity"])

    def provision(self) -> Rig:
        """Factory state, then ``hsmctl provision --ip`` (ansible-runner, the real path)."""
        restart_hsmd(self.appliance)
        factory_reset(self.appliance)
        conf = provider_config(self.directory / "provider", [self.appliance])
        proc = subprocess.run(
            [HSMCTL, "--config", str(conf), "provision", "--tenant", self.tenant,
             "--vnet", "vnet1", "--subnet", "hsm", "--ip", self.ip, "--json"],
            capture_output=True, timeout=300, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RigError(f"{self.appliance}: hsmctl provision: {proc.stderr.decode()}")
        out = json.loads(proc.stdout)
        if out.get("appliance") != self.appliance:
            raise RigError(f"{self.appliance}: provisioned {out}")
        self.handoff = Path(out["handoff"])
        from hsmctl.provider.context import open_context

        ctx = open_context(str(self.provider_conf))
        try:
            alloc = ctx.store.allocation(self.appliance)
            if alloc is None:
                raise RigError(f"{self.appliance}: no allocation after provisioning")
            self.request_id = alloc.request_id
        finally:
            ctx.close()
        return self

    def reprovision(self) -> Path:
        """A fresh hand-off on the same allocation: fresh daemon, factory reset, then the
        provisioning steps (a new one-time password, a new signed bundle)."""
        from hsmctl.provider import provisioning

        restart_hsmd(self.appliance)
        factory_reset(self.appliance)
        result: dict[str, Any] = {}
        for step in provisioning.STEPS:
            result = provisioning.run_step(
                str(self.provider_conf), self.appliance, self.request_id, step.value
            )
        self.handoff = Path(result["handoff"])
        return self.handoff

    def tenant_conf(self, directory: Path) -> Path:
        return tenant_config(directory, self.lab, self.tenant)


def provision_all(rigs: Sequence[Rig]) -> None:
    """``hsmctl provision`` for several rigs at once (each its own provider database)."""
    errors: list[BaseException] = []

    def one(rig: Rig) -> None:
        try:
            rig.provision()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(r,)) for r in rigs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# -- the customer side ----------------------------------------------------------------------------


def takeover_cli(
    netns: str,
    tenant_conf: Path,
    handoff: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[bytes]:
    """``ip netns exec CLIENT hsmctl --config C takeover --handoff B ... --json``."""
    argv = ["ip", "netns", "exec", netns, HSMCTL, "--config", str(tenant_conf), "takeover",
            "--handoff", str(handoff), *extra, "--json"]  # fmt: skip
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(argv, capture_output=True, timeout=timeout, env=full_env, check=False)


def customer_state(tenant_conf: Path, appliance: str) -> Path:
    conf = yaml.safe_load(tenant_conf.read_text())
    return Path(conf["state_dir"]) / "appliances" / appliance


def escrowed(tenant_conf: Path, appliance: str, name: str) -> str | None:
    path = customer_state(tenant_conf, appliance) / "secrets" / name
    return path.read_text().removesuffix("\n") if path.exists() else None
