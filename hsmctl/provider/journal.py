"""The provider's workflows journal their steps in the state store's operations journal.

One :class:`StoreJournal` per run of a workflow on one appliance: every transition the
step runner (:mod:`hsmctl.steps`) reports becomes an entry (``started``, then ``ok`` with
the step's detail or ``failed`` with the error), tagged with the run's ``context``
(deprovisioning's run id). Which steps are done is what the workflow read back from the
journal before the run (``done``); steps finished in this run are added to it, so a
later step can read an earlier one's detail.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, Generic, TypeVar

from hsmctl.errors import HsmctlError
from hsmctl.state.model import Operation, StepStatus
from hsmctl.state.store import Store
from hsmctl.steps import failure_detail

S = TypeVar("S", bound=enum.Enum)


class StoreJournal(Generic[S]):
    def __init__(
        self,
        store: Store,
        operation: Operation,
        *,
        appliance: str,
        request_id: str | None,
        context: Mapping[str, Any] | None = None,
        done: MutableMapping[S, dict[str, Any]] | None = None,
        unjournaled: Iterable[str] = (),
    ) -> None:
        """``unjournaled``: detail keys a step returns to its caller but that the journal
        does not keep (bulky, or recorded elsewhere)."""
        self.store = store
        self.operation = operation
        self.appliance = appliance
        self.request_id = request_id
        self.context = dict(context or {})
        self.done: MutableMapping[S, dict[str, Any]] = {} if done is None else done
        self.unjournaled = frozenset(unjournaled)

    def record(self, step: S, status: StepStatus, detail: Mapping[str, Any]) -> None:
        """One entry, also for what is no step of the runner (authorisation, the end)."""
        self.store.record_step(
            self.operation,
            str(step.value),
            status,
            appliance=self.appliance,
            request_id=self.request_id,
            detail={**self.context, **detail},
        )

    def is_done(self, step: S) -> bool:
        return step in self.done

    def started(self, step: S) -> None:
        self.record(step, StepStatus.STARTED, {})

    def ok(self, step: S, detail: Mapping[str, Any]) -> None:
        kept = {k: v for k, v in detail.items() if k not in self.unjournaled}
        self.record(step, StepStatus.OK, kept)
        self.done[step] = dict(detail)

    def failed(self, step: S, error: HsmctlError) -> None:
        self.record(step, StepStatus.FAILED, failure_detail(error))
