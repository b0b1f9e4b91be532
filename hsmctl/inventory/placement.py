"""Whether a provisioning target (tenant, vnet, subnet, address, stamp) fits the
inventory; which appliances it gets is :mod:`hsmctl.state.allocation`."""

from __future__ import annotations

import ipaddress

from hsmctl.inventory.model import (
    Inventory,
    Placement,
    PlacementError,
    is_reserved,
    usable_addresses,
)


def check_placement(
    inventory: Inventory,
    tenant: str,
    vnet: str,
    subnet: str,
    ip: str | ipaddress.IPv4Address | None = None,
    stamp: str | None = None,
    *,
    use_spares: bool = False,
) -> Placement:
    """Check a provisioning target before anything is touched; raise ``PlacementError``.

    The subnet must be delegated to the HSM service: a missing delegation is the most
    common dedicated-HSM deployment failure on Azure, and it is cheap to catch here.
    This only checks the target against the inventory; which appliances it gets
    (anti-affinity, quotas, spares held back) is
    :func:`hsmctl.state.allocation.choose_appliances`. ``use_spares``: the stamps'
    spares may be taken too (the placement then holds none back).
    """
    t = inventory.tenant(tenant)
    v = t.vnet(vnet)
    if v is None:
        known = ", ".join(x.name for x in t.vnets) or "none"
        raise PlacementError(f"{t.origin}: tenant {tenant} has no vnet {vnet!r} (vnets: {known})")
    s = v.subnet(subnet)
    if s is None:
        known = ", ".join(x.name for x in v.subnets) or "none"
        raise PlacementError(f"{v.origin}: vnet {vnet} has no subnet {subnet!r} (subnets: {known})")
    if not s.delegated:
        raise PlacementError(
            f"{s.origin}: subnet {subnet} ({s.cidr}) is not delegated to the HSM service. "
            "A missing delegation is the most common dedicated-HSM deployment failure: "
            "delegate the subnet (Azure: Microsoft.HardwareSecurityModules/dedicatedHSMs), "
            "then set 'delegated: true' in the inventory"
        )
    address: ipaddress.IPv4Address | None = None
    if ip is not None:
        try:
            parsed = ipaddress.ip_address(str(ip).strip())
        except ValueError:
            raise PlacementError(f"--ip {ip!r} is not an IPv4 address") from None
        if not isinstance(parsed, ipaddress.IPv4Address):
            raise PlacementError(f"--ip {ip}: only IPv4 is supported")
        address = parsed
        if address not in s.cidr:
            raise PlacementError(f"{s.origin}: address {address} is outside subnet {s.cidr}")
        if is_reserved(s.cidr, address):
            first = next(usable_addresses(s.cidr))
            raise PlacementError(
                f"{s.origin}: address {address} is reserved (the first four addresses and "
                f"the last address of a subnet are); the first usable one is {first}"
            )
    if stamp is not None:
        st = inventory.stamp(stamp)
        if v.region is not None and st.region != v.region:
            raise PlacementError(
                f"{st.origin}: stamp {stamp} is in region {st.region}, but vnet {vnet} of "
                f"tenant {tenant} is in region {v.region}"
            )
    return Placement(
        tenant=t.name,
        vnet=v.name,
        subnet=s.name,
        cidr=s.cidr,
        ip=address,
        stamp=stamp,
        region=v.region,
        quota=t.quota,
        spares={} if use_spares else {st.name: st.spares for st in inventory.stamps if st.spares},
    )
