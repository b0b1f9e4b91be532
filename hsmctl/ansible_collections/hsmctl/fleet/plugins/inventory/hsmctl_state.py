"""Ansible inventory plugin: the hsmctl state store as an inventory.

Lets engineers and AWX run the project's playbooks against the same picture
``hsmctl fleet list`` shows: one host per appliance, grouped by tenant, stamp, region and
state, with ``hsm_``-prefixed host variables. Read-only: it opens an existing, migrated
store (:meth:`hsmctl.state.Store.open_read_only`) and never creates, migrates, syncs the
fleet file or pins host keys; it never contacts a device. Every failure is an
AnsibleParserError naming the cause (``ansible-inventory`` exits non-zero when
``[inventory] unparsed_is_failed`` is on, as in the project's ``ansible.cfg`` and in
every AWX inventory update).
"""

from __future__ import annotations

DOCUMENTATION = r"""
name: hsmctl_state
short_description: Appliances from the hsmctl provider state store
description:
  - One host per appliance in the hsmctl state store (SQLite or PostgreSQL), read through
    the hsmctl library. Read-only - the store must exist and be migrated (any hsmctl
    provider command does both); the plugin never creates, migrates or writes to it,
    never reads the fleet file and never contacts a device.
  - The configuration file must be named C(hsmctl.yml) or C(hsmctl.yaml), or end in
    C(.hsmctl.yml) or C(.hsmctl.yaml); other files are not claimed.
  - Groups C(tenant_<name>), C(stamp_<name>), C(region_<name>) and C(state_<state>)
    (characters other than letters, digits and C(_) become C(_), so C(customer-owned)
    is C(state_customer_owned)); more with O(groups) and O(keyed_groups).
  - "Host variables, all prefixed C(hsm_): C(hsm_mgmt_ip), C(hsm_data_ip), C(hsm_tenant),
    C(hsm_stamp), C(hsm_region), C(hsm_state), C(hsm_serial), C(hsm_model); for an
    allocated appliance C(hsm_vnet), C(hsm_subnet) and C(hsm_request_id); and
    C(hsm_config), the provider configuration file, when one was used (what
    C(playbooks/provision.yml) needs). No C(ansible_host) - set it with O(compose)."
  - A missing or unmigrated store, an unreachable database or a bad configuration fails
    the inventory source with the reason.
  - Runs with the interpreter that runs Ansible, which must have hsmctl installed.
author:
  - hsmctl maintainers (!UNKNOWN)
version_added: "0.1.0"
extends_documentation_fragment:
  - constructed
  - inventory_cache
options:
  plugin:
    description: Marks the file as this plugin's configuration.
    required: true
    choices: [hsmctl.fleet.hsmctl_state]
  config:
    description:
      - The hsmctl provider configuration file; the store is its C(database_url), else
        C(state_dir)/hsmctl.db. Default - C($HSMCTL_CONFIG), else
        C(/etc/hsmctl/hsmctl.yaml).
      - Not needed when O(database_url) is set.
    type: path
    env:
      - name: HSMCTL_CONFIG
  database_url:
    description:
      - The store itself, instead of the one O(config) names - a PostgreSQL URL
        (C(postgresql+psycopg://user:password@host/db)), or a SQLite file. Put a password
        in the environment (AWX - a custom credential injecting the variable), not in
        the file.
    type: str
    env:
      - name: HSMCTL_DATABASE_URL
"""

EXAMPLES = r"""
# playbooks/inventory/hsmctl.yml: the store of $HSMCTL_CONFIG
plugin: hsmctl.fleet.hsmctl_state
compose:
  ansible_host: hsm_mgmt_ip
keyed_groups:
  - key: hsm_model
    prefix: model
groups:
  unallocated: hsm_tenant is none

# prod.hsmctl.yml: one PostgreSQL store for several orchestrator hosts; the URL comes
# from $HSMCTL_DATABASE_URL. Cached for 5 minutes in a directory.
plugin: hsmctl.fleet.hsmctl_state
cache: true
cache_plugin: ansible.builtin.jsonfile
cache_connection: /var/cache/hsmctl-inventory
cache_timeout: 300
keyed_groups:
  - key: hsm_tenant
    prefix: customer
    default_value: none
"""

# Ansible wants the documentation before any import (ansible-test validate-modules).
import hashlib  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
from typing import Any  # noqa: E402

from ansible.errors import AnsibleParserError  # noqa: E402
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable  # noqa: E402

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
_FILE_NAMES = ("hsmctl.yml", "hsmctl.yaml")
_FILE_SUFFIXES = (".hsmctl.yml", ".hsmctl.yaml")


def group_name(prefix: str, value: str) -> str:
    return f"{prefix}_{_UNSAFE.sub('_', value)}"


def claims(path: str) -> bool:
    """Whether a file of this name is this plugin's configuration."""
    name = os.path.basename(path)
    return name in _FILE_NAMES or name.endswith(_FILE_SUFFIXES)


def read_store(target: str, config_file: str | None) -> list[dict[str, Any]]:
    """One dict per appliance (name, vars, groups), plain JSON values: what is cached."""
    from hsmctl.state import Store

    with Store.open_read_only(target) as store:
        allocations = {a.appliance: a for a in store.allocations()}
        records = store.list_appliances()
    hosts = []
    for rec in records:
        hostvars: dict[str, Any] = {
            "hsm_mgmt_ip": rec.mgmt_ip,
            "hsm_data_ip": rec.data_ip,
            "hsm_tenant": rec.tenant,
            "hsm_stamp": rec.stamp,
            "hsm_region": rec.region,
            "hsm_state": rec.state.value,
            "hsm_serial": rec.serial,
            "hsm_model": rec.model,
        }
        if config_file is not None:
            hostvars["hsm_config"] = config_file
        alloc = allocations.get(rec.id)
        if alloc is not None:
            hostvars.update(
                hsm_vnet=alloc.vnet, hsm_subnet=alloc.subnet, hsm_request_id=alloc.request_id
            )
        groups = [
            group_name("stamp", rec.stamp),
            group_name("region", rec.region),
            group_name("state", rec.state.value),
        ]
        if rec.tenant:
            groups.append(group_name("tenant", rec.tenant))
        hosts.append({"name": rec.id, "vars": hostvars, "groups": groups})
    return hosts


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):  # type: ignore[misc]
    NAME = "hsmctl.fleet.hsmctl_state"

    def verify_file(self, path: str) -> bool:
        return bool(super().verify_file(path)) and claims(path)

    def parse(self, inventory: Any, loader: Any, path: str, cache: bool = True) -> None:
        super().parse(inventory, loader, path, cache)
        data = self._read_config_data(path)
        unknown = sorted(str(k) for k in set(data) - set(self._options))
        if unknown:
            raise AnsibleParserError(f"{path}: unknown option(s) {', '.join(unknown)}")
        try:
            from hsmctl.errors import HsmctlError
        except ImportError as exc:
            raise AnsibleParserError(
                f"hsmctl is not importable ({exc}): run Ansible with hsmctl installed"
            ) from exc
        try:
            target, config_file = self._target()
            cache_key = f"{self.get_cache_key(path)}_{_digest(target, config_file)}"
            use_cache = bool(self.get_option("cache"))
            hosts = None
            if use_cache and cache:
                hosts = self._cache.get(cache_key)
            if hosts is None:
                hosts = read_store(target, config_file)
                if use_cache:
                    self._cache[cache_key] = hosts
        except HsmctlError as exc:
            # The message names the store and the cause; the driver's chain only repeats it.
            raise AnsibleParserError(str(exc)) from None
        self._populate(hosts)

    def _target(self) -> tuple[str, str | None]:
        """(the store to open, the provider configuration file or None)."""
        url = self.get_option("database_url")
        if url:
            return str(url), None
        from hsmctl import config as config_mod
        from hsmctl.state.store import database_target

        config = config_mod.load_for(
            self.get_option("config"), "provider", "or set database_url in the inventory file"
        )
        return str(database_target(config)), str(config.source)

    def _populate(self, hosts: list[dict[str, Any]]) -> None:
        strict = self.get_option("strict")
        for h in hosts:
            name = h["name"]
            self.inventory.add_host(name)
            for key, value in h["vars"].items():
                self.inventory.set_variable(name, key, value)
            for group in h["groups"]:
                self.inventory.add_group(group)
                self.inventory.add_child(group, name)
            hostvars = self.inventory.get_host(name).get_vars()
            self._set_composite_vars(self.get_option("compose"), hostvars, name, strict=strict)
            self._add_host_to_composed_groups(
                self.get_option("groups"), hostvars, name, strict=strict
            )
            self._add_host_to_keyed_groups(
                self.get_option("keyed_groups"), hostvars, name, strict=strict
            )


def _digest(target: str, config_file: str | None) -> str:
    """Which store (and configuration) a cache entry is of, without the URL's password in
    the cache's keys."""
    return hashlib.sha256(f"{target}\n{config_file}".encode()).hexdigest()[:16]
