"""Fleet health (SPEC §6, issue 15): what a provider may still see of each appliance,
stored poll by poll, with alerts.

Per appliance, cheapest first, every login pinned to the management host keys:
``monitor`` (the provider's monitoring key) runs ``hsm show``, which answers without
secrets and says whether provider access is still on; only when ``monitor`` does not
answer does ``provider`` log in — authentication only, no session, unless the store
expects the device in the provider's hands and the owner state is needed. A spare (the
store says ``available``) is asked the other way round: the provider key first, as its
``monitor`` is locked until provisioning; ``monitor`` only if that key is refused. Then the
hardware sensors, out of band (the lab's BMC: :class:`hsmctl.lab.faults.LabSensors`),
unless the customer disabled ``monitor``: that device reports "no telemetry (customer
choice)" and raises no sensor alert. A device whose ``monitor`` is locked and whose
provider key works is in the factory state (SPEC §3: provisioning enables ``monitor``,
the first password change locks the provider).

Each poll is stored (``health_polls``) and judged by :mod:`hsmctl.provider.alerts` in the
same transaction; alerts that were raised or cleared go to syslog.

At scale (issue 15: ``--all`` over 100 <= 3x one): the command plans the poll with light
modules only (:mod:`hsmctl.provider.pollplan`: configuration, inventory, targets) and
starts every appliance's first TCP connection (:mod:`hsmctl.provider.ahead`) before it
imports this module, so the devices accept and fork while this host imports the SSH
library and the state store and opens it; the logins
(:class:`hsmctl.provider.sessions.PollLogins`) use the two keys loaded once per run (a
missing or unreadable key is exit 2 before any login).

A login that gets as far as a verified host key reached the device, even when the device
then closed the connection (sshd disconnects a locked account after its key was offered):
that is a refusal, not an outage.

The store learns from it: a ``provisioned`` appliance whose device says
``customer-owned``, or that refuses the provider key, becomes ``customer-owned``. Other
disagreements are reported and journaled, never "fixed" from a health probe.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from hsmctl import config as config_mod
from hsmctl.contract import OwnerState
from hsmctl.device import HSM_INFO, Fact, HsmInfo
from hsmctl.device.fact import Fields
from hsmctl.errors import (
    HostKeyMismatch,
    HsmctlError,
    IntegrityError,
    UnreachableError,
    most_severe,
)
from hsmctl.progress import NullProgress, Progress
from hsmctl.provider import alerts as al
from hsmctl.provider.context import ProviderContext, context_with
from hsmctl.provider.pollplan import PollPlan, plan_poll
from hsmctl.provider.sessions import PollLogins, load_key
from hsmctl.ssh import AuthenticationFailed, DeviceConnection
from hsmctl.state.healthlog import AlertRow, PollRow
from hsmctl.state.model import ApplianceState, Operation, StepStatus

MAX_PARALLEL = 32
"""Polls in flight at once. A poll mostly waits (handshakes, the device's reply), so
more than the cores; the devices' own CPU is the limit in the lab."""

SENSOR_KINDS = frozenset({"power-off", "psu1", "psu2", "temperature", "fan"})


class Login(enum.StrEnum):
    """How one login attempt ended."""

    OK = "ok"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    HOST_KEY_MISMATCH = "host-key-mismatch"
    FAILED = "failed"
    SKIPPED = "skipped"  # not needed: the monitor's hsm show already said it


@dataclass(frozen=True)
class LogDisk:
    """``hsm show``'s ``log_disk`` (device log retention), when the firmware has it."""

    used_bytes: int | None
    limit_bytes: int | None
    high_water_bytes: int | None
    warning: bool

    @classmethod
    def parse(cls, f: Fields) -> LogDisk | None:
        try:
            d = f.object("log_disk")
        except IntegrityError:
            return None  # older firmware: no retention report
        return cls(
            d.optional_number("used_bytes"),
            d.optional_number("limit_bytes"),
            d.optional_number("high_water_bytes"),
            bool(d.optional_flag("warning")),
        )


@dataclass(frozen=True)
class MonitorView:
    info: HsmInfo
    log_disk: LogDisk | None


MONITOR_VIEW = Fact("hsm show", lambda f: MonitorView(HsmInfo.parse(f), LogDisk.parse(f)))


@dataclass(frozen=True)
class Attempt:
    login: Login
    info: HsmInfo | None = None
    error: str | None = None
    exit_code: int = 0
    log_disk: LogDisk | None = None


@dataclass(frozen=True)
class Probe:
    appliance: str
    monitor: Attempt
    provider: Attempt
    sensors: Mapping[str, Any] | None = None  # out-of-band readings; None: not read
    sensors_error: str | None = None


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
    telemetry: str = "unavailable"
    problems: frozenset[str] = frozenset()
    observed: frozenset[str] = frozenset()
    sensors: Mapping[str, Any] | None = None
    log_disk: LogDisk | None = None

    @property
    def owner_name(self) -> str | None:
        return self.owner_state.value if self.owner_state else None

    @property
    def ok(self) -> bool:
        return not self.problems and not self.exit_code

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


def attempt(
    conn: DeviceConnection, fact: Fact[HsmInfo] | Fact[MonitorView] | None, host: str | None = None
) -> Attempt:
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
        if isinstance(info, MonitorView):
            return Attempt(Login.OK, info=info.info, log_disk=info.log_disk)
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


class SensorReader(Protocol):
    def read(self, appliance: str) -> Mapping[str, Any]: ...


class Logins(Protocol):
    """Where a probe's logins come from: unconnected management sessions, pinned."""

    def provider(self, appliance: str) -> DeviceConnection: ...

    def monitor(self, appliance: str) -> DeviceConnection: ...


@dataclass(frozen=True)
class _RunLogins:
    """A run's :class:`Logins`: :class:`PollLogins`' connections, pinned by the context."""

    ctx: ProviderContext
    logins: PollLogins

    def provider(self, appliance: str) -> DeviceConnection:
        return self.logins.connection(appliance, "provider", self.ctx.mgmt_pins(appliance))

    def monitor(self, appliance: str) -> DeviceConnection:
        return self.logins.connection(appliance, "monitor", self.ctx.mgmt_pins(appliance))


def sensors_for(kind: str) -> SensorReader | None:
    """The out-of-band sensor driver (lab: the emulated BMC); None where there is none."""
    if kind == "lab":
        from hsmctl.lab.faults import LabSensors

        return LabSensors()
    return None


def probe(
    logins: Logins,
    appliance: str,
    expected: ApplianceState | None = None,
    reader: SensorReader | None = None,
) -> Probe:
    """The cheapest logins that answer the questions (see the module docstring)."""
    provider: Attempt | None = None
    if expected == ApplianceState.AVAILABLE:
        # A spare: monitoring is enabled only by provisioning, so its account is locked;
        # the provider key answers the question. Monitor only if that key is refused.
        provider = attempt(logins.provider(appliance), None, appliance)
        monitor = (
            Attempt(Login.SKIPPED)
            if provider.login is Login.OK
            else attempt(logins.monitor(appliance), MONITOR_VIEW, appliance)
        )
    else:
        monitor = attempt(logins.monitor(appliance), MONITOR_VIEW, appliance)
    if provider is not None:
        pass
    elif monitor.login is Login.OK:
        provider = Attempt(Login.SKIPPED)
    else:
        # The owner state only where the provider should still hold the device and the
        # store does not already know it is factory-fresh.
        need_info = expected not in (None, ApplianceState.AVAILABLE)
        provider = attempt(logins.provider(appliance), HSM_INFO if need_info else None, appliance)
    customer_choice = monitor.login is Login.REFUSED and provider.login is Login.REFUSED
    if reader is None or customer_choice:
        return Probe(appliance, monitor, provider)
    try:
        return Probe(appliance, monitor, provider, sensors=reader.read(appliance))
    except HsmctlError as exc:
        return Probe(appliance, monitor, provider, sensors_error=exc.message)


def sensor_problems(readings: Mapping[str, Any]) -> frozenset[str]:
    """Problem kinds in out-of-band sensor readings (pure)."""
    found = set()
    if readings.get("power") == "off":
        found.add("power-off")
    for psu, state in (readings.get("psu") or {}).items():
        if state != "ok":
            found.add(str(psu))
    temp, limit = readings.get("temperature_c"), readings.get("temperature_limit_c")
    if isinstance(temp, int | float) and isinstance(limit, int | float) and temp > limit:
        found.add("temperature")
    if any(rpm == 0 for rpm in (readings.get("fans") or {}).values()):
        found.add("fan")
    return frozenset(found)


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
    if v.login is Login.SKIPPED and m.info is not None:
        accepted = m.info.provider_access
    owner = next((a.info.owner_state for a in (m, v) if a.login is Login.OK and a.info), None)
    if owner is None and accepted is False:
        # Only a customer locks the provider out (first password change, or revoke).
        owner = OwnerState.CUSTOMER_OWNED
    if (
        owner is None
        and accepted is True
        and m.login in (Login.REFUSED, Login.SKIPPED)
        and (state == ApplianceState.AVAILABLE)
    ):
        # monitor locked (or not tried on a spare), provider key working: nothing since
        # the factory (provisioning enables monitor; a takeover locks the provider).
        owner = OwnerState.FACTORY
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
    problems: set[str] = set()
    observed = {"unreachable", "host-key-mismatch"}
    if not reachable:
        problems.add("unreachable")
    if Login.HOST_KEY_MISMATCH in (m.login, v.login):
        problems.add("host-key-mismatch")
    if m.login is Login.REFUSED and accepted is False:
        telemetry = al.NO_TELEMETRY
        observed |= SENSOR_KINDS | {"log-disk-high-water"}  # no telemetry: nothing to alert
    elif p.sensors is not None:
        telemetry = "ok"
        problems |= sensor_problems(p.sensors)
        observed |= SENSOR_KINDS
    else:
        telemetry = "unavailable"
    if m.login is Login.OK:
        observed.add("log-disk-high-water")
        if m.log_disk is not None and m.log_disk.warning:
            problems.add("log-disk-high-water")
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
        telemetry=telemetry,
        problems=frozenset(problems),
        observed=frozenset(observed),
        sensors=p.sensors,
        log_disk=m.log_disk,
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
class Row:
    """One appliance in the report: the assessment and its alerts after this poll."""

    assessment: Assessment
    alerts: tuple[AlertRow, ...] = ()
    last_ok: datetime | None = None
    region: str | None = None
    stamp: str | None = None

    def as_dict(self) -> dict[str, Any]:
        a = self.assessment
        return {
            "id": a.appliance,
            "state": (a.new_state or a.state).value,
            "reachable": a.reachable,
            "alerts": [x.as_dict() for x in self.alerts],
            "last_ok": _iso(self.last_ok) if self.last_ok else None,
            "telemetry": a.telemetry,
            "problems": sorted(a.problems),
            "sensors": dict(a.sensors) if a.sensors is not None else None,
            **a.as_dict(),
        }


@dataclass(frozen=True)
class HealthReport:
    rows: list[Row]
    raised: list[al.Event] = field(default_factory=list)
    cleared: list[al.Event] = field(default_factory=list)
    notify_error: str | None = None
    # (region, stamp, state) -> appliances in the store: the fleet's capacity
    capacity: Mapping[tuple[str, str, str], int] = field(default_factory=dict)

    @property
    def appliances(self) -> list[Assessment]:
        return [r.assessment for r in self.rows]

    @property
    def exit_code(self) -> int:
        codes = [a.exit_code for a in self.appliances]
        if self.notify_error:
            codes.append(UnreachableError.exit_code)
        return most_severe(codes)

    def as_dict(self) -> dict[str, Any]:
        return {"appliances": [r.as_dict() for r in self.rows]}


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rule_of(
    config: config_mod.Config, polls: int | None, window_minutes: int | None
) -> al.AlertRule:
    """The alert rule: flags over the configuration over the defaults (3 within 60 min)."""
    return al.AlertRule(
        polls=polls or config.health_alert_polls,
        window=timedelta(minutes=window_minutes or config.health_alert_window_minutes),
    )


def health(
    config_path: str | None,
    appliances: Sequence[str] | None,
    *,
    progress: Progress | None = None,
    prober: Callable[..., Probe] = probe,
    alert_polls: int | None = None,
    alert_window_minutes: int | None = None,
    syslog: str | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    plan: PollPlan | None = None,
) -> HealthReport:
    """Probe ``appliances`` (None: every appliance of the inventory), store the poll,
    raise and clear alerts, send them to syslog, and update the store's states. ``plan``:
    made already by :func:`~hsmctl.provider.pollplan.plan_poll` for these arguments
    (``config_path`` and ``appliances`` are then not read again); closed here."""
    progress = progress or NullProgress()
    if plan is None:
        plan = plan_poll(config_path, appliances, open_ahead=prober is probe)
    config, inventory, targets = plan.config, plan.inventory, plan.targets
    ctx: ProviderContext | None = None
    try:
        rule = rule_of(config, alert_polls, alert_window_minutes)
        destination = syslog or config.health_syslog
        logins = None
        if prober is probe:
            keys = {"provider": "provider_key", "monitor": "monitor_key"}
            logins = PollLogins(
                {a.id: str(a.mgmt_ip) for a in inventory.appliances},
                {user: load_key(config.require(name)) for user, name in keys.items()},
                plan.ahead,
            )
        ctx = context_with(config, inventory)
        run_logins = _RunLogins(ctx, logins) if logins is not None else None
        records = {r.id: r for r in ctx.store.list_appliances()}
        states = {k: r.state for k, r in records.items()}
        reader = sensors_for(config.out_of_band) if prober is probe else None

        def one(a: str) -> Probe:
            if run_logins is not None:
                return probe(run_logins, a, states[a], reader)
            return prober(ctx, a)

        with ThreadPoolExecutor(max_workers=max(1, min(MAX_PARALLEL, len(targets)))) as pool:
            probes = list(pool.map(one, targets))
        when = now()
        assessed = [assess(p, states[p.appliance]) for p in probes]
        applied = ctx.store.record_health(
            [
                PollRow(
                    a.appliance,
                    when,
                    a.reachable,
                    a.ok,
                    a.telemetry,
                    tuple(sorted(a.problems)),
                    a.as_dict(),
                )
                for a in assessed
            ],
            when - rule.window,
            _decider(rule, {a.appliance: a for a in assessed}),
            al.message,
            prune_before=when - timedelta(days=ctx.config.health_retention_days),
        )
        rows = []
        a_state = {a.appliance: a.new_state for a in assessed if a.new_state is not None}
        for a in assessed:
            if a.new_state is not None:
                ctx.store.set_state(a.appliance, a.new_state, expect={a.state})
            if a.new_state is not None or a.exit_code or a.drift:
                ctx.store.record_step(
                    Operation.HEALTH,
                    "probe",
                    StepStatus.FAILED if a.exit_code else StepStatus.OK,
                    appliance=a.appliance,
                    detail=a.as_dict(),
                )
            progress.step(
                f"{a.appliance}: reachable={a.reachable} owner={a.owner_name} "
                f"provider_key={a.provider_key_accepted} monitor={a.monitor} "
                f"telemetry={a.telemetry} problems={','.join(sorted(a.problems)) or '-'}"
            )
            rec = records.get(a.appliance)
            rows.append(
                Row(
                    a,
                    tuple(applied.active.get(a.appliance, [])),
                    applied.last_ok.get(a.appliance),
                    rec.region if rec else None,
                    rec.stamp if rec else None,
                )
            )

        def events(found: list[tuple[AlertRow, int]], t: al.Transition) -> list[al.Event]:
            return [al.Event(x.appliance, x.kind, t, when, n, rule) for x, n in found]

        raised = events(applied.raised, al.Transition.RAISED)
        cleared = events(applied.cleared, al.Transition.CLEARED)
        for e in raised + cleared:
            progress.step(f"alert {e.transition.value}: {e.text}")
        notify_error = None
        if destination:
            try:
                al.send(destination, raised + cleared)
            except HsmctlError as exc:
                notify_error = exc.message
        capacity: Counter[tuple[str, str, str]] = Counter()
        for rec in records.values():
            st = a_state.get(rec.id, rec.state)
            capacity[(rec.region, rec.stamp, st.value)] += 1
        return HealthReport(rows, raised, cleared, notify_error, dict(capacity))
    finally:
        plan.close()
        if ctx is not None:
            ctx.close()


def _decider(
    rule: al.AlertRule, assessed: Mapping[str, Assessment]
) -> Callable[[str, Sequence[PollRow], set[str]], list[tuple[str, str, int]]]:
    def decide(
        appliance: str, history: Sequence[PollRow], active: set[str]
    ) -> list[tuple[str, str, int]]:
        a = assessed[appliance]
        polls = [al.Poll(p.time, frozenset(p.problems), frozenset()) for p in history[:-1]]
        if history:
            latest = history[-1]
            polls.append(al.Poll(latest.time, a.problems, a.observed))
        return [(c.kind, c.transition.value, c.count) for c in al.decide(polls, active, rule)]

    return decide
