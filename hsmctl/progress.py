"""Progress reporting from the library to whoever runs it.

The library never prints. Long operations take a :class:`Progress` and call it; the
CLI supplies one (``hsmctl/cli/progress.py``, the only user of ``rich.progress``) that
draws one live line per appliance on a terminal and plain lines otherwise, always on
stderr so ``--json`` output stays clean.

A message about one appliance starts with its id and ``": "`` (``"hsm01: verify"``,
as :mod:`hsmctl.steps` writes them): :func:`subject` reads it back, and a renderer may
group by it. Anything else is a message about the whole operation.
"""

from __future__ import annotations

import re
from typing import Protocol

# An inventory name (hsmctl.inventory.reader.NAME_RE), then ": ".
_SUBJECT = re.compile(r"([A-Za-z][A-Za-z0-9._-]{0,62}): (.*)", re.DOTALL)


def subject(message: str) -> tuple[str | None, str]:
    """``(appliance, rest)`` of a message about one appliance, else ``(None, message)``."""
    match = _SUBJECT.fullmatch(message)
    return (match.group(1), match.group(2)) if match else (None, message)


class Progress(Protocol):
    """Messages are plain text and often carry a device's words or a user's input: an
    implementation prints them as they are, never interprets them (as markup, format
    strings or terminal escapes), and never lets printing one fail the operation."""

    def step(self, message: str) -> None:
        """A step started or finished (one line)."""

    def advance(self, done: int, total: int, message: str = "") -> None:
        """Count-based progress of one task."""


class NullProgress:
    def step(self, message: str) -> None:
        pass

    def advance(self, done: int, total: int, message: str = "") -> None:
        pass
