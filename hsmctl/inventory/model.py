"""The provider's inventory as immutable data: the fleet and the tenants' networks.

Every entity remembers where it was written (:class:`Declared`: file and entry path), so a
later check — a placement request, a host-key mismatch — can point the engineer at the
line of YAML to fix. Nothing here does I/O; :mod:`hsmctl.inventory.load` builds these.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hsmctl.errors import UsageError

# PublicKey is the one OpenSSH key type; imported from here too (state/, the package).
from hsmctl.sshkeys import PublicKey as PublicKey

# Host keys an appliance's sshd may present; the tenant identity is P-256 only (SPEC §6:
# the same key signs receipts and opens bundles, and P-256 is what every HSM and every
# OpenSSH since 5.7 speaks).
HOST_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "ssh-rsa",
    }
)
IDENTITY_KEY_TYPE = "ecdsa-sha2-nistp256"
# Azure reserves the first four addresses and the last one of every subnet.
RESERVED_AT_START = 4
# The smallest subnet that still has a usable address after the five reserved ones.
MAX_SUBNET_PREFIX = 29


class InventoryError(UsageError):
    """The inventory, or a request checked against it, is wrong; exit 2, nothing changed."""


class PlacementError(InventoryError):
    """A provisioning target (tenant, vnet, subnet, address, stamp) is not acceptable."""


@dataclass(frozen=True)
class Declared:
    """Where an entity was declared: ``file`` and an entry path like ``tenants[t1]``."""

    file: Path
    entry: str

    def __str__(self) -> str:
        return f"{self.file}: {self.entry}"


def is_reserved(cidr: ipaddress.IPv4Network, ip: ipaddress.IPv4Address) -> bool:
    """Azure's rule: the first four addresses and the last address of a subnet."""
    offset = int(ip) - int(cidr.network_address)
    return offset < RESERVED_AT_START or ip == cidr.broadcast_address


def usable_addresses(cidr: ipaddress.IPv4Network) -> Iterator[ipaddress.IPv4Address]:
    """The addresses a device may get, lowest first."""
    first = int(cidr.network_address) + RESERVED_AT_START
    for value in range(first, int(cidr.broadcast_address)):
        yield ipaddress.IPv4Address(value)


@dataclass(frozen=True)
class Quota:
    """How many appliances one tenant may hold; Azure's defaults are 2 per stamp, 4 per
    region."""

    per_stamp: int = 2
    per_region: int = 4


@dataclass(frozen=True)
class Appliance:
    id: str
    serial: str
    model: str
    mgmt_ip: ipaddress.IPv4Address
    mgmt_host_keys: tuple[PublicKey, ...]
    region: str
    stamp: str
    origin: Declared = field(compare=False)

    @property
    def mgmt_fingerprints(self) -> tuple[str, ...]:
        return tuple(k.fingerprint for k in self.mgmt_host_keys)


@dataclass(frozen=True)
class Stamp:
    name: str
    region: str
    appliances: tuple[Appliance, ...]
    mgmt_cidr: ipaddress.IPv4Network | None
    origin: Declared = field(compare=False)
    # Appliances held back for replacements (Azure keeps spares in every stamp):
    # provisioning leaves this many available ones alone unless told to use spares.
    spares: int = 0


@dataclass(frozen=True)
class Region:
    name: str
    stamps: tuple[Stamp, ...]
    origin: Declared = field(compare=False)


@dataclass(frozen=True)
class Subnet:
    name: str
    cidr: ipaddress.IPv4Network
    delegated: bool
    origin: Declared = field(compare=False)


@dataclass(frozen=True)
class Vnet:
    name: str
    cidr: ipaddress.IPv4Network
    region: str | None
    subnets: tuple[Subnet, ...]
    origin: Declared = field(compare=False)

    def subnet(self, name: str) -> Subnet | None:
        return next((s for s in self.subnets if s.name == name), None)


@dataclass(frozen=True)
class Tenant:
    name: str
    identity_public_key: PublicKey
    vnets: tuple[Vnet, ...]
    quota: Quota
    origin: Declared = field(compare=False)

    def vnet(self, name: str) -> Vnet | None:
        return next((v for v in self.vnets if v.name == name), None)


@dataclass(frozen=True)
class Placement:
    """A checked provisioning target: what the state store needs to allocate.

    ``region`` is the vnet's region (None: any region); ``stamp`` the requested stamp.
    """

    tenant: str
    vnet: str
    subnet: str
    cidr: ipaddress.IPv4Network
    ip: ipaddress.IPv4Address | None = None
    stamp: str | None = None
    region: str | None = None
    quota: Quota = field(default_factory=Quota)
    # Available appliances each stamp holds back (stamp -> count); empty with --use-spares.
    spares: Mapping[str, int] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Inventory:
    """The whole inventory, merged from one file or a directory of files."""

    regions: tuple[Region, ...]
    tenants: tuple[Tenant, ...]
    sources: tuple[Path, ...] = field(default=(), compare=False)

    @property
    def stamps(self) -> tuple[Stamp, ...]:
        return tuple(s for r in self.regions for s in r.stamps)

    @property
    def appliances(self) -> tuple[Appliance, ...]:
        return tuple(a for s in self.stamps for a in s.appliances)

    def _where(self) -> str:
        return ", ".join(str(p) for p in self.sources) or "the inventory"

    def appliance(self, ident: str) -> Appliance:
        for a in self.appliances:
            if a.id == ident:
                return a
        raise InventoryError(f"{self._where()}: no appliance {ident!r}")

    def tenant(self, name: str) -> Tenant:
        for t in self.tenants:
            if t.name == name:
                return t
        known = ", ".join(t.name for t in self.tenants) or "none"
        raise InventoryError(f"{self._where()}: no tenant {name!r} (tenants: {known})")

    def stamp(self, name: str) -> Stamp:
        for s in self.stamps:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.stamps) or "none"
        raise InventoryError(f"{self._where()}: no stamp {name!r} (stamps: {known})")
