"""The lab's networks: the provider's management bridge and each tenant's virtual
networks, subnets (bridges) and customer VM, as namespaces and veth pairs."""

from __future__ import annotations

from hsmctl.lab import netns
from hsmctl.lab.plan import LabPlan, TenantPlan


def veth(a: str, b: str, *, a_ns: str | None, b_ns: str | None) -> None:
    args = ["link", "add", a]
    if a_ns:
        args += ["netns", a_ns]
    args += ["type", "veth", "peer", "name", b]
    if b_ns:
        args += ["netns", b_ns]
    netns.ip(*args)


def provider_network(plan: LabPlan) -> None:
    netns.add(plan.mgmt_netns)
    netns.add(plan.fabric_netns)
    netns.ip("link", "add", "br-mgmt", "type", "bridge", netns=plan.mgmt_netns)
    netns.ip("link", "set", "br-mgmt", "up", netns=plan.mgmt_netns)
    veth(plan.host_veth, "uplink", a_ns=None, b_ns=plan.mgmt_netns)
    netns.ip("link", "set", "uplink", "master", "br-mgmt", "up", netns=plan.mgmt_netns)
    netns.ip("addr", "add", f"{plan.host_ip}/{plan.mgmt_net.prefixlen}", "dev", plan.host_veth)
    netns.ip("link", "set", plan.host_veth, "up")


def tenant_network(tenant: TenantPlan) -> None:
    for vnet in tenant.vnets:
        netns.add(vnet.netns)
        netns.sysctl(vnet.netns, net__ipv4__ip_forward="1")
        for subnet in vnet.subnets:
            netns.ip("link", "add", subnet.bridge, "type", "bridge", netns=vnet.netns)
            netns.ip(
                "addr",
                "add",
                f"{subnet.gateway}/{subnet.cidr.prefixlen}",
                "dev",
                subnet.bridge,
                netns=vnet.netns,
            )
            netns.ip("link", "set", subnet.bridge, "up", netns=vnet.netns)
    vnet = tenant.client_vnet
    subnet = next(s for s in vnet.subnets if s.name == tenant.client_subnet)
    netns.add(tenant.client_netns)
    veth("eth0", f"c-t{tenant.index}", a_ns=tenant.client_netns, b_ns=vnet.netns)
    netns.ip("link", "set", f"c-t{tenant.index}", "master", subnet.bridge, "up", netns=vnet.netns)
    netns.ip(
        "addr",
        "add",
        f"{tenant.client_ip}/{subnet.cidr.prefixlen}",
        "dev",
        "eth0",
        netns=tenant.client_netns,
    )
    netns.ip("link", "set", "eth0", "up", netns=tenant.client_netns)
    # The customer VM reaches its own virtual network and nothing else.
    netns.ip("route", "add", str(vnet.cidr), "via", str(subnet.gateway), netns=tenant.client_netns)
