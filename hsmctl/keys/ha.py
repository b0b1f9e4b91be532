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
Each member is read in one session (every object described in one attribute read), each
receiving member written in one more; syncs of one group run one at a time (a flock), so
what the read found holds until the copies are made.

Destroying: ``hsmctl key destroy`` on a member of a group first journals a *tombstone*
per object it is about to destroy (the private or secret key and its public half) in
``STATE/ha-destroyed/NAME.json`` of every group the member is in (under a lock, atomic,
fsynced before the device is asked), keyed by the identity sync matches objects by
(class, type, label, id, public-key hash); a destroy the device refuses (no such key, a
policy refusal: nothing changed) takes its tombstones back. ``sync`` then destroys a
tombstoned object on every reachable member that still holds it, never copies it, and
strikes each member off the tombstone's ``pending`` list once it has been seen without
it; a tombstone whose list is empty is settled (kept as a record, no longer applied). A
sync interrupted anywhere reruns to completion: the rerun reads every member again, so
what is already gone is not destroyed twice and what is already there not copied
again. A key destroyed on a device by anything other than hsmctl (an application's own
C_DestroyObject, pkcs11-tool) leaves no tombstone: to sync it is a key the member
lacks, and the next sync copies it back from the others (docs/keys.md).

The membership rules and the sync plan are pure functions (tests/unit/test_ha.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
from collections.abc import Collection, Iterator, Mapping, Sequence
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
from hsmctl.keys.domain import KWP_ON_THE_WIRE, DomainToken, match_key
from hsmctl.keys.remote import translate

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
    present: Mapping[str, set[MatchKey]],
    offered: Mapping[str, Sequence[dict[str, Any]]],
    gone: Collection[MatchKey] = frozenset(),
) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """The copies to make (pure): for each member (of ``present``), every object some
    member offers (can send: public keys, keys of the domain) that it does not hold and
    that is not ``gone`` (tombstoned: destroyed through hsmctl), as (source member,
    entry), the first source in member order; members in order."""
    union: dict[MatchKey, tuple[str, dict[str, Any]]] = {}
    for member in sorted(offered):
        for entry in offered[member]:
            if match_key(entry) not in gone:
                union.setdefault(match_key(entry), (member, entry))
    plan: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for member in sorted(present):
        plan[member] = [union[k] for k in sorted(union) if k not in present[member]]
    return plan


def in_sync(
    present: Mapping[str, set[MatchKey]],
    offered: Mapping[str, Sequence[dict[str, Any]]],
    gone: Collection[MatchKey] = frozenset(),
) -> dict[str, bool]:
    """Whether each member holds every object the union of the members holds, except
    the tombstoned ones, and none of those (pure)."""
    plan = sync_plan(present, offered, gone)
    return {m: not copies and not (present[m] & set(gone)) for m, copies in plan.items()}


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


# --- the destroy journal (tombstones) ------------------------------------------------------

TOMBSTONE_FORMAT = "hsmctl-ha-destroyed/1"


def tombstone_path(state_dir: Path, name: str) -> Path:
    return state_dir / "ha-destroyed" / f"{check_name(name)}.json"


@contextlib.contextmanager
def _journal(state_dir: Path, name: str) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """The group's tombstones under an exclusive lock (flock on a lock file beside them);
    the caller rewrites them with :func:`_save` before leaving."""
    path = tombstone_path(state_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.parent / f".{name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path, _load_stones(path, name)
    finally:
        os.close(fd)


def _load_stones(path: Path, name: str) -> list[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IntegrityError(f"{path}: not a readable destroy journal ({exc})") from exc
    if not isinstance(doc, dict):
        raise IntegrityError(f"{path}: not a destroy journal hsmctl wrote")
    stones = doc.get("tombstones")
    if (
        doc.get("format") != TOMBSTONE_FORMAT
        or doc.get("group") != name
        or not isinstance(stones, list)
        or not all(_is_stone(t) for t in stones)
    ):
        raise IntegrityError(f"{path}: not a destroy journal hsmctl wrote")
    return list(stones)


def _is_stone(t: Any) -> bool:
    return (
        isinstance(t, dict)
        and isinstance(t.get("key"), list)
        and len(t["key"]) == 5
        and all(isinstance(k, str) for k in t["key"])
        and isinstance(t.get("pending"), list)
        and all(isinstance(m, str) for m in t["pending"])
    )


def _save(path: Path, name: str, stones: list[dict[str, Any]]) -> None:
    doc = {"format": TOMBSTONE_FORMAT, "group": name, "tombstones": stones}
    privatefiles.write_atomic(path, (json.dumps(doc, indent=1) + "\n").encode())


def active_tombstones(ctx: TenantContext, name: str) -> dict[MatchKey, list[str]]:
    """Tombstoned objects of group ``name`` with members still to be seen without them."""
    with _journal(ctx.state_dir, name) as (_path, stones):
        return {_key(t): list(t["pending"]) for t in stones if t["pending"]}


def _key(stone: dict[str, Any]) -> MatchKey:
    a, b, c, d, e = (str(x) for x in stone["key"])
    return (a, b, c, d, e)


def groups_of(ctx: TenantContext, appliance: str) -> list[dict[str, Any]]:
    """The HA groups in this state directory that have ``appliance`` as a member."""
    root = ctx.state_dir / "ha"
    if not root.is_dir():
        return []
    groups = []
    for path in sorted(root.glob("*.json")):
        name = path.stem
        if NAME.fullmatch(name):
            group = load_group(ctx, name)
            if appliance in group["members"]:
                groups.append(group)
    return groups


def record_destroy(
    ctx: TenantContext, appliance: str, entries: Sequence[dict[str, Any]]
) -> dict[str, dict[MatchKey, dict[str, Any] | None]]:
    """Journal a tombstone for each entry (a key object about to be destroyed on
    ``appliance``) in every group it is a member of, every member pending; written and
    fsynced before it returns. Returns what each replaced (for :func:`retract_destroy`)."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    replaced: dict[str, dict[MatchKey, dict[str, Any] | None]] = {}
    for group in groups_of(ctx, appliance):
        name = str(group["group"])
        with _journal(ctx.state_dir, name) as (path, stones):
            by_key = {_key(t): t for t in stones}
            before: dict[MatchKey, dict[str, Any] | None] = {}
            for entry in entries:
                key = match_key(entry)
                before[key] = by_key.get(key)
                by_key[key] = {
                    "key": list(key),
                    "class": entry["class"],
                    "label": entry["label"],
                    "id": entry["id"],
                    "destroyed_on": appliance,
                    "recorded": now,
                    "pending": list(group["members"]),
                }
            _save(path, name, list(by_key.values()))
        replaced[name] = before
    return replaced


def retract_destroy(
    ctx: TenantContext, replaced: Mapping[str, Mapping[MatchKey, dict[str, Any] | None]]
) -> None:
    """Undo :func:`record_destroy` (the device refused the destroy: nothing changed)."""
    for name, before in replaced.items():
        with _journal(ctx.state_dir, name) as (path, stones):
            kept = [t for t in stones if _key(t) not in before]
            kept += [t for t in before.values() if t is not None]
            _save(path, name, kept)


def _strike(ctx: TenantContext, name: str, seen: Mapping[str, Collection[MatchKey]]) -> None:
    """Each member in ``seen`` has been seen without those tombstoned objects: strike it
    off their pending lists (a list that empties settles the tombstone)."""
    if not any(seen.values()):
        return
    with _journal(ctx.state_dir, name) as (path, stones):
        for t in stones:
            key = _key(t)
            t["pending"] = [m for m in t["pending"] if key not in seen.get(m, ())]
        _save(path, name, stones)


@contextlib.contextmanager
def journaled_destroy(
    ctx: TenantContext, appliance: str, token: DomainToken, label: str
) -> Iterator[None]:
    """Around ``token.destroy(label)`` (``hsmctl key destroy``): when ``appliance`` is in
    an HA group, the objects it will destroy are tombstoned first; a destroy that raises
    UsageError (no such key, several, a policy refusal: nothing changed) retracts them."""
    if not groups_of(ctx, appliance):
        yield
        return
    replaced = record_destroy(ctx, appliance, _doomed(token, label))
    try:
        yield
    except UsageError:
        retract_destroy(ctx, replaced)
        raise


def _doomed(token: DomainToken, label: str) -> list[dict[str, Any]]:
    """What ``RemoteToken.destroy(label)`` removes, described: the one private or secret
    key labelled ``label`` and the public keys of that label and id (none when the label
    is missing or ambiguous: destroy refuses those)."""
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    try:
        keys = token._keys(label)
        if len(keys) != 1:
            return []
        cls = "private-key" if keys[0].object_class == ObjectClass.PRIVATE_KEY else "secret-key"
        doomed = [(cls, keys[0])]
        key_id = keys[0][Attribute.ID]
        for pub in token._session.get_objects(
            {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: label}
        ):
            if pub[Attribute.ID] == key_id:
                doomed.append(("public-key", pub))
        described = [token.describe(c, o) for c, o in doomed]
    except pkcs11.PKCS11Error as exc:
        raise translate(exc, token.appliance, "destroy") from exc
    return [e for e in described if e is not None]


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


class _Survey:
    """What one pass over the members found (see :func:`_survey`)."""

    def __init__(self) -> None:
        self.present: dict[str, set[MatchKey]] = {}
        self.offered: dict[str, list[dict[str, Any]]] = {}
        self.destroyed: dict[str, list[dict[str, str]]] = {}
        self.failed: dict[str, HsmctlError] = {}


def _brief(entry: Mapping[str, Any]) -> dict[str, str]:
    return {"label": str(entry["label"]), "id": str(entry["id"]), "class": str(entry["class"])}


def _scan(
    token: DomainToken, domain: Any, gone: Collection[MatchKey], sync: bool
) -> tuple[set[MatchKey], list[dict[str, Any]], list[dict[str, str]]]:
    """One pass over the member's token, one session: (match keys of what it holds, what
    it can send, what was destroyed). With ``sync``, tombstoned objects are destroyed and
    the objects that may leave are wrapped under the domain key (as backup does)."""
    import pkcs11
    from pkcs11 import Mechanism

    present: set[MatchKey] = set()
    offered: list[dict[str, Any]] = []
    destroyed: list[dict[str, str]] = []
    try:
        for cls, obj in token._objects():
            entry = token.describe(cls, obj)
            if entry is None:
                continue
            key = match_key(entry)
            if sync and key in gone:
                obj.destroy()
                destroyed.append(_brief(entry))
                continue
            present.add(key)
            if cls != "public-key":
                if not entry.pop("cloneable"):
                    continue  # made outside the domain: it cannot leave this device
                if sync:
                    blob = domain.wrap_key(obj, mechanism=Mechanism(KWP_ON_THE_WIRE))
                    entry["wrapped"] = bytes(blob).hex()
            offered.append(entry)
    except pkcs11.PKCS11Error as exc:
        raise translate(exc, token.appliance, "ha sync") from exc
    return present, offered, destroyed


def _survey(
    ctx: TenantContext, group: dict[str, Any], gone: Collection[MatchKey], sync: bool
) -> _Survey:
    from hsmctl.keys.backup import _token

    found = _Survey()
    domain = str(group["domain"])
    for member in group["members"]:
        try:
            _owned(ctx, member)
            if not _reachable(ctx, member):
                raise UnreachableError(f"{member}: its data port does not answer")
            with _token(ctx, member, None, None) as token:
                key = token.domain_key()
                if key is None or key[1] != domain:
                    raise IntegrityError(
                        f"{member}: its token is no longer in the group's cloning domain "
                        f"{domain[:16]}...; nothing copied to or from it"
                    )
                present, offered, destroyed = _scan(token, key[0], gone, sync)
            found.present[member], found.offered[member] = present, offered
            found.destroyed[member] = destroyed
        except HsmctlError as exc:
            found.failed[member] = exc
    return found


def status(ctx: TenantContext, name: str) -> dict[str, Any]:
    group = load_group(ctx, name)
    gone = set(active_tombstones(ctx, name))
    found = _survey(ctx, group, gone, sync=False)
    synced = in_sync(found.present, found.offered, gone)
    members = []
    for member in group["members"]:
        up = member in found.present
        members.append({
            "appliance": member,
            "reachable": up,
            "objects": len(found.present[member]) if up else None,
            "in_sync": synced.get(member, False),
        })  # fmt: skip
    report = {"group": name, "members": members}
    _raise_integrity(found.failed, report)
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
    """Destroy what was destroyed through hsmctl (tombstones), then copy what is missing;
    one session per member to read it (and destroy), one per member that receives."""
    group = load_group(ctx, name)
    with _sync_lock(ctx.state_dir, name):
        return _sync(ctx, name, group)


@contextlib.contextmanager
def _sync_lock(state_dir: Path, name: str) -> Iterator[None]:
    """One sync of a group at a time (flock, waits): what the survey found stays true
    until the copies are made, so none is made twice."""
    lock = tombstone_path(state_dir, name).with_name(f".{name}.sync.lock")
    lock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _sync(ctx: TenantContext, name: str, group: dict[str, Any]) -> dict[str, Any]:
    from hsmctl.keys.backup import _token

    gone = set(active_tombstones(ctx, name))
    found = _survey(ctx, group, gone, sync=True)
    # Each member read has been seen without every tombstoned object (destroyed now).
    _strike(ctx, name, {m: gone for m in found.present})
    present, failed = found.present, found.failed
    plan = sync_plan(present, found.offered, gone)
    copied: dict[str, list[dict[str, str]]] = {}
    for member, copies in plan.items():
        copied[member] = []
        if not copies:
            continue
        try:
            with _token(ctx, member, None, None) as token:
                key = token.domain_key()
                if key is None or key[1] != group["domain"]:
                    raise IntegrityError(f"{member}: left the group's cloning domain")
                for _source, entry in copies:
                    token.put(key[0], entry)
                    present[member].add(match_key(entry))
                    copied[member].append(_brief(entry))
        except HsmctlError as exc:
            failed[member] = exc
    members = []
    for member in group["members"]:
        members.append({
            "appliance": member,
            "reachable": member in present and member not in failed,
            "copied": copied.get(member, []),
            "destroyed": found.destroyed.get(member, []),
            "objects": len(present[member]) if member in present else None,
        })  # fmt: skip
    report = {
        "group": name,
        "members": members,
        "copied": sum(len(c) for c in copied.values()),
        "destroyed": sum(len(d) for d in found.destroyed.values()),
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
