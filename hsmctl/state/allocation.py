"""Which free appliances and addresses a request gets: pure decisions over plain data.

:func:`hsmctl.inventory.check_placement` turns a CLI target into a
:class:`~hsmctl.inventory.Placement` (names resolved, subnet delegated, address and
stamp plausible). Inside its transaction the store reads a :class:`Pool`, these
functions choose, and :mod:`hsmctl.state.claim` claims the choice with guarded writes.
The choice lives here so anti-affinity and quotas are testable as a table; the guarantee
that no appliance or address is given twice stays in the database (engine isolation,
guarded updates, constraints), whatever is chosen.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from hsmctl.errors import ConflictError, UsageError
from hsmctl.inventory.model import Placement, is_reserved, usable_addresses

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True)
class FreeAppliance:
    """An available appliance, as allocation sees it."""

    id: str
    region: str
    stamp: str
    mgmt_ip: str


@dataclass(frozen=True)
class Pool:
    """What allocation decides on: the available appliances in the order to hand them
    out (the store reads them by id), and how many the tenant already holds per stamp
    and per region."""

    free: Sequence[FreeAppliance]
    held_by_stamp: Mapping[str, int] = field(default_factory=dict)
    held_by_region: Mapping[str, int] = field(default_factory=dict)


def check_request(request_id: str, p: Placement, count: int) -> None:
    """Refuse a malformed request before any transaction (a Placement may be built by
    hand, not by ``check_placement``)."""
    if not REQUEST_ID_RE.match(request_id):
        raise UsageError(
            f"request id {request_id!r} is not valid "
            "(up to 128 letters, digits, '.', '_', ':', '-')"
        )
    if count < 1:
        raise UsageError(f"--count must be at least 1, got {count}")
    if p.ip is not None:
        if count != 1:
            raise UsageError("--ip names one address; it cannot be used with --count above 1")
        if p.ip not in p.cidr or is_reserved(p.cidr, p.ip):
            raise UsageError(f"address {p.ip} is not a usable address of subnet {p.cidr}")


@dataclass
class _Tally:
    """The choice in progress: free appliances per stamp, and the tenant's holdings."""

    free: dict[str, list[FreeAppliance]]
    stamp_region: dict[str, str]
    held_stamp: Counter[str]
    held_region: Counter[str]
    spares: dict[str, int] = field(default_factory=dict)  # held back per stamp


def hold_back_spares(
    free: Mapping[str, Sequence[FreeAppliance]], spares: Mapping[str, int]
) -> tuple[dict[str, list[FreeAppliance]], dict[str, int]]:
    """Split each stamp's free appliances (in hand-out order) into those provisioning
    may take and the spares it holds back: the last ``spares[stamp]`` of them, so the
    first ones keep going out first. Returns (usable per stamp, held back per stamp)."""
    usable: dict[str, list[FreeAppliance]] = {}
    held: dict[str, int] = {}
    for stamp, items in free.items():
        keep = min(max(spares.get(stamp, 0), 0), len(items))
        usable[stamp] = list(items[: len(items) - keep])
        if keep:
            held[stamp] = keep
    return usable, held


def choose_appliances(pool: Pool, placement: Placement, count: int) -> list[FreeAppliance]:
    """``count`` appliances for ``placement``, or ConflictError saying why not.

    Only appliances in the placement's stamp and region (when set) qualify. Stamp
    anti-affinity: each pick goes to the stamp where the tenant holds the fewest, then
    the one with most free appliances, then by name; a stamp or region at its quota is
    skipped. Each stamp's spares (``placement.spares``) are held back: a request that
    only spares could serve is refused (exit 5) with how to use them. All or nothing:
    ``count`` picks or an error.
    """
    p = placement
    tally = _Tally({}, {}, Counter(pool.held_by_stamp), Counter(pool.held_by_region))
    for a in pool.free:
        if p.stamp not in (None, a.stamp) or p.region not in (None, a.region):
            continue
        tally.free.setdefault(a.stamp, []).append(a)
        tally.stamp_region[a.stamp] = a.region
    tally.free, tally.spares = hold_back_spares(tally.free, p.spares)
    chosen: list[FreeAppliance] = []
    for _ in range(count):
        options = [
            s
            for s, left in tally.free.items()
            if left
            and tally.held_stamp[s] < p.quota.per_stamp
            and tally.held_region[tally.stamp_region[s]] < p.quota.per_region
        ]
        if not options:
            raise _no_capacity(p, count, len(chosen), tally)
        best = min(options, key=lambda s: (tally.held_stamp[s], -len(tally.free[s]), s))
        chosen.append(tally.free[best].pop(0))
        tally.held_stamp[best] += 1
        tally.held_region[tally.stamp_region[best]] += 1
    return chosen


def _no_capacity(p: Placement, count: int, placed: int, tally: _Tally) -> ConflictError:
    scope = "".join(
        [f" in stamp {p.stamp}" if p.stamp else "", f" in region {p.region}" if p.region else ""]
    )
    free_total = sum(len(v) for v in tally.free.values()) + placed
    spares = sum(tally.spares.values())
    detail: dict[str, object] = {
        "tenant": p.tenant,
        "requested": count,
        "free": free_total,
        "held_by_stamp": dict(tally.held_stamp),
        "held_by_region": dict(tally.held_region),
        "quota": {"per_stamp": p.quota.per_stamp, "per_region": p.quota.per_region},
    }
    if spares:
        detail["spares_held_back"] = dict(tally.spares)
    if free_total < count and spares:
        held = ", ".join(f"stamp {s} holds back {n}" for s, n in sorted(tally.spares.items()))
        what = "only spares remain" if free_total == 0 else f"only {free_total} free appliance(s)"
        return ConflictError(
            f"{what}{scope} for {count} requested by tenant {p.tenant}: spares are held "
            f"back ({held}; the inventory's 'spares' per stamp); nothing was changed. "
            "To provision from the spares, rerun with --use-spares",
            detail=detail,
        )
    if free_total == 0:
        return ConflictError(
            f"no free appliance{scope} for tenant {p.tenant}; nothing was changed",
            detail=detail,
        )
    if free_total < count:
        return ConflictError(
            f"only {free_total} free appliance(s){scope} for {count} requested by tenant "
            f"{p.tenant}; nothing was changed",
            detail=detail,
        )
    blocked = []
    for stamp in sorted(tally.free):
        region = tally.stamp_region[stamp]
        if tally.held_region[region] >= p.quota.per_region:
            blocked.append(
                f"region {region} holds {tally.held_region[region]} of {p.quota.per_region}"
            )
        elif tally.held_stamp[stamp] >= p.quota.per_stamp:
            blocked.append(f"stamp {stamp} holds {tally.held_stamp[stamp]} of {p.quota.per_stamp}")
    return ConflictError(
        f"quota exceeded for tenant {p.tenant}{scope}: {'; '.join(sorted(set(blocked)))} "
        f"(limits: {p.quota.per_stamp} per stamp, {p.quota.per_region} per region); "
        "nothing was changed",
        detail=detail,
    )


def choose_addresses(
    placement: Placement, used: Mapping[str, str], count: int
) -> list[IPv4Address]:
    """The requested address, or the ``count`` lowest usable ones of the subnet that no
    appliance holds in the tenant's vnet (``used``: address → appliance)."""
    p = placement
    if p.ip is not None:
        owner = used.get(str(p.ip))
        if owner is not None:
            raise ConflictError(
                f"address {p.ip} in {p.tenant}/{p.vnet} is already assigned to {owner}; "
                "nothing was changed",
                detail={"ip": str(p.ip), "appliance": owner},
            )
        return [p.ip]
    picked = []
    for ip in usable_addresses(p.cidr):
        if str(ip) not in used:
            picked.append(ip)
            if len(picked) == count:
                return picked
    raise ConflictError(
        f"subnet {p.subnet} ({p.cidr}) of {p.tenant}/{p.vnet} has no free address for "
        f"{count} appliance(s); nothing was changed",
        detail={"subnet": p.subnet, "cidr": str(p.cidr)},
    )
