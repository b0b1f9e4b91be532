"""HA groups, the pure parts (hsmctl/keys/ha.py): membership rules, the group name, and
the sync plan (objects per member -> copies to make) with its in-sync verdict, and the
destroy journal (tombstones in the state directory)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hsmctl.errors import IntegrityError, UsageError
from hsmctl.keys.domain import match_key
from hsmctl.keys.ha import (
    GROUP_FORMAT,
    _strike,
    active_tombstones,
    check_members,
    check_name,
    groups_of,
    in_sync,
    record_destroy,
    retract_destroy,
    sync_plan,
    tombstone_path,
)


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


def test_tombstoned_objects_are_not_copied_and_their_holders_are_not_in_sync() -> None:
    k1, k2 = entry("k1"), entry("k2", "secret-key", "02")
    gone = {match_key(k1)}
    present = {"m1": {match_key(k2)}, "m2": {match_key(k1), match_key(k2)}}
    offered = {"m1": [k2], "m2": [k1, k2]}
    assert sync_plan(present, offered, gone) == {"m1": [], "m2": []}
    assert in_sync(present, offered, gone) == {"m1": True, "m2": False}
    # without the tombstone m2's key would be copied back to m1
    assert sync_plan(present, offered) == {"m1": [("m2", k1)], "m2": []}


def _group(tmp_path: Path, name: str, members: list[str]) -> SimpleNamespace:
    ctx = SimpleNamespace(state_dir=tmp_path, tenant="tenant1")
    (tmp_path / "ha").mkdir(exist_ok=True)
    doc = {"format": GROUP_FORMAT, "group": name, "members": members, "domain": "d" * 64,
           "tenant": "tenant1", "created": "2026-01-01T00:00:00Z"}  # fmt: skip
    (tmp_path / "ha" / f"{name}.json").write_text(json.dumps(doc))
    return ctx


def test_destroy_journal_records_in_every_group_of_the_member_and_settles(
    tmp_path: Path,
) -> None:
    ctx: Any = _group(tmp_path, "g1", ["m1", "m2"])
    _group(tmp_path, "g2", ["m1", "m3"])
    _group(tmp_path, "g3", ["m2", "m3"])
    doomed = [entry("k"), entry("k", "public-key", pub="aa")]
    replaced = record_destroy(ctx, "m1", doomed)
    assert sorted(replaced) == ["g1", "g2"]
    assert not tombstone_path(tmp_path, "g3").exists()
    path = tombstone_path(tmp_path, "g1")
    assert path.stat().st_mode & 0o777 == 0o600
    stones = active_tombstones(ctx, "g1")
    assert stones == {match_key(e): ["m1", "m2"] for e in doomed}
    # a sync that read m2 (and destroyed there) strikes m2 only; then m1: settled
    _strike(ctx, "g1", {"m2": set(stones)})
    assert active_tombstones(ctx, "g1") == {match_key(e): ["m1"] for e in doomed}
    _strike(ctx, "g1", {"m1": set(stones)})
    assert active_tombstones(ctx, "g1") == {}
    doc = json.loads(path.read_text())
    assert len(doc["tombstones"]) == 2 and all(t["pending"] == [] for t in doc["tombstones"])
    assert {t["destroyed_on"] for t in doc["tombstones"]} == {"m1"}


def test_a_refused_destroy_takes_its_tombstones_back(tmp_path: Path) -> None:
    ctx: Any = _group(tmp_path, "g1", ["m1", "m2"])
    first = record_destroy(ctx, "m2", [entry("old")])
    _strike(ctx, "g1", {"m1": {match_key(entry("old"))}})
    before = tombstone_path(tmp_path, "g1").read_bytes()
    replaced = record_destroy(ctx, "m1", [entry("k"), entry("old")])
    assert set(active_tombstones(ctx, "g1")) == {match_key(entry("k")), match_key(entry("old"))}
    retract_destroy(ctx, replaced)
    assert json.loads(tombstone_path(tmp_path, "g1").read_bytes()) == json.loads(before)
    assert first["g1"] == {match_key(entry("old")): None}


def test_a_member_in_no_group_journals_nothing(tmp_path: Path) -> None:
    ctx: Any = _group(tmp_path, "g1", ["m1", "m2"])
    assert groups_of(ctx, "m9") == [] and record_destroy(ctx, "m9", [entry("k")]) == {}
    assert not (tmp_path / "ha-destroyed" / "g1.json").exists()


def test_a_damaged_destroy_journal_is_an_integrity_error(tmp_path: Path) -> None:
    ctx: Any = _group(tmp_path, "g1", ["m1", "m2"])
    path = tombstone_path(tmp_path, "g1")
    path.parent.mkdir()
    path.write_text('{"format": "hsmctl-ha-destroyed/1", "group": "g1", "tombstones": [1]}')
    with pytest.raises(IntegrityError):
        active_tombstones(ctx, "g1")
    with pytest.raises(IntegrityError):
        record_destroy(ctx, "m1", [entry("k")])
