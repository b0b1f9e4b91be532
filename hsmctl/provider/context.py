"""What a provider-side operation needs: configuration, inventory, state store, and a
way to open pinned management sessions."""

from __future__ import annotations

import importlib.util
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from hsmctl import config as config_mod
from hsmctl.errors import ConfigError
from hsmctl.inventory.load import load_inventory
from hsmctl.inventory.model import Inventory
from hsmctl.provider.sessions import SessionPool
from hsmctl.ssh import DeviceConnection, PinnedHostKeys
from hsmctl.state.store import Store


@dataclass
class ProviderContext:
    """Lifecycle: :func:`open_context` → use → :meth:`close` (closes the store)."""

    config: config_mod.Config
    sessions: SessionPool | None = None
    """The run's management connections (:mod:`hsmctl.provider.sessions`), when the
    context serves a step of ``hsmctl provision``; None: a connection per session."""

    @cached_property
    def inventory(self) -> Inventory:
        return load_inventory(self.config.require("inventory"))

    @cached_property
    def store(self) -> Store:
        if not self.config.database_url:
            # SQLite's directory: a state_dir that cannot be one is an exit 2, not a
            # driver error from deep inside the store.
            config_mod.ensure_state_dir(self.config)
        else:
            require_driver(self.config.database_url)
        store = Store.for_config(self.config)
        store.sync_inventory(self.inventory)
        return store

    @property
    def state_dir(self) -> Path:
        return config_mod.ensure_state_dir(self.config)

    @property
    def signing_key(self) -> Path:
        return self.config.signing_key or self.state_dir / "signing_key.pem"

    def mgmt_pins(self, appliance: str) -> PinnedHostKeys:
        inv = self.inventory.appliance(appliance)
        return PinnedHostKeys(inv.mgmt_host_keys)

    def provider_session(self, appliance: str) -> DeviceConnection:
        """A management session as ``provider`` (not yet connected)."""
        inv = self.inventory.appliance(appliance)
        return DeviceConnection(
            str(inv.mgmt_ip),
            username="provider",
            pinned=self.mgmt_pins(appliance),
            key=self.config.require("provider_key"),
        )

    def management(self, appliance: str) -> AbstractContextManager[DeviceConnection]:
        """``with ctx.management(appliance) as conn:`` a connected session as
        ``provider``: the run's pooled connection when the context has a pool (kept open
        after the block), otherwise a connection of its own (closed after the block)."""
        if self.sessions is None:
            return self.provider_session(appliance)
        return self.sessions.lease(appliance, lambda: self.provider_session(appliance))

    def monitor_session(self, appliance: str) -> DeviceConnection:
        inv = self.inventory.appliance(appliance)
        return DeviceConnection(
            str(inv.mgmt_ip),
            username="monitor",
            pinned=self.mgmt_pins(appliance),
            key=self.config.require("monitor_key"),
        )

    def monitor_public_key(self) -> str:
        path = Path(str(self.config.require("monitor_key")) + ".pub")
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"monitoring public key {path}: {exc.strerror}") from exc

    def close(self) -> None:
        if "store" in self.__dict__:
            self.store.close()


def context_with(
    config: config_mod.Config, inventory: Inventory, sessions: SessionPool | None = None
) -> ProviderContext:
    """A context over an already loaded configuration and inventory (both only read):
    the steps of one ``hsmctl provision`` run share the run's, instead of each parsing
    the inventory file again, and its management connections (``sessions``). Its store
    is its own, as :func:`open_context`'s."""
    ctx = ProviderContext(config, sessions)
    ctx.__dict__["inventory"] = inventory  # the cached_property's slot
    return ctx


def open_context(config_path: str | None) -> ProviderContext:
    config = config_mod.load_for(config_path, "provider", "the lab writes one")
    return ProviderContext(config)


def require_driver(database_url: str) -> None:
    """PostgreSQL's driver is the optional extra ``hsmctl[postgres]`` (SQLite needs
    nothing): without it, a ``postgresql`` URL is a configuration error that says what to
    install, not an import error from deep inside SQLAlchemy. The URL is never quoted (it
    may hold a password)."""
    if not database_url.split("://", 1)[0].startswith("postgresql"):
        return
    try:
        found = importlib.util.find_spec("psycopg") is not None
    except ImportError:
        found = False
    if not found:
        raise ConfigError(
            "database_url names a PostgreSQL database, and its driver (psycopg) is not "
            "installed: pip install 'hsmctl[postgres]'"
        )
