"""The device replies the client reads, as typed values (the firmware's handlers in
``appliance/handlers.py`` write them; ``tests/unit/data/device/`` holds recorded ones).

Each record states the device contract for one reply: which fields are there for every
role, which only for some (the ``monitor`` role sees a subset of ``hsm show``), and their
types. Host keys are checked to be OpenSSH public keys here, so a hostile key line is a
verdict on the device (exit 3) and not an input error of the user's (exit 2) later.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from hsmctl.contract import OwnerState
from hsmctl.device.fact import Fact, Fields
from hsmctl.ssh.hostkeys import KeyFormatError, PublicKey
from hsmctl.sshkeys import is_fingerprint


class Switch(enum.StrEnum):
    """An account the device can switch on and off (``monitor``)."""

    ENABLED = "enabled"
    DISABLED = "disabled"


@dataclass(frozen=True)
class HsmInfo:
    """``hsm show``. The fields after ``monitor`` are not shown to the ``monitor`` role."""

    id: str
    model: str | None
    firmware: str | None
    initialised: bool
    owner_state: OwnerState
    provider_access: bool
    monitor: Switch
    serial: str | None = None
    label: str | None = None  # "" while the token is not initialised
    objects: int | None = None  # public objects on the token
    co_pin_set: bool | None = None
    audit_key_id: str | None = None

    @classmethod
    def parse(cls, f: Fields) -> HsmInfo:
        return cls(
            id=f.text("id"),
            model=f.optional_text("model"),
            firmware=f.optional_text("firmware"),
            initialised=f.flag("initialised"),
            owner_state=f.choice("owner_state", OwnerState),
            provider_access=f.flag("provider_access"),
            monitor=f.choice("monitor", Switch),
            serial=f.optional_text("serial"),
            label=f.optional_text("label"),
            objects=f.optional_number("objects"),
            co_pin_set=f.optional_flag("co_pin_set"),
            audit_key_id=f.optional_text("audit_key_id"),
        )


def _key_lines(f: Fields, key: str) -> tuple[str, ...]:
    lines = f.texts(key)
    for line in lines:
        try:
            PublicKey.parse(line)
        except KeyFormatError as exc:
            raise f.error(f"{key!r} holds what is no SSH public key ({exc.message})") from None
    return lines


@dataclass(frozen=True)
class HostKeys:
    """``sysconf hostkey show``: the data interface's keys, served and staged."""

    active: tuple[str, ...]  # fingerprints as ssh-keygen -l prints them: "SHA256:… (ed25519)"
    staged: tuple[str, ...]
    active_keys: tuple[str, ...]  # "TYPE BASE64" lines
    staged_keys: tuple[str, ...]

    @classmethod
    def parse(cls, f: Fields) -> HostKeys:
        return cls(
            active=f.texts("active"),
            staged=f.texts("staged"),
            active_keys=_key_lines(f, "active_keys"),
            staged_keys=_key_lines(f, "staged_keys"),
        )


@dataclass(frozen=True)
class StagedHostKeys:
    """``sysconf hostkey stage``: the fingerprints of the keys it made."""

    staged: tuple[str, ...]

    @classmethod
    def parse(cls, f: Fields) -> StagedHostKeys:
        return cls(f.texts("staged"))


@dataclass(frozen=True)
class AuditKey:
    """``audit key show``: the key that signs the log now, and the one of personalisation
    (with it, the rotation records carry trust through the whole log)."""

    key_id: str
    public_key: str  # PEM
    initial_key_id: str
    initial_public_key: str

    @classmethod
    def parse(cls, f: Fields) -> AuditKey:
        return cls(
            key_id=f.text("key_id"),
            public_key=f.text("public_key"),
            initial_key_id=f.text("initial_key_id"),
            initial_public_key=f.text("initial_public_key"),
        )


@dataclass(frozen=True)
class AuditKeyRotation:
    """``audit key rotate``: the new key and where the log records the rotation."""

    key_id: str
    public_key: str
    previous_key_id: str
    rotation_seq: int

    @classmethod
    def parse(cls, f: Fields) -> AuditKeyRotation:
        return cls(
            key_id=f.text("key_id"),
            public_key=f.text("public_key"),
            previous_key_id=f.text("previous_key_id"),
            rotation_seq=f.number("rotation_seq"),
        )


@dataclass(frozen=True)
class ProviderAccess:
    """``sysconf provider-access show``."""

    provider_access: bool
    provider_key_installed: bool
    provider_enabled: bool
    owner_state: OwnerState

    @property
    def revoked(self) -> bool:
        """No path left for the provider: the flag off, no key, the account disabled."""
        return not (self.provider_access or self.provider_key_installed or self.provider_enabled)

    def as_dict(self) -> dict[str, Any]:
        """The reply as the device sent it (the receipt records it)."""
        return {
            "owner_state": self.owner_state.value,
            "provider_access": self.provider_access,
            "provider_enabled": self.provider_enabled,
            "provider_key_installed": self.provider_key_installed,
        }

    @classmethod
    def parse(cls, f: Fields) -> ProviderAccess:
        return cls(
            provider_access=f.flag("provider_access"),
            provider_key_installed=f.flag("provider_key_installed"),
            provider_enabled=f.flag("provider_enabled"),
            owner_state=f.choice("owner_state", OwnerState),
        )


def _fingerprint(f: Fields, key: str) -> str:
    value = f.text(key)
    if not is_fingerprint(value):
        raise f.error(f"{key!r} is no SHA256 key fingerprint")
    return value


@dataclass(frozen=True)
class Client:
    """An application client (SPEC §11) as ``client list`` shows it; ``client register``
    answers the same fields with the name as ``client``."""

    name: str
    role: str
    fingerprint: str  # of its SSH key, as ssh-keygen -l prints it
    registered: str

    def as_dict(self) -> dict[str, str]:
        """What the receipt records of it (no secret: the public key's fingerprint)."""
        return {"client": self.name, "role": self.role, "fingerprint": self.fingerprint}

    @classmethod
    def parse(cls, f: Fields) -> Client:
        return cls._parse(f, "name")

    @classmethod
    def parse_registered(cls, f: Fields) -> Client:
        return cls._parse(f, "client")

    @classmethod
    def _parse(cls, f: Fields, name_key: str) -> Client:
        return cls(
            name=f.text(name_key),
            role=f.text("role"),
            fingerprint=_fingerprint(f, "fingerprint"),
            registered=f.text("registered"),
        )


@dataclass(frozen=True)
class Clients:
    """``client list``."""

    clients: tuple[Client, ...]

    def named(self, name: str) -> Client | None:
        return next((c for c in self.clients if c.name == name), None)

    @classmethod
    def parse(cls, f: Fields) -> Clients:
        clients = tuple(Client.parse(item) for item in f.objects("clients"))
        names = [c.name for c in clients]
        if len(set(names)) != len(names):
            raise f.error("a client is listed twice")
        return cls(clients)


@dataclass(frozen=True)
class NetworkConfig:
    """``network show``: the data interface's configured address and gateway (none at
    the factory) and the live IPv4 addresses (``ip -br -4 addr`` lines)."""

    address: str | None
    gateway: str | None
    interfaces: tuple[str, ...]

    def is_live(self, address: str) -> bool:
        """Whether ``address`` (A.B.C.D/PREFIX) is on the data interface right now."""
        return any(
            line.split()[0].split("@")[0] == "data0" and address in line.split()[2:]
            for line in self.interfaces
            if len(line.split()) > 2
        )

    @classmethod
    def parse(cls, f: Fields) -> NetworkConfig:
        data = f.object("data")
        return cls(
            address=data.optional_text("address"),
            gateway=data.optional_text("gateway"),
            interfaces=f.texts("interfaces"),
        )


def register_client(name: str, role: str) -> Fact[Client]:
    """``client register NAME --role ROLE`` (the public key on stdin)."""
    return Fact(f"client register {name} --role {role}", Client.parse_registered)


HSM_INFO = Fact("hsm show", HsmInfo.parse)
HOST_KEYS = Fact("sysconf hostkey show", HostKeys.parse)
STAGE_HOST_KEYS = Fact("sysconf hostkey stage", StagedHostKeys.parse)
AUDIT_KEY = Fact("audit key show", AuditKey.parse)
ROTATE_AUDIT_KEY = Fact("audit key rotate", AuditKeyRotation.parse)
PROVIDER_ACCESS = Fact("sysconf provider-access show", ProviderAccess.parse)
CLIENTS = Fact("client list", Clients.parse)
NETWORK = Fact("network show", NetworkConfig.parse)
