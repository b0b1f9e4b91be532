"""The shell language's vocabulary: why a line is refused, what a command looks like
(``CommandSpec``, ``Param``) and a parsed one (``Command``). Stdlib only: firmware."""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from hsmctl.errors import UsageError

MAX_LINE_BYTES = 512
ACCOUNT_NAMES = ("provider", "monitor", "admin", "audit")
MAX_LAST = 10_000
MAX_SEQ = 2**63 - 1

Value = str | int | ipaddress.IPv4Interface | ipaddress.IPv4Address


class Reason(enum.Enum):
    """Why a line was refused; machine-readable for the activity log."""

    EMPTY = "empty"
    NUL = "nul"
    TOO_LONG = "too-long"
    ENCODING = "encoding"
    METACHAR = "metacharacter"
    QUOTE = "quote"
    CONTROL = "control"
    NON_ASCII = "non-ascii"
    TRAVERSAL = "traversal"
    PROGRAM = "program"
    UNKNOWN_COMMAND = "unknown-command"
    UNKNOWN_OPTION = "unknown-option"
    DUPLICATE_OPTION = "duplicate-option"
    MISSING_ARGUMENT = "missing-argument"
    EXTRA_ARGUMENT = "extra-argument"
    BAD_VALUE = "bad-value"

    @property
    def escape_attempt(self) -> bool:
        """True when no honest typo produces this: the shell logs it as an attack."""
        return self in _ESCAPES


# Quotes alone cannot do harm once metacharacters are gone; people type them by habit.
_ESCAPES = frozenset(
    {
        Reason.NUL,
        Reason.TOO_LONG,
        Reason.ENCODING,
        Reason.METACHAR,
        Reason.CONTROL,
        Reason.NON_ASCII,
        Reason.TRAVERSAL,
        Reason.PROGRAM,
    }
)


class ParseError(UsageError):
    """A refused line: ``reason`` for the log, the message (with usage) for the person."""

    def __init__(self, reason: Reason, message: str, *, usage: str = "") -> None:
        text = f"{message}\n{usage}" if usage else message
        super().__init__(text, detail={"reason": reason.value})
        self.reason = reason
        self.usage = usage


@dataclass(frozen=True)
class Param:
    """One argument: an ``--option VALUE`` when ``flag`` is set, else positional."""

    key: str
    metavar: str
    convert: Callable[[str], Value] = field(compare=False)
    flag: str | None = None
    required: bool = True
    default: Value | None = None
    account: bool = True  # a positional naming a device account: part of the ACL key

    @property
    def usage(self) -> str:
        text = self.metavar if self.flag is None else f"{self.flag} {self.metavar}"
        return text if self.required else f"[{text}]"


@dataclass(frozen=True)
class CommandSpec:
    """A device command: its words, arguments, the stdin secrets it reads (in order)."""

    words: tuple[str, ...]
    help: str
    params: tuple[Param, ...] = ()
    stdin: tuple[str, ...] = ()
    read_only: bool = False
    aliases: tuple[tuple[str, ...], ...] = ()
    check: Callable[[Mapping[str, Value]], None] | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return " ".join(self.words)

    @property
    def positionals(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.flag is None)

    @property
    def account_positionals(self) -> tuple[Param, ...]:
        """The positionals the role table is keyed by (``user enable monitor``); a client
        name (``client revoke app1``) is an argument, not a grant."""
        return tuple(p for p in self.positionals if p.account)


@dataclass(frozen=True)
class Command:
    """A parsed line; ``options`` holds converted values keyed by ``Param.key``."""

    spec: CommandSpec
    options: Mapping[str, Value]

    @property
    def words(self) -> tuple[str, ...]:
        return self.spec.words

    @property
    def acl_words(self) -> tuple[str, ...]:
        """What the role table is keyed by: the words plus the account a command names."""
        return self.spec.words + tuple(self.get_str(p.key) for p in self.spec.account_positionals)

    def get_str(self, key: str) -> str:
        value = self.options[key]
        if not isinstance(value, str):
            raise TypeError(f"option {key!r} is not text")
        return value

    def get_int(self, key: str) -> int | None:
        value = self.options.get(key)
        if value is None or isinstance(value, int):
            return value
        raise TypeError(f"option {key!r} is not an integer")

    def get_interface(self, key: str) -> ipaddress.IPv4Interface:
        value = self.options[key]
        if not isinstance(value, ipaddress.IPv4Interface):
            raise TypeError(f"option {key!r} is not an address with prefix")
        return value

    def get_address(self, key: str) -> ipaddress.IPv4Address:
        value = self.options[key]
        if not isinstance(value, ipaddress.IPv4Address) or isinstance(
            value, ipaddress.IPv4Interface
        ):
            raise TypeError(f"option {key!r} is not an address")
        return value

    def canonical(self) -> str:
        """The line in normal form, safe to log (never the raw input)."""
        parts = list(self.spec.words)
        for p in self.spec.params:
            if p.key in self.options:
                value = str(self.options[p.key])
                parts.append(value if p.flag is None else f"{p.flag} {value}")
        return " ".join(parts)
