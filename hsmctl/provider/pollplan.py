"""What a fleet poll (``hsmctl health``) will contact, settled before its heavy imports.

The configuration, the inventory, the appliances to poll and the TCP connections opened
ahead to them (:mod:`hsmctl.provider.ahead`) need only light modules; the SSH library, the
device facts and the state store (most of this host's fixed cost) are imported after
:func:`plan_poll` has returned, while the devices accept those connections. Every input
problem is found here, before any device is contacted: exit 2, nothing changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from hsmctl import config as config_mod
from hsmctl.errors import UsageError
from hsmctl.inventory.load import load_inventory
from hsmctl.inventory.model import Inventory
from hsmctl.provider.ahead import OpenAhead


@dataclass
class PollPlan:
    """Lifecycle: :func:`plan_poll` → given to :func:`hsmctl.provider.health.health` →
    :meth:`close` (closes the connections nobody used; idempotent; also a context
    manager)."""

    config: config_mod.Config
    inventory: Inventory
    targets: list[str]
    ahead: OpenAhead | None = None

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.close()

    def __enter__(self) -> PollPlan:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def plan_poll(
    config_path: str | None, appliances: Sequence[str] | None, *, open_ahead: bool = True
) -> PollPlan:
    """Load and check the provider's configuration and inventory, pick the targets (None:
    every appliance of the inventory) and, with ``open_ahead``, start connecting to them."""
    config = config_mod.load_for(config_path, "provider", "the lab writes one")
    inventory = load_inventory(config.require("inventory"))
    known = [a.id for a in inventory.appliances]
    if appliances is None:
        targets = sorted(known)
    else:
        unknown = [a for a in appliances if a not in known]
        if unknown:
            raise UsageError(
                f"{', '.join(map(str, inventory.sources))}: no appliance "
                f"{', '.join(repr(a) for a in unknown)} (appliances: {', '.join(known)})"
            )
        targets = list(appliances)
    # Configuration problems (no monitoring key) surface once, before any login.
    config.require("monitor_key")
    config.require("provider_key")
    ahead = None
    if open_ahead:
        ahead = OpenAhead({a.id: str(a.mgmt_ip) for a in inventory.appliances})
        ahead.start(targets)
    return PollPlan(config, inventory, targets, ahead)
