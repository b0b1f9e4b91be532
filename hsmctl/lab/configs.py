"""What the lab writes for hsmctl to use it: the provider's and the tenants' keys, the
inventory, the provider's host config and each customer VM's config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hsmctl import config as config_mod
from hsmctl.errors import ConflictError
from hsmctl.lab import netns, workdir
from hsmctl.lab.appliances import host_key_lines
from hsmctl.lab.plan import LabPlan, TenantPlan
from hsmctl.lab.workdir import write_private


def ssh_keygen(path: Path, kind: str, comment: str) -> None:
    if path.exists():
        return
    args = ["ssh-keygen", "-q", "-N", "", "-C", comment, "-f", str(path), "-t", kind]
    if kind == "ecdsa":
        args += ["-b", "256"]
    netns.run(*args)


def make_keys(plan: LabPlan) -> None:
    """The provider's login and signing keys, each tenant's identity and state directory."""
    provider_dir = workdir.LAB_DIR / "provider"
    provider_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ssh_keygen(provider_dir / "provider_key", "ed25519", "hsmctl-lab-provider")
    ssh_keygen(provider_dir / "monitor_key", "ed25519", "hsmctl-lab-monitor")
    from hsmctl.handoff.identity import ensure_provider_signing_key

    ensure_provider_signing_key(provider_dir)
    for t in plan.tenants:
        tdir = workdir.LAB_DIR / "tenants" / t.name
        (tdir / "state").mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(tdir, 0o700)
        ssh_keygen(tdir / "identity", "ecdsa", f"{t.name}-identity")


def vnets(tenant: TenantPlan) -> list[dict[str, Any]]:
    """A tenant's networks as the inventory and ``lab status`` both spell them."""
    return [
        {
            "name": v.name,
            "cidr": str(v.cidr),
            "subnets": [
                {"name": s.name, "cidr": str(s.cidr), "delegated": s.delegated} for s in v.subnets
            ],
        }
        for v in tenant.vnets
    ]


def describe(plan: LabPlan) -> dict[str, Any]:
    """``lab status --json`` (SPEC §5) for a lab of this plan, whichever driver runs it."""
    return {
        "provider_key": str(workdir.LAB_DIR / "provider" / "provider_key"),
        "state_dir": str(workdir.LAB_DIR / "provider" / "state"),
        "appliances": [
            {"id": a.id, "stamp": a.stamp, "mgmt_ip": str(a.mgmt_ip)} for a in plan.appliances
        ],
        "tenants": [
            {
                "name": t.name,
                "client_netns": t.client_netns,
                "client_ip": str(t.client_ip),
                "identity": str(workdir.LAB_DIR / "tenants" / t.name / "identity"),
                "state_dir": str(workdir.LAB_DIR / "tenants" / t.name / "state"),
                "vnets": vnets(t),
            }
            for t in plan.tenants
        ],
    }


def write_configs(plan: LabPlan, *, driver: str = "lab") -> None:
    """The provider's known_hosts, inventory and host config (its drivers: ``lab`` or
    ``vagrant``); each tenant VM's config."""
    provider_dir = workdir.LAB_DIR / "provider"
    known = []
    for a in plan.appliances:
        for line in host_key_lines(a.id, "mgmt"):
            kind, blob = line.split()[:2]
            known.append(f"{a.mgmt_ip} {kind} {blob}")
    write_private(provider_dir / "known_hosts", "\n".join(known) + "\n", 0o644)
    inventory = inventory_yaml(plan)
    write_private(provider_dir / "inventory.yaml", inventory, 0o644)
    workdir.HOST_CONFIG.parent.mkdir(parents=True, exist_ok=True)
    if workdir.foreign_host_config():
        raise ConflictError(
            f"{workdir.HOST_CONFIG} exists and was not written by the lab; not touching it"
        )
    workdir.HOST_CONFIG.write_text(
        workdir.MARKER
        + config_mod.dump(
            {
                "role": "provider",
                "state_dir": provider_dir / "state",
                "inventory": provider_dir / "inventory.yaml",
                "provider_key": provider_dir / "provider_key",
                "monitor_key": provider_dir / "monitor_key",
                "signing_key": provider_dir / "signing_key.pem",
                "fabric": driver,
                "out_of_band": driver,
            }
        )
    )
    for t in plan.tenants:
        tdir = workdir.LAB_DIR / "tenants" / t.name
        etc = workdir.NETNS_ETC / t.client_netns / "hsmctl"
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hsmctl.yaml").write_text(
            workdir.MARKER
            + config_mod.dump(
                {
                    "role": "tenant",
                    "tenant": t.name,
                    "state_dir": tdir / "state",
                    "identity": tdir / "identity",
                    "provider_public_key": provider_dir / "signing_key.pub.pem",
                }
            )
        )


def inventory_yaml(plan: LabPlan) -> str:
    """The lab's fleet and tenants as an inventory file (``inventory/load`` reads it)."""
    import yaml

    fleet = {
        "regions": [
            {
                "name": "lab",
                "stamps": [
                    {
                        "name": stamp,
                        "appliances": [
                            {
                                "id": a.id,
                                "serial": a.serial,
                                "model": "hsmctl-softhsm2",
                                "mgmt_ip": str(a.mgmt_ip),
                                "mgmt_host_keys": host_key_lines(a.id, "mgmt"),
                            }
                            for a in plan.appliances
                            if a.stamp == stamp
                        ],
                    }
                    for stamp in sorted({a.stamp for a in plan.appliances})
                ],
            }
        ],
        "tenants": [
            {
                "name": t.name,
                "identity_public_key": (workdir.LAB_DIR / "tenants" / t.name / "identity.pub")
                .read_text()
                .strip(),
                "vnets": vnets(t),
            }
            for t in plan.tenants
        ],
    }
    return "# The lab's inventory, written by hsmctl lab up.\n" + yaml.safe_dump(
        fleet, sort_keys=False
    )
