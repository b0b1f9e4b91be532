"""The lab's address and name plan: a pure function of (tenants, appliances).

Everything lives in 198.18.0.0/15 (RFC 2544 benchmarking range):

* ``198.18.0.0/24`` provider management network; the host is ``.1``, appliance *i*
  is ``.(10 + i)``.
* ``198.19.(8 (t - 1)).0/21`` tenant *t*'s virtual network ``vnet1``, with subnets
  ``hsm`` (the first /24, delegated to the HSM service), ``hsm2`` (the third /24,
  delegated) and ``default`` (the second /24, not delegated; the client VM is there).
  ``.1`` of every subnet is the virtual network's router; ``.0`` to ``.3`` and the last
  address are reserved (Azure's rule).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from hsmctl.errors import UsageError

LAB_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
MGMT_NET = ipaddress.IPv4Network("198.18.0.0/24")
TENANT_BLOCK = ipaddress.IPv4Network("198.19.0.0/16")
MAX_TENANTS = 32
MAX_APPLIANCES = 128
STAMPS = ("stamp1", "stamp2")
REGION = "lab"
PREFIX = "hsmlab"


@dataclass(frozen=True)
class SubnetPlan:
    name: str
    cidr: ipaddress.IPv4Network
    delegated: bool

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.cidr.network_address + 1

    @property
    def bridge(self) -> str:
        return f"br-{self.name}"[:15]


@dataclass(frozen=True)
class VnetPlan:
    name: str
    cidr: ipaddress.IPv4Network
    subnets: tuple[SubnetPlan, ...]
    netns: str


@dataclass(frozen=True)
class TenantPlan:
    index: int
    name: str
    vnets: tuple[VnetPlan, ...]
    client_netns: str
    client_ip: ipaddress.IPv4Address
    client_subnet: str

    @property
    def client_vnet(self) -> VnetPlan:
        return self.vnets[0]


@dataclass(frozen=True)
class AppliancePlan:
    index: int
    id: str
    stamp: str
    serial: str
    mgmt_ip: ipaddress.IPv4Address
    netns: str
    mgmt_peer: str
    data_peer: str


@dataclass(frozen=True)
class LabPlan:
    tenants: tuple[TenantPlan, ...]
    appliances: tuple[AppliancePlan, ...]
    mgmt_netns: str = f"{PREFIX}-mgmt"
    fabric_netns: str = f"{PREFIX}-fabric"
    host_veth: str = f"{PREFIX}0"
    host_ip: ipaddress.IPv4Address = MGMT_NET.network_address + 1
    mgmt_net: ipaddress.IPv4Network = MGMT_NET
    lab_range: ipaddress.IPv4Network = LAB_RANGE

    def appliance(self, ident: str) -> AppliancePlan:
        for a in self.appliances:
            if a.id == ident:
                return a
        raise UsageError(f"no appliance {ident!r} in the lab")

    def tenant(self, name: str) -> TenantPlan:
        for t in self.tenants:
            if t.name == name:
                return t
        raise UsageError(f"no tenant {name!r} in the lab")

    def all_netns(self) -> list[str]:
        names = [self.mgmt_netns, self.fabric_netns]
        for t in self.tenants:
            names.extend(v.netns for v in t.vnets)
            names.append(t.client_netns)
        names.extend(a.netns for a in self.appliances)
        return names


def validate_sizes(tenants: int, appliances: int) -> None:
    if not 1 <= tenants <= MAX_TENANTS:
        raise UsageError(f"--tenants must be between 1 and {MAX_TENANTS}, got {tenants}")
    if not 1 <= appliances <= MAX_APPLIANCES:
        raise UsageError(f"--appliances must be between 1 and {MAX_APPLIANCES}, got {appliances}")


def make_plan(tenants: int, appliances: int) -> LabPlan:
    validate_sizes(tenants, appliances)
    tplans = []
    for t in range(1, tenants + 1):
        base = TENANT_BLOCK.network_address + 8 * 256 * (t - 1)
        vnet_cidr = ipaddress.IPv4Network(f"{base}/21")
        subnets = (
            SubnetPlan("hsm", ipaddress.IPv4Network(f"{base}/24"), True),
            SubnetPlan("default", ipaddress.IPv4Network(f"{base + 256}/24"), False),
            SubnetPlan("hsm2", ipaddress.IPv4Network(f"{base + 512}/24"), True),
        )
        name = f"tenant{t}"
        vnet = VnetPlan("vnet1", vnet_cidr, subnets, f"{PREFIX}-t{t}-vnet1")
        client_ip = subnets[1].cidr.network_address + 4
        tplans.append(TenantPlan(t, name, (vnet,), f"{PREFIX}-t{t}-client", client_ip, "default"))
    aplans = []
    for i in range(1, appliances + 1):
        ident = f"hsm{i:02d}"
        aplans.append(
            AppliancePlan(
                index=i,
                id=ident,
                stamp=STAMPS[(i - 1) % len(STAMPS)],
                serial=f"LAB{i:06d}",
                mgmt_ip=MGMT_NET.network_address + 10 + i,
                netns=f"{PREFIX}-{ident}",
                mgmt_peer=f"m-{ident}",
                data_peer=f"d-{ident}",
            )
        )
    return LabPlan(tuple(tplans), tuple(aplans))
