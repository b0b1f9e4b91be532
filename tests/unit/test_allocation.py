"""The allocation choice as a table: which appliances and addresses a request gets, or
why none. Pure: no database; the store's race tests (tests/store) prove the claim."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from hsmctl.errors import ConflictError, UsageError
from hsmctl.inventory.model import Placement, Quota
from hsmctl.state.allocation import (
    FreeAppliance,
    Pool,
    check_request,
    choose_addresses,
    choose_appliances,
)

pytestmark = pytest.mark.unit

# Region r1: stamps s1 (a1-a3) and s2 (b1-b3); region r2: stamp s3 (c1, c2).
FLEET = {"s1": ("r1", "a1 a2 a3"), "s2": ("r1", "b1 b2 b3"), "s3": ("r2", "c1 c2")}


def pool(
    taken: str = "", held: dict[str, int] | None = None, fleet: dict[str, Any] = FLEET
) -> Pool:
    """The free appliances of ``fleet`` minus ``taken`` (by id, as the store reads them);
    ``held``: the tenant's appliances per stamp."""
    free = sorted(
        (
            FreeAppliance(i, region, stamp, f"192.0.2.{n}")
            for n, (stamp, (region, ids)) in enumerate(fleet.items())
            for i in ids.split()
            if i not in taken.split()
        ),
        key=lambda a: a.id,
    )
    held = held or {}
    by_region: dict[str, int] = {}
    for stamp, n in held.items():
        region = fleet[stamp][0]
        by_region[region] = by_region.get(region, 0) + n
    return Pool(tuple(free), dict(held), by_region)


def place(
    stamp: str | None = None,
    region: str | None = None,
    quota: tuple[int, int] = (2, 4),
    ip: str | None = None,
    cidr: str = "10.0.1.0/24",
) -> Placement:
    return Placement(
        "t1",
        "v1",
        "hsm",
        IPv4Network(cidr),
        ip=IPv4Address(ip) if ip else None,
        stamp=stamp,
        region=region,
        quota=Quota(*quota),
    )


@dataclass(frozen=True)
class Case:
    name: str
    placement: Placement
    count: int
    pool: Pool = field(default_factory=pool)
    picks: str = ""  # the ids chosen, in order
    error: str = ""  # or: the ConflictError's message (a regex)


CASES = [
    # anti-affinity: one per stamp first, the emptier holding wins, ties by free count
    Case("one goes to the first stamp by name", place(), 1, picks="a1"),
    Case("three spread over three stamps", place(), 3, picks="a1 b1 c1"),
    Case("a region: spread over its stamps", place(region="r1"), 2, picks="a1 b1"),
    Case("the stamp with fewest held", place(), 1, pool(held={"s1": 1}), picks="b1"),
    Case("then the stamp with most free", place(), 1, pool("a1"), picks="b1"),
    Case("wraps round after each stamp has one", place(), 4, picks="a1 b1 c1 a2"),
    Case("another tenant's holdings", place(), 1, pool("a1 b1 c1"), picks="a2"),
    # --stamp and the vnet's region narrow the pool
    Case("--stamp picks only there", place(stamp="s2"), 2, picks="b1 b2"),
    Case("--stamp in a region", place(stamp="s3", region="r2"), 1, picks="c1"),
    Case(
        "--stamp outside the region",
        place(stamp="s3", region="r1"),
        1,
        error=r"^no free appliance in stamp s3 in region r1 for tenant t1; nothing",
    ),
    # --count: all or nothing
    Case("--count takes every free one", place(quota=(9, 9)), 8, picks="a1 b1 c1 a2 b2 c2 a3 b3"),
    Case(
        "--count above what is free",
        place(quota=(9, 9)),
        3,
        pool("a1 a2 a3 b1 b2 c1"),
        error=r"^only 2 free appliance\(s\) for 3 requested by tenant t1; nothing",
    ),
    # quotas: 2 per stamp, 4 per region by default
    Case(
        "stamp quota full",
        place(stamp="s1"),
        1,
        pool(held={"s1": 2}),
        error=r"quota exceeded for tenant t1 in stamp s1: stamp s1 holds 2 of 2 \(limits: 2 "
        r"per stamp, 4 per region\)",
    ),
    Case(
        "region quota full though spares are free",
        place(region="r1"),
        1,
        pool(held={"s1": 2, "s2": 2}),
        error=r"for tenant t1 in region r1: region r1 holds 4 of 4 \(",
    ),
    Case(
        "region r2 is a budget of its own", place(), 2, pool(held={"s1": 2, "s2": 2}), picks="c1 c2"
    ),
    Case(
        "the quota is reached during the request",
        place(region="r1"),
        3,
        pool(held={"s1": 1, "s2": 1}),
        error=r"region r1 holds 4 of 4 \(limits",
    ),
    Case("a stamp at quota is skipped", place(), 1, pool(held={"s1": 2}), picks="b1"),
    Case("configured quota: 1 per stamp", place(quota=(1, 2)), 2, picks="a1 b1"),
    Case(
        "configured quota: 1 per stamp, 2 per region",
        place(region="r1", quota=(1, 2)),
        3,
        error=r"quota exceeded .*: region r1 holds 2 of 2 \(limits: 1 per stamp, 2 per",
    ),
    # no capacity
    Case(
        "nothing free at all",
        place(),
        1,
        pool("a1 a2 a3 b1 b2 b3 c1 c2"),
        error=r"^no free appliance for tenant t1; nothing was changed$",
    ),
    Case(
        "nothing free in the stamp",
        place(stamp="s3"),
        1,
        pool("c1 c2"),
        error=r"^no free appliance in stamp s3 for tenant t1",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_choose_appliances(case: Case) -> None:
    if case.error:
        with pytest.raises(ConflictError, match=case.error) as err:
            choose_appliances(case.pool, case.placement, case.count)
        assert err.value.exit_code == 5
    else:
        got = choose_appliances(case.pool, case.placement, case.count)
        assert " ".join(a.id for a in got) == case.picks


def test_no_capacity_detail_counts_what_the_request_would_have_held() -> None:
    with pytest.raises(ConflictError) as err:
        choose_appliances(pool(held={"s1": 1, "s2": 1}), place(region="r1"), 3)
    assert err.value.detail == {
        "tenant": "t1",
        "requested": 3,
        "free": 6,
        "held_by_stamp": {"s1": 2, "s2": 2},
        "held_by_region": {"r1": 4},
        "quota": {"per_stamp": 2, "per_region": 4},
    }


def test_choice_leaves_the_pool_untouched() -> None:
    p = pool(held={"s1": 1})
    before = (tuple(p.free), dict(p.held_by_stamp), dict(p.held_by_region))
    choose_appliances(p, place(), 3)
    assert (tuple(p.free), dict(p.held_by_stamp), dict(p.held_by_region)) == before


ADDRESSES = [
    # (placement, addresses already held in the vnet, count, picks, or the error)
    (place(), {}, 1, "10.0.1.4", None),
    (place(), {}, 3, "10.0.1.4 10.0.1.5 10.0.1.6", None),
    (place(), {"10.0.1.4": "a1", "10.0.1.6": "b1"}, 2, "10.0.1.5 10.0.1.7", None),
    (place(ip="10.0.1.200"), {"10.0.1.4": "a1"}, 1, "10.0.1.200", None),
    (place(ip="10.0.1.200"), {"10.0.1.200": "a1"}, 1, "", r"10\.0\.1\.200 .* assigned to a1"),
    (place(cidr="10.0.2.0/29"), {}, 3, "10.0.2.4 10.0.2.5 10.0.2.6", None),
    (place(cidr="10.0.2.0/29"), {"10.0.2.5": "a1"}, 3, "", r"\(10\.0\.2\.0/29\) of t1/v1 has no"),
]


@pytest.mark.parametrize(("placement", "used", "count", "picks", "error"), ADDRESSES)
def test_choose_addresses(
    placement: Placement, used: dict[str, str], count: int, picks: str, error: str | None
) -> None:
    if error is None:
        got = choose_addresses(placement, used, count)
        assert " ".join(str(ip) for ip in got) == picks
    else:
        with pytest.raises(ConflictError, match=error):
            choose_addresses(placement, used, count)


@pytest.mark.parametrize(
    ("request_id", "placement", "count", "error"),
    [
        ("r1", place(), 1, None),
        ("r:1.a_b-c", place(ip="10.0.1.4"), 1, None),
        ("-r1", place(), 1, "request id '-r1' is not valid"),
        ("r" * 129, place(), 1, "is not valid"),
        ("r1", place(), 0, "--count must be at least 1, got 0"),
        ("r1", place(ip="10.0.1.4"), 2, "cannot be used with --count above 1"),
        ("r1", place(ip="10.0.1.3"), 1, "10.0.1.3 is not a usable address"),
        ("r1", place(ip="10.0.2.4"), 1, "10.0.2.4 is not a usable address"),
    ],
)
def test_check_request(
    request_id: str, placement: Placement, count: int, error: str | None
) -> None:
    if error is None:
        check_request(request_id, placement, count)
    else:
        with pytest.raises(UsageError, match=error):
            check_request(request_id, placement, count)
