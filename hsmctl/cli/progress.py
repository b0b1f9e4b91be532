"""The CLI's renderer of the library's :class:`hsmctl.progress.Progress`, on stderr.

On a terminal: a ``rich.progress`` display with one live line per subject — the
appliance a message is about (``"hsm01: verify"``, see :func:`hsmctl.progress.subject`)
— that shows its latest step, a line for messages about no appliance, and a bar for
``advance``; lines are cut to the terminal's width, never wrapped, and stay on screen in
their last state when the display stops. Otherwise (a pipe, a file, journald): plain
lines, one per message (``- text``, ``- [done/total] text``), no control characters.

Lifecycle: create, use as a context manager around the library call (the display stops
before the CLI's error handler reports, so the report is not drawn over), pass it as the
``progress``. Used without ``with``, the display starts at the first message and stops
at exit. Thread-safe: the collector reports from several threads.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import threading
from collections.abc import Callable
from types import TracebackType

from rich.console import Console, RenderableType
from rich.progress import (
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TimeElapsedColumn,
)
from rich.progress_bar import ProgressBar
from rich.table import Column, Table
from rich.text import Text

from hsmctl.cli.output import _err, plain
from hsmctl.progress import subject

_BAR = "\0bar"  # the key of advance()'s line: no subject can hold a NUL


class CliProgress:
    """The library's Progress, drawn on stderr (see the module docstring)."""

    def __init__(self, quiet: bool = False, *, console: Console | None = None) -> None:
        self.quiet = quiet
        self.console = console or _err
        self.tty = sys.stderr.isatty() if console is None else console.is_terminal
        self._lock = threading.RLock()
        self._live: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    # -- the Progress protocol ------------------------------------------------------------

    def step(self, message: str) -> None:
        if self.quiet:
            return
        if not self.tty:
            self._plain(f"- {plain(message)}")
            return
        who, rest = subject(message)
        self._update(who or "", label=f"{who}:" if who else "", text=rest if who else message)

    def advance(self, done: int, total: int, message: str = "") -> None:
        if self.quiet:
            return
        if not self.tty:
            self._plain(f"- [{done}/{total}] {plain(message)}")
            return
        self._update(_BAR, label="", text=message, done=done, total=max(total, 1))

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> CliProgress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the live display, leaving each line in its last state (idempotent)."""
        with self._lock:
            live, self._live = self._live, None
            if live is None:
                return

            def stop() -> None:
                for task in live.tasks:
                    live.update(task.id, stopped=True)
                    live.stop_task(task.id)
                live.stop()

            _quietly(stop)

    # -- drawing --------------------------------------------------------------------------

    def _plain(self, line: str) -> None:
        with self._lock:
            _quietly(lambda: print(line, file=sys.stderr, flush=True))

    def _update(
        self,
        key: str,
        *,
        label: str,
        text: str,
        done: int | None = None,
        total: int | None = None,
    ) -> None:
        with self._lock:

            def draw() -> None:
                live = self._start()
                shown, said = plain(label), plain(text)
                task = self._tasks.get(key)
                if task is None:
                    self._tasks[key] = live.add_task(
                        "", total=total, completed=done or 0, stopped=False, label=shown, text=said
                    )
                else:
                    live.update(task, total=total, completed=done, label=shown, text=said)

            _quietly(draw)

    def _start(self) -> Progress:
        if self._live is None:
            self._live = Progress(
                _Spinner(finished_text="-", table_column=Column(no_wrap=True, min_width=1)),
                _Label(),
                _Field("text", Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                TimeElapsedColumn(table_column=Column(no_wrap=True, min_width=7)),
                console=self.console,
                transient=False,
                redirect_stdout=False,
                redirect_stderr=False,
                refresh_per_second=8,
            )
            self._tasks = {}
            self._live.start()
            atexit.register(self.close)
        return self._live


class _Spinner(SpinnerColumn):
    def render(self, task: Task) -> RenderableType:
        if task.fields.get("stopped"):
            return self.finished_text
        return super().render(task)


class _Label(ProgressColumn):
    """The line's subject (``hsm01:``); on the line of ``advance``, a bar and ``done/total``."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True))

    def render(self, task: Task) -> RenderableType:
        if task.total is None:
            return Text(str(task.fields.get("label", "")), no_wrap=True, overflow="ellipsis")
        bar = ProgressBar(total=task.total, completed=task.completed, width=16)
        count = Text(f"{int(task.completed)}/{int(task.total)}")
        grid = Table.grid(padding=(0, 1))
        grid.add_row(bar, count)
        return grid


class _Field(ProgressColumn):
    """A task field as text: never markup, already made printable by :func:`plain`."""

    def __init__(self, name: str, column: Column | None = None) -> None:
        super().__init__(table_column=column or Column(no_wrap=True))
        self.name = name

    def render(self, task: Task) -> RenderableType:
        return Text(str(task.fields.get(self.name, "")), no_wrap=True, overflow="ellipsis")


def _quietly(write: Callable[[], None]) -> None:
    """Progress is advisory: a stderr nobody reads any more (a closed pipe) must not stop
    the operation half-way, least of all from inside the library's error handling."""
    with contextlib.suppress(OSError):
        write()
