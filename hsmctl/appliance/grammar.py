"""The restricted shell's language: a fixed command table and a strict one-line parser.

The shell is the login shell of every device account, so sshd hands it whatever a client
sends (``SHELL -c LINE``). The parser refuses, before it splits anything, every byte a
POSIX shell would interpret, and tells an escape attempt (``Reason.escape_attempt``) from
a plain typo so the shell can log it as one. Secrets never travel on the line: a command
names the values it reads from stdin. Stdlib only: this runs on the device.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from types import MappingProxyType

from hsmctl.appliance.commandspec import (
    ACCOUNT_NAMES,
    MAX_LAST,
    MAX_LINE_BYTES,
    MAX_SEQ,
    Command,
    CommandSpec,
    Param,
    ParseError,
    Reason,
    Value,
)
from hsmctl.appliance.commandtable import CLIENT_NAME, CLIENT_ROLES, COMMANDS

__all__ = [
    "ACCOUNT_NAMES",
    "CLIENT_NAME",
    "CLIENT_ROLES",
    "COMMANDS",
    "MAX_LAST",
    "MAX_LINE_BYTES",
    "MAX_SEQ",
    "Command",
    "CommandSpec",
    "Param",
    "ParseError",
    "Reason",
    "Value",
    "help_text",
    "loggable",
    "parse",
    "usage",
]

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
