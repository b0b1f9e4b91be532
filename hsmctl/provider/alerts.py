"""Health alerts: when a problem becomes an alert, when it clears, and how it is sent.

The rule (Azure's for its dedicated HSMs: several bad readings within an hour): an alert
of a kind (``psu1``, ``temperature``, ``unreachable`` ...) is raised only after ``polls``
polls within ``window`` saw that problem, so one bad reading raises nothing; it clears at
the first poll that could see that kind and found it fine (recovery). :func:`decide` is
pure: polls in, transitions out; the health run applies them in the same transaction as
the poll it records (:meth:`hsmctl.state.store.Store.record_health`).

Alerts leave as RFC 5424 syslog messages, framed and sent by the log export's code
(:mod:`hsmctl.collect.export`: UDP, or TCP with octet counting)::

    <132>1 2026-12-06T18:40:01.123456Z hsm31 hsmctl-health - alert-raised
    [hsmHealth@32473 appliance="hsm31" kind="psu1" state="raised" polls="3"
    window="3600"] BOMhsm31: power supply 1 failed

Facility 16 (local0); severity warning (4) when raised, notice (5) when cleared.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from hsmctl.collect.export import BOM, SyslogDestination, _printusascii, _sd_value
from hsmctl.errors import HsmctlError, UsageError

APP_NAME = "hsmctl-health"
SD_ID = "hsmHealth@32473"
FACILITY_LOCAL0 = 16
NO_TELEMETRY = "no telemetry (customer choice)"


class Transition(enum.StrEnum):
    RAISED = "raised"
    CLEARED = "cleared"


@dataclass(frozen=True)
class AlertRule:
    """``polls`` bad polls within ``window`` raise an alert (Azure-like defaults)."""

    polls: int = 3
    window: timedelta = timedelta(minutes=60)

    def __post_init__(self) -> None:
        if self.polls < 1:
            raise UsageError("the alert rule needs at least 1 poll")
        if self.window <= timedelta(0):
            raise UsageError("the alert window must be longer than 0")


@dataclass(frozen=True)
class Poll:
    """One poll of one appliance as the rule sees it: the problems found and the kinds
    the poll could judge at all (a sensor that could not be read neither raises nor
    clears its alert)."""

    time: datetime
    problems: frozenset[str]
    observed: frozenset[str]


@dataclass(frozen=True)
class Change:
    kind: str
    transition: Transition
    count: int  # bad polls of this kind within the window


def decide(history: Sequence[Poll], active: Collection[str], rule: AlertRule) -> tuple[Change, ...]:
    """The alert changes the newest poll (``history[-1]``) makes, given every poll of
    the appliance within the window before it and the kinds already ``active``."""
    if not history:
        return ()
    latest = history[-1]
    since = latest.time - rule.window
    counts = Counter(k for p in history if p.time > since for k in p.problems)
    changes = [
        Change(k, Transition.RAISED, counts[k])
        for k in sorted(latest.problems)
        if k not in active and counts[k] >= rule.polls
    ]
    changes += [
        Change(k, Transition.CLEARED, counts[k])
        for k in sorted(active)
        if k in latest.observed and k not in latest.problems
    ]
    return tuple(changes)


# -- what the problems are called ---------------------------------------------------------

MESSAGES = {
    "unreachable": "does not answer on the management network",
    "host-key-mismatch": "answers with a management host key that is not pinned",
    "power-off": "is powered off (out-of-band reading)",
    "psu1": "power supply 1 failed",
    "psu2": "power supply 2 failed",
    "temperature": "temperature above its limit",
    "fan": "a fan stopped",
    "log-disk-high-water": "activity-log disk above its high-water mark (collect and ack)",
}


def message(appliance: str, kind: str) -> str:
    return f"{appliance}: {MESSAGES.get(kind, kind)}"


# -- syslog -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One alert transition, as sent."""

    appliance: str
    kind: str
    transition: Transition
    time: datetime
    count: int
    rule: AlertRule

    @property
    def text(self) -> str:
        what = message(self.appliance, self.kind)
        return what if self.transition is Transition.RAISED else f"{what}: recovered"


def syslog_message(event: Event) -> bytes:
    """One RFC 5424 message (no framing) for an alert transition."""
    severity = 4 if event.transition is Transition.RAISED else 5
    stamp = event.time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    params = {
        "appliance": event.appliance,
        "kind": event.kind,
        "state": event.transition.value,
        "polls": event.count,
        "window": int(event.rule.window.total_seconds()),
    }
    sd = " ".join(f'{k}="{_sd_value(v)}"' for k, v in params.items())
    header = (
        f"<{FACILITY_LOCAL0 * 8 + severity}>1 {stamp} {_printusascii(event.appliance, 255)} "
        f"{APP_NAME} - alert-{event.transition.value} [{SD_ID} {sd}] "
    )
    return header.encode("utf-8") + BOM + event.text.encode("utf-8")


def send(url: str, events: Iterable[Event]) -> None:
    """Send ``events`` to the syslog receiver at ``url`` (``udp://`` or ``tcp://``)."""
    todo = list(events)
    if not todo:
        return
    dest = SyslogDestination(url)
    try:
        for event in todo:
            dest.send(syslog_message(event))
    except HsmctlError:
        dest.sock.close()
        raise
    dest.close()
