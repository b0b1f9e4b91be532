"""The one step runner: provisioning, deprovisioning and the takeover run through it.

A workflow is plain data — an ordered mapping of step names (a ``StrEnum``) to actions —
and a :class:`Journal`. For each step the journal does not hold as done, the runner
reports progress, records ``started``, runs the action, and records ``ok`` with what the
action returned or ``failed`` with the error's message and exit code, then re-raises it
unchanged (the exit code is the error's). So a run killed anywhere is finished by running
it again: the journal says what is left, and every action is idempotent or decides from
the journal what is left to do.

What a journal persists is its own affair: the provider's operations journal
(:class:`hsmctl.provider.journal.StoreJournal`) records every transition in the state
store; the takeover's (:class:`hsmctl.takeover.journal.FileJournal`) keeps the steps
done in the customer's ``takeover.json``, in the format existing journals have.
:class:`Hooks` carry what a workflow adds around a step (the takeover's fault points,
deprovisioning's ``failed`` appliance state) without the runner knowing of either.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from hsmctl.errors import HsmctlError
from hsmctl.progress import NullProgress, Progress

S = TypeVar("S", bound=enum.Enum)
S_contra = TypeVar("S_contra", bound=enum.Enum, contravariant=True)

Action = Callable[[], Mapping[str, Any] | None]
"""A step's body. What it returns is the step's detail (journaled by the journal)."""


class Journal(Protocol[S_contra]):
    """Where a workflow's steps are recorded; read before each step, written after."""

    def is_done(self, step: S_contra) -> bool:
        """Whether an earlier run (or this one) finished ``step``: it is skipped."""

    def started(self, step: S_contra) -> None: ...

    def ok(self, step: S_contra, detail: Mapping[str, Any]) -> None:
        """Durable before this returns: the runner moves on to the next step after it."""

    def failed(self, step: S_contra, error: HsmctlError) -> None: ...


def _nothing(*args: object) -> None:
    pass


@dataclass(frozen=True)
class Hooks(Generic[S]):
    """Called around each step that runs: ``before`` it starts, ``after`` the journal
    recorded it ``ok``, ``failed`` after the journal recorded the failure."""

    before: Callable[[S], None] = _nothing
    after: Callable[[S], None] = _nothing
    failed: Callable[[S, HsmctlError], None] = _nothing


def run(
    steps: Mapping[S, Action],
    journal: Journal[S],
    *,
    subject: str,
    progress: Progress | None = None,
    hooks: Hooks[S] | None = None,
) -> dict[S, Mapping[str, Any]]:
    """Run every step of ``steps`` not done yet, in order; ``subject`` (the appliance)
    leads each progress line. Returns the steps this call ran and their details."""
    progress = progress or NullProgress()
    hooks = hooks or Hooks()
    ran: dict[S, Mapping[str, Any]] = {}
    for step, action in steps.items():
        if journal.is_done(step):
            continue
        progress.step(f"{subject}: {step.value}")
        hooks.before(step)
        journal.started(step)
        try:
            detail = action() or {}
        except HsmctlError as exc:
            journal.failed(step, exc)
            hooks.failed(step, exc)
            raise
        journal.ok(step, detail)
        ran[step] = detail
        hooks.after(step)
    return ran


def failure_detail(error: HsmctlError) -> dict[str, Any]:
    """What a journal records of a failed step (never the error's detail: it may hold
    device output, and the message is what an operator reads)."""
    return {"error": error.message, "exit_code": error.exit_code}
