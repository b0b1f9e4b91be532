"""The role table against SPEC §3, written out by hand: every role x command x state."""

from __future__ import annotations

import pytest

from hsmctl.appliance.grammar import ACCOUNT_NAMES, COMMANDS, help_text, parse
from hsmctl.appliance.roles import (
    Access,
    DeviceState,
    Role,
    Rule,
    allowed_interface,
    authorize,
    authorize_spec,
)
from hsmctl.contract import OwnerState

pytestmark = pytest.mark.unit

# Every full command form, account names included.
ALL = [
    "help",
    "exit",
    "hsm show",
    "hsm init",
    "hsm zeroize",
    "hsm co-pin set",
    "hsm co-pin change",
    "hsm domain set",
    "hsm backup-sign",
    "user password",
    "user list",
    "user enable provider",
    "user enable monitor",
    "user enable admin",
    "user enable audit",
    "user disable provider",
    "user disable monitor",
    "user disable admin",
    "user disable audit",
    "user credential set provider",
    "user credential set monitor",
    "user credential set admin",
    "user credential set audit",
    "user otp set",
    "sysconf provider-access show",
    "sysconf provider-access revoke",
    "sysconf hostkey show",
    "sysconf hostkey stage",
    "sysconf hostkey activate",
    "sysconf factory-reset",
    "network show",
    "network set",
    "audit show",
    "audit export",
    "audit ack",
    "audit verify",
    "audit key show",
    "audit key rotate",
    "hsm policy show",
    "client register",
    "client list",
    "client revoke",
]

STATES = {
    "factory": DeviceState(OwnerState.FACTORY),
    "provisioned": DeviceState(OwnerState.PROVISIONED),
    "customer-owned": DeviceState(OwnerState.CUSTOMER_OWNED, otp_changed=True),
    # the first `user password` interrupted between the ownership fact and the new
    # password: the provider is already out, the admin may only finish the change
    "transferring": DeviceState(OwnerState.CUSTOMER_OWNED),
    # the first `user password` sets the flag in the same operation as the state change;
    # the flag alone must already end provider powers
    "otp-changed": DeviceState(OwnerState.PROVISIONED, otp_changed=True),
}

ALWAYS = {"help", "exit"}
PROVIDER_BEFORE_HANDOVER = ALWAYS | {
    "hsm show",
    "network show",
    "network set",
    "user otp set",
    "user credential set monitor",
    "user enable monitor",
    "user disable monitor",
    "user list",
    "sysconf provider-access show",
    "sysconf hostkey show",
    "sysconf factory-reset",
    "audit key show",
}
MONITOR = ALWAYS | {"hsm show"}
AUDIT = ALWAYS | {"audit show", "audit export", "audit ack", "audit verify", "audit key show"}
ADMIN_OWNER = ALWAYS | {
    "hsm show",
    "hsm init",
    "hsm zeroize",
    "hsm co-pin set",
    "hsm co-pin change",
    "hsm domain set",
    "hsm backup-sign",
    "user password",
    "user list",
    "user enable monitor",
    "user enable audit",
    "user disable monitor",
    "user disable audit",
    "user credential set monitor",
    "user credential set audit",
    "sysconf provider-access show",
    "sysconf provider-access revoke",
    "sysconf hostkey show",
    "sysconf hostkey stage",
    "sysconf hostkey activate",
    "network show",
    "audit show",
    "audit export",
    "audit verify",
    "audit key show",
    "audit key rotate",
    "hsm policy show",
    "client register",
    "client list",
    "client revoke",
}

EXPECTED: dict[tuple[Role, str], set[str]] = {
    (Role.PROVIDER, "factory"): PROVIDER_BEFORE_HANDOVER,
    (Role.PROVIDER, "provisioned"): PROVIDER_BEFORE_HANDOVER,
    (Role.PROVIDER, "customer-owned"): ALWAYS,
    (Role.PROVIDER, "otp-changed"): ALWAYS,
    (Role.PROVIDER, "transferring"): ALWAYS,
    (Role.MONITOR, "transferring"): MONITOR,
    (Role.ADMIN, "transferring"): ALWAYS | {"user password"},
    (Role.AUDIT, "transferring"): AUDIT,
    (Role.CONSOLE, "transferring"): set(ALL),
    (Role.MONITOR, "factory"): MONITOR,
    (Role.MONITOR, "provisioned"): MONITOR,
    (Role.MONITOR, "customer-owned"): MONITOR,
    (Role.MONITOR, "otp-changed"): MONITOR,
    (Role.ADMIN, "factory"): ALWAYS,
    (Role.ADMIN, "provisioned"): ALWAYS | {"user password"},
    (Role.ADMIN, "customer-owned"): ADMIN_OWNER,
    (Role.ADMIN, "otp-changed"): ADMIN_OWNER,
    (Role.AUDIT, "factory"): AUDIT,
    (Role.AUDIT, "provisioned"): AUDIT,
    (Role.AUDIT, "customer-owned"): AUDIT,
    (Role.AUDIT, "otp-changed"): AUDIT,
    (Role.CONSOLE, "factory"): set(ALL),
    (Role.CONSOLE, "provisioned"): set(ALL),
    (Role.CONSOLE, "customer-owned"): set(ALL),
    (Role.CONSOLE, "otp-changed"): set(ALL),
    # An application client runs nothing of the shell, not even help.
    **{(Role.CLIENT, state): set() for state in STATES},
}

CASES = [(role, command, state) for role in Role for state in STATES for command in ALL]


def test_command_list_is_complete() -> None:
    forms = set()
    for spec in COMMANDS:
        if spec.account_positionals:
            forms |= {f"{spec.name} {name}" for name in ACCOUNT_NAMES}
        else:
            forms.add(spec.name)
    assert forms == set(ALL)
    assert set(EXPECTED) == {(role, state) for role in Role for state in STATES}


@pytest.mark.parametrize(
    ("role", "command", "state"), CASES, ids=[f"{r.value}|{s}|{c}" for r, c, s in CASES]
)
def test_role_table(role: Role, command: str, state: str) -> None:
    decision = authorize(role, command.split(), STATES[state])
    assert decision.allowed is (command in EXPECTED[role, state])
    assert decision.reason.strip()
    if not decision.allowed:
        assert decision.rule not in {Rule.GRANTED, Rule.ALWAYS, Rule.CONSOLE}
        assert len(decision.reason) >= 20


@pytest.mark.parametrize("command", sorted(set(ALL) - ALWAYS))
@pytest.mark.parametrize("state", ["customer-owned", "otp-changed"])
def test_provider_is_told_access_is_revoked(command: str, state: str) -> None:
    decision = authorize(Role.PROVIDER, command.split(), STATES[state])
    assert decision.rule is Rule.PROVIDER_REVOKED
    assert decision.reason == "device is customer-owned; provider access has been revoked"


@pytest.mark.parametrize("command", sorted(set(ALL) - ALWAYS - {"user password"}))
def test_admin_must_change_the_one_time_password_first(command: str) -> None:
    decision = authorize(Role.ADMIN, command.split(), STATES["provisioned"])
    assert decision.rule is Rule.OTP_CHANGE_REQUIRED
    assert decision.reason == "change the one-time password first: user password"


# (role, command, state) -> the rule that refuses it and words the reason must contain
REFUSALS = [
    (Role.ADMIN, "hsm show", "factory", Rule.NOT_PROVISIONED, "not been provisioned"),
    (Role.ADMIN, "user otp set", "customer-owned", Rule.PROVIDER_ONLY, "user otp set"),
    (Role.ADMIN, "network set", "customer-owned", Rule.PROVIDER_ONLY, "network set"),
    (Role.ADMIN, "sysconf factory-reset", "otp-changed", Rule.PROVIDER_ONLY, "provider"),
    (Role.ADMIN, "user enable provider", "customer-owned", Rule.ACCOUNT_NOT_MANAGED, "audit"),
    (Role.ADMIN, "user credential set admin", "customer-owned", Rule.ACCOUNT_NOT_MANAGED, "mon"),
    (Role.ADMIN, "user disable admin", "customer-owned", Rule.ACCOUNT_NOT_MANAGED, "admin"),
    (Role.PROVIDER, "user enable audit", "provisioned", Rule.NOT_GRANTED, "provider account"),
    (Role.PROVIDER, "hsm init", "factory", Rule.NOT_GRANTED, "hsm init"),
    (Role.PROVIDER, "audit export", "provisioned", Rule.NOT_GRANTED, "audit export"),
    (Role.MONITOR, "user list", "factory", Rule.NOT_GRANTED, "monitor account"),
    (Role.AUDIT, "hsm show", "customer-owned", Rule.NOT_GRANTED, "audit account"),
]


@pytest.mark.parametrize(("role", "command", "state", "rule", "says"), REFUSALS)
def test_refusals_say_why(role: Role, command: str, state: str, rule: Rule, says: str) -> None:
    decision = authorize(role, command.split(), STATES[state])
    assert not decision.allowed
    assert decision.rule is rule
    assert says in decision.reason


def test_quit_is_exit_and_unknown_words_are_refused() -> None:
    owned = STATES["customer-owned"]
    assert authorize(Role.PROVIDER, ["quit"], owned).allowed
    for words in (["user", "enable"], ["user", "enable", "audit", "x"], ["sh"], [], ["hsm"]):
        decision = authorize(Role.CONSOLE, words, owned)
        assert not decision.allowed
        assert decision.rule is Rule.UNKNOWN_COMMAND
        assert decision.reason


def test_parsed_commands_authorize_by_their_acl_words() -> None:
    owned = STATES["customer-owned"]
    assert authorize(Role.ADMIN, parse("user credential set audit").acl_words, owned).allowed
    cmd = parse("user credential set provider")
    assert not authorize(Role.ADMIN, cmd.acl_words, owned).allowed
    assert not authorize(Role.ADMIN, cmd.words, owned).allowed  # the account is required


def test_help_shows_only_what_the_role_may_run() -> None:
    monitor = help_text(lambda s: authorize_spec(Role.MONITOR, s, STATES["factory"]))
    assert [line.split()[0:2] for line in monitor.splitlines()[1:]] == [
        ["help", "list"],
        ["exit", "end"],
        ["hsm", "show"],
    ]
    provisioned_admin = help_text(lambda s: authorize_spec(Role.ADMIN, s, STATES["provisioned"]))
    assert "user password" in provisioned_admin
    assert "hsm init" not in provisioned_admin
    owner = help_text(lambda s: authorize_spec(Role.ADMIN, s, STATES["customer-owned"]))
    assert "user credential set NAME" in owner
    assert "user otp set" not in owner


def test_the_owner_flag_alone_counts_as_customer_owned() -> None:
    assert DeviceState(OwnerState.FACTORY, otp_changed=True).customer_owned
    assert DeviceState(OwnerState.CUSTOMER_OWNED).customer_owned
    assert not DeviceState(OwnerState.PROVISIONED).customer_owned


def test_interfaces() -> None:
    assert {role: allowed_interface(role) for role in Role} == {
        Role.PROVIDER: Access.MGMT,
        Role.MONITOR: Access.MGMT,
        Role.ADMIN: Access.DATA,
        Role.AUDIT: Access.DATA,
        Role.CONSOLE: Access.CONSOLE,
        Role.CLIENT: Access.DATA,
    }
