"""The restricted shell's language: a fixed command table and a strict one-line parser.

The shell is the login shell of every device account, so sshd hands it whatever a client
sends (``SHELL -c LINE``). The parser refuses, before it splits anything, every byte a
POSIX shell would interpret, and tells an escape attempt (``Reason.escape_attempt``) from
a plain typo so the shell can log it as one. Secrets never travel on the line: a command
names the values it reads from stdin. Stdlib only: this runs on the device.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from hsmctl import contract
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


# --- value converters: raise ValueError with the rule the value broke -----------------

_LABEL = re.compile(r"[A-Za-z0-9._-]{1,32}")
_DIGITS = re.compile(r"[0-9]{1,19}")


def _label(text: str) -> str:
    if not _LABEL.fullmatch(text):
        raise ValueError("must be 1 to 32 characters from A-Z a-z 0-9 . _ -")
    if text.startswith("-"):  # would read as an option to softhsm2-util
        raise ValueError("must not start with '-'")
    return text


def _integer(low: int, high: int) -> Callable[[str], Value]:
    def convert(text: str) -> Value:
        if not _DIGITS.fullmatch(text) or not low <= int(text) <= high:
            raise ValueError(f"must be a whole number from {low} to {high}")
        return int(text)

    return convert


def _account(text: str) -> Value:
    if text not in ACCOUNT_NAMES:
        raise ValueError(f"must be one of {', '.join(ACCOUNT_NAMES)}")
    return text


def _unicast(ip: ipaddress.IPv4Address) -> None:
    if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_reserved:
        raise ValueError(f"{ip} is not a usable unicast address")


def _interface(text: str) -> Value:
    _, slash, prefix = text.partition("/")
    if not slash or not _DIGITS.fullmatch(prefix):
        raise ValueError("must be A.B.C.D/PREFIX")
    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError as exc:
        raise ValueError("must be A.B.C.D/PREFIX with PREFIX from 1 to 32") from exc
    if iface.network.prefixlen < 1:
        raise ValueError("PREFIX must be from 1 to 32")
    _unicast(iface.ip)
    if iface.network.prefixlen <= 30 and iface.ip in (
        iface.network.network_address,
        iface.network.broadcast_address,
    ):
        raise ValueError(f"{iface.ip} is the network or broadcast address of {iface.network}")
    return iface


def _address(text: str) -> Value:
    try:
        ip = ipaddress.IPv4Address(text)
    except ValueError as exc:
        raise ValueError("must be A.B.C.D") from exc
    _unicast(ip)
    return ip


def _gateway_on_link(values: Mapping[str, Value]) -> None:
    """A gateway off the subnet would cut the device off the network it is managed from."""
    iface, gateway = values["ip"], values["gateway"]
    assert isinstance(iface, ipaddress.IPv4Interface)
    assert isinstance(gateway, ipaddress.IPv4Address)
    if gateway not in iface.network:
        raise ValueError(f"--gateway {gateway} is not on {iface.network}")
    if gateway == iface.ip:
        raise ValueError("--gateway must differ from the device's own address")
    if iface.network.prefixlen <= 30 and gateway in (
        iface.network.network_address,
        iface.network.broadcast_address,
    ):
        raise ValueError(f"--gateway {gateway} is the network or broadcast address")


# A client's name becomes part of a Unix account name (``p11-NAME``, at most 32 bytes)
# and of file names: lower-case letters, digits and dashes, a letter first.
CLIENT_NAME = re.compile(r"[a-z][a-z0-9-]{0,27}")
CLIENT_ROLES = ("crypto-officer", "crypto-user")


def _client_name(text: str) -> Value:
    if not CLIENT_NAME.fullmatch(text) or text.endswith("-"):
        raise ValueError(
            "must be 1 to 28 characters from a-z 0-9 -, start with a letter, not end with '-'"
        )
    return text


def _client_role(text: str) -> Value:
    if text not in CLIENT_ROLES:
        raise ValueError(f"must be one of {', '.join(CLIENT_ROLES)}")
    return text


_NAME = Param("name", "NAME", _account)
_CLIENT = Param("name", "NAME", _client_name, account=False)

COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec(("help",), "list the commands you may run", read_only=True),
    CommandSpec(("exit",), "end the session", read_only=True, aliases=(("quit",),)),
    CommandSpec(
        ("hsm", "show"),
        "token, firmware, owner state and who has access",
        read_only=True,
    ),
    CommandSpec(
        ("hsm", "policy", "show"),
        "the key policy every PKCS#11 client is held to",
        read_only=True,
    ),
    CommandSpec(
        ("hsm", "init"),
        "initialise the token, wiping every object on it",
        params=(Param("label", "LABEL", _label, flag="--label"),),
        stdin=("so_pin",),
    ),
    CommandSpec(("hsm", "zeroize"), "erase the token and its keys beyond recovery"),
    CommandSpec(
        ("hsm", "co-pin", "set"),
        "set the crypto-officer PIN as security officer",
        stdin=("so_pin", "co_pin"),
    ),
    CommandSpec(
        ("hsm", "co-pin", "change"),
        "change the crypto-officer PIN",
        stdin=("old_co_pin", "new_co_pin"),
    ),
    CommandSpec(
        ("user", "password"),
        "change your password (admin's first change: customer-owned)",
        stdin=("new_password",),
    ),
    CommandSpec(("user", "list"), "list the accounts and whether each is enabled", read_only=True),
    CommandSpec(("user", "enable"), "unlock an account", params=(_NAME,)),
    CommandSpec(("user", "disable"), "lock an account", params=(_NAME,)),
    CommandSpec(
        ("user", "credential", "set"),
        "install the SSH public key an account logs in with",
        params=(_NAME,),
        stdin=("ssh_public_key",),
    ),
    CommandSpec(
        ("user", "otp", "set"),
        "set the admin's SSH key and one-time password",
        params=(
            Param(
                "expires_hours",
                "H",
                _integer(1, 720),
                flag="--expires-hours",
                required=False,
                default=contract.OTP_VALID_HOURS,
            ),
        ),
        stdin=("ssh_public_key", "password"),
    ),
    CommandSpec(
        ("client", "register"),
        "register an application: its own SSH key, PKCS#11 on the customer token only",
        params=(_CLIENT, Param("role", "ROLE", _client_role, flag="--role")),
        stdin=("ssh_public_key",),
    ),
    CommandSpec(("client", "list"), "list the registered applications", read_only=True),
    CommandSpec(
        ("client", "revoke"),
        "remove an application and end its open PKCS#11 sessions",
        params=(_CLIENT,),
    ),
    CommandSpec(
        ("sysconf", "provider-access", "show"),
        "show whether the provider can still log in",
        read_only=True,
    ),
    CommandSpec(("sysconf", "provider-access", "revoke"), "lock the provider out for good"),
    CommandSpec(
        ("sysconf", "hostkey", "show"),
        "active and staged data-interface host key fingerprints",
        read_only=True,
    ),
    CommandSpec(
        ("sysconf", "hostkey", "stage"),
        "make new data-interface host keys, print fingerprints",
    ),
    CommandSpec(
        ("sysconf", "hostkey", "activate"), "switch the data interface to the staged host keys"
    ),
    CommandSpec(
        ("sysconf", "factory-reset"), "return to factory state, wiping tokens and accounts"
    ),
    CommandSpec(("network", "show"), "show addresses and routes", read_only=True),
    CommandSpec(
        ("network", "set"),
        "set the device address and default gateway",
        params=(
            Param("ip", "A.B.C.D/PREFIX", _interface, flag="--ip"),
            Param("gateway", "A.B.C.D", _address, flag="--gateway"),
        ),
        check=_gateway_on_link,
    ),
    CommandSpec(
        ("audit", "show"),
        "show activity-log records, the last N if given",
        params=(Param("last", "N", _integer(0, MAX_LAST), flag="--last", required=False),),
        read_only=True,
    ),
    CommandSpec(
        ("audit", "export"),
        "print records after SEQ as JSON lines, signed at the end",
        params=(Param("after", "SEQ", _integer(0, MAX_SEQ), flag="--after", required=False),),
        read_only=True,
    ),
    CommandSpec(
        ("audit", "verify"), "check the hash chain and checkpoint signatures", read_only=True
    ),
    CommandSpec(
        ("audit", "key", "show"),
        "the audit signing key in use (key id, public key)",
        read_only=True,
    ),
    CommandSpec(
        ("audit", "key", "rotate"),
        "make a new audit signing key, linked to the old one by a record both sign",
    ),
)

_FORMS: dict[tuple[str, ...], CommandSpec] = {
    form: spec for spec in COMMANDS for form in (spec.words, *spec.aliases)
}
_GROUPS = frozenset(words[:n] for words in _FORMS for n in range(1, len(words)))

# Names sshd, scp, sftp, rsync, git or an attacker would ask a login shell to run.
_PROGRAM_NAMES = """
    sh bash dash zsh ksh mksh csh tcsh fish ash busybox rbash exec env command builtin eval
    source nohup setsid script login su sudo doas chsh passwd newgrp sg
    scp sftp sftp-server internal-sftp rsync ssh ssh-agent ssh-add ssh-keygen git
    git-upload-pack git-receive-pack git-upload-archive
    python python3 perl ruby php lua luajit node nodejs tclsh wish expect gdb strace
    awk gawk mawk sed ed ex vi vim nvim view nano pico emacs less more pager man info
    cat tac head tail tee dd cp mv rm ln chmod chown mkdir rmdir touch find xargs tar gzip
    cpio zip unzip ls dir id whoami who w uname hostname ps top kill killall pkill pgrep
    nc ncat netcat socat telnet curl wget ftp tftp openssl ip ifconfig ping
    softhsm2-util pkcs11-tool systemctl journalctl crontab at true false echo printf test
"""
_PROGRAMS = frozenset(_PROGRAM_NAMES.split())
_VERSIONED_PROGRAM = re.compile(r"(python|perl|ruby|php|lua|pypy|node)[0-9.]*")

_METACHARS = frozenset(";&|`$<>(){}\\*?[]~!\n")
_QUOTES = frozenset("'\"")


def _shown(char: str) -> str:
    """A character the terminal will show as itself, whatever it is."""
    return char if " " < char < "\x7f" else f"U+{ord(char):04X}"


def _screen(line: bytes | str) -> str:
    """Refuse everything a shell might interpret; return text safe to split on spaces."""
    if isinstance(line, str):
        try:
            raw = line.encode("utf-8")
        except UnicodeEncodeError as exc:  # surrogate-escaped undecodable argv bytes
            raise ParseError(Reason.ENCODING, "the line is not valid UTF-8") from exc
    else:
        raw = bytes(line)
    if b"\x00" in raw:
        raise ParseError(Reason.NUL, "the line contains a NUL byte")
    if len(raw) > MAX_LINE_BYTES:
        raise ParseError(Reason.TOO_LONG, f"the line is longer than {MAX_LINE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParseError(Reason.ENCODING, "the line is not valid UTF-8") from exc
    checks: tuple[tuple[Reason, Callable[[str], bool], str], ...] = (
        (Reason.METACHAR, _METACHARS.__contains__, "this shell runs one device command"),
        (Reason.QUOTE, _QUOTES.__contains__, "no quoting is needed: values have no spaces"),
        (Reason.CONTROL, lambda c: c < " " or "\x7f" <= c <= "\x9f", "control characters"),
        (Reason.NON_ASCII, lambda c: c > "\x7f", "commands are plain ASCII"),
    )
    for reason, bad, why in checks:
        for index, char in enumerate(text):
            if bad(char):
                raise ParseError(
                    reason,
                    f"character {_shown(char)} at position {index + 1} is not allowed ({why})",
                )
    if ".." in text:
        raise ParseError(Reason.TRAVERSAL, "'..' is not allowed: there are no paths here")
    return text


def _is_program(word: str) -> bool:
    return "/" in word or word in _PROGRAMS or bool(_VERSIONED_PROGRAM.fullmatch(word))


def _match(tokens: list[str]) -> tuple[CommandSpec, list[str]]:
    for n in range(min(len(tokens), 3), 0, -1):
        spec = _FORMS.get(tuple(tokens[:n]))
        if spec is not None:
            return spec, tokens[n:]
    for n in range(min(len(tokens), 2), 0, -1):
        group = tuple(tokens[:n])
        if group in _GROUPS:
            members = [s for s in COMMANDS if s.words[:n] == group]
            said = " ".join(group)
            message = (
                f"'{said}' needs a subcommand"
                if len(tokens) == n
                else f"unknown subcommand '{tokens[n][:40]}' for '{said}'"
            )
            raise ParseError(Reason.UNKNOWN_COMMAND, message, usage=_usage_lines(members))
    if _is_program(tokens[0]):
        raise ParseError(
            Reason.PROGRAM,
            "programs cannot be started here; this shell runs device commands only (type 'help')",
        )
    raise ParseError(Reason.UNKNOWN_COMMAND, f"unknown command '{tokens[0][:40]}' (type 'help')")


def _fail(reason: Reason, spec: CommandSpec, message: str) -> ParseError:
    return ParseError(reason, f"{spec.name}: {message}", usage=_usage_lines([spec]))


def _bind(spec: CommandSpec, rest: list[str]) -> dict[str, Value]:
    flags = {p.flag: p for p in spec.params if p.flag is not None}
    positionals = list(spec.positionals)
    raw: dict[str, tuple[Param, str]] = {}
    i = 0
    while i < len(rest):
        token = rest[i]
        if token.startswith("-"):
            flag, eq, inline = token.partition("=")
            param = flags.get(flag)
            if param is None:
                raise _fail(Reason.UNKNOWN_OPTION, spec, f"unknown option '{flag[:40]}'")
            if param.key in raw:
                raise _fail(Reason.DUPLICATE_OPTION, spec, f"{flag} given twice")
            if eq:
                value, i = inline, i + 1
            elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                value, i = rest[i + 1], i + 2
            else:
                value, i = "", i + 1
            if not value:
                raise _fail(Reason.MISSING_ARGUMENT, spec, f"{flag} needs a value")
        else:
            if not positionals:
                raise _fail(Reason.EXTRA_ARGUMENT, spec, f"unexpected argument '{token[:40]}'")
            param, value, i = positionals.pop(0), token, i + 1
        raw[param.key] = (param, value)
    values: dict[str, Value] = {}
    for param in spec.params:
        if param.key in raw:
            try:
                values[param.key] = param.convert(raw[param.key][1])
            except ValueError as exc:
                raise _fail(Reason.BAD_VALUE, spec, f"{param.metavar} {exc}") from exc
        elif param.required:
            raise _fail(Reason.MISSING_ARGUMENT, spec, f"{param.usage} is required")
        elif param.default is not None:
            values[param.key] = param.default
    if spec.check is not None:
        try:
            spec.check(values)
        except ValueError as exc:
            raise _fail(Reason.BAD_VALUE, spec, str(exc)) from exc
    return values


def loggable(line: bytes | str) -> str:
    """A refused line as the activity log may keep it: the leading words that name a
    command (or a command group), then only how many more words there were.

    Whatever else a person typed may be a secret given as an argument by mistake
    (``user password N3w-Secret``): no value from a refused line reaches the log.
    """
    raw = line if isinstance(line, bytes) else line.encode("utf-8", "surrogateescape")
    tokens = raw.decode("utf-8", "replace").split()
    known = 0
    for n in range(1, min(len(tokens), 3) + 1):
        if tuple(tokens[:n]) in _FORMS or tuple(tokens[:n]) in _GROUPS:
            known = n
    shown = " ".join(tokens[:known])
    rest = len(tokens) - known
    if rest:
        shown = f"{shown} [{rest} more word{'s' if rest > 1 else ''} not logged]".lstrip()
    return shown


def parse(line: bytes | str) -> Command:
    """Parse one command line, or raise ParseError; the caller strips the line ending."""
    tokens = _screen(line).split()
    if not tokens:
        raise ParseError(Reason.EMPTY, "empty command line (type 'help')")
    spec, rest = _match(tokens)
    return Command(spec, MappingProxyType(_bind(spec, rest)))


def usage(spec: CommandSpec) -> str:
    """One synopsis line, e.g. ``user otp set [--expires-hours H]``."""
    return " ".join([*spec.words, *(p.usage for p in spec.params)])


def _usage_lines(specs: Iterable[CommandSpec]) -> str:
    return "usage:\n" + "\n".join(f"  {usage(s)}" for s in specs)


def help_text(role_filter: Callable[[CommandSpec], bool] | None = None) -> str:
    """The help listing, limited to the commands ``role_filter`` lets the caller run."""
    specs = [s for s in COMMANDS if role_filter is None or role_filter(s)]
    width = max((len(usage(s)) for s in specs), default=0)
    lines = ["Commands (secrets are read from stdin, never typed on the line):"]
    for spec in specs:
        text = spec.help
        if spec.aliases:
            text += " (also: " + ", ".join(" ".join(a) for a in spec.aliases) + ")"
        lines.append(f"  {usage(spec).ljust(width)}  {text}")
        if spec.stdin:
            lines.append(f"  {'':{width}}    stdin: {', '.join(spec.stdin)}")
    return "\n".join(lines)
