"""Secrets that never print, and the one way to read them from files.

A :class:`Secret` shows ``***`` in ``str``, ``repr``, f-strings, logs, exceptions and
JSON; the value is reachable only through :meth:`Secret.reveal`, so every use of it is
greppable.
"""

from __future__ import annotations

import os
from pathlib import Path

from hsmctl.errors import UsageError
from hsmctl.privatefiles import read_private


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")


def read_secret_file(path: str | os.PathLike[str], *, what: str = "secret") -> Secret:
    """Read one secret from a file the way SPEC §6 says.

    One trailing newline is stripped; a file readable by group or others is refused
    (exit 2), as is a missing or empty file (:func:`hsmctl.privatefiles.read_private`).
    """
    p = Path(path)
    data = read_private(p, what=f"{what} file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} file {p}: not UTF-8") from exc
    if text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise UsageError(f"{what} file {p}: empty")
    return Secret(text)


_CLASSES = (
    "abcdefghijkmnopqrstuvwxyz",
    "ABCDEFGHJKLMNPQRSTUVWXYZ",
    "23456789",
    "-_.+=@%",
)


def generate_password(length: int = 24) -> Secret:
    """A random password meeting the device policy (SPEC §3: at least 12 characters, 3 of
    4 classes): every class appears at least once; no look-alike characters."""
    import secrets

    if length < 12:
        raise ValueError("passwords are at least 12 characters")
    alphabet = "".join(_CLASSES)
    while True:
        chars = [secrets.choice(alphabet) for _ in range(length)]
        if all(any(c in cls for c in chars) for cls in _CLASSES):
            return Secret("".join(chars))


def generate_pin(length: int = 16) -> Secret:
    """A random PIN for SoftHSM (4..255 bytes): letters and digits."""
    import secrets
    import string

    return Secret(
        "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(length))
    )
