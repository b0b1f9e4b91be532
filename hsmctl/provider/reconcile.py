"""Fleet reconciliation (issue 15): where the state store, the devices, the network fabric
and the inventory disagree, and the few disagreements that can be fixed from proof.

Shape (as :mod:`hsmctl.provider.health`): *observe* (I/O: each device's ``hsm show`` and
``network show`` read over the out-of-band console, which needs no account on the device
and works after a takeover; the fabric's view of its data port), *compare* (pure: store
rows, device facts and the inventory's tenants → a list of :class:`Drift`), *apply*
(I/O, ``--apply`` only: each fixable item under the appliance's lock, re-checked there,
journaled as ``reconcile``).

What ``--apply`` may change is deliberately small: the fabric (plug a data port back
where the allocation says, unplug a factory-state appliance the store calls available)
and the store (follow a device whose customer took it over). It never logs in to a
device and never sends it a command that changes anything, so a customer-owned device's
accounts, keys and secrets cannot be touched; the console reads it makes are in the
device's own activity log like every command. Everything else is reported with why it
needs a person: an orphan's zeroize, a device reset behind the store's back, a device
the store calls free that a customer owns.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from hsmctl.contract import OwnerState
from hsmctl.device import HSM_INFO, NETWORK
from hsmctl.errors import HsmctlError, most_severe
from hsmctl.progress import NullProgress, Progress
from hsmctl.provider.context import ProviderContext, open_context
from hsmctl.provider.drivers import Fabric, console_checked, fabric_for, out_of_band_for
from hsmctl.state.model import ApplianceState, Operation, StepStatus

MAX_PARALLEL = 8
S = ApplianceState


class DriftKind(enum.StrEnum):
    STATE = "state"  # the store's state and the device's owner state disagree
    ATTACHMENT = "attachment"  # the data port is not where the store says
    ADDRESS = "address"  # the device's data address is not the allocated one
    ORPHAN = "orphan"  # allocated to a tenant the inventory no longer has
    NOT_IN_INVENTORY = "not-in-inventory"  # the store holds an appliance the inventory dropped


class Fix(enum.StrEnum):
    """What ``--apply`` does for a fixable item."""

    ATTACH = "attach"  # plug the data port into the allocated subnet (unplug it first)
    DETACH = "detach"  # unplug an available, factory-state appliance
    MARK_CUSTOMER_OWNED = "mark-customer-owned"  # the store follows the device


@dataclass(frozen=True)
class Where:
    """A data port's place; all None: detached."""

    tenant: str | None = None
    vnet: str | None = None
    subnet: str | None = None

    def __str__(self) -> str:
        if self.tenant is None:
            return "detached"
        return f"{self.tenant}/{self.vnet}/{self.subnet}"


DETACHED = Where()


@dataclass(frozen=True)
class StoreView:
    """What the store says of one appliance."""

    appliance: str
    state: ApplianceState
    tenant: str | None = None
    data_ip: str | None = None
    attachment: Where | None = None  # the allocation's subnet, if allocated
    in_inventory: bool = True


@dataclass(frozen=True)
class DeviceFacts:
    """What the device and the fabric say; ``error`` set: they could not be read."""

    appliance: str
    owner_state: OwnerState | None = None
    address: str | None = None  # configured data address, A.B.C.D/N
    attachment: Where | None = None
    error: str | None = None
    exit_code: int = 0


@dataclass(frozen=True)
class Drift:
    kind: DriftKind
    appliance: str
    store: str | None
    device: str | None
    fixable: bool
    why: str
    fix: Fix | None = None
    target: Where | None = None  # ATTACH: where the port goes
    fixed: bool | None = None  # after --apply: whether the fix was made
    result: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind.value,
            "appliance": self.appliance,
            "store": self.store,
            "device": self.device,
            "fixable": self.fixable,
            "why": self.why,
            "fix": self.fix.value if self.fix else None,
        }
        if self.fixed is not None:
            out["fixed"] = self.fixed
            out["result"] = self.result
        return out


# -- compare (pure) --------------------------------------------------------------------------

# Which store states each device owner state is consistent with.
CONSISTENT: Mapping[OwnerState, frozenset[ApplianceState]] = {
    OwnerState.FACTORY: frozenset({S.AVAILABLE, S.PROVISIONING, S.FAILED, S.DEPROVISIONING}),
    OwnerState.PROVISIONED: frozenset({S.PROVISIONING, S.PROVISIONED, S.FAILED, S.DEPROVISIONING}),
    OwnerState.CUSTOMER_OWNED: frozenset({S.CUSTOMER_OWNED, S.FAILED, S.DEPROVISIONING}),
}
SETTLED = frozenset({S.PROVISIONED, S.CUSTOMER_OWNED})  # an allocation that should be live
# The store states in which each fix is still right (re-checked under the lock).
FIX_STATES: Mapping[Fix, frozenset[ApplianceState]] = {
    Fix.ATTACH: SETTLED,
    Fix.DETACH: frozenset({S.AVAILABLE}),
    Fix.MARK_CUSTOMER_OWNED: SETTLED,
}


def _state_why(state: ApplianceState, owner: OwnerState) -> tuple[bool, str]:
    if state is S.PROVISIONED and owner is OwnerState.CUSTOMER_OWNED:
        return True, (
            "the customer's first password change made the device customer-owned (the "
            "device proves it); the store follows the device, as health does"
        )
    if state is S.AVAILABLE and owner is OwnerState.CUSTOMER_OWNED:
        return False, (
            "a customer owns a device the store calls free: find out whose it is; it is "
            "never reset or handed out automatically"
        )
    if state is S.AVAILABLE:
        return False, (
            "the device holds a one-time admin credential no request in this store made: "
            "find the request (another store?) before deprovisioning it"
        )
    if owner is OwnerState.FACTORY:
        return False, (
            "the device was reset behind the store's back; the tenant's allocation stands "
            "until a person decides: hsmctl deprovision ID --yes --force --reason TEXT "
            "returns it to the pool"
        )
    return False, "the store and the device disagree on who owns it; a person must decide"


def compare(
    stores: Sequence[StoreView], facts: Mapping[str, DeviceFacts], tenants: Iterable[str]
) -> list[Drift]:
    """Every disagreement, appliance by appliance, with whether ``--apply`` may fix it."""
    known_tenants = frozenset(tenants)
    drift: list[Drift] = []
    for s in stores:
        a = s.appliance
        if not s.in_inventory:
            drift.append(
                Drift(
                    DriftKind.NOT_IN_INVENTORY,
                    a,
                    s.state.value,
                    None,
                    False,
                    "the store holds it but the inventory no longer lists it (no pinned "
                    "management keys, no device contact): put it back in the inventory, or "
                    "deprovision it before removing it",
                )
            )
            continue
        orphan = s.tenant is not None and s.tenant not in known_tenants
        if orphan:
            drift.append(
                Drift(
                    DriftKind.ORPHAN,
                    a,
                    s.tenant,
                    None,
                    False,
                    f"tenant {s.tenant} is no longer in the inventory; the appliance keeps "
                    "running (and billing). Deprovisioning zeroizes it, so a person decides: "
                    f"hsmctl deprovision {a} --yes --force --reason TEXT",
                )
            )
        f = facts.get(a)
        if f is None or f.error is not None:
            continue
        state_ok = True
        if f.owner_state is not None and s.state not in CONSISTENT[f.owner_state]:
            fixable, why = _state_why(s.state, f.owner_state)
            drift.append(
                Drift(
                    DriftKind.STATE,
                    a,
                    s.state.value,
                    f.owner_state.value,
                    fixable,
                    why,
                    Fix.MARK_CUSTOMER_OWNED if fixable else None,
                )
            )
            # The store follows the device: what is expected below is the fixed state.
            state_ok = fixable
        drift += _attachment(s, f, state_ok=state_ok, orphan=orphan)
        drift += _address(s, f)
    return drift


def _attachment(s: StoreView, f: DeviceFacts, *, state_ok: bool, orphan: bool) -> list[Drift]:
    if f.attachment is None:
        return []
    if s.state in SETTLED and s.attachment is not None:
        want = s.attachment
    elif s.state is S.AVAILABLE:
        want = DETACHED
    else:
        return []  # in flight or failed: the workflow's own rerun settles the port
    if f.attachment == want:
        return []
    if want == DETACHED:
        fixable = f.owner_state is OwnerState.FACTORY
        why = (
            "an available appliance in factory state must not sit in a tenant network; "
            "the fabric unplugs it"
            if fixable
            else "the device is not in factory state: settle its state drift first"
        )
        fix = Fix.DETACH
    elif orphan:
        fixable, why, fix = False, "its tenant is gone (orphan): nothing is re-plugged", Fix.ATTACH
    elif not state_ok:
        fixable, why, fix = False, "settle the state drift first", Fix.ATTACH
    else:
        fixable = True
        why = (
            "the allocation records the subnet and the device agrees it is the tenant's; "
            "the fabric plugs the data port back (no device login)"
        )
        fix = Fix.ATTACH
    return [
        Drift(
            DriftKind.ATTACHMENT,
            s.appliance,
            str(want),
            str(f.attachment),
            fixable,
            why,
            fix if fixable else None,
            target=want if fixable else None,
        )
    ]


def _address(s: StoreView, f: DeviceFacts) -> list[Drift]:
    if s.state not in SETTLED or s.data_ip is None:
        return []
    have = f.address.split("/")[0] if f.address else None
    if have == s.data_ip:
        return []
    why = (
        "after the takeover the device's network settings are the customer's"
        if s.state is S.CUSTOMER_OWNED or f.owner_state is OwnerState.CUSTOMER_OWNED
        else "reconcile changes no device setting: rerun the provisioning request "
        "(the network step sets the allocated address)"
    )
    return [Drift(DriftKind.ADDRESS, s.appliance, s.data_ip, have, False, why)]


# -- observe (I/O) ---------------------------------------------------------------------------


def store_views(ctx: ProviderContext) -> list[StoreView]:
    allocs = {a.appliance: a for a in ctx.store.allocations()}
    known = {a.id for a in ctx.inventory.appliances}
    out = []
    for r in ctx.store.list_appliances():
        al = allocs.get(r.id)
        out.append(
            StoreView(
                appliance=r.id,
                state=r.state,
                tenant=al.tenant if al else r.tenant,
                data_ip=al.ip if al else r.data_ip,
                attachment=Where(al.tenant, al.vnet, al.subnet) if al else None,
                in_inventory=r.id in known,
            )
        )
    return out


def _where(place: Any) -> Where:
    return Where(place.tenant, place.vnet, place.subnet) if place.tenant else DETACHED


def observe(ctx: ProviderContext, fabric: Fabric, appliance: str) -> DeviceFacts:
    """The device's owner state and data address, read over the out-of-band console (no
    account, works after a takeover), and where the fabric has its data port."""
    oob = out_of_band_for(ctx.config.out_of_band)
    try:
        info = HSM_INFO.process(
            console_checked(oob, appliance, HSM_INFO.command), appliance, via="console reply"
        )
        net = NETWORK.process(
            console_checked(oob, appliance, NETWORK.command), appliance, via="console reply"
        )
        place = _where(fabric.attachment(appliance))
    except HsmctlError as exc:
        return DeviceFacts(appliance, error=exc.message, exit_code=exc.exit_code)
    return DeviceFacts(appliance, info.owner_state, net.address, place)


# -- apply (I/O) -----------------------------------------------------------------------------


def apply_one(ctx: ProviderContext, fabric: Fabric, d: Drift, view: StoreView) -> Drift:
    """Make one fix under the appliance's lock, after checking that the store still says
    what the comparison saw; journaled either way."""
    try:
        with ctx.store.appliance_lock(d.appliance, lock_dir=ctx.state_dir / "locks"):
            now = ctx.store.get_appliance(d.appliance).state
            if d.fix is None or now not in FIX_STATES[d.fix]:
                result, ok = f"skipped: the store changed meanwhile ({now.value})", False
            elif d.fix is Fix.MARK_CUSTOMER_OWNED:
                if now is S.PROVISIONED:
                    ctx.store.set_state(d.appliance, S.CUSTOMER_OWNED, expect={S.PROVISIONED})
                result, ok = "store: customer-owned", True
            elif d.fix is Fix.ATTACH and d.target is not None and d.target.tenant:
                if _where(fabric.attachment(d.appliance)) not in (DETACHED, d.target):
                    fabric.detach(d.appliance)
                fabric.attach(
                    d.appliance, d.target.tenant, str(d.target.vnet), str(d.target.subnet)
                )
                after = _where(fabric.attachment(d.appliance))
                ok = after == d.target
                result = f"attached to {after}"
            elif d.fix is Fix.DETACH:
                fabric.detach(d.appliance)
                after = _where(fabric.attachment(d.appliance))
                ok = after == DETACHED
                result = str(after)
            else:
                result, ok = "skipped: no target", False
    except HsmctlError as exc:
        result, ok = f"failed: {exc.message}", False
    ctx.store.record_step(
        Operation.RECONCILE,
        d.kind.value,
        StepStatus.OK if ok else StepStatus.FAILED,
        appliance=d.appliance,
        detail={
            "fix": d.fix.value if d.fix else None,
            "store": d.store,
            "device": d.device,
            "why": d.why,
            "result": result,
        },
    )
    return replace(d, fixed=ok, result=result)


# -- the command -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReconcileReport:
    drift: tuple[Drift, ...]
    errors: tuple[DeviceFacts, ...]
    checked: int
    applied: bool

    @property
    def exit_code(self) -> int:
        """0 with drift reported (drift is the answer, not a failure); a device that
        could not be read counts as its error (4 unreachable, 1 failed); a fix that was
        attempted and failed, 1."""
        failed_fix = any(d.fixed is False for d in self.drift if d.fixable)
        return most_severe([*(e.exit_code for e in self.errors), 1 if failed_fix else 0])

    def as_dict(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "applied": self.applied,
            "drift": [d.as_dict() for d in self.drift],
            "errors": [{"appliance": e.appliance, "error": e.error} for e in self.errors],
        }


def reconcile(
    config_path: str | None,
    *,
    apply: bool = False,
    progress: Progress | None = None,
    observer: Callable[[ProviderContext, Fabric, str], DeviceFacts] = observe,
    fabric: Fabric | None = None,
) -> ReconcileReport:
    """Observe every appliance the store and the inventory share, compare, and with
    ``apply`` fix what is fixable. ``observer`` and ``fabric`` default to the
    configuration's drivers (tests inject their own)."""
    progress = progress or NullProgress()
    ctx = open_context(config_path)
    try:
        views = store_views(ctx)
        fabric = fabric or fabric_for(ctx.config.fabric)
        targets = [v.appliance for v in views if v.in_inventory]
        with ThreadPoolExecutor(max_workers=max(1, min(MAX_PARALLEL, len(targets)))) as pool:
            facts = {f.appliance: f for f in pool.map(lambda a: observer(ctx, fabric, a), targets)}
        for f in facts.values():
            progress.step(
                f"{f.appliance}: {f.error}"
                if f.error
                else f"{f.appliance}: owner={f.owner_state.value if f.owner_state else None} "
                f"port={f.attachment} address={f.address}"
            )
        drift = compare(views, facts, (t.name for t in ctx.inventory.tenants))
        if apply:
            by_id = {v.appliance: v for v in views}
            # The store first: an attachment fix may depend on the state the store follows.
            order = sorted(drift, key=lambda d: d.fix is not Fix.MARK_CUSTOMER_OWNED)
            done = []
            for d in order:
                if d.fixable:
                    d = apply_one(ctx, fabric, d, by_id[d.appliance])
                    progress.step(f"{d.appliance}: {d.kind.value}: {d.result}")
                done.append(d)
            drift = sorted(done, key=lambda d: (d.appliance, list(DriftKind).index(d.kind)))
        errors = tuple(f for f in facts.values() if f.error is not None)
        return ReconcileReport(tuple(drift), errors, len(targets), apply)
    finally:
        ctx.close()
