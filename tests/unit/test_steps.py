"""The step runner: what it journals, in what order, what it skips, and that a failure
reaches the caller unchanged after it is recorded."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import pytest

from hsmctl import steps
from hsmctl.errors import ConflictError, HsmctlError

pytestmark = pytest.mark.unit


class Step(enum.StrEnum):
    ONE = "one"
    TWO = "two"
    THREE = "three"


class ListJournal:
    def __init__(self, done: set[Step] | None = None) -> None:
        self.done = done or set()
        self.events: list[tuple[str, ...]] = []

    def is_done(self, step: Step) -> bool:
        return step in self.done

    def started(self, step: Step) -> None:
        self.events.append(("started", step.value))

    def ok(self, step: Step, detail: Mapping[str, Any]) -> None:
        self.events.append(("ok", step.value, *sorted(detail)))
        self.done.add(step)

    def failed(self, step: Step, error: HsmctlError) -> None:
        self.events.append(("failed", step.value, str(steps.failure_detail(error))))


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def step(self, message: str) -> None:
        self.lines.append(message)

    def advance(self, done: int, total: int, message: str = "") -> None:
        pass


def _hooks(events: list[tuple[str, ...]]) -> steps.Hooks[Step]:
    return steps.Hooks(
        before=lambda s: events.append(("before", s.value)),
        after=lambda s: events.append(("after", s.value)),
        failed=lambda s, e: events.append(("hook-failed", s.value, e.message)),
    )


def test_each_step_is_journaled_around_its_action() -> None:
    journal, progress = ListJournal(), Lines()

    def three() -> dict[str, int]:
        journal.events.append(("action", "three"))
        return {"b": 2}

    plan: dict[Step, steps.Action] = {Step.ONE: lambda: {"a": 1}, Step.TWO: lambda: None}
    plan[Step.THREE] = three
    ran = steps.run(plan, journal, subject="hsm01", progress=progress, hooks=_hooks(journal.events))
    assert ran == {Step.ONE: {"a": 1}, Step.TWO: {}, Step.THREE: {"b": 2}}
    assert journal.events == [
        ("before", "one"),
        ("started", "one"),
        ("ok", "one", "a"),
        ("after", "one"),
        ("before", "two"),
        ("started", "two"),
        ("ok", "two"),
        ("after", "two"),
        ("before", "three"),
        ("started", "three"),
        ("action", "three"),
        ("ok", "three", "b"),
        ("after", "three"),
    ]
    assert progress.lines == ["hsm01: one", "hsm01: two", "hsm01: three"]


def test_steps_the_journal_holds_as_done_are_skipped() -> None:
    journal = ListJournal({Step.ONE, Step.THREE})
    plan: dict[Step, steps.Action] = {s: lambda: None for s in Step}
    assert list(steps.run(plan, journal, subject="hsm01")) == [Step.TWO]
    assert journal.events == [("started", "two"), ("ok", "two")]


def test_a_failure_is_journaled_then_raised_unchanged() -> None:
    journal = ListJournal()
    error = ConflictError("busy")

    def fail() -> None:
        raise error

    plan: dict[Step, steps.Action] = {Step.ONE: lambda: None, Step.TWO: fail, Step.THREE: dict}
    with pytest.raises(ConflictError) as raised:
        steps.run(plan, journal, subject="hsm01", hooks=_hooks(journal.events))
    assert raised.value is error
    assert journal.events[-4:] == [
        ("before", "two"),
        ("started", "two"),
        ("failed", "two", str({"error": "busy", "exit_code": 5})),
        ("hook-failed", "two", "busy"),
    ]
    assert journal.done == {Step.ONE}  # a rerun starts at two


def test_what_is_no_hsmctl_error_is_not_journaled_as_a_failure() -> None:
    # A bug (or KeyboardInterrupt) leaves the step "started": the journal does not claim
    # to know how it ended.
    journal = ListJournal()

    def bug() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        steps.run({Step.ONE: bug}, journal, subject="hsm01")
    assert journal.events == [("started", "one")]
