"""Deprovisioning (SPEC §6, issue 4): zeroize over the out-of-band path, prove it, detach
the data port, return the appliance to the pool.

Authorisation comes first and changes nothing when refused (:mod:`.authorization`: the
tenant's signed release, or ``--force`` with a reason, which is recorded). Then a run of
steps (plain data, :data:`STEPS`), run by :func:`hsmctl.steps.run` and each journaled in
the state store under one run id:

``snapshot``  record, through the console, what a factory reset must change: the audit key
              id and the data-interface host keys;
``zeroize``   ``sysconf factory-reset`` as the console role: it works after the customer
              revoked the provider's access, because the console needs no account;
``verify``    through the console: token not initialised, owner state ``factory``, new data
              host keys (neither the pinned nor the snapshot ones), a new audit key, and
              the reset's own record in the device's activity log; then the provider key
              logs in on management again; the new data host keys are pinned;
``detach``    the data port leaves the tenant network (fabric driver);
``zeroization`` the zeroization record in the journal (before/after, the device's record);
``release``   the store frees the address and the appliance becomes ``available``.

A run that stopped anywhere (killed, device unreachable) is finished by running the same
command again: the journal says which steps are done, and the run's authorisation
carries over. A step that fails leaves the appliance ``failed`` with the reason.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hsmctl import devicejson, steps
from hsmctl.contract import OwnerState
from hsmctl.device import AUDIT_KEY, HOST_KEYS, HSM_INFO, Fact, HsmInfo, Switch
from hsmctl.errors import ConflictError, HsmctlError, IntegrityError
from hsmctl.progress import NullProgress, Progress
from hsmctl.provider.authorization import authorize, check_flags, require_authority
from hsmctl.provider.context import ProviderContext, open_context
from hsmctl.provider.drivers import console_checked, fabric_for, out_of_band_for
from hsmctl.provider.journal import StoreJournal
from hsmctl.ssh import PublicKey
from hsmctl.state.model import ApplianceState, Interface, Operation, StepStatus
from hsmctl.state.records import ApplianceRecord, JournalEntry

A = ApplianceState
T = TypeVar("T")
# Where a new run may start. `deprovisioning` without an unfinished run in the journal
# means a run stopped before it journaled its authorisation: authorise again.
STARTABLE = frozenset({A.PROVISIONED, A.CUSTOMER_OWNED, A.FAILED, A.DEPROVISIONING})
FAILURE_PREFIX = "deprovision"
PROVIDER_LOGIN_ATTEMPTS = 10
"""The device restarts its sshd after a factory reset: give it a few seconds."""


class DeprovisionStep(enum.StrEnum):
    AUTHORIZE = "authorize"
    SNAPSHOT = "snapshot"
    ZEROIZE = "zeroize"
    VERIFY = "verify"
    DETACH = "detach"
    ZEROIZATION = "zeroization"
    RELEASE = "release"
    DONE = "done"


STEPS: tuple[DeprovisionStep, ...] = (
    DeprovisionStep.SNAPSHOT,
    DeprovisionStep.ZEROIZE,
    DeprovisionStep.VERIFY,
    DeprovisionStep.DETACH,
    DeprovisionStep.ZEROIZATION,
    DeprovisionStep.RELEASE,
)


_STEP_VALUES = frozenset(s.value for s in DeprovisionStep)


@dataclass
class Run:
    """One deprovisioning run as the journal tells it."""

    run_id: str
    authorization: dict[str, Any]
    done: dict[DeprovisionStep, dict[str, Any]] = field(default_factory=dict)
    finished: bool = False


# -- pure decisions ----------------------------------------------------------------------


def runs_from_journal(entries: Iterable[JournalEntry]) -> list[Run]:
    """Group an appliance's deprovisioning journal entries into runs, oldest first."""
    runs: dict[str, Run] = {}
    for e in entries:
        if e.operation != Operation.DEPROVISION:
            continue
        run_id = e.detail.get("run")
        if not isinstance(run_id, str):
            continue
        if e.step == DeprovisionStep.AUTHORIZE and e.status == StepStatus.OK:
            runs[run_id] = Run(run_id, dict(e.detail.get("authorization") or {}))
            continue
        run = runs.get(run_id)
        if run is None:
            continue
        if e.step == DeprovisionStep.DONE and e.status == StepStatus.OK:
            run.finished = True
        elif e.status == StepStatus.OK and e.step in _STEP_VALUES:
            run.done[DeprovisionStep(e.step)] = dict(e.detail)
    return list(runs.values())


def unfinished_run(entries: Iterable[JournalEntry]) -> Run | None:
    runs = runs_from_journal(entries)
    return runs[-1] if runs and not runs[-1].finished else None


def resumable(record: ApplianceRecord, run: Run | None) -> bool:
    """Whether ``run`` may be finished without a new authorisation."""
    if run is None:
        return False
    if record.state == A.DEPROVISIONING:
        return True
    if record.state == A.FAILED:
        return (record.failure_reason or "").startswith(f"{FAILURE_PREFIX}:")
    # Freed but not marked done: only the last bookkeeping entry is missing.
    return record.state == A.AVAILABLE and DeprovisionStep.RELEASE in run.done


def pending(run: Run) -> list[DeprovisionStep]:
    return [s for s in STEPS if s not in run.done]


def fingerprints(lines: Iterable[str]) -> list[str]:
    return sorted(PublicKey.parse(line).fingerprint for line in lines)


def zeroization_checks(
    *,
    before: Mapping[str, Any],
    hsm: HsmInfo,
    data_host_keys: Sequence[str],
    audit_key_id: str,
    pinned_data: Iterable[str],
    reset_record: Mapping[str, Any] | None,
) -> dict[str, bool]:
    """What the console must show after a factory reset; every value must be True."""
    new = set(fingerprints(data_host_keys))
    old = set(before.get("data_host_keys") or ()) | set(pinned_data)
    return {
        "token_not_initialised": not hsm.initialised and not hsm.objects,
        "owner_state_factory": hsm.owner_state is OwnerState.FACTORY,
        "monitor_disabled": hsm.monitor is Switch.DISABLED,
        "data_host_keys_new": bool(new) and not (new & old),
        "audit_key_new": bool(audit_key_id) and audit_key_id != before.get("audit_key_id"),
        # The device's own record of the reset names the key it rotated to.
        "reset_in_device_log": reset_record is not None
        and reset_record.get("new_audit_key_id") == audit_key_id,
    }


def find_reset_record(lines: Iterable[str]) -> dict[str, Any] | None:
    """The newest successful ``sysconf factory-reset`` result in an ``audit show`` tail."""
    found = None
    for line in lines:
        try:
            rec = devicejson.loads(line, "audit show record")
        except IntegrityError:
            continue  # not a record (e.g. the cut-off first line of a tail): not the one
        detail = rec.get("detail") if isinstance(rec, dict) else None
        if (
            isinstance(detail, dict)
            and rec.get("event") == "result"
            and rec.get("outcome") == "ok"
            and detail.get("command") == "sysconf factory-reset"
        ):
            found = {
                "seq": rec.get("seq"),
                "hash": rec.get("hash"),
                "time": rec.get("time"),
                "old_audit_key_id": detail.get("old_key_id"),
                "new_audit_key_id": detail.get("new_key_id"),
            }
    return found


# -- the executor ------------------------------------------------------------------------


class _Executor:
    """The steps' I/O for one run; :func:`hsmctl.steps.run` runs them and journals each
    in the state store under the run's id."""

    def __init__(self, ctx: ProviderContext, appliance: str, run: Run, progress: Progress):
        self.ctx = ctx
        self.appliance = appliance
        self.run = run
        self.progress = progress
        self.oob = out_of_band_for(ctx.config.out_of_band)
        alloc = ctx.store.allocation(appliance)
        self.journal: StoreJournal[DeprovisionStep] = StoreJournal(
            ctx.store,
            Operation.DEPROVISION,
            appliance=appliance,
            request_id=alloc.request_id if alloc is not None else None,
            context={"run": run.run_id},
            done=run.done,
        )

    def console(self, line: str) -> str:
        return console_checked(self.oob, self.appliance, line)

    def console_fact(self, fact: Fact[T]) -> T:
        return fact.process(self.console(fact.command), self.appliance, via="console reply")

    # steps ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        audit = self.console_fact(AUDIT_KEY)
        keys = self.console_fact(HOST_KEYS)
        return {"audit_key_id": audit.key_id, "data_host_keys": fingerprints(keys.active_keys)}

    def zeroize(self) -> dict[str, Any]:
        out = self.console("sysconf factory-reset").strip()
        return {"console": "sysconf factory-reset", "output": out}

    def verify(self) -> dict[str, Any]:
        before = self.run.done.get(DeprovisionStep.SNAPSHOT, {})
        hsm = self.console_fact(HSM_INFO)
        keys = self.console_fact(HOST_KEYS)
        audit = self.console_fact(AUDIT_KEY)
        tail = self.console("audit show --last 200").splitlines()
        active = list(keys.active_keys)
        pinned = [k.fingerprint for k in self.ctx.store.host_keys(self.appliance, Interface.DATA)]
        record = find_reset_record(tail)
        checks = zeroization_checks(
            before=before,
            hsm=hsm,
            data_host_keys=active,
            audit_key_id=audit.key_id,
            pinned_data=pinned,
            reset_record=record,
        )
        checks["provider_key_accepted"] = self._provider_logs_in()
        failed = sorted(k for k, ok in checks.items() if not ok)
        if failed:
            raise HsmctlError(
                f"{self.appliance}: the factory reset did not verify: {', '.join(failed)}",
                detail={"appliance": self.appliance, "checks": checks},
            )
        # Keys read over the console (a trusted path) replace the tenant-era pins.
        self.ctx.store.pin_host_keys(self.appliance, Interface.DATA, active)
        return {
            "checks": checks,
            "audit_key_id": audit.key_id,
            "data_host_keys": fingerprints(active),
            "device_record": record,
        }

    def _provider_logs_in(self) -> bool:
        last: HsmctlError | None = None
        for _ in range(PROVIDER_LOGIN_ATTEMPTS):
            try:
                with self.ctx.provider_session(self.appliance) as conn:
                    info = HSM_INFO.on(conn, self.appliance)
                return info.id == self.appliance
            except HsmctlError as exc:
                last = exc
                time.sleep(0.5)
        self.progress.step(f"{self.appliance}: provider login after the reset failed: {last}")
        return False

    def detach(self) -> dict[str, Any]:
        fabric_for(self.ctx.config.fabric).detach(self.appliance)
        return {"detached": True}

    def zeroization(self) -> dict[str, Any]:
        record = self.ctx.store.get_appliance(self.appliance)
        verified = self.run.done.get(DeprovisionStep.VERIFY, {})
        return {
            "tenant": record.tenant,
            "ip": record.data_ip,
            "authorization": self.run.authorization,
            "before": self.run.done.get(DeprovisionStep.SNAPSHOT, {}),
            "after": {
                "audit_key_id": verified.get("audit_key_id"),
                "data_host_keys": verified.get("data_host_keys"),
            },
            "checks": verified.get("checks"),
            "device_record": verified.get("device_record"),
            "path": f"out-of-band ({self.ctx.config.out_of_band})",
        }

    def release(self) -> dict[str, Any]:
        kind = self.run.authorization.get("kind", "?")
        rec = self.ctx.store.release(self.appliance, reason=f"deprovisioned ({kind})")
        return {"state": rec.state.value}

    # driver -----------------------------------------------------------------------------

    def _failed(self, step: DeprovisionStep, exc: HsmctlError) -> None:
        reason = f"{FAILURE_PREFIX}: {step.value}: {exc.message}"
        current = self.ctx.store.get_appliance(self.appliance).state
        if current in (A.DEPROVISIONING, A.FAILED):
            self.ctx.store.set_state(self.appliance, A.FAILED, reason=reason)

    def execute(self) -> None:
        actions = {
            DeprovisionStep.SNAPSHOT: self.snapshot,
            DeprovisionStep.ZEROIZE: self.zeroize,
            DeprovisionStep.VERIFY: self.verify,
            DeprovisionStep.DETACH: self.detach,
            DeprovisionStep.ZEROIZATION: self.zeroization,
            DeprovisionStep.RELEASE: self.release,
        }
        steps.run(
            {step: actions[step] for step in STEPS},
            self.journal,
            subject=self.appliance,
            progress=self.progress,
            hooks=steps.Hooks(failed=self._failed),
        )
        self.journal.record(DeprovisionStep.DONE, StepStatus.OK, {})


def deprovision(
    config_path: str | None,
    appliance: str,
    *,
    yes: bool,
    release: str | None = None,
    force: bool = False,
    reason: str | None = None,
    progress: Progress | None = None,
) -> dict[str, str]:
    """Zeroize ``appliance`` and return it to the pool; ``{"appliance", "state"}``."""
    progress = progress or NullProgress()
    check_flags(yes=yes, release=release, force=force, reason=reason)
    ctx = open_context(config_path)
    try:
        ctx.inventory.appliance(appliance)  # the management pins come from there
        record = ctx.store.get_appliance(appliance)
        run = unfinished_run(
            ctx.store.journal(appliance=appliance, operation=Operation.DEPROVISION)
        )
        if resumable(record, run):
            assert run is not None
            progress.step(
                f"{appliance}: resuming deprovisioning run {run.run_id} "
                f"(authorised by {run.authorization.get('kind')}; done: "
                f"{', '.join(s.value for s in run.done) or 'nothing yet'})"
            )
            if record.state == A.FAILED:
                ctx.store.set_state(appliance, A.DEPROVISIONING, expect={A.FAILED})
        else:
            if record.state not in STARTABLE:
                raise ConflictError(
                    f"{appliance} is {record.state.value}: "
                    + (
                        "nothing to deprovision"
                        if record.state == A.AVAILABLE
                        else "provisioning is under way; resume or finish it first"
                    ),
                    detail={"appliance": appliance, "state": record.state.value},
                )
            require_authority(release, force)
            auth = authorize(ctx, record, release=release, force=force, reason=reason)
            ctx.store.set_state(appliance, A.DEPROVISIONING, expect={record.state})
            run = Run(f"deprov-{uuid.uuid4()}", auth.as_detail())
            _Executor(ctx, appliance, run, progress).journal.record(
                DeprovisionStep.AUTHORIZE,
                StepStatus.OK,
                {
                    "authorization": run.authorization,
                    "from_state": record.state.value,
                    "tenant": record.tenant,
                    "ip": record.data_ip,
                },
            )
            progress.step(f"{appliance}: deprovisioning authorised by {auth.kind.value}")
        _Executor(ctx, appliance, run, progress).execute()
        final = ctx.store.get_appliance(appliance)
        return {"appliance": appliance, "state": final.state.value}
    finally:
        ctx.close()
