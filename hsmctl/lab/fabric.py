"""The lab's network-fabric driver: plug an appliance's data port into a tenant subnet.

SPEC §4: the fabric attaches and detaches a device's data port; the device configures its
own address (``network set``). In the lab a data port is a veth whose appliance end is
``data0``; its other end waits in the fabric namespace while detached, and is moved into
the tenant's virtual-network namespace and enslaved to the subnet's bridge on attach.
"""

from __future__ import annotations

from dataclasses import dataclass

from hsmctl.errors import ConflictError, UsageError
from hsmctl.lab import netns
from hsmctl.lab.plan import LabPlan, SubnetPlan, VnetPlan


def parse_link_names(ip_o_link: str) -> set[str]:
    """The interface names in ``ip -o link show`` output, exactly: ``d-hsm10`` is not
    ``d-hsm100`` (a substring test took one for the other in a 100-appliance lab)."""
    names = set()
    for line in ip_o_link.splitlines():
        _, _, rest = line.partition(": ")
        if rest:
            names.add(rest.split(":", 1)[0].split("@", 1)[0])
    return names


def link_names(ns: str) -> set[str]:
    return parse_link_names(netns.ip("-o", "link", "show", netns=ns))


@dataclass(frozen=True)
class Attachment:
    appliance: str
    tenant: str | None
    vnet: str | None
    subnet: str | None


class LabFabric:
    def __init__(self, plan: LabPlan) -> None:
        self.plan = plan

    def _where(self, appliance: str) -> tuple[str, VnetPlan | None]:
        a = self.plan.appliance(appliance)
        if a.data_peer in link_names(self.plan.fabric_netns):
            return self.plan.fabric_netns, None
        for t in self.plan.tenants:
            for v in t.vnets:
                if a.data_peer in link_names(v.netns):
                    return v.netns, v
        raise ConflictError(f"the data port of {appliance} is missing")

    def _subnet(self, tenant: str, vnet: str, subnet: str) -> tuple[VnetPlan, SubnetPlan]:
        t = self.plan.tenant(tenant)
        for v in t.vnets:
            if v.name == vnet:
                for s in v.subnets:
                    if s.name == subnet:
                        return v, s
        raise UsageError(f"no subnet {tenant}/{vnet}/{subnet} in the lab")

    def attach(self, appliance: str, tenant: str, vnet: str, subnet: str) -> Attachment:
        """Idempotent: attaching to where the port already is does nothing."""
        a = self.plan.appliance(appliance)
        v, s = self._subnet(tenant, vnet, subnet)
        ns, current = self._where(appliance)
        if current is not None and current.netns != v.netns:
            raise ConflictError(f"{appliance} is attached to another network; detach it first")
        if current is None:
            netns.ip("link", "set", a.data_peer, "netns", v.netns, netns=ns)
        netns.ip("link", "set", a.data_peer, "master", s.bridge, "up", netns=v.netns)
        return Attachment(appliance, tenant, vnet, subnet)

    def detach(self, appliance: str) -> Attachment:
        a = self.plan.appliance(appliance)
        ns, current = self._where(appliance)
        if current is not None:
            netns.ip("link", "set", a.data_peer, "nomaster", netns=ns)
            netns.ip("link", "set", a.data_peer, "netns", self.plan.fabric_netns, netns=ns)
        return Attachment(appliance, None, None, None)

    def attachment(self, appliance: str) -> Attachment:
        _, current = self._where(appliance)
        if current is None:
            return Attachment(appliance, None, None, None)
        a = self.plan.appliance(appliance)
        master = netns.ip("-o", "link", "show", a.data_peer, netns=current.netns)
        for t in self.plan.tenants:
            for v in t.vnets:
                if v.netns == current.netns:
                    for s in v.subnets:
                        if f"master {s.bridge} " in master:
                            return Attachment(appliance, t.name, v.name, s.name)
                    return Attachment(appliance, t.name, v.name, None)
        return Attachment(appliance, None, None, None)
