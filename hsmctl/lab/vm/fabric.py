"""The VM tier's network-fabric driver (SPEC §4, "Vagrant: pre-wired, verified only").

Each appliance VM's data NIC is wired by the Vagrantfile to its tenant's libvirt network
(the ``hsm`` subnet). ``attach`` verifies that wiring — another tenant or subnet is a
conflict, never a rewiring — and sets the NIC's link up; ``detach`` sets it down (what a
pulled cable looks like to the device and to the tenant). ``attachment`` reads both
from libvirt.
"""

from __future__ import annotations

from hsmctl.errors import ConflictError
from hsmctl.lab.fabric import Attachment
from hsmctl.lab.plan import LabPlan
from hsmctl.lab.vm import host
from hsmctl.lab.vm.plan import VmAppliance, vm_appliance

WIRED_VNET = "vnet1"
WIRED_SUBNET = "hsm"


def parse_domiflist(text: str, mac: str) -> str | None:
    """The source network of the NIC with ``mac`` in ``virsh domiflist`` output."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[4].lower() == mac.lower():
            return fields[2]
    return None


class VmFabric:
    def __init__(self, plan: LabPlan) -> None:
        self.plan = plan

    def _vm(self, appliance: str) -> VmAppliance:
        return vm_appliance(self.plan, appliance)

    def _wired(self, v: VmAppliance) -> str:
        network = parse_domiflist(host.virsh("domiflist", v.domain), v.data_mac)
        if network != v.data_network:
            raise ConflictError(
                f"the data port of {v.plan.id} is on {network!r}, not {v.data_network!r}"
            )
        return network

    def _link_up(self, v: VmAppliance) -> bool:
        return host.virsh("domif-getlink", v.domain, v.data_mac).split()[-1] == "up"

    def attach(self, appliance: str, tenant: str, vnet: str, subnet: str) -> Attachment:
        v = self._vm(appliance)
        self.plan.tenant(tenant)
        if (tenant, vnet, subnet) != (v.tenant, WIRED_VNET, WIRED_SUBNET):
            raise ConflictError(
                f"{appliance} is pre-wired to {v.tenant}/{WIRED_VNET}/{WIRED_SUBNET} (a VM's "
                f"data port is fixed by the Vagrantfile), not {tenant}/{vnet}/{subnet}"
            )
        self._wired(v)
        if not self._link_up(v):
            host.virsh("domif-setlink", v.domain, v.data_mac, "up")
        return Attachment(appliance, tenant, vnet, subnet)

    def detach(self, appliance: str) -> Attachment:
        v = self._vm(appliance)
        self._wired(v)
        if self._link_up(v):
            host.virsh("domif-setlink", v.domain, v.data_mac, "down")
        return Attachment(appliance, None, None, None)

    def attachment(self, appliance: str) -> Attachment:
        v = self._vm(appliance)
        self._wired(v)
        if not self._link_up(v):
            return Attachment(appliance, None, None, None)
        return Attachment(appliance, v.tenant, WIRED_VNET, WIRED_SUBNET)
