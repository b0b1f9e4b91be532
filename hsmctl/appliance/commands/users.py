"""Accounts and ownership: ``user password|list|enable|disable|credential set|otp set``; the
first password change by the admin makes the device customer-owned."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from hsmctl import contract
from hsmctl.appliance import accounts, faults, store
from hsmctl.appliance.commands.common import Context, Reply, as_json
from hsmctl.appliance.grammar import Command
from hsmctl.appliance.roles import Role
from hsmctl.contract import OwnerState

if TYPE_CHECKING:
    from hsmctl.appliance.daemon import Daemon


def user_password(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    (password,) = secrets
    accounts.check_password_policy(password)
    user = ctx.caller_account
    owner = ctx.owner
    if not (user == "admin" and not owner.device_state().otp_changed):
        accounts.set_password(user, password)
        return Reply(output="password changed")
    if owner.state is OwnerState.FACTORY:
        return Reply.failure("the admin account has not been provisioned yet")
    # The first change by the admin makes the device customer-owned in the same
    # operation, in this order, so that no crash at any point leaves the provider
    # enabled once the customer's password works: (1) the one-way fact on disk,
    # (2) the provider locked out, (3) the new password, (4) ``otp_changed``. A crash
    # after (1) leaves the provider out and the admin able to finish the change with
    # the one-time password; a crash after (3) is recognised by the shadow entry
    # (:meth:`store.Owner.load`).
    now = time.time()
    fresh = not store.customer_owned_fact()
    store.record_ownership(now)
    owner.state = OwnerState.CUSTOMER_OWNED
    owner.owned_since = owner.owned_since or now
    owner.otp_expires = None
    owner.provider_access = False
    owner.save()
    lock_provider()
    if fresh:
        daemon.record(
            "hsmd",
            "system",
            "console",
            "ownership-transfer",
            "ok",
            {"owner": "customer", "provider_access": "revoked"},
        )
    faults.reached("user-password:owned")
    accounts.set_password(user, password)
    faults.reached("user-password:changed")
    owner.otp_changed = True
    owner.save()
    return Reply(
        output="password changed; the device is now customer-owned and the "
        "provider's access is revoked",
        log_detail={"first_change": True},
    )


def provider_guard(ctx: Context) -> None:
    """Re-check inside the handler, under the device-wide order, that the provider
    still has powers: the role table decided on the same state, but a handler that
    changes what the provider controls checks the one-way fact itself."""
    if ctx.role is Role.PROVIDER and (
        store.customer_owned_fact() or ctx.owner.device_state().customer_owned
    ):
        raise store.OwnershipError("device is customer-owned; provider access has been revoked")


def lock_provider() -> None:
    owner = store.Owner.load()
    owner.provider_access = False
    owner.save()
    accounts.remove_authorized_key("provider")
    accounts.disable("provider")
    accounts.end_sessions("provider")


def _managed(ctx: Context, name: str) -> None:
    if name not in ("monitor", "audit") and ctx.role is not Role.CONSOLE:
        raise accounts.AccountError(f"{name} cannot be managed this way")


def user_enable(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    name = cmd.get_str("name")
    _managed(ctx, name)
    provider_guard(ctx)
    if not accounts.has_key(name):
        return Reply.failure(
            f"{name} has no credential; set one first (user credential set {name})"
        )
    accounts.enable(name)
    return Reply(output=f"{name} enabled", log_detail={"account": name})


def user_disable(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    name = cmd.get_str("name")
    _managed(ctx, name)
    provider_guard(ctx)
    accounts.disable(name)
    accounts.end_sessions(name)
    return Reply(output=f"{name} disabled", log_detail={"account": name})


def credential_set(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    name = cmd.get_str("name")
    _managed(ctx, name)
    provider_guard(ctx)
    fingerprint = accounts.check_public_key(secrets[0])
    accounts.set_authorized_key(name, secrets[0])
    return Reply(
        output=f"{name} credential set: {fingerprint}",
        log_detail={"account": name, "fingerprint": fingerprint},
    )


def otp_set(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    key, password = secrets
    provider_guard(ctx)
    if store.customer_owned_fact():
        # Not even from the console: a customer-owned device gets a new one-time
        # credential only after the out-of-band factory reset.
        raise store.OwnershipError(
            "device is customer-owned; a one-time password needs a factory reset first"
        )
    accounts.check_password_policy(password)
    fingerprint = accounts.check_public_key(key)
    hours = cmd.get_int("expires_hours") or contract.OTP_VALID_HOURS
    owner = ctx.owner
    owner.state = OwnerState.PROVISIONED
    owner.otp_expires = time.time() + hours * 3600
    owner.otp_changed = False
    accounts.set_authorized_key("admin", key)
    accounts.set_password("admin", password)
    owner.otp_hash = store.shadow_hash("admin")
    owner.save()
    accounts.enable("admin")
    return Reply(
        output=f"admin credential set ({fingerprint}); one-time password expires in {hours} h",
        log_detail={"fingerprint": fingerprint, "expires_hours": hours},
    )


def user_list(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    return Reply(output=as_json(accounts.listing()))
