"""The VM tier's address and name plan: a pure function of (tenants, appliances), in the
same shape as the namespace lab's (:class:`hsmctl.lab.plan.LabPlan`) so that ``lab
status``, the inventory and the configs are written by the same code.

Inside 198.18.0.0/15, apart from the namespace lab's addresses:

* ``198.18.200.0/24`` the management network (libvirt network ``hsmvm-mgmt``, isolated);
  the host is ``.1``, appliance *i* is ``.(10 + i)`` (a fixed DHCP lease for its MAC);
* ``198.18.(208 + 4 (t - 1)).0/22`` tenant *t*'s virtual network ``vnet1``: subnet
  ``hsm`` (the first /24, delegated; its bridge reaches the libvirt network
  ``hsmvm-tT`` the appliances' data NICs are on) and ``default`` (the second /24, the
  customer VM's).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from hsmctl.errors import UsageError
from hsmctl.lab.plan import (
    LAB_RANGE,
    STAMPS,
    AppliancePlan,
    LabPlan,
    SubnetPlan,
    TenantPlan,
    VnetPlan,
)
from hsmctl.lab.vm.box import DATA_MAC_PREFIX, MGMT_MAC_PREFIX

PREFIX = "hsmvm"
MGMT_NET = ipaddress.IPv4Network("198.18.200.0/24")
TENANT_BASE = ipaddress.IPv4Address("198.18.208.0")
VM_RANGE = ipaddress.IPv4Network("198.18.192.0/18")  # everything the tier addresses
MAX_TENANTS = 4
MAX_APPLIANCES = 8
MGMT_NETWORK = f"{PREFIX}-mgmt"


@dataclass(frozen=True)
class VmAppliance:
    """What a VM needs beyond :class:`AppliancePlan`."""

    plan: AppliancePlan
    tenant: str
    domain: str
    mgmt_mac: str
    data_mac: str
    data_network: str


def validate_sizes(tenants: int, appliances: int) -> None:
    if not 1 <= tenants <= MAX_TENANTS:
        raise UsageError(f"--tenants must be between 1 and {MAX_TENANTS} for the VM tier")
    if not 1 <= appliances <= MAX_APPLIANCES:
        raise UsageError(
            f"--appliances must be between 1 and {MAX_APPLIANCES} for the VM tier "
            "(each is a QEMU process of about 400 MB under software emulation)"
        )


def tenant_network_name(t: int) -> str:
    return f"{PREFIX}-t{t}"


def make_plan(tenants: int, appliances: int) -> LabPlan:
    validate_sizes(tenants, appliances)
    tplans = []
    for t in range(1, tenants + 1):
        base = TENANT_BASE + 4 * 256 * (t - 1)
        subnets = (
            SubnetPlan("hsm", ipaddress.IPv4Network(f"{base}/24"), True),
            SubnetPlan("default", ipaddress.IPv4Network(f"{base + 256}/24"), False),
        )
        vnet = VnetPlan(
            "vnet1", ipaddress.IPv4Network(f"{base}/22"), subnets, f"{PREFIX}-t{t}-vnet1"
        )
        client_ip = subnets[1].cidr.network_address + 4
        tplans.append(
            TenantPlan(t, f"tenant{t}", (vnet,), f"{PREFIX}-t{t}-client", client_ip, "default")
        )
    aplans = []
    for i in range(1, appliances + 1):
        ident = f"hsm{i:02d}"
        aplans.append(
            AppliancePlan(
                index=i,
                id=ident,
                stamp=STAMPS[(i - 1) % len(STAMPS)],
                serial=f"VM{i:06d}",
                mgmt_ip=MGMT_NET.network_address + 10 + i,
                netns="",
                mgmt_peer="",
                data_peer="",
            )
        )
    return LabPlan(
        tuple(tplans),
        tuple(aplans),
        mgmt_netns="",
        fabric_netns="",
        host_veth=MGMT_NETWORK,
        host_ip=MGMT_NET.network_address + 1,
        mgmt_net=MGMT_NET,
        lab_range=LAB_RANGE,
    )


def vm_appliances(plan: LabPlan) -> list[VmAppliance]:
    """Appliance *i* is pre-wired to tenant ``(i - 1) % tenants + 1``."""
    out = []
    for a in plan.appliances:
        t = (a.index - 1) % len(plan.tenants) + 1
        out.append(
            VmAppliance(
                plan=a,
                tenant=f"tenant{t}",
                domain=f"{PREFIX}-{a.id}",
                mgmt_mac=f"{MGMT_MAC_PREFIX}:{a.index:02x}",
                data_mac=f"{DATA_MAC_PREFIX}:{a.index:02x}",
                data_network=tenant_network_name(t),
            )
        )
    return out


def vm_appliance(plan: LabPlan, ident: str) -> VmAppliance:
    for v in vm_appliances(plan):
        if v.plan.id == ident:
            return v
    raise UsageError(f"no appliance {ident!r} in the lab")
