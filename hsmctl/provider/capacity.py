"""Fleet capacity (issue 15): per region and stamp, how many appliances there are, how
many provisioning may still hand out, how many spares are held back, and how many are
in each lifecycle state — from the inventory and the state store only, no device contact.

A stamp's spares are a count in its inventory entry (``spares: N``), not named
appliances: provisioning holds back that many of the stamp's *available* appliances
(:func:`hsmctl.state.allocation.hold_back_spares`) unless ``--use-spares``. So
``available`` here is what a plain ``hsmctl provision`` can still get, and ``spares`` is
what is held back now (fewer than configured once spares were used).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hsmctl.inventory.model import Inventory
from hsmctl.provider.context import open_context
from hsmctl.state.model import ApplianceState
from hsmctl.state.records import ApplianceRecord


@dataclass(frozen=True)
class StampCapacity:
    region: str
    stamp: str
    total: int
    available: int  # what provisioning may take without --use-spares
    spares: int  # available appliances held back now
    spares_configured: int
    provisioning: int
    provisioned: int
    customer_owned: int
    deprovisioning: int
    failed: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "stamp": self.stamp,
            "total": self.total,
            "available": self.available,
            "spares": self.spares,
            "spares_configured": self.spares_configured,
            "provisioning": self.provisioning,
            "provisioned": self.provisioned,
            "customer_owned": self.customer_owned,
            "deprovisioning": self.deprovisioning,
            "failed": self.failed,
        }


NUMBERS = (
    "total",
    "available",
    "spares",
    "spares_configured",
    "provisioning",
    "provisioned",
    "customer_owned",
    "deprovisioning",
    "failed",
)


@dataclass(frozen=True)
class CapacityReport:
    stamps: tuple[StampCapacity, ...]

    def as_dict(self) -> dict[str, Any]:
        rows = [s.as_dict() for s in self.stamps]
        return {
            "stamps": rows,
            "totals": {k: sum(int(r[k]) for r in rows) for k in NUMBERS},
        }


def compute(inventory: Inventory, records: Iterable[ApplianceRecord]) -> CapacityReport:
    """Pure: every stamp of the inventory, counted from the store's records of the
    inventory's appliances (an appliance only the store still knows is not capacity;
    ``fleet reconcile`` reports it)."""
    state = {r.id: ApplianceState(r.state) for r in records}
    out = []
    for st in inventory.stamps:
        counts = Counter(state.get(a.id, ApplianceState.AVAILABLE) for a in st.appliances)
        free = counts[ApplianceState.AVAILABLE]
        held = min(st.spares, free)
        out.append(
            StampCapacity(
                region=st.region,
                stamp=st.name,
                total=len(st.appliances),
                available=free - held,
                spares=held,
                spares_configured=st.spares,
                provisioning=counts[ApplianceState.PROVISIONING],
                provisioned=counts[ApplianceState.PROVISIONED],
                customer_owned=counts[ApplianceState.CUSTOMER_OWNED],
                deprovisioning=counts[ApplianceState.DEPROVISIONING],
                failed=counts[ApplianceState.FAILED],
            )
        )
    return CapacityReport(tuple(out))


def capacity(config_path: str | None) -> CapacityReport:
    ctx = open_context(config_path)
    try:
        return compute(ctx.inventory, ctx.store.list_appliances())
    finally:
        ctx.close()
