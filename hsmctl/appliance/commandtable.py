"""The device's command table as data, with the converters that check each value (a
converter raises ``ValueError`` naming the rule the value broke). Stdlib only: firmware."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping

from hsmctl import contract
from hsmctl.appliance.commandspec import (
    ACCOUNT_NAMES,
    MAX_LAST,
    MAX_SEQ,
    CommandSpec,
    Param,
    Value,
)

# --- value converters: raise ValueError with the rule the value broke -----------------

_LABEL = re.compile(r"[A-Za-z0-9._-]{1,32}")
_DIGITS = re.compile(r"[0-9]{1,19}")


def _label(text: str) -> str:
    if not _LABEL.fullmatch(text):
        raise ValueError("must be 1 to 32 characters from A-Z a-z 0-9 . _ -")
    if text.startswith("-"):  # would read as an option to softhsm2-util
        raise ValueError("must not start with '-'")
    return text


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _sha256_hex(text: str) -> Value:
    if not _SHA256_HEX.fullmatch(text):
        raise ValueError("must be 64 lower-case hex digits (a SHA-256)")
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
        ("hsm", "domain", "set"),
        "put the token into a cloning domain (SO PIN, then the domain secret)",
        stdin=("so_pin", "domain_secret"),
    ),
    CommandSpec(
        ("hsm", "backup-sign"),
        "sign a backup manifest's SHA-256 with the audit key",
        params=(Param("digest", "SHA256", _sha256_hex, flag="--digest"),),
    ),
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
        ("audit", "ack"),
        "acknowledge records through SEQ as collected: older log segments may be deleted",
        params=(Param("seq", "SEQ", _integer(1, MAX_SEQ), account=False),),
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
