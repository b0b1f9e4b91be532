"""What the customer asks of a takeover, checked before anything is sent."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hsmctl import contract
from hsmctl.clients.request import ClientRequest, check_unique
from hsmctl.errors import UsageError
from hsmctl.handoff import OpenedBundle
from hsmctl.secret import Secret
from hsmctl.takeover.records import ClientKit


@dataclass
class Options:
    handoff: Path
    new_password: Secret | None = None
    so_pin: Secret | None = None
    co_pin: Secret | None = None
    keep_monitor: bool = False
    domain_secret: Secret | None = None  # --domain-file: the token joins that cloning domain
    clients: tuple[ClientRequest, ...] = ()  # --client NAME:ROLE, in the order given


def check_inputs(opts: Options) -> None:
    check_unique(opts.clients)
    if opts.new_password is not None:
        try:
            contract.check_password_policy(opts.new_password.reveal())
        except contract.PasswordPolicyError as exc:
            raise UsageError(f"--new-password-file: {exc}") from exc
    if opts.domain_secret is not None:
        from hsmctl.appliance import domainkey

        try:
            domainkey.check_secret(opts.domain_secret.reveal())
        except ValueError as exc:
            raise UsageError(f"--domain-file: {exc}") from exc
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


def client_set_change(
    requested: Sequence[ClientRequest], journaled: Sequence[ClientKit] | None
) -> str | None:
    """What differs between the ``--client`` set of this run and the one the journal is
    committed to (None: the same, or nothing committed yet). Pure.

    Once the clients step has started (its set journaled before the first key is made),
    a rerun must ask for the same clients with the same roles: a client left out could
    be half made, and one added after the proof would not be in the receipt. The order
    does not matter."""
    if journaled is None:
        return None
    want = {(r.name, r.role) for r in requested}
    have = {(c.name, c.role) for c in journaled}
    if want == have:
        return None
    added = ", ".join(f"{n}:{r}" for n, r in sorted(want - have))
    missing = ", ".join(f"{n}:{r}" for n, r in sorted(have - want))
    parts = [f"not journaled: {added}" if added else "", f"left out: {missing}" if missing else ""]
    return "; ".join(p for p in parts if p)


def check_client_set(
    appliance: str, requested: Sequence[ClientRequest], journaled: Sequence[ClientKit] | None
) -> None:
    change = client_set_change(requested, journaled)
    if change is None:
        return
    shown = " ".join(f"--client {c.name}:{c.role}" for c in journaled or ()) or "no --client"
    raise UsageError(
        f"{appliance}: this takeover is committed to its clients ({shown}); --client differs "
        f"({change}). Rerun with the same --client set; change clients afterwards with "
        "hsmctl client register/revoke"
    )
