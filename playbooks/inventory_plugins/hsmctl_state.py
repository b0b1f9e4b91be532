"""Ansible inventory plugin: the hsmctl state store as an inventory.

Lets engineers run the project's playbooks with plain ``ansible-playbook`` against the
same picture ``hsmctl fleet list`` shows: one host per appliance, grouped by tenant,
stamp, region and state, with the facts a playbook needs as host variables. Read-only
apart from what every hsmctl command does on opening the store (migrations, inventory
sync); it never contacts a device.
"""

from __future__ import annotations

import re
from typing import Any

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin

DOCUMENTATION = r"""
name: hsmctl_state
short_description: Appliances from the hsmctl provider state store
description:
  - One host per appliance in the hsmctl state store (SQLite or PostgreSQL), read through
    the hsmctl library with the provider configuration.
  - Groups C(tenant_<name>), C(stamp_<name>), C(region_<name>) and C(state_<state>)
    (characters other than letters, digits and C(_) become C(_), so C(customer-owned)
    is C(state_customer_owned)).
  - Host variables C(mgmt_ip), C(data_ip), C(tenant), C(stamp), C(region), C(state),
    C(hsm_serial), C(hsm_model), and for an allocated appliance C(vnet), C(subnet) and
    C(hsm_request_id) (what C(playbooks/provision.yml) needs); C(hsmctl_config) on every
    host.
  - Runs with the interpreter that runs Ansible, which must be hsmctl's virtualenv.
options:
  plugin:
    description: Marks the file as this plugin's configuration.
    required: true
    choices: [hsmctl_state]
  config:
    description:
      - The hsmctl provider configuration file. Default - C($HSMCTL_CONFIG), else
        C(/etc/hsmctl/hsmctl.yaml).
    type: path
    env:
      - name: HSMCTL_CONFIG
"""

EXAMPLES = r"""
# playbooks/inventory/hsmctl.yml
plugin: hsmctl_state
# ansible-inventory -i playbooks/inventory/hsmctl.yml --graph
"""

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def group_name(prefix: str, value: str) -> str:
    return f"{prefix}_{_UNSAFE.sub('_', value)}"


def host_entries(config_path: str | None) -> tuple[str, list[dict[str, Any]]]:
    """(the config file used, one dict per appliance: name, vars, groups)."""
    from hsmctl.provider.context import open_context

    ctx = open_context(config_path)
    try:
        allocations = {a.appliance: a for a in ctx.store.allocations()}
        source = str(ctx.config.source)
        hosts = []
        for rec in ctx.store.list_appliances():
            alloc = allocations.get(rec.id)
            hostvars: dict[str, Any] = {
                "ansible_host": rec.mgmt_ip,
                "mgmt_ip": rec.mgmt_ip,
                "data_ip": rec.data_ip,
                "tenant": rec.tenant,
                "stamp": rec.stamp,
                "region": rec.region,
                "state": rec.state.value,
                "hsm_serial": rec.serial,
                "hsm_model": rec.model,
                "hsmctl_config": source,
            }
            groups = [
                group_name("stamp", rec.stamp),
                group_name("region", rec.region),
                group_name("state", rec.state.value),
            ]
            if rec.tenant:
                groups.append(group_name("tenant", rec.tenant))
            if alloc is not None:
                hostvars.update(
                    vnet=alloc.vnet, subnet=alloc.subnet, hsm_request_id=alloc.request_id
                )
            hosts.append({"name": rec.id, "vars": hostvars, "groups": groups})
        return source, hosts
    finally:
        ctx.close()


class InventoryModule(BaseInventoryPlugin):  # type: ignore[misc]
    NAME = "hsmctl_state"

    def verify_file(self, path: str) -> bool:
        return bool(super().verify_file(path)) and path.endswith((".yml", ".yaml"))

    def parse(self, inventory: Any, loader: Any, path: str, cache: bool = True) -> None:
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        try:
            from hsmctl.errors import HsmctlError
        except ImportError as exc:
            raise AnsibleParserError(
                f"hsmctl is not importable ({exc}): run Ansible from hsmctl's virtualenv"
            ) from exc
        try:
            _, hosts = host_entries(self.get_option("config"))
        except HsmctlError as exc:
            raise AnsibleParserError(f"hsmctl state store: {exc}") from exc
        for h in hosts:
            self.inventory.add_host(h["name"])
            for key, value in h["vars"].items():
                self.inventory.set_variable(h["name"], key, value)
            for group in h["groups"]:
                self.inventory.add_group(group)
                self.inventory.add_child(group, h["name"])
