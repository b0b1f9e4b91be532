"""The customer token: status, init, the crypto-officer PIN, zeroize, each through the
helper process."""

from __future__ import annotations

from hsmctl.appliance.tokenhelper import call_helper
from hsmctl.appliance.tokenlib import (
    DEFAULT_LIB,
    PinLike,
    TokenError,
    TokenStatus,
    check_customer_label,
    reveal_pin,
)
from hsmctl.appliance.tokenstore import StatusCache
from hsmctl.secret import Secret

# The last status read, while SoftHSM's token store is unchanged (tokenstore: hsm show
# in every provisioning step and health poll no longer loads SoftHSM each time).
_STATUS = StatusCache[TokenStatus]()


def customer_status(*, lib_path: str = DEFAULT_LIB) -> TokenStatus:
    """Label, serial, initialised, public object count, whether the CO PIN is set."""

    def read() -> TokenStatus:
        return TokenStatus.from_dict(call_helper("customer_status", {}, lib_path))

    return _STATUS.get(read) if lib_path == DEFAULT_LIB else read()


def customer_init(
    label: str,
    so_pin: PinLike,
    current_so_pin: PinLike | None = None,
    *,
    lib_path: str = DEFAULT_LIB,
) -> TokenStatus:
    """Wipe and (re)initialise the customer token with a new label and SO PIN.

    An initialised token needs its current SO PIN (C_InitToken checks it, then the SO PIN
    is changed to ``so_pin``); without it: TokenStateError, wrong: TokenAuthError, and in
    both cases nothing changes. The CO PIN is unset afterwards.
    """
    args: dict[str, object] = {
        "label": check_customer_label(label),
        "so_pin": reveal_pin(so_pin, "SO PIN"),
        "current_so_pin": (
            None if current_so_pin is None else reveal_pin(current_so_pin, "current SO PIN")
        ),
    }
    return TokenStatus.from_dict(call_helper("customer_init", args, lib_path))


def customer_set_co_pin(so_pin: PinLike, co_pin: PinLike, *, lib_path: str = DEFAULT_LIB) -> None:
    """Set (or reset) the crypto-officer PIN as SO (C_InitPIN)."""
    args = {"so_pin": reveal_pin(so_pin, "SO PIN"), "co_pin": reveal_pin(co_pin, "CO PIN")}
    call_helper("customer_set_co_pin", args, lib_path)


def customer_change_co_pin(old: PinLike, new: PinLike, *, lib_path: str = DEFAULT_LIB) -> None:
    """Change the crypto-officer PIN as the crypto officer (C_SetPIN)."""
    args = {"old": reveal_pin(old, "current CO PIN"), "new": reveal_pin(new, "new CO PIN")}
    call_helper("customer_change_co_pin", args, lib_path)


def customer_check_co_pin(pin: PinLike, *, lib_path: str = DEFAULT_LIB) -> bool:
    """Whether ``pin`` is the crypto-officer PIN (a login and logout)."""
    result = call_helper("customer_check_co_pin", {"pin": reveal_pin(pin, "CO PIN")}, lib_path)
    return bool(result["match"])


def customer_domain_set(
    so_pin: PinLike, domain_secret: PinLike, *, lib_path: str = DEFAULT_LIB
) -> dict[str, object]:
    """Put the token into the cloning domain of ``domain_secret`` (the SO makes the
    domain key): ``{"domain": fingerprint, "created": bool}``; the same domain again
    changes nothing, another one is TokenStateError."""
    secret = domain_secret.reveal() if isinstance(domain_secret, Secret) else domain_secret
    args = {"so_pin": reveal_pin(so_pin, "SO PIN"), "domain_secret": secret}
    return dict(call_helper("customer_domain_set", args, lib_path))


def customer_zeroize(*, lib_path: str = DEFAULT_LIB) -> TokenStatus:
    """Delete the customer token (objects and PINs) without any PIN; the audit token stays.
    Any stray second non-audit token goes too, so a factory reset always ends in one
    known state. Idempotent. Returns the status afterwards (uninitialised)."""
    call_helper("customer_zeroize", {}, lib_path)
    status = customer_status(lib_path=lib_path)
    if status.initialised:
        raise TokenError("customer token still initialised after zeroize")
    return status
