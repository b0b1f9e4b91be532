"""Human output: aligned tables and key/value listings, drawn with ``rich.table``.

Made for a terminal and for a pipe alike, so one shape serves both: no colour, no box
characters, columns separated by two spaces, a header line in capitals, one row per
line (never wrapped, whatever the width: an id cut in two cannot be copied, and
``grep``/``awk`` see one record per line), no trailing blanks, and ``-`` for a value that
is not there (so ``awk '{print $5}'`` finds the same column on every row). Cells go
through :func:`~hsmctl.cli.output.plain` one by one, before alignment: a control
character in a device's text is shown escaped and still leaves its column straight.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text

from hsmctl.cli.output import plain

MISSING = "-"
_WIDE = 1 << 15
"""The render width: far beyond any row, so rich never wraps or shrinks a column."""


@dataclass(frozen=True)
class Col:
    header: str
    justify: Literal["left", "right"] = "left"


def cell(value: object) -> str:
    """One value as table text: ``-`` for nothing, ``yes``/``no`` for booleans,
    lists joined by ``,``; never a Python repr of a container or ``None``."""
    if value is None or value == "":
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(cell(v) for v in value) or MISSING
    return plain(str(value))


def table(columns: Sequence[Col | str], rows: Iterable[Sequence[object]]) -> str:
    """The rows under their headers, each column as wide as its widest cell."""
    cols = [c if isinstance(c, Col) else Col(c) for c in columns]
    t = Table(
        box=None,
        show_header=True,
        header_style="",
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=False,
    )
    for c in cols:
        t.add_column(Text(c.header), justify=c.justify, no_wrap=True)
    for row in rows:
        t.add_row(*(Text(cell(v)) for v in row))
    return _render(t)


def key_values(payload: Mapping[str, object], *, omit: Iterable[str] = ()) -> str:
    """A mapping as ``key  value`` lines, values aligned; nested mappings indented
    under their key, lists one item per line. Lists of mappings (records) are left to
    the caller, who shows them as a :func:`table`."""
    skip = set(omit)
    t = Table(box=None, show_header=False, show_edge=False, pad_edge=False, padding=(0, 1))
    t.add_column(no_wrap=True)
    t.add_column(no_wrap=True)

    def add(key: str, value: object, indent: int) -> None:
        label = Text(" " * indent + plain(key))
        if isinstance(value, Mapping):
            if not value:
                t.add_row(label, Text(MISSING))
                return
            t.add_row(label, Text(""))
            for k, v in value.items():
                add(str(k), v, indent + 2)
        elif isinstance(value, list | tuple) and value:
            for i, item in enumerate(value):
                t.add_row(label if i == 0 else Text(""), Text(cell(item)))
        else:
            t.add_row(label, Text(cell(value)))

    for key, value in payload.items():
        if key not in skip:
            add(key, value, 0)
    return _render(t)


def _render(renderable: Table) -> str:
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=_WIDE,
        color_system=None,
        force_terminal=False,
        force_jupyter=False,
        no_color=True,
        highlight=False,
        markup=False,
        emoji=False,
        soft_wrap=False,
    )
    console.print(renderable)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())
