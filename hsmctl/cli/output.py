"""Printing for the CLI: one JSON object on stdout with ``--json``; human text otherwise
(tables: ``render.py``); progress and logs always on stderr (``progress.py``: live lines on
a terminal, plain lines otherwise).

Every message printed here may carry text from a user, a configuration file or a device
(an error a device sent back, a tenant name, a path). None of it is ever read as rich
markup (``[/oops]`` in a device message once raised ``MarkupError`` inside the error
handler and lost the report) or passed to the terminal raw (an escape sequence in a
device message could recolour or rewrite the operator's screen): rich gets
:class:`~rich.text.Text`, never a markup string, and control characters are shown as
``\\xNN`` by :func:`plain`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console


class _ProgressConsole(Console):
    """rich on stderr, for progress only. On a broken pipe rich's own answer is to put
    /dev/null over *stdout* and exit 1, which would throw away the --json result and end
    an operation half-way because nobody reads its progress; this one just goes quiet."""

    def on_broken_pipe(self) -> None:
        self.quiet = True


_err = _ProgressConsole(stderr=True, highlight=False, markup=False, emoji=False)

# paramiko logs a whole traceback at ERROR, line by line, when a peer speaks bad SSH, and
# with no handler configured Python's last resort prints it raw on stderr: a device (or
# anyone answering at its address) could put a "Traceback" and its own bytes on the
# operator's terminal. The exception itself reaches the caller, translated by the SSH
# transport into the error hsmctl reports, so the CLI drops paramiko's log.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

# C0 controls but tab and newline, DEL, C1 controls (0x9b is a one-byte CSI), and lone
# surrogates (undecodable bytes of a file name, which a strict stdout cannot encode).
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def plain(text: str) -> str:
    """``text`` safe to print on a terminal: unprintable characters as ``\\xNN`` or
    ``\\uNNNN`` escapes, so what a device or a file said stays visible but inert."""
    return _UNPRINTABLE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def emit(as_json: bool, payload: dict[str, Any], human: Callable[[dict[str, Any]], str]) -> None:
    if as_json:
        click.echo(json.dumps(payload, sort_keys=False))
    else:
        click.echo(plain(human(payload)))


def error(message: str) -> None:
    """The one-line (or multi-line: a command's output tail) report on stderr; the text
    is the exception's, often a device's, so it goes through :func:`plain`."""
    print(f"hsmctl: error: {plain(message)}", file=sys.stderr, flush=True)


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print one JSON object on stdout (for automation)."
    )(f)


def config_path(ctx: click.Context) -> str | None:
    """The ``--config`` given to the top-level command, if any (each subcommand reads it
    from the root context, so the option works before any subcommand)."""
    root = ctx.find_root()
    value: str | None = root.obj.get("config_path") if root.obj else None
    return value
