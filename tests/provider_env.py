"""A provider environment on disk for tests that need no lab: an inventory, a provider
configuration and a SQLite state store, all under one directory.

Nothing here can reach a device: management addresses are on loopback, appliance ids
are not the lab's, and the out-of-band and fabric drivers are names no driver answers
to, so a test that got further than it should fails with a configuration error instead
of touching a real appliance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsmctl.handoff import TenantIdentity
from hsmctl.state.store import DB_FILE, Store


def _host_key() -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


@dataclass
class ProviderEnv:
    root: Path
    inventory: Path
    config: Path
    state_dir: Path
    identities: dict[str, Path]

    def store(self) -> Store:
        self.state_dir.mkdir(mode=0o700, exist_ok=True)
        return Store.open(self.state_dir / DB_FILE)

    def snapshot(self) -> dict[str, list[dict[str, object]]]:
        with self.store() as s:
            return s.snapshot()

    def write_config(self, name: str, **overrides: object) -> Path:
        conf = yaml.safe_load(self.config.read_text())
        conf.update(overrides)
        path = self.root / name
        path.write_text(yaml.safe_dump(conf))
        return path


def make_env(root: Path) -> ProviderEnv:
    """Two regions (r1: stamps s1, s2; r2: stamp s3), appliances unit01..unit04, tenants
    t1 (vnet v1 in r1: subnets hsm delegated, default not) and t2; the store synced."""
    root.mkdir(parents=True, exist_ok=True)
    identities = {}
    for tenant in ("t1", "t2"):
        path = root / f"{tenant}-identity"
        TenantIdentity.create(path, comment=f"{tenant}-identity")
        identities[tenant] = path

    def appliance(n: int) -> dict[str, object]:
        return {
            "id": f"unit{n:02d}",
            "serial": f"UNIT{n:04d}",
            "model": "unit-test",
            "mgmt_ip": f"127.0.0.{10 + n}",
            "mgmt_host_keys": [_host_key()],
        }

    inv = {
        "version": 1,
        "regions": [
            {
                "name": "r1",
                "stamps": [
                    {"name": "s1", "appliances": [appliance(1), appliance(2)]},
                    {"name": "s2", "appliances": [appliance(3)]},
                ],
            },
            {"name": "r2", "stamps": [{"name": "s3", "appliances": [appliance(4)]}]},
        ],
        "tenants": [
            {
                "name": "t1",
                "identity_public_key": TenantIdentity.load(identities["t1"]).public_key_line,
                "vnets": [
                    {
                        "name": "v1",
                        "region": "r1",
                        "cidr": "10.10.0.0/16",
                        "subnets": [
                            {"name": "hsm", "cidr": "10.10.1.0/24", "delegated": True},
                            {"name": "default", "cidr": "10.10.2.0/24", "delegated": False},
                        ],
                    }
                ],
            },
            {
                "name": "t2",
                "identity_public_key": TenantIdentity.load(identities["t2"]).public_key_line,
                "vnets": [
                    {
                        "name": "v1",
                        "cidr": "10.20.0.0/16",
                        "subnets": [{"name": "hsm", "cidr": "10.20.1.0/24", "delegated": True}],
                    }
                ],
            },
        ],
    }
    inventory = root / "inventory.yaml"
    inventory.write_text(yaml.safe_dump(inv, sort_keys=False))
    state_dir = root / "state"
    config = root / "provider.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "role": "provider",
                "inventory": str(inventory),
                "state_dir": str(state_dir),
                "provider_key": str(root / "no-provider-key"),
                "monitor_key": str(root / "no-monitor-key"),
                "signing_key": str(root / "no-signing-key.pem"),
                "fabric": "none-in-unit-tests",
                "out_of_band": "none-in-unit-tests",
            }
        )
    )
    env = ProviderEnv(root, inventory, config, state_dir, identities)
    from hsmctl.inventory import load_inventory

    with env.store() as store:
        store.sync_inventory(load_inventory(inventory))
    return env
