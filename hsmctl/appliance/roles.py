"""Who may run what on the appliance: SPEC §3's role table as data, and one pure decision.

The device daemon applies it to every request (the shell's own check is only a courtesy),
so it is a plain table keyed by a command's full words, including the account a command
names (``user enable monitor``): a reviewer can read every grant without running code.
Ownership ends provider powers: once the admin's one-time password has been changed the
provider is refused everything, whatever the account database still says.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hsmctl.appliance.grammar import ACCOUNT_NAMES, COMMANDS, CommandSpec
from hsmctl.contract import OwnerState

Words = tuple[str, ...]


class Role(enum.Enum):
    """A device account; ``console`` is root on the out-of-band path."""

    PROVIDER = "provider"
    MONITOR = "monitor"
    ADMIN = "admin"
    AUDIT = "audit"
    CONSOLE = "console"
    # A registered application (``p11-NAME``): PKCS#11 on the customer token, nothing of
    # the shell. Not an account name: the daemon maps client accounts to it.
    CLIENT = "client"


class Access(enum.Enum):
    """How a caller reaches the device: an SSH connection to the management or the data
    interface, or the out-of-band console (root, no SSH)."""

    MGMT = "mgmt"
    DATA = "data"
    CONSOLE = "console"


@dataclass(frozen=True)
class DeviceState:
    """Owner state plus whether the admin's one-time password has been replaced.

    The first ``user password`` makes the device customer-owned *before* it changes the
    password (provider out first), and sets ``otp_changed`` once the new password is in
    place. ``(CUSTOMER_OWNED, otp_changed=False)`` is that change interrupted: the
    provider has no power left and the admin may only finish the change.
    """

    owner: OwnerState
    otp_changed: bool = False

    @property
    def customer_owned(self) -> bool:
        # Either fact ends provider powers: a half-finished takeover must not reopen them.
        return self.owner is OwnerState.CUSTOMER_OWNED or self.otp_changed


class Rule(enum.Enum):
    """Which rule decided, so the activity log records why and not only whether."""

    ALWAYS = "always"
    CONSOLE = "console"
    GRANTED = "granted"
    NOT_GRANTED = "not-granted"
    UNKNOWN_COMMAND = "unknown-command"
    PROVIDER_REVOKED = "provider-revoked"
    NOT_PROVISIONED = "not-provisioned"
    OTP_CHANGE_REQUIRED = "otp-change-required"
    PROVIDER_ONLY = "provider-only"
    ACCOUNT_NOT_MANAGED = "account-not-managed"
    CLIENT_ACCOUNT = "client-account"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    rule: Rule


ALWAYS: frozenset[Words] = frozenset({("help",), ("exit",)})

# Commands the provider keeps for itself; the admin never gets them, even as owner.
PROVIDER_ONLY: frozenset[Words] = frozenset(
    {("user", "otp", "set"), ("sysconf", "factory-reset"), ("network", "set")}
)

# The accounts an owning admin manages; never provider (its access is gone) nor admin.
CUSTOMER_MANAGED = ("audit", "monitor")

GRANTS: Mapping[Role, frozenset[Words]] = {
    # Only while not customer-owned (checked before the table).
    Role.PROVIDER: frozenset(
        {
            ("hsm", "show"),
            ("network", "show"),
            ("network", "set"),
            ("user", "otp", "set"),
            ("user", "credential", "set", "monitor"),
            ("user", "enable", "monitor"),
            ("user", "disable", "monitor"),
            ("user", "list"),
            ("sysconf", "provider-access", "show"),
            ("sysconf", "hostkey", "show"),
            ("sysconf", "factory-reset"),
            ("audit", "key", "show"),
        }
    ),
    Role.MONITOR: frozenset({("hsm", "show")}),  # the daemon strips secrets from it
    # Once customer-owned; before that only ADMIN_BEFORE_OWNERSHIP.
    Role.ADMIN: frozenset(
        {
            ("hsm", "show"),
            ("hsm", "init"),
            ("hsm", "zeroize"),
            ("hsm", "co-pin", "set"),
            ("hsm", "co-pin", "change"),
            ("hsm", "domain", "set"),
            ("hsm", "backup-sign"),
            ("user", "password"),
            ("user", "list"),
            ("user", "enable", "audit"),
            ("user", "enable", "monitor"),
            ("user", "disable", "audit"),
            ("user", "disable", "monitor"),
            ("user", "credential", "set", "audit"),
            ("user", "credential", "set", "monitor"),
            ("hsm", "policy", "show"),
            ("client", "register"),
            ("client", "list"),
            ("client", "revoke"),
            ("sysconf", "provider-access", "show"),
            ("sysconf", "provider-access", "revoke"),
            ("sysconf", "hostkey", "show"),
            ("sysconf", "hostkey", "stage"),
            ("sysconf", "hostkey", "activate"),
            ("network", "show"),
            ("audit", "show"),
            ("audit", "export"),
            ("audit", "verify"),
            ("audit", "key", "show"),
            ("audit", "key", "rotate"),
        }
    ),
    Role.AUDIT: frozenset(
        {
            ("audit", "show"),
            ("audit", "export"),
            ("audit", "ack"),  # the collector: lets the device delete what it has stored
            ("audit", "verify"),
            ("audit", "key", "show"),
        }
    ),
    Role.CLIENT: frozenset(),  # refused every shell command, even help and exit
}

ADMIN_BEFORE_OWNERSHIP: frozenset[Words] = frozenset({("user", "password")})

# Commands (by their words, without account arguments) that change nothing: they run
# outside the daemon's device-wide order. Everything else is approved and executed under
# it, so no approval goes stale before its command runs.
READ_ONLY: frozenset[Words] = frozenset(
    {
        ("help",),
        ("exit",),
        ("hsm", "show"),
        ("hsm", "policy", "show"),
        ("client", "list"),
        ("user", "list"),
        ("network", "show"),
        ("sysconf", "provider-access", "show"),
        ("sysconf", "hostkey", "show"),
        ("audit", "show"),
        ("audit", "export"),
        ("audit", "verify"),
        ("audit", "key", "show"),
    }
)

_INTERFACES = {
    Role.PROVIDER: Access.MGMT,
    Role.MONITOR: Access.MGMT,
    Role.ADMIN: Access.DATA,
    Role.AUDIT: Access.DATA,
    Role.CONSOLE: Access.CONSOLE,
    Role.CLIENT: Access.DATA,
}


def allowed_interface(role: Role) -> Access:
    """The one interface a role may log in on; customer accounts never on management."""
    return _INTERFACES[role]


def _resolve(words: Words) -> tuple[CommandSpec, Words] | None:
    """Split full words into a command and its account arguments (aliases accepted)."""
    for spec in COMMANDS:
        for form in (spec.words, *spec.aliases):
            args = words[len(form) :]
            if words[: len(form)] == form and len(args) == len(spec.account_positionals):
                return spec, args
    return None


def _allow(rule: Rule, reason: str = "allowed") -> Decision:
    return Decision(True, reason, rule)


def _deny(rule: Rule, reason: str) -> Decision:
    return Decision(False, reason, rule)


def authorize(role: Role, command_words: Sequence[str], state: DeviceState) -> Decision:
    """May ``role`` run this command now? ``command_words`` is ``Command.acl_words``."""
    resolved = _resolve(tuple(command_words))
    if resolved is None:
        return _deny(Rule.UNKNOWN_COMMAND, f"unknown command '{' '.join(command_words)[:80]}'")
    spec, args = resolved
    key = spec.words + args
    name = " ".join(key)
    if role is Role.CLIENT:
        return _deny(Rule.CLIENT_ACCOUNT, "an application client has no shell commands")
    if spec.words in ALWAYS:
        return _allow(Rule.ALWAYS)
    if role is Role.CONSOLE:
        return _allow(Rule.CONSOLE, "the out-of-band console may run every command")
    if role is Role.PROVIDER and state.customer_owned:
        return _deny(
            Rule.PROVIDER_REVOKED, "device is customer-owned; provider access has been revoked"
        )
    if role is Role.ADMIN and not state.otp_changed:
        if state.owner is OwnerState.FACTORY:
            return _deny(Rule.NOT_PROVISIONED, "the admin account has not been provisioned yet")
        if key in ADMIN_BEFORE_OWNERSHIP:
            return _allow(Rule.GRANTED)
        return _deny(Rule.OTP_CHANGE_REQUIRED, "change the one-time password first: user password")
    if role is Role.ADMIN:
        if spec.words in PROVIDER_ONLY:
            return _deny(
                Rule.PROVIDER_ONLY,
                f"'{name}' is reserved to the provider before hand-over; the admin cannot run it",
            )
        if args and args[0] not in CUSTOMER_MANAGED:
            return _deny(
                Rule.ACCOUNT_NOT_MANAGED,
                f"'{name}': the admin manages only the {' and '.join(CUSTOMER_MANAGED)} accounts",
            )
    if key in GRANTS[role]:
        return _allow(Rule.GRANTED)
    return _deny(
        Rule.NOT_GRANTED,
        f"'{name}' is not permitted for the {role.value} account (type 'help' for yours)",
    )


def authorize_spec(role: Role, spec: CommandSpec, state: DeviceState) -> bool:
    """True when the role may run the command for some account: the help listing filter."""
    if not spec.account_positionals:
        return authorize(role, spec.words, state).allowed
    return any(authorize(role, (*spec.words, name), state).allowed for name in ACCOUNT_NAMES)
