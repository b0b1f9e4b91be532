"""Fleet health (SPEC §6): what a provider may still see of each appliance.

Two logins per appliance over the management interface, both pinned to the management
host keys: ``monitor`` (the provider's monitoring key) runs ``hsm show``, which answers
without secrets; ``provider`` only logs in (and runs ``hsm show`` if that is still
allowed). Nothing else: after a takeover the customer may have disabled ``monitor`` and
the provider key is refused, and that is exactly what is reported.

A login that gets as far as a verified host key reached the device, even when the device
then closed the connection (sshd disconnects a locked account after its key was offered):
that is a refusal, not an outage.

The store learns from it: a ``provisioned`` appliance whose device says
``customer-owned``, or that refuses the provider key, becomes ``customer-owned``. Other
disagreements are reported and journaled, never "fixed" from a health probe.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from hsmctl.contract import OwnerState
from hsmctl.device import HSM_INFO, Fact, HsmInfo
from hsmctl.errors import (
    HostKeyMismatch,
    HsmctlError,
    IntegrityError,
    UnreachableError,
    UsageError,
    most_severe,
)
from hsmctl.progress import NullProgress, Progress
from hsmctl.provider.context import ProviderContext, open_context
from hsmctl.ssh import AuthenticationFailed, DeviceConnection
from hsmctl.state.model import ApplianceState, Operation, StepStatus

MAX_PARALLEL = 16


class Login(enum.StrEnum):
    """How one login attempt ended."""

    OK = "ok"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    HOST_KEY_MISMATCH = "host-key-mismatch"
    FAILED = "failed"


@dataclass(frozen=True)
class Attempt:
    login: Login
    info: HsmInfo | None = None
    error: str | None = None
    exit_code: int = 0


@dataclass(frozen=True)
class Probe:
    appliance: str
    monitor: Attempt
    provider: Attempt


@dataclass(frozen=True)
class Assessment:
    """A probe judged against the store: what to report and what to record."""

    appliance: str
    reachable: bool
    owner_state: OwnerState | None
    provider_key_accepted: bool | None
    monitor: str
    state: ApplianceState
    new_state: ApplianceState | None
    exit_code: int
    errors: tuple[str, ...] = ()
    drift: str | None = None

    @property
    def owner_name(self) -> str | None:
        return self.owner_state.value if self.owner_state else None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "appliance": self.appliance,
            "reachable": self.reachable,
            "owner_state": self.owner_name,
            "provider_key_accepted": self.provider_key_accepted,
            "monitor": self.monitor,
            "state": (self.new_state or self.state).value,
        }
        if self.errors:
            out["errors"] = list(self.errors)
        if self.drift:
            out["drift"] = self.drift
        return out


# -- probing (I/O) -----------------------------------------------------------------------


def attempt(conn: DeviceConnection, fact: Fact[HsmInfo] | None, host: str | None = None) -> Attempt:
    """Log in (and read ``fact``); classify how it ended. Never raises HsmctlError."""
    try:
        conn.connect()
    except HostKeyMismatch as exc:
        return Attempt(Login.HOST_KEY_MISMATCH, error=exc.message, exit_code=exc.exit_code)
    except AuthenticationFailed as exc:
        return Attempt(Login.REFUSED, error=exc.message)
    except UnreachableError as exc:
        if _host_key_verified(conn):
            # The device proved its identity, then dropped us during authentication.
            return Attempt(Login.REFUSED, error=exc.message)
        return Attempt(Login.UNREACHABLE, error=exc.message, exit_code=exc.exit_code)
    except HsmctlError as exc:
        return Attempt(Login.FAILED, error=exc.message, exit_code=exc.exit_code)
    try:
        if fact is None:
            return Attempt(Login.OK)
        out = conn.run(fact.command).stdout
        try:
            info = fact.process(out, host)
        except IntegrityError as exc:  # the device answers garbage: an integrity verdict
            return Attempt(Login.FAILED, error=exc.message, exit_code=exc.exit_code)
        return Attempt(Login.OK, info=info)
    except HsmctlError as exc:
        return Attempt(Login.FAILED, error=exc.message, exit_code=exc.exit_code)
    finally:
        conn.close()


def _host_key_verified(conn: DeviceConnection) -> bool:
    try:
        conn.host_key()
    except HsmctlError:
        return False
    return True


def probe(ctx: ProviderContext, appliance: str) -> Probe:
    monitor = attempt(ctx.monitor_session(appliance), HSM_INFO, appliance)
    provider = attempt(ctx.provider_session(appliance), HSM_INFO, appliance)
    return Probe(appliance, monitor, provider)


# -- judging (pure) ----------------------------------------------------------------------


def assess(p: Probe, state: ApplianceState) -> Assessment:
    m, v = p.monitor, p.provider
    reachable = not (m.login is Login.UNREACHABLE and v.login is Login.UNREACHABLE)
    accepted: bool | None
    if v.login is Login.OK:
        accepted = True
    elif v.login is Login.REFUSED:
        accepted = False
    else:
        accepted = None
    owner = next((a.info.owner_state for a in (m, v) if a.login is Login.OK and a.info), None)
    if owner is None and accepted is False:
        # Only a customer locks the provider out (first password change, or revoke).
        owner = OwnerState.CUSTOMER_OWNED
    new_state = None
    drift = None
    if owner is OwnerState.CUSTOMER_OWNED and state == ApplianceState.PROVISIONED:
        new_state = ApplianceState.CUSTOMER_OWNED
    elif owner is not None and not _consistent(owner, state):
        drift = f"the store says {state.value}, the device says {owner.value}"
    codes = [a.exit_code for a in (m, v)]
    errors = tuple(
        f"{who}: {a.error}"
        for who, a in (("monitor", m), ("provider", v))
        if a.error and a.login is not Login.REFUSED
    )
    return Assessment(
        appliance=p.appliance,
        reachable=reachable,
        owner_state=owner,
        provider_key_accepted=accepted,
        monitor=m.login.value,
        state=state,
        new_state=new_state,
        exit_code=most_severe(codes),
        errors=errors,
        drift=drift,
    )


def _consistent(owner: OwnerState, state: ApplianceState) -> bool:
    S, Own = ApplianceState, OwnerState
    expected = {
        Own.FACTORY: {S.AVAILABLE, S.PROVISIONING, S.FAILED, S.DEPROVISIONING},
        Own.PROVISIONED: {S.PROVISIONING, S.PROVISIONED, S.FAILED, S.DEPROVISIONING},
        Own.CUSTOMER_OWNED: {S.CUSTOMER_OWNED, S.FAILED, S.DEPROVISIONING},
    }
    return state in expected[owner]


# -- the command -------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthReport:
    appliances: list[Assessment]

    @property
    def exit_code(self) -> int:
        return most_severe(a.exit_code for a in self.appliances)

    def as_dict(self) -> dict[str, Any]:
        return {"appliances": [a.as_dict() for a in self.appliances]}


def health(
    config_path: str | None,
    appliances: Sequence[str] | None,
    *,
    progress: Progress | None = None,
    prober: Callable[[ProviderContext, str], Probe] = probe,
) -> HealthReport:
    """Probe ``appliances`` (None: every appliance of the inventory) and update the store."""
    progress = progress or NullProgress()
    ctx = open_context(config_path)
    try:
        known = [a.id for a in ctx.inventory.appliances]
        if appliances is None:
            targets = sorted(known)
        else:
            unknown = [a for a in appliances if a not in known]
            if unknown:
                raise UsageError(
                    f"{', '.join(map(str, ctx.inventory.sources))}: no appliance "
                    f"{', '.join(repr(a) for a in unknown)} (appliances: {', '.join(known)})"
                )
            targets = list(appliances)
        states = {r.id: r.state for r in ctx.store.list_appliances()}
        # Configuration problems (no monitoring key) surface once, before any login.
        ctx.config.require("monitor_key")
        ctx.config.require("provider_key")
        with ThreadPoolExecutor(max_workers=max(1, min(MAX_PARALLEL, len(targets)))) as pool:
            probes = list(pool.map(lambda a: prober(ctx, a), targets))
        report = []
        for p in probes:
            a = assess(p, states[p.appliance])
            if a.new_state is not None:
                ctx.store.set_state(p.appliance, a.new_state, expect={a.state})
            if a.new_state is not None or a.exit_code or a.drift:
                ctx.store.record_step(
                    Operation.HEALTH,
                    "probe",
                    StepStatus.FAILED if a.exit_code else StepStatus.OK,
                    appliance=p.appliance,
                    detail=a.as_dict(),
                )
            progress.step(
                f"{a.appliance}: reachable={a.reachable} owner={a.owner_name} "
                f"provider_key={a.provider_key_accepted} monitor={a.monitor}"
            )
            report.append(a)
        return HealthReport(report)
    finally:
        ctx.close()
