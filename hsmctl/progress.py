"""Progress reporting from the library to whoever runs it.

The library never prints. Long operations take a :class:`Progress` and call it; the
CLI supplies one that draws a bar on a terminal and plain lines otherwise, always on
stderr so ``--json`` output stays clean.
"""

from __future__ import annotations

from typing import Protocol


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
