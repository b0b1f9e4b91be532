"""A fact: a device command and the pure parser of its JSON reply (pyinfra's shape).

The parser never sees a connection: it gets the bytes a device sent and returns a typed
value, or raises :class:`~hsmctl.errors.IntegrityError` (exit 3) naming the appliance and
the reply. So whatever path a reply came by (the data or management interface, the
out-of-band console, a test's recorded output), it is judged the same way, and a caller
reads ``info.owner_state`` instead of ``info.get("owner_state")`` on a dict it hopes is
well formed.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from hsmctl import devicejson
from hsmctl.errors import IntegrityError

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)


class _Output(Protocol):
    @property
    def stdout(self) -> str: ...


class Runs(Protocol):
    """What :meth:`Fact.on` needs of a connection: ``DeviceConnection.run``'s shape."""

    def run(self, command: str) -> _Output: ...


class Fields:
    """One reply object, read field by field. A field that is missing or of another type
    than the device contract says is the device's fault, so it is an IntegrityError like
    malformed JSON; extra fields are ignored (a newer firmware may add some)."""

    def __init__(self, obj: Mapping[str, Any], what: str, host: str | None, at: str = "") -> None:
        self._obj = obj
        self.what = what
        self.host = host
        self.at = at  # where in the reply this object is ("clients[2]"), for the message

    def error(self, problem: str) -> IntegrityError:
        where = f"{self.host}: " if self.host else ""
        problem = f"{self.at}: {problem}" if self.at else problem
        detail: dict[str, object] = {"what": self.what}
        if self.host:
            detail = {"appliance": self.host, **detail}
        return IntegrityError(f"{where}{self.what}: {problem}", detail=detail)

    def _get(self, key: str, kind: type | tuple[type, ...], name: str, optional: bool) -> Any:
        if key not in self._obj or self._obj[key] is None:
            if optional:
                return None
            raise self.error(f"no {key!r}")
        value = self._obj[key]
        # bool is an int in Python, never in the device contract.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(f"{key!r} is not {name}")
        return value

    def text(self, key: str) -> str:
        value: str = self._get(key, str, "a string", False)
        return value

    def optional_text(self, key: str) -> str | None:
        value: str | None = self._get(key, str, "a string", True)
        return value

    def flag(self, key: str) -> bool:
        value: bool = self._get(key, bool, "true or false", False)
        return value

    def optional_flag(self, key: str) -> bool | None:
        value: bool | None = self._get(key, bool, "true or false", True)
        return value

    def number(self, key: str) -> int:
        value: int = self._get(key, int, "an integer", False)
        return value

    def optional_number(self, key: str) -> int | None:
        value: int | None = self._get(key, int, "an integer", True)
        return value

    def texts(self, key: str) -> tuple[str, ...]:
        items: list[Any] = self._get(key, list, "a list", False)
        if not all(isinstance(item, str) for item in items):
            raise self.error(f"{key!r} is not a list of strings")
        return tuple(items)

    def objects(self, key: str) -> tuple[Fields, ...]:
        """A list of objects, each read field by field like the reply itself."""
        items: list[Any] = self._get(key, list, "a list", False)
        if not all(isinstance(item, dict) for item in items):
            raise self.error(f"{key!r} is not a list of objects")
        prefix = f"{self.at}." if self.at else ""
        return tuple(
            Fields(item, self.what, self.host, f"{prefix}{key}[{n}]")
            for n, item in enumerate(items)
        )

    def object(self, key: str) -> Fields:
        """A nested object, read field by field like the reply itself."""
        value: dict[str, Any] = self._get(key, dict, "an object", False)
        prefix = f"{self.at}." if self.at else ""
        return Fields(value, self.what, self.host, f"{prefix}{key}")

    def choice(self, key: str, cls: type[E]) -> E:
        value = self.text(key)
        try:
            return cls(value)
        except ValueError:
            known = ", ".join(repr(m.value) for m in cls)
            raise self.error(f"{key!r} is {value[:40]!r}, not one of {known}") from None


@dataclass(frozen=True)
class Fact(Generic[T]):
    """``command`` and the pure ``parser`` of its reply.

    A command that changes something and answers JSON (``audit key rotate``) has the same
    shape: the parser is what matters, and it is tested from recorded outputs.
    """

    command: str
    parser: Callable[[Fields], T]

    def process(self, output: str | bytes, host: str | None = None, *, via: str = "reply") -> T:
        """Parse ``output`` that ``host`` sent (``via``: "reply", "console reply")."""
        what = f"{via} to {self.command!r}"
        return self.parser(Fields(devicejson.loads_object(output, what, host), what, host))

    def on(self, conn: Runs, host: str | None = None) -> T:
        """Run the command over ``conn`` and parse its reply."""
        return self.process(conn.run(self.command).stdout, host)
