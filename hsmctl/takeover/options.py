"""What the customer asks of a takeover, checked before anything is sent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hsmctl import contract
from hsmctl.errors import UsageError
from hsmctl.handoff import OpenedBundle
from hsmctl.secret import Secret


@dataclass
class Options:
    handoff: Path
    new_password: Secret | None = None
    so_pin: Secret | None = None
    co_pin: Secret | None = None
    keep_monitor: bool = False


def check_inputs(opts: Options) -> None:
    if opts.new_password is not None:
        try:
            contract.check_password_policy(opts.new_password.reveal())
        except contract.PasswordPolicyError as exc:
            raise UsageError(f"--new-password-file: {exc}") from exc
    for flag, pin in (("--so-pin-file", opts.so_pin), ("--co-pin-file", opts.co_pin)):
        if pin is None:
            continue
        size = len(pin.reveal().encode("utf-8"))
        if not 4 <= size <= 255:
            raise UsageError(f"{flag}: a PIN is 4 to 255 bytes (SoftHSM's range), got {size}")
        if any(ch in pin.reveal() for ch in "\n\r\x00"):
            raise UsageError(f"{flag}: a PIN cannot contain line breaks or NUL")


def token_label(bundle: OpenedBundle) -> str:
    return f"{bundle.tenant}-{bundle.appliance}"[:32]
