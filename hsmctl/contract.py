"""What the device and its clients agree on: the device shell's exit statuses, the owner
states ``hsm show`` reports, and the password policy.

Standard library only, and in the firmware file list (``hsmctl/lab/firmware.py``), so the
appliance and the client import the same definitions and neither imports the other.
"""

from __future__ import annotations

import enum
from typing import Final

# Device-shell exit statuses (sysexits.h where one fits).
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 64  # the device parsed nothing, changed nothing
EXIT_INTEGRITY: Final = 65  # e.g. ``audit verify`` found a broken chain
EXIT_UNAVAILABLE: Final = 69  # the device daemon is down
EXIT_DENIED: Final = 77  # the role table refused


class OwnerState(enum.Enum):
    """Who owns the device (``hsm show`` ``owner_state``)."""

    FACTORY = "factory"  # no admin credential yet
    PROVISIONED = "provisioned"  # one-time password set, not yet changed
    CUSTOMER_OWNED = "customer-owned"


OTP_VALID_HOURS: Final = 72  # SPEC §3: the one-time password's default validity

MIN_PASSWORD: Final = 12
MAX_PASSWORD: Final = 128


class PasswordPolicyError(ValueError):
    """A password the device would refuse; the message is safe to show and to log."""


def check_password_policy(password: str) -> None:
    """At least 12 characters from at least 3 of the 4 character classes (SPEC §3)."""
    if len(password) < MIN_PASSWORD:
        raise PasswordPolicyError(f"password too short: at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise PasswordPolicyError(f"password too long: at most {MAX_PASSWORD} characters")
    if any(ch in password for ch in "\n\r\x00:"):
        raise PasswordPolicyError("password contains a forbidden character (newline, NUL or ':')")
    classes = [
        any(c.islower() for c in password),
        any(c.isupper() for c in password),
        any(c.isdigit() for c in password),
        any(not c.isalnum() for c in password),
    ]
    if sum(classes) < 3:
        raise PasswordPolicyError(
            "password too weak: use at least 3 of lower case, upper case, digits, symbols"
        )
