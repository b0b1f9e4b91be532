"""Provisioning (SPEC §6, issue 4): allocate in the store, then run the collection's
``provision.yml`` (hsmctl.fleet, shipped in this package) through ansible-runner; each
of its tasks is one step here.

The workflow is a list of steps (plain data); each step is idempotent, so a request that
was interrupted anywhere is finished by running it again with the same ``--request-id``:
the store returns the same allocation and the steps redo only what is missing. The
one-time password is made inside :func:`step_handoff`, installed on the device and
encrypted to the tenant in the bundle within the same call; the provider keeps no copy.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from hsmctl import contract, steps
from hsmctl.config import Config
from hsmctl.contract import OwnerState
from hsmctl.device import AUDIT_KEY, HOST_KEYS, HSM_INFO, NETWORK, HsmInfo, Switch
from hsmctl.errors import ConflictError, HsmctlError, UsageError, most_severe
from hsmctl.handoff import make_bundle, write_bundle
from hsmctl.inventory.load import check_placement
from hsmctl.inventory.model import Inventory
from hsmctl.progress import NullProgress, Progress
from hsmctl.provider.context import ProviderContext, context_with, open_context
from hsmctl.provider.drivers import fabric_for
from hsmctl.provider.journal import StoreJournal
from hsmctl.provider.sessions import SessionPool
from hsmctl.runner import adapter
from hsmctl.secret import generate_password
from hsmctl.state.engine import Database
from hsmctl.state.model import (
    ApplianceState,
    Interface,
    Operation,
    RequestStatus,
    StepStatus,
)
from hsmctl.state.records import Allocation
from hsmctl.state.store import Store, database_target

OTP_VALIDITY = timedelta(hours=contract.OTP_VALID_HOURS)


class ProvisionStep(enum.StrEnum):
    VERIFY = "verify"
    ATTACH = "attach"
    NETWORK = "network"
    MONITOR = "monitor"
    HANDOFF = "handoff"


STEPS: tuple[ProvisionStep, ...] = tuple(ProvisionStep)
PLAYBOOK = "provision.yml"
SERVED_TAG = "hsmctl_served"
"""The tag of provision.yml's one task that runs the five steps (``step: all``):
``hsmctl provision`` runs only it, one task per appliance instead of five (Ansible's cost
is per task and host: a worker process, the main process's scheduling and events); each
step is still its own served, journaled step. Plain ansible-playbook / AWX runs skip it
(``never``) and run the five tasks."""


@dataclass(frozen=True)
class Provisioned:
    appliance: str
    ip: str
    handoff: str

    def as_dict(self) -> dict[str, str]:
        return {"appliance": self.appliance, "ip": self.ip, "handoff": self.handoff}


def _allocation(ctx: ProviderContext, appliance: str, request_id: str) -> Allocation:
    alloc = ctx.store.allocation(appliance)
    if alloc is None or alloc.request_id != request_id:
        raise ConflictError(f"{appliance} is not allocated to request {request_id}")
    return alloc


def _gateway(ctx: ProviderContext, alloc: Allocation) -> tuple[ipaddress.IPv4Network, str]:
    vnet = ctx.inventory.tenant(alloc.tenant).vnet(alloc.vnet)
    subnet = vnet.subnet(alloc.subnet) if vnet else None
    if subnet is None:
        raise UsageError(f"{alloc.tenant}/{alloc.vnet}/{alloc.subnet} left the inventory")
    # Azure's rule: .1 of every subnet is the virtual network's gateway.
    return subnet.cidr, str(subnet.cidr.network_address + 1)


def handoff_file(ctx: ProviderContext, alloc: Allocation) -> Path:
    """Where the request's bundle is (or will be) written; nothing is created here."""
    return ctx.state_dir / "handoff" / alloc.tenant / f"{alloc.appliance}-{alloc.request_id}.json"


def handoff_path(ctx: ProviderContext, alloc: Allocation) -> Path:
    path = handoff_file(ctx, alloc)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


class Readings:
    """``hsm show`` as the ``verify`` step of this run read it, per appliance: the
    ``monitor`` and ``handoff`` steps of the same run use it instead of asking the device
    again where that is sound (see each step; each ``hsm show`` costs the device a
    command, ~20 ms of CPU, and this host a round trip). One per ``hsmctl provision`` run
    (:func:`serve_steps`), never shared across runs; plain ``ansible-playbook``/AWX runs
    (a process per step) have none and read the device in every step, as before.
    Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, HsmInfo] = {}

    def put(self, appliance: str, info: HsmInfo) -> None:
        with self._lock:
            self._seen[appliance] = info

    def get(self, appliance: str) -> HsmInfo | None:
        with self._lock:
            return self._seen.get(appliance)


@dataclass(frozen=True)
class StepOptions:
    """How a step runs: ``check`` (report what would change, change nothing, journal
    nothing), ``reissue_otp`` (make a new one-time password even when the appliance
    already holds one and its bundle exists) and ``readings`` (the run's
    :class:`Readings`, when the run serves its steps)."""

    check: bool = False
    reissue_otp: bool = False
    readings: Readings | None = None


class HandoffAction(enum.Enum):
    KEEP = "keep"  # the device holds the one-time password of this request's hand-off
    ISSUE = "issue"


def decide_handoff(owner: OwnerState, handed_off: bool, reissue: bool) -> HandoffAction:
    """Never re-issue a one-time password a tenant may already hold, unless told to.

    ``handed_off``: the journal holds this request's hand-off as done (its bundle may be
    on another orchestrator host: the journal, not a local file, is what all hosts share).
    A device that holds no one-time password (factory state) or a hand-off that never
    finished (the password set, the bundle not journaled) is issued (again)."""
    if reissue or owner is not OwnerState.PROVISIONED or not handed_off:
        return HandoffAction.ISSUE
    return HandoffAction.KEEP


def _journaled_ok(ctx: ProviderContext, alloc: Allocation, step: ProvisionStep) -> bool:
    return _last_ok(ctx, alloc, step) is not None


def _last_ok(ctx: ProviderContext, alloc: Allocation, step: ProvisionStep) -> dict[str, Any] | None:
    """The detail of the last ``ok`` entry of ``step`` for this request, if any."""
    found: dict[str, Any] | None = None
    for e in ctx.store.journal(
        appliance=alloc.appliance, request_id=alloc.request_id, operation=Operation.PROVISION
    ):
        if e.step == step.value and e.status is StepStatus.OK:
            found = dict(e.detail)
    return found


def _diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {"before": before, "after": after}


def step_verify(ctx: ProviderContext, alloc: Allocation, opts: StepOptions) -> dict[str, Any]:
    with ctx.management(alloc.appliance) as conn:
        info = HSM_INFO.on(conn, alloc.appliance)
    if info.id != alloc.appliance:
        raise ConflictError(f"{alloc.appliance}: the device says it is {info.id!r}")
    if info.owner_state is OwnerState.CUSTOMER_OWNED:
        raise ConflictError(f"{alloc.appliance} is customer-owned; it must be deprovisioned")
    if opts.readings is not None:
        opts.readings.put(alloc.appliance, info)
    return {"changed": False, "owner_state": info.owner_state.value}


def step_attach(ctx: ProviderContext, alloc: Allocation, opts: StepOptions) -> dict[str, Any]:
    fabric = fabric_for(ctx.config.fabric)
    want = f"{alloc.tenant}/{alloc.vnet}/{alloc.subnet}"
    now = fabric.attachment(alloc.appliance)
    before = f"{now.tenant}/{now.vnet}/{now.subnet}" if now.tenant else None
    changed = before != want
    if changed and not opts.check:
        fabric.attach(alloc.appliance, alloc.tenant, alloc.vnet, alloc.subnet)
    return {
        "changed": changed,
        "attached": want,
        "diff": _diff({"attached": before}, {"attached": want}),
    }


def step_network(ctx: ProviderContext, alloc: Allocation, opts: StepOptions) -> dict[str, Any]:
    cidr, gateway = _gateway(ctx, alloc)
    want = {"address": f"{alloc.ip}/{cidr.prefixlen}", "gateway": gateway}
    with ctx.management(alloc.appliance) as conn:
        now = NETWORK.on(conn, alloc.appliance)
        before = {"address": now.address, "gateway": now.gateway}
        changed = before != want or not now.is_live(want["address"])
        if changed and not opts.check:
            conn.run(f"network set --ip {want['address']} --gateway {gateway}")
    return {"changed": changed, **want, "diff": _diff(before, want)}


def step_monitor(ctx: ProviderContext, alloc: Allocation, opts: StepOptions) -> dict[str, Any]:
    """The device shows whether ``monitor`` is enabled, not which key it holds: the key is
    the provider's when this request installed it (journaled) and the account is still
    enabled; otherwise it is installed again.

    In a served run the ``monitor`` switch is taken from ``verify``'s reading of the same
    run (:class:`Readings`): the steps between (``attach``: the fabric; ``network``: the
    data address) do not touch the account, and nothing else on the provider's side
    disables it (provisioning only enables it; a customer cannot log in before the
    hand-off, which comes after this step). A reading that says enabled when the device
    no longer is would need the device reset under the running request, which undoes the
    earlier steps' work just the same and is not what this step guards against; a rerun
    of the request reads the device again. Without a reading (plain ansible-playbook,
    AWX, a run that began after ``verify``) the device is asked."""
    ours = _journaled_ok(ctx, alloc, ProvisionStep.MONITOR)
    seen = opts.readings.get(alloc.appliance) if opts.readings is not None else None
    with ctx.management(alloc.appliance) as conn:
        info = seen if seen is not None else HSM_INFO.on(conn, alloc.appliance)
        before = {
            "monitor": info.monitor.value,
            "key": "provider" if ours and info.monitor is Switch.ENABLED else "not the provider's",
        }
        want = {"monitor": Switch.ENABLED.value, "key": "provider"}
        changed = before != want
        if changed and not opts.check:
            # One exec for both (the device pays one session): the account is enabled
            # only once its key is the provider's.
            conn.run_batch(
                [("user credential set monitor", [ctx.monitor_public_key()]),
                 ("user enable monitor", [])]
            )  # fmt: skip
            if seen is not None and opts.readings is not None:
                opts.readings.put(
                    alloc.appliance, dataclasses.replace(seen, monitor=Switch.ENABLED)
                )
    return {"changed": changed, "diff": _diff(before, want)}


def _handed_over(ctx: ProviderContext, alloc: Allocation) -> None:
    """The hand-off is the last step: the appliance is ``provisioned`` once its bundle is
    written, whoever runs the playbook (``hsmctl provision``, AWX, plain
    ansible-playbook). Only from ``provisioning``: a retry of a failed request goes
    through ``hsmctl provision``, which says so first."""
    if ctx.store.get_appliance(alloc.appliance).state == ApplianceState.PROVISIONING:
        ctx.store.set_state(alloc.appliance, ApplianceState.PROVISIONED)


def step_handoff(ctx: ProviderContext, alloc: Allocation, opts: StepOptions) -> dict[str, Any]:
    # One management session for the whole step (the device logs and checkpoints every
    # session; served steps share one for the run), its first reply kept for the serial.
    with ctx.management(alloc.appliance) as conn:
        done = _last_ok(ctx, alloc, ProvisionStep.HANDOFF)
        # The rule: never re-issue a password a tenant may hold. That is decided by the
        # journal (read now, under the appliance's lock) together with the device's
        # owner state; the device's state matters only when the journal holds this
        # request's hand-off as done (KEEP or, for a reset device, ISSUE), and then it is
        # read now, never taken from an earlier step. When the journal holds no finished
        # hand-off the action is ISSUE whatever the device says (no tenant holds a
        # password of this request; a password set by an interrupted hand-off is
        # replaced: decide_handoff), so verify's reading of this run (Readings) serves for
        # what is left: the serial (fixed at manufacturing) and `reissued` (whether the
        # device held a password when verify read it).
        seen = opts.readings.get(alloc.appliance) if opts.readings is not None else None
        info = seen if done is None and seen is not None else HSM_INFO.on(conn, alloc.appliance)
        owner = info.owner_state
        action = decide_handoff(owner, done is not None, opts.reissue_otp)
        if action is HandoffAction.KEEP and done is not None:
            if not opts.check:
                _handed_over(ctx, alloc)  # a run cut between the bundle and the state
            return {"changed": False, "handoff": str(done.get("handoff", "")), "reissued": False}
        reissued = owner is OwnerState.PROVISIONED
        if opts.check:
            return {
                "changed": True,
                "handoff": str(handoff_file(ctx, alloc)),
                "reissued": reissued,
            }
        tenant = ctx.inventory.tenant(alloc.tenant)
        tenant_key = tenant.identity_public_key.line
        otp = generate_password()
        # One exec (one device session) for the password and the two keys the bundle
        # carries, read after it; the keys are read only if the password was set.
        _, keys_reply, audit_reply = conn.run_batch(
            [
                (f"user otp set --expires-hours {contract.OTP_VALID_HOURS}", [tenant_key, otp]),
                (HOST_KEYS.command, []),
                (AUDIT_KEY.command, []),
            ]
        )
        hostkeys = HOST_KEYS.process(keys_reply.stdout, alloc.appliance)
        audit = AUDIT_KEY.process(audit_reply.stdout, alloc.appliance)
    data_keys = list(hostkeys.active_keys)
    ctx.store.pin_host_keys(alloc.appliance, Interface.DATA, data_keys)
    bundle = make_bundle(
        appliance=alloc.appliance,
        serial=info.serial or alloc.appliance,
        tenant=alloc.tenant,
        data_ip=alloc.ip,
        data_host_keys=data_keys,
        audit_public_key=audit.initial_public_key,
        request_id=alloc.request_id,
        otp=otp,
        tenant_public_key_line=tenant_key,
        provider_signing_key_path=ctx.signing_key,
        validity=OTP_VALIDITY,
        mgmt_ip=alloc.mgmt_ip,
    )
    path = write_bundle(handoff_path(ctx, alloc), bundle)
    _handed_over(ctx, alloc)
    return {
        "changed": True,
        "handoff": str(path),
        "reissued": reissued,
        "data_host_keys": data_keys,
    }


_STEPS = {
    ProvisionStep.VERIFY: step_verify,
    ProvisionStep.ATTACH: step_attach,
    ProvisionStep.NETWORK: step_network,
    ProvisionStep.MONITOR: step_monitor,
    ProvisionStep.HANDOFF: step_handoff,
}


def _call(
    ctx: ProviderContext,
    appliance: str,
    which: ProvisionStep,
    alloc: Allocation,
    opts: StepOptions,
) -> dict[str, Any]:
    """The step; with the run's pooled connections, once more on a new connection when
    the pooled one turned out dead (:meth:`~hsmctl.provider.sessions.SessionPool.run`)."""
    if ctx.sessions is None:
        return _STEPS[which](ctx, alloc, opts)
    return ctx.sessions.run(appliance, lambda: _STEPS[which](ctx, alloc, opts))


def run_step(
    config_path: str,
    appliance: str,
    request_id: str,
    step: str,
    *,
    check: bool = False,
    reissue_otp: bool = False,
    opener: Callable[[str], ProviderContext] = open_context,
    readings: Readings | None = None,
) -> dict[str, Any]:
    """One step for one appliance (what the ``hsm_provision`` module calls). In check
    mode the step only reads (device, fabric, store) and nothing is journaled.
    ``opener``: how the step's context is opened (served steps share their run's
    configuration and inventory, :func:`serve_steps`); ``readings``: the run's
    :class:`Readings` (served steps only)."""
    opts = StepOptions(check=check, reissue_otp=reissue_otp, readings=readings)
    ctx = opener(config_path)
    try:
        # One step at a time per appliance, across hosts when the store is PostgreSQL
        # (hsmctl.state.locks); held for the whole step, journal entries included.
        with ctx.store.appliance_lock(appliance, lock_dir=ctx.state_dir / "locks"):
            alloc = _allocation(ctx, appliance, request_id)
            which = ProvisionStep(step)
            if check:
                return _call(ctx, appliance, which, alloc, opts)
            # Ansible runs one task at a time, so a plan of one step, never skipped: every
            # step decides from the device (and the journal) what is left, and reports
            # `changed` only when it changed something. The host keys go to the pins,
            # not to the journal.
            journal: StoreJournal[ProvisionStep] = StoreJournal(
                ctx.store,
                Operation.PROVISION,
                appliance=appliance,
                request_id=request_id,
                unjournaled=("data_host_keys",),
            )
            plan = {which: lambda: _call(ctx, appliance, which, alloc, opts)}
            return dict(steps.run(plan, journal, subject=appliance)[which])
    finally:
        ctx.close()


def serve_steps(
    hosts: Collection[str],
    sessions: SessionPool | None = None,
    run: ProviderContext | None = None,
) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """The steps of one run as ``hsmctl provision`` serves them to the playbook's modules
    (:mod:`hsmctl.runner.stepserver`): what the module would run in its own process,
    :func:`run_step`, run here for the run's own appliances only. The configuration
    file and the inventory are read once per run (parsing the inventory was most of a
    step's ~13 ms of CPU to open its context), and the store migrated and synced with
    that inventory once; each step still opens a store of its own. With
    ``sessions`` (the caller closes it when the run ends), the steps of one appliance
    share one management connection (:mod:`hsmctl.provider.sessions`). With ``run``
    (the run's own context, its store open, migrated and synced; the caller closes it
    when the run ends), the steps of its configuration file take its configuration and
    inventory as they are and its store's database,
    :meth:`~hsmctl.state.store.Store.borrowed`: one engine for the run. A store (an
    engine) of its own for each step compiled every statement again (SQLAlchemy caches
    them per engine): ~40% of a served step's CPU."""
    loaded: dict[str, tuple[Config, Inventory]] = {}
    lock = threading.Lock()
    readings = Readings()

    own, shared = None, None
    if run is not None:  # its store opened (migrated, synced) now if it was not yet
        own, shared = str(run.config.source), run.store
        loaded[own] = (run.config, run.inventory)

    def opener(path: str) -> ProviderContext:
        with lock:
            if path not in loaded:
                first = open_context(path)
                try:
                    # The run's one migration and inventory sync, with the store's
                    # checks (state_dir, database driver), for all its steps.
                    _ = first.store
                    loaded[path] = (first.config, first.inventory)
                finally:
                    first.close()
            config, inventory = loaded[path]
        ctx = context_with(config, inventory, sessions)
        # Not migrated and synced with the inventory again: done once above, with this
        # same parsed inventory, moments before (on SQLite each was a write transaction
        # taking the database's write lock, ~7 ms of CPU, twice per step).
        if shared is not None and path == own:
            ctx.__dict__["store"] = shared.borrowed()
        else:
            ctx.__dict__["store"] = Store(Database.open(database_target(config)))
        return ctx

    def handle(request: Mapping[str, Any]) -> dict[str, Any]:
        appliance, step = request.get("appliance"), request.get("step")
        config, request_id = request.get("config"), request.get("request_id")
        check, reissue = request.get("check", False), request.get("reissue_otp", False)
        if not isinstance(appliance, str) or appliance not in hosts or step not in set(STEPS):
            raise UsageError(f"step {step!r} for {appliance!r} is not one of this run's")
        if not (isinstance(config, str) and isinstance(request_id, str)):
            raise UsageError("a step request names a configuration file and a request id")
        if not (isinstance(check, bool) and isinstance(reissue, bool)):
            raise UsageError("check and reissue_otp are booleans")
        return run_step(
            config,
            appliance,
            request_id,
            step,
            check=check,
            reissue_otp=reissue,
            opener=opener,
            readings=readings,
        )

    return handle


@dataclass
class ProvisionOutcome:
    provisioned: list[Provisioned]
    failures: dict[str, HsmctlError]

    @property
    def exit_code(self) -> int:
        return most_severe(e.exit_code for e in self.failures.values())


def provision(
    config_path: str | None,
    *,
    tenant: str,
    vnet: str,
    subnet: str,
    ip: str | None = None,
    stamp: str | None = None,
    request_id: str | None = None,
    count: int = 1,
    progress: Progress | None = None,
    use_spares: bool = False,
) -> ProvisionOutcome:
    progress = progress or NullProgress()
    if count < 1 or count > 64:
        raise UsageError("--count must be between 1 and 64")
    if ip is not None and count != 1:
        raise UsageError("--ip names one address; it cannot be combined with --count")
    ctx = open_context(config_path)
    try:
        placement = check_placement(
            ctx.inventory, tenant, vnet, subnet, ip=ip, stamp=stamp, use_spares=use_spares
        )
        if request_id is not None:
            done = ctx.store.get_request(request_id)
            if done is not None and done.status == RequestStatus.SUCCEEDED:
                progress.step(f"request {request_id} already completed")
                return ProvisionOutcome([Provisioned(**r) for r in done.result["appliances"]], {})
        # The installed playbook and its modules, before anything is allocated: a broken
        # installation must not leave appliances stuck in `provisioning`.
        adapter.check_playbook(PLAYBOOK)
        allocations = ctx.store.allocate(request_id, placement, count=count)
        rid = allocations[0].request_id
        progress.step(
            f"request {rid}: "
            + ", ".join(f"{a.appliance} ({a.stamp}) -> {a.ip}" for a in allocations)
        )
        for a in allocations:
            if ctx.store.get_appliance(a.appliance).state == ApplianceState.FAILED:
                # A retry of a failed request: the same appliance and address again.
                ctx.store.set_state(a.appliance, ApplianceState.PROVISIONING)
        ctx.store.update_request(rid, RequestStatus.RUNNING)
        spec = adapter.build_run(
            PLAYBOOK,
            {a.appliance: {"hsm_request_id": rid} for a in allocations},
            {"hsm_config": str(ctx.config.source)},
            forks=count,
            tags=(SERVED_TAG,),
        )
        # The steps of an appliance share one management connection for the run (the
        # device pays ~30-40 ms of CPU per connection); all closed when the run ends.
        with SessionPool() as sessions:
            handle = serve_steps({a.appliance for a in allocations}, sessions, ctx)
            outcomes = adapter.run(spec, progress, serve=_reporting(handle, progress))
        provisioned: list[Provisioned] = []
        failures: dict[str, HsmctlError] = {}
        for a in allocations:
            outcome = outcomes[a.appliance]
            if outcome.status is adapter.HostStatus.OK:
                handoff = step_result(outcome, ProvisionStep.HANDOFF)["handoff"]
                if ctx.store.get_appliance(a.appliance).state != ApplianceState.PROVISIONED:
                    ctx.store.set_state(a.appliance, ApplianceState.PROVISIONED)
                provisioned.append(Provisioned(a.appliance, a.ip, handoff))
            else:
                failed = outcome.results.get(outcome.failed_task or "", {}) or {}
                # `step: all` names its failed step in its message ("network: ...").
                reason = (
                    str(outcome.message)
                    if failed.get("failed_step")
                    else f"{outcome.failed_task}: {outcome.message}"
                )
                ctx.store.set_state(a.appliance, ApplianceState.FAILED, reason=reason)
                code = failed.get(
                    "exit_code", 4 if outcome.status is adapter.HostStatus.UNREACHABLE else 1
                )
                failures[a.appliance] = _error(code, f"{a.appliance}: {reason}")
        status = RequestStatus.FAILED if failures else RequestStatus.SUCCEEDED
        ctx.store.update_request(
            rid,
            status,
            {"appliances": [p.as_dict() for p in provisioned], "failed": sorted(failures)},
        )
        return ProvisionOutcome(provisioned, failures)
    finally:
        ctx.close()


def step_result(outcome: adapter.HostOutcome, step: ProvisionStep) -> dict[str, Any]:
    """The result of ``step`` in a host's run, found by the ``step`` field hsm_provision
    returns (never by a task's title, which the playbook is free to reword), also among
    the ``steps`` of a ``step: all`` task."""
    for result in outcome.results.values():
        for one in [result, *(result.get("steps") or [])]:
            if isinstance(one, dict) and one.get("step") == step.value:
                return dict(one)
    raise HsmctlError(f"{outcome.host}: the playbook run reported no {step.value} step")


def _reporting(
    handle: Callable[[Mapping[str, Any]], dict[str, Any]], progress: Progress
) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """``handle``, with a progress line as each served step ends (``hsm01: network:
    changed``): a run's one task per appliance (SERVED_TAG) says nothing per step."""

    def handle_reporting(request: Mapping[str, Any]) -> dict[str, Any]:
        who, step = request.get("appliance"), request.get("step")
        try:
            result = handle(request)
        except HsmctlError as exc:
            progress.step(f"{who}: {step}: failed: {exc}")
            raise
        progress.step(f"{who}: {step}: {'changed' if result.get('changed') else 'ok'}")
        return result

    return handle_reporting


def _error(code: int, message: str) -> HsmctlError:
    from hsmctl import errors

    for cls in (
        errors.IntegrityError,
        errors.UnreachableError,
        errors.ConflictError,
        errors.UsageError,
    ):
        if cls.exit_code == code:
            return cls(message)
    return HsmctlError(message)
