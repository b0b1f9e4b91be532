"""What a customer-side command needs: its configuration, identity, the provider's
public signing key, and the state directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hsmctl import config as config_mod
from hsmctl.customer.store import ApplianceDir
from hsmctl.errors import UsageError


@dataclass
class TenantContext:
    config: config_mod.Config
    identity: Path

    @property
    def state_dir(self) -> Path:
        return config_mod.ensure_state_dir(self.config)

    @property
    def provider_public_key(self) -> Path:
        path: Path = self.config.require("provider_public_key")
        return path

    @property
    def tenant(self) -> str | None:
        return self.config.tenant

    def appliance(self, appliance: str) -> ApplianceDir:
        return ApplianceDir(self.state_dir, appliance)


def load_tenant_config(config_path: str | None) -> config_mod.Config:
    """The tenant's configuration (exit 2 if there is none or it is another role's)."""
    return config_mod.load_for(
        config_path, "tenant", "in the lab: run inside the tenant's client namespace"
    )


def open_tenant_context(config_path: str | None, identity: str | None = None) -> TenantContext:
    config = load_tenant_config(config_path)
    if identity == "":
        # An empty --identity (an unset shell variable) must not quietly mean the config's.
        raise UsageError("--identity: an empty file name")
    ident = Path(identity) if identity is not None else config.require("identity")
    return TenantContext(config, ident)
