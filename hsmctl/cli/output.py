"""Printing for the CLI: one JSON object on stdout with ``--json``; human text otherwise;
progress and logs always on stderr (a live line on a terminal, plain lines otherwise)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console

_err = Console(stderr=True, highlight=False)


class CliProgress:
    """The library's Progress, drawn on stderr."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def step(self, message: str) -> None:
        if self.quiet:
            return
        if self.tty:
            _err.print(f"[dim]·[/dim] {message}", markup=True, soft_wrap=True)
        else:
            print(f"- {message}", file=sys.stderr, flush=True)

    def advance(self, done: int, total: int, message: str = "") -> None:
        if self.quiet:
            return
        width = 24
        filled = int(width * done / total) if total else width
        if self.tty:
            bar = "█" * filled + "░" * (width - filled)
            _err.print(f"  {bar} {done}/{total} {message}", markup=False)
        else:
            print(f"- [{done}/{total}] {message}", file=sys.stderr, flush=True)


def emit(as_json: bool, payload: dict[str, Any], human: Callable[[dict[str, Any]], str]) -> None:
    if as_json:
        click.echo(json.dumps(payload, sort_keys=False))
    else:
        click.echo(human(payload))


def error(message: str) -> None:
    print(f"hsmctl: error: {message}", file=sys.stderr, flush=True)


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print one JSON object on stdout (for automation)."
    )(f)
