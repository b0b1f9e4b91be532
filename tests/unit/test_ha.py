"""HA groups, the pure parts (hsmctl/keys/ha.py): membership rules, the group name, and
the sync plan (objects per member -> copies to make) with its in-sync verdict."""

from __future__ import annotations

from typing import Any

import pytest

from hsmctl.errors import UsageError
from hsmctl.keys.domain import match_key
from hsmctl.keys.ha import check_members, check_name, in_sync, sync_plan


def entry(
    label: str, cls: str = "private-key", key_id: str = "01", pub: str = ""
) -> dict[str, Any]:
    e: dict[str, Any] = {"class": cls, "key_type": "ec", "label": label, "id": key_id}
    if pub:
        e["public_sha256"] = pub
    return e


@pytest.mark.parametrize("name", ["g", "g1", "prod-eu", "a" * 32])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "G1", "1g", "g-", "g_1", "a" * 33, "../g", "g 1", "g/1"])
def test_bad_names(name: str) -> None:
    with pytest.raises(UsageError):
        check_name(name)


def test_members_ok() -> None:
    assert check_members(["hsm72", "hsm73"]) == ["hsm72", "hsm73"]
    assert check_members(["hsm1", "hsm2", "hsm3"]) == ["hsm1", "hsm2", "hsm3"]


@pytest.mark.parametrize(
    "members",
    [
        [],
        ["hsm72"],
        ["hsm72", "hsm72"],
        ["hsm72", "hsm73", "hsm72"],
        ["hsm72", "../x"],
        ["hsm72", ""],
        ["hsm72", "-x"],
    ],
)
def test_members_refused(members: list[str]) -> None:
    with pytest.raises(UsageError) as caught:
        check_members(members)
    assert caught.value.exit_code == 2


def test_plan_copies_both_ways_from_the_first_holder() -> None:
    a = [entry("k1"), entry("k1", "public-key")]
    b = [entry("k2", "secret-key", "02")]
    present = {"m1": {match_key(e) for e in a}, "m2": {match_key(e) for e in b}}
    plan = sync_plan(present, {"m1": a, "m2": b})
    assert plan["m1"] == [("m2", b[0])]
    assert sorted(e["class"] for _, e in plan["m2"]) == ["private-key", "public-key"]
    assert all(src == "m1" for src, _ in plan["m2"])
    assert in_sync(present, {"m1": a, "m2": b}) == {"m1": False, "m2": False}


def test_plan_is_empty_when_in_sync_and_after_the_copies() -> None:
    a = [entry("k1"), entry("k2", "secret-key", "02")]
    present = {"m1": {match_key(e) for e in a}, "m2": {match_key(e) for e in a}}
    assert sync_plan(present, {"m1": a, "m2": list(a)}) == {"m1": [], "m2": []}
    assert in_sync(present, {"m1": a, "m2": a}) == {"m1": True, "m2": True}


def test_same_label_other_key_is_another_object() -> None:
    a = [entry("k", pub="aa")]
    b = [entry("k", pub="bb")]
    present = {"m1": {match_key(e) for e in a}, "m2": {match_key(e) for e in b}}
    plan = sync_plan(present, {"m1": a, "m2": b})
    assert plan == {"m1": [("m2", b[0])], "m2": [("m1", a[0])]}


def test_an_unreachable_member_gets_no_plan_and_offers_nothing() -> None:
    a = [entry("k1")]
    present = {"m1": {match_key(e) for e in a}, "m3": set()}
    plan = sync_plan(present, {"m1": a, "m3": []})
    assert set(plan) == {"m1", "m3"} and plan["m3"] == [("m1", a[0])] and plan["m1"] == []


def test_held_but_not_offered_is_not_required_elsewhere() -> None:
    # a key made outside the domain is held (present) but cannot be sent (not offered)
    outside = entry("old")
    present = {"m1": {match_key(outside)}, "m2": set()}
    assert sync_plan(present, {"m1": [], "m2": []}) == {"m1": [], "m2": []}
    assert in_sync(present, {"m1": [], "m2": []}) == {"m1": True, "m2": True}
