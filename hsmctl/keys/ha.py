"""HA groups on the customer's side (SPEC §12): ``hsmctl ha create|status|sync``.

A group is two or more appliances this tenant owns (taken over from this state
directory, their signed receipts verify with this tenant's identity and name this
tenant) that share one cloning domain (the ``domain`` fingerprint of each device's
``hsm show``). It is kept in the state directory as ``ha/NAME.json`` (atomic, 0600)::

    {"group", "members": [ID...], "domain", "tenant", "created"}

``sync`` reads every reachable member through hsmctl's own crypto-officer kit
(:class:`~hsmctl.keys.domain.DomainToken`, as backup does): each key object that may
leave (public keys; private and secret keys made in the domain, wrapped on the device
under the domain key), then adds to every member what it lacks (as restore does: matched
by class, type, label, id and public-key hash, unwrapped under the domain key on the
target). No plaintext key leaves a device. A member that does not answer is reported
(exit 4 for the run) and the others are still synced; it gets its keys on the next sync.

Destroying: hsmctl journals no key destruction yet (``hsmctl key destroy`` destroys on
one device and records it nowhere), so ``sync`` destroys nothing: a key destroyed on one
member comes back from another at the next sync. Destroy it on every member.

The membership rules and the sync plan are pure functions (tests/unit/test_ha.py).
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hsmctl import privatefiles
from hsmctl.customer.context import TenantContext
from hsmctl.customer.store import ApplianceDir
from hsmctl.errors import (
    ConflictError,
    HsmctlError,
    IntegrityError,
    PartialFailure,
    UnreachableError,
    UsageError,
)
from hsmctl.keys.domain import match_key

GROUP_FORMAT = "hsmctl-ha-group/1"
NAME = re.compile(r"[a-z][a-z0-9-]{0,30}[a-z0-9]|[a-z]")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PROBE_TIMEOUT = 3.0  # seconds for the TCP probe of a member's data port

MatchKey = tuple[str, str, str, str, str]


# --- pure -------------------------------------------------------------------------------


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise UsageError(
            f"group name {name[:40]!r}: 1 to 32 characters from a-z 0-9 -, a letter first, "
            "not ending with '-'"
        )
    return name


def check_members(members: Sequence[str]) -> list[str]:
    """The member ids as given, once each (UsageError: fewer than two, a duplicate, a
    malformed id). Pure."""
    for m in members:
        if not _ID.fullmatch(m):
            raise UsageError(f"not an appliance id: {m[:40]!r}; nothing changed")
    dups = sorted({m for m in members if list(members).count(m) > 1})
    if dups:
        raise UsageError(f"{', '.join(dups)}: named more than once; nothing changed")
    if len(members) < 2:
        raise UsageError("an HA group needs two or more appliances; nothing changed")
    return list(members)


def sync_plan(
    present: Mapping[str, set[MatchKey]], offered: Mapping[str, Sequence[dict[str, Any]]]
) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """The copies to make (pure): for each member (of ``present``), every object some
    member offers (can send: public keys, keys of the domain) that it does not hold, as
    (source member, entry), the first source in member order; members in order."""
    union: dict[MatchKey, tuple[str, dict[str, Any]]] = {}
    for member in sorted(offered):
        for entry in offered[member]:
            union.setdefault(match_key(entry), (member, entry))
    plan: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for member in sorted(present):
        plan[member] = [union[k] for k in sorted(union) if k not in present[member]]
    return plan


def in_sync(
    present: Mapping[str, set[MatchKey]], offered: Mapping[str, Sequence[dict[str, Any]]]
) -> dict[str, bool]:
    """Whether each member holds every object the union of the members holds (pure)."""
    return {m: not copies for m, copies in sync_plan(present, offered).items()}


# --- the group file ---------------------------------------------------------------------


def group_path(state_dir: Path, name: str) -> Path:
    return state_dir / "ha" / f"{check_name(name)}.json"


def load_group(ctx: TenantContext, name: str) -> dict[str, Any]:
    path = group_path(ctx.state_dir, name)
    try:
        doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no HA group {name!r} in {ctx.state_dir} (hsmctl ha create)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IntegrityError(f"{path}: not a readable HA group file ({exc})") from exc
    members = doc.get("members")
    if (
        doc.get("format") != GROUP_FORMAT
        or doc.get("group") != name
        or not isinstance(members, list)
        or not all(isinstance(m, str) and _ID.fullmatch(m) for m in members)
    ):
        raise IntegrityError(f"{path}: not an HA group file hsmctl wrote")
    return doc


# --- membership -------------------------------------------------------------------------


def _owned(ctx: TenantContext, appliance: str) -> Any:
    """The member as an :class:`Appliance` once this tenant's ownership is shown: exit 2
    unknown here, exit 3 taken over by another tenant (receipt), exit 5 unfinished."""
    from hsmctl.clients.workflow import Appliance
    from hsmctl.takeover.receipt import RECEIPT, verify_receipt

    state = ApplianceDir.taken_over(ctx.state_dir, appliance)
    if state is None:
        raise UsageError(
            f"{appliance}: unknown here (not taken over from {ctx.state_dir}); nothing changed"
        )
    receipt = state.dir / RECEIPT
    if not receipt.is_file():
        raise ConflictError(f"{appliance}: the takeover is not finished (no receipt)")
    try:
        verify_receipt(receipt, ctx.identity)
        tenant = json.loads(receipt.read_text(encoding="utf-8")).get("tenant")
    except IntegrityError as exc:
        raise IntegrityError(
            f"{appliance}: its takeover receipt is not this tenant's ({exc.message}); "
            "not a member for this tenant; nothing changed"
        ) from exc
    if ctx.tenant is not None and tenant != ctx.tenant:
        raise IntegrityError(
            f"{appliance}: taken over by tenant {str(tenant)[:40]!r}, not {ctx.tenant!r}; "
            "nothing changed"
        )
    return Appliance(ctx, appliance)


def _domain_of(target: Any) -> str | None:
    with target.connect() as conn:
        shown = target.reply(conn, "hsm show")
    domain = shown.get("domain")
    return str(domain) if domain else None


def create(ctx: TenantContext, name: str, members: Sequence[str]) -> dict[str, Any]:
    check_name(name)
    wanted = check_members(members)
    path = group_path(ctx.state_dir, name)
    if path.exists():
        existing = load_group(ctx, name)
        if sorted(existing["members"]) != sorted(wanted):
            raise ConflictError(
                f"HA group {name!r} exists with members {', '.join(existing['members'])}; "
                "nothing changed"
            )
        return {**_public(existing), "created": False}
    owned = [_owned(ctx, m) for m in wanted]  # every member checked before any is asked
    domains = {a.id: _domain_of(a) for a in owned}
    outside = [m for m, d in domains.items() if d is None]
    if outside:
        raise IntegrityError(
            f"{', '.join(outside)}: in no cloning domain (hsmctl domain set); nothing changed"
        )
    if len(set(domains.values())) != 1:
        listed = ", ".join(f"{m} {str(d)[:16]}..." for m, d in domains.items())
        raise IntegrityError(f"the members are in different cloning domains ({listed}); "
                             "nothing changed")  # fmt: skip
    doc = {
        "format": GROUP_FORMAT,
        "group": name,
        "members": wanted,
        "domain": domains[wanted[0]],
        "tenant": ctx.tenant,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        privatefiles.write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode(),
                                  exclusive=True)  # fmt: skip
    except FileExistsError:  # created meanwhile by another run: same rules
        return create(ctx, name, members)
    return {**_public(doc), "created": True}


def _public(doc: dict[str, Any]) -> dict[str, Any]:
    return {"group": doc["group"], "members": list(doc["members"]), "domain": doc["domain"]}


# --- reading and writing the members' tokens ----------------------------------------------


def _reachable(ctx: TenantContext, appliance: str) -> bool:
    """A TCP connect to the member's data port (the kit's ssh would wait 10 s)."""
    pins = ApplianceDir(ctx.state_dir, appliance).pins()
    address = (str(pins.get("data_ip")), int(pins.get("data_port") or 22))
    try:
        with socket.create_connection(address, timeout=PROBE_TIMEOUT):
            return True
    except OSError:
        return False


def _read(ctx: TenantContext, appliance: str, domain: str) -> tuple[set[MatchKey], list[Any]]:
    """(match keys of every object on the member, the objects it can send, wrapped)."""
    from hsmctl.keys.backup import _token

    with _token(ctx, appliance, None, None) as token:
        found = token.domain_key()
        if found is None or found[1] != domain:
            raise IntegrityError(
                f"{appliance}: its token is no longer in the group's cloning domain "
                f"{domain[:16]}...; nothing copied to or from it"
            )
        kept, _skipped = token.export(found[0])
        present = token.present()
    return present, kept


def _survey(
    ctx: TenantContext, group: dict[str, Any]
) -> tuple[dict[str, set[MatchKey]], dict[str, list[Any]], dict[str, HsmctlError]]:
    present: dict[str, set[MatchKey]] = {}
    offered: dict[str, list[Any]] = {}
    failed: dict[str, HsmctlError] = {}
    for member in group["members"]:
        try:
            _owned(ctx, member)
            if not _reachable(ctx, member):
                raise UnreachableError(f"{member}: its data port does not answer")
            present[member], offered[member] = _read(ctx, member, str(group["domain"]))
        except HsmctlError as exc:
            failed[member] = exc
    return present, offered, failed


def status(ctx: TenantContext, name: str) -> dict[str, Any]:
    group = load_group(ctx, name)
    present, offered, failed = _survey(ctx, group)
    synced = in_sync(present, offered)
    members = []
    for member in group["members"]:
        up = member in present
        members.append({
            "appliance": member,
            "reachable": up,
            "objects": len(present[member]) if up else None,
            "in_sync": synced.get(member, False),
        })  # fmt: skip
    report = {"group": name, "members": members}
    _raise_integrity(failed, report)
    return report


def _raise_integrity(failed: Mapping[str, HsmctlError], report: dict[str, Any]) -> None:
    """A member that is not the tenant's or left the domain fails the run (exit 3)."""
    bad = {m: e for m, e in failed.items() if not isinstance(e, UnreachableError)}
    if bad:
        raise PartialFailure(
            "; ".join(e.message for e in bad.values()),
            results={m: e.exit_code for m, e in failed.items()},
            detail=report,
        )


def sync(ctx: TenantContext, name: str) -> dict[str, Any]:
    from hsmctl.keys.backup import _token

    group = load_group(ctx, name)
    present, offered, failed = _survey(ctx, group)
    plan = sync_plan(present, offered)
    copied: dict[str, list[dict[str, str]]] = {}
    for member, copies in plan.items():
        copied[member] = []
        if not copies:
            continue
        try:
            with _token(ctx, member, None, None) as token:
                found = token.domain_key()
                if found is None or found[1] != group["domain"]:
                    raise IntegrityError(f"{member}: left the group's cloning domain")
                now = token.present()  # another run may have added some meanwhile
                for _source, entry in copies:
                    if match_key(entry) in now:
                        continue
                    token.put(found[0], entry)
                    now.add(match_key(entry))
                    copied[member].append(
                        {"label": entry["label"], "id": entry["id"], "class": entry["class"]}
                    )
                present[member] = now
        except HsmctlError as exc:
            failed[member] = exc
    members = []
    for member in group["members"]:
        members.append({
            "appliance": member,
            "reachable": member in present and member not in failed,
            "copied": copied.get(member, []),
            "objects": len(present[member]) if member in present else None,
        })  # fmt: skip
    report = {
        "group": name,
        "members": members,
        "copied": sum(len(c) for c in copied.values()),
        "destroyed": 0,
    }
    _raise_integrity(failed, report)
    if failed:
        raise PartialFailure(
            "; ".join(e.message for e in failed.values())
            + " (the reachable members were synced; run hsmctl ha sync again later)",
            results={m: failed[m].exit_code if m in failed else 0 for m in group["members"]},
            detail=report,
        )
    return report
