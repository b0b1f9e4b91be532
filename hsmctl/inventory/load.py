"""Read and validate the inventory: one YAML file, or a directory of ``*.yaml`` files.

Validation is strict and complete: every problem is reported at once, each line naming
the file and the entry (``x.yaml: tenants[t1].vnets[v1].subnets[hsm]: ...``), because
an engineer fixing a fleet file wants the whole list, not one error per run. Unknown
keys, duplicate keys and wrong types are errors: a typo must never silently become a
default. Cross-entry rules (duplicates, overlaps, references) run over all files merged.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hsmctl.inventory.model import (
    HOST_KEY_TYPES,
    IDENTITY_KEY_TYPE,
    MAX_SUBNET_PREFIX,
    Appliance,
    Declared,
    Inventory,
    InventoryError,
    Placement,
    PlacementError,
    Quota,
    Region,
    Stamp,
    Subnet,
    Tenant,
    Vnet,
    is_reserved,
    usable_addresses,
)
from hsmctl.sshkeys import KeyFormatError, PublicKey, is_fingerprint

FORMAT_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,62}$")
SERIAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_REPORTED = 100

_TOP = (set[str](), {"version", "regions", "tenants"})
_REGION = ({"name", "stamps"}, set[str]())
_STAMP = ({"name", "appliances"}, {"mgmt_cidr"})
_APPLIANCE = (
    {"id", "serial", "model", "mgmt_ip", "mgmt_host_keys"},
    {"mgmt_host_key_fingerprints"},
)
_TENANT = ({"name", "identity_public_key", "vnets"}, {"quota"})
_VNET = ({"name", "cidr", "subnets"}, {"region"})
_SUBNET = ({"name", "cidr", "delegated"}, set[str]())
_QUOTA = (set[str](), {"per_stamp", "per_region"})


# -- YAML that refuses duplicate keys ----------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last silently)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _parse_yaml(file: Path, text: str) -> object:
    loader = _StrictLoader(text)
    loader.name = str(file)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise InventoryError(f"{file}: not valid YAML: {exc}") from exc
    finally:
        loader.dispose()


# -- field readers that collect problems -------------------------------------------------


def _type_name(value: object) -> str:
    if value is None:
        return "nothing (null)"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


@dataclass
class _Problems:
    items: list[str]

    def add(self, origin: Declared | tuple[Path, str], message: str) -> None:
        file, entry = (origin.file, origin.entry) if isinstance(origin, Declared) else origin
        self.items.append(f"{file}: {entry}: {message}" if entry else f"{file}: {message}")


class _Reader:
    """Typed access to one file's raw YAML; a wrong value is reported and read as None."""

    def __init__(self, file: Path, problems: _Problems) -> None:
        self.file = file
        self.problems = problems

    def error(self, entry: str, message: str) -> None:
        self.problems.add((self.file, entry), message)

    def fields(
        self, entry: str, value: object, spec: tuple[set[str], set[str]]
    ) -> dict[str, Any] | None:
        required, optional = spec
        if not isinstance(value, dict):
            self.error(entry, f"expected a mapping, got {_type_name(value)}")
            return None
        allowed = required | optional
        for key in value:
            if key not in allowed:
                self.error(
                    entry,
                    f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))})",
                )
        for key in sorted(required - set(value)):
            self.error(entry, f"missing key {key!r}")
        return {k: v for k, v in value.items() if k in allowed}

    def items(self, entry: str, m: dict[str, Any], key: str, ident: str) -> list[tuple[str, Any]]:
        """A list under ``key``, each item labelled by its name (or index if it has none)."""
        value = m.get(key)
        if key not in m:
            return []
        if not isinstance(value, list):
            self.error(entry, f"{key}: expected a list, got {_type_name(value)}")
            return []
        out = []
        prefix = f"{entry}.{key}" if entry else key
        for index, item in enumerate(value):
            label = item.get(ident) if isinstance(item, dict) else None
            if not (isinstance(label, str) and NAME_RE.match(label)):
                label = str(index)
            out.append((f"{prefix}[{label}]", item))
        return out

    def string(self, entry: str, m: dict[str, Any], key: str) -> str | None:
        if key not in m:
            return None
        value = m[key]
        if not isinstance(value, str):
            hint = " (quote it)" if isinstance(value, int | float | bool) else ""
            self.error(entry, f"{key}: expected a string, got {_type_name(value)}{hint}")
            return None
        if not value.strip():
            self.error(entry, f"{key}: must not be empty")
            return None
        return value

    def name(self, entry: str, m: dict[str, Any], key: str = "name") -> str | None:
        value = self.string(entry, m, key)
        if value is not None and not NAME_RE.match(value):
            self.error(
                entry,
                f"{key}: {value!r} is not a valid name (a letter, then up to 62 letters, "
                "digits, '.', '_' or '-')",
            )
            return None
        return value

    def boolean(self, entry: str, m: dict[str, Any], key: str) -> bool | None:
        if key not in m:
            return None
        value = m[key]
        if not isinstance(value, bool):
            self.error(entry, f"{key}: expected true or false, got {_type_name(value)}")
            return None
        return value

    def integer(self, entry: str, m: dict[str, Any], key: str, minimum: int) -> int | None:
        if key not in m:
            return None
        value = m[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(entry, f"{key}: expected an integer, got {_type_name(value)}")
            return None
        if value < minimum:
            self.error(entry, f"{key}: must be at least {minimum}, got {value}")
            return None
        return value

    def network(self, entry: str, m: dict[str, Any], key: str) -> ipaddress.IPv4Network | None:
        text = self.string(entry, m, key)
        if text is None:
            return None
        if "/" not in text:
            self.error(entry, f"{key}: {text!r} has no prefix length (write it as A.B.C.D/N)")
            return None
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            self.error(entry, f"{key}: {text!r} is not an IPv4 network")
            return None
        if not isinstance(net, ipaddress.IPv4Network):
            self.error(entry, f"{key}: {text!r} is IPv6; only IPv4 is supported")
            return None
        if str(net) != text.strip():
            self.error(entry, f"{key}: {text!r} has host bits set; did you mean {net}?")
            return None
        return net

    def address(self, entry: str, m: dict[str, Any], key: str) -> ipaddress.IPv4Address | None:
        text = self.string(entry, m, key)
        if text is None:
            return None
        try:
            ip = ipaddress.ip_address(text.strip())
        except ValueError:
            self.error(entry, f"{key}: {text!r} is not an IPv4 address")
            return None
        if not isinstance(ip, ipaddress.IPv4Address):
            self.error(entry, f"{key}: {text!r} is IPv6; only IPv4 is supported")
            return None
        return ip

    def key(
        self, entry: str, m: dict[str, Any], key: str, allowed: frozenset[str]
    ) -> PublicKey | None:
        text = self.string(entry, m, key)
        return None if text is None else self.key_text(entry, key, text, allowed)

    def key_text(
        self, entry: str, label: str, text: str, allowed: frozenset[str]
    ) -> PublicKey | None:
        try:
            return PublicKey.parse(text, allowed)
        except KeyFormatError as exc:
            self.error(entry, f"{label}: {exc.message}")
            return None


# -- one file ----------------------------------------------------------------------------


def _read_file(r: _Reader, raw: object) -> tuple[list[Region], list[Tenant]]:
    if raw is None:
        return [], []
    top = r.fields("", raw, _TOP)
    if top is None:
        return [], []
    if "version" in top and (isinstance(top["version"], bool) or top["version"] != FORMAT_VERSION):
        r.error(
            "version", f"unsupported inventory version {top['version']!r} (this hsmctl reads 1)"
        )
    regions = [_region(r, e, v) for e, v in r.items("", top, "regions", "name")]
    tenants = [_tenant(r, e, v) for e, v in r.items("", top, "tenants", "name")]
    return [x for x in regions if x], [x for x in tenants if x]


def _region(r: _Reader, entry: str, raw: object) -> Region | None:
    m = r.fields(entry, raw, _REGION)
    if m is None:
        return None
    name = r.name(entry, m)
    stamps = [_stamp(r, e, v, name or "?") for e, v in r.items(entry, m, "stamps", "name")]
    if name is None:
        return None
    return Region(name, tuple(s for s in stamps if s), Declared(r.file, entry))


def _stamp(r: _Reader, entry: str, raw: object, region: str) -> Stamp | None:
    m = r.fields(entry, raw, _STAMP)
    if m is None:
        return None
    name = r.name(entry, m)
    mgmt_cidr = r.network(entry, m, "mgmt_cidr")
    appliances = []
    for e, v in r.items(entry, m, "appliances", "id"):
        a = _appliance(r, e, v, region, name or "?")
        if a is None:
            continue
        if mgmt_cidr is not None:
            if a.mgmt_ip not in mgmt_cidr:
                r.error(e, f"mgmt_ip {a.mgmt_ip} is outside the stamp's mgmt_cidr {mgmt_cidr}")
            elif a.mgmt_ip in (mgmt_cidr.network_address, mgmt_cidr.broadcast_address):
                r.error(
                    e, f"mgmt_ip {a.mgmt_ip} is the network or broadcast address of {mgmt_cidr}"
                )
        appliances.append(a)
    if name is None:
        return None
    return Stamp(name, region, tuple(appliances), mgmt_cidr, Declared(r.file, entry))


def _appliance(r: _Reader, entry: str, raw: object, region: str, stamp: str) -> Appliance | None:
    m = r.fields(entry, raw, _APPLIANCE)
    if m is None:
        return None
    ident = r.name(entry, m, "id")
    serial = r.string(entry, m, "serial")
    if serial is not None and not SERIAL_RE.match(serial):
        r.error(entry, f"serial {serial!r} is not valid (letters, digits, '.', '_', '-')")
        serial = None
    model = r.string(entry, m, "model")
    mgmt_ip = r.address(entry, m, "mgmt_ip")
    keys = _host_keys(r, entry, m)
    if None in (ident, serial, model, mgmt_ip, keys):
        return None
    assert ident and serial and model and mgmt_ip and keys is not None
    return Appliance(ident, serial, model, mgmt_ip, keys, region, stamp, Declared(r.file, entry))


def _host_keys(r: _Reader, entry: str, m: dict[str, Any]) -> tuple[PublicKey, ...] | None:
    raw = m.get("mgmt_host_keys")
    if "mgmt_host_keys" not in m:
        return None
    if not isinstance(raw, list) or not raw:
        r.error(entry, f"mgmt_host_keys: expected a non-empty list, got {_type_name(raw)}")
        return None
    keys: list[PublicKey] = []
    ok = True
    for i, text in enumerate(raw):
        label = f"mgmt_host_keys[{i}]"
        if not isinstance(text, str):
            r.error(entry, f"{label}: expected a key line, got {_type_name(text)}")
            ok = False
            continue
        key = r.key_text(entry, label, text, HOST_KEY_TYPES)
        if key is None:
            ok = False
        elif any(k.blob == key.blob for k in keys):
            r.error(entry, f"{label}: the same key is listed twice")
        else:
            keys.append(key)
    if "mgmt_host_key_fingerprints" in m:
        fps = m["mgmt_host_key_fingerprints"]
        if not isinstance(fps, list):
            r.error(entry, f"mgmt_host_key_fingerprints: expected a list, got {_type_name(fps)}")
            return None
        known = {k.fingerprint for k in keys}
        for i, fp in enumerate(fps):
            label = f"mgmt_host_key_fingerprints[{i}]"
            if not (isinstance(fp, str) and is_fingerprint(fp)):
                r.error(entry, f"{label}: {fp!r} is not an OpenSSH SHA256 fingerprint")
                ok = False
            elif ok and fp not in known:
                r.error(entry, f"{label}: {fp} matches none of mgmt_host_keys")
                ok = False
    return tuple(keys) if ok else None


def _tenant(r: _Reader, entry: str, raw: object) -> Tenant | None:
    m = r.fields(entry, raw, _TENANT)
    if m is None:
        return None
    name = r.name(entry, m)
    key = r.key(entry, m, "identity_public_key", frozenset({IDENTITY_KEY_TYPE}))
    quota = _quota(r, f"{entry}.quota", m["quota"]) if "quota" in m else Quota()
    vnets = [_vnet(r, e, v) for e, v in r.items(entry, m, "vnets", "name")]
    if name is None or key is None or quota is None:
        return None
    return Tenant(name, key, tuple(v for v in vnets if v), quota, Declared(r.file, entry))


def _quota(r: _Reader, entry: str, raw: object) -> Quota | None:
    m = r.fields(entry, raw, _QUOTA)
    if m is None:
        return None
    default = Quota()
    per_stamp = r.integer(entry, m, "per_stamp", 1)
    per_region = r.integer(entry, m, "per_region", 1)
    if ("per_stamp" in m and per_stamp is None) or ("per_region" in m and per_region is None):
        return None
    return Quota(per_stamp or default.per_stamp, per_region or default.per_region)


def _vnet(r: _Reader, entry: str, raw: object) -> Vnet | None:
    m = r.fields(entry, raw, _VNET)
    if m is None:
        return None
    name = r.name(entry, m)
    cidr = r.network(entry, m, "cidr")
    region = r.name(entry, m, "region") if "region" in m else None
    subnets = []
    for e, v in r.items(entry, m, "subnets", "name"):
        s = _subnet(r, e, v)
        if s is None:
            continue
        if cidr is not None and not s.cidr.subnet_of(cidr):
            r.error(e, f"cidr {s.cidr} is outside vnet {cidr}")
        subnets.append(s)
    if name is None or cidr is None or ("region" in m and region is None):
        return None
    return Vnet(name, cidr, region, tuple(subnets), Declared(r.file, entry))


def _subnet(r: _Reader, entry: str, raw: object) -> Subnet | None:
    m = r.fields(entry, raw, _SUBNET)
    if m is None:
        return None
    name = r.name(entry, m)
    cidr = r.network(entry, m, "cidr")
    delegated = r.boolean(entry, m, "delegated")
    if cidr is not None and cidr.prefixlen > MAX_SUBNET_PREFIX:
        r.error(
            entry,
            f"cidr {cidr} is too small: the first four and the last address are reserved, "
            f"so a subnet needs a prefix of /{MAX_SUBNET_PREFIX} or shorter",
        )
        return None
    if name is None or cidr is None or delegated is None:
        return None
    return Subnet(name, cidr, delegated, Declared(r.file, entry))


# -- rules across entries and files ------------------------------------------------------


def _unique(p: _Problems, what: str, entries: Sequence[tuple[object, Declared]]) -> None:
    first: dict[object, Declared] = {}
    for value, origin in entries:
        if value in first:
            p.add(origin, f"duplicate {what} {value} (first at {first[value]})")
        else:
            first[value] = origin


def _overlaps(
    p: _Problems, what: str, nets: Sequence[tuple[ipaddress.IPv4Network, Declared]]
) -> None:
    for i, (a, oa) in enumerate(nets):
        for b, ob in nets[:i]:
            if a.overlaps(b):
                p.add(oa, f"{what} {a} overlaps {b} ({ob})")


def _cross_checks(p: _Problems, regions: list[Region], tenants: list[Tenant]) -> None:
    stamps = [s for r in regions for s in r.stamps]
    appliances = [a for s in stamps for a in s.appliances]
    _unique(p, "region", [(r.name, r.origin) for r in regions])
    _unique(p, "stamp", [(s.name, s.origin) for s in stamps])
    _unique(p, "appliance id", [(a.id, a.origin) for a in appliances])
    _unique(p, "serial", [(a.serial, a.origin) for a in appliances])
    _unique(p, "mgmt_ip", [(a.mgmt_ip, a.origin) for a in appliances])
    _unique(
        p,
        "management host key",
        [(k.fingerprint, a.origin) for a in appliances for k in a.mgmt_host_keys],
    )
    _overlaps(p, "mgmt_cidr", [(s.mgmt_cidr, s.origin) for s in stamps if s.mgmt_cidr])
    _unique(p, "tenant", [(t.name, t.origin) for t in tenants])
    _unique(
        p,
        "identity_public_key (every tenant needs its own identity)",
        [(t.identity_public_key.fingerprint, t.origin) for t in tenants],
    )
    region_names = {r.name for r in regions}
    for t in tenants:
        _unique(p, "vnet", [(v.name, v.origin) for v in t.vnets])
        _overlaps(p, "cidr", [(v.cidr, v.origin) for v in t.vnets])
        for v in t.vnets:
            if v.region is not None and v.region not in region_names:
                p.add(v.origin, f"region {v.region!r} is not in the fleet")
            _unique(p, "subnet", [(s.name, s.origin) for s in v.subnets])
            _overlaps(p, "cidr", [(s.cidr, s.origin) for s in v.subnets])


def _raise(problems: _Problems) -> None:
    items = problems.items
    if not items:
        return
    if len(items) == 1:
        raise InventoryError(items[0], detail={"errors": items})
    shown = items[:MAX_REPORTED]
    more = f"\n  ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    raise InventoryError(
        f"{len(items)} problems in the inventory:\n  " + "\n  ".join(shown) + more,
        detail={"errors": items},
    )


# -- public ------------------------------------------------------------------------------


def parse_inventory(documents: Sequence[tuple[Path, str]]) -> Inventory:
    """Validate inventory YAML given as ``(file name, text)`` pairs, merged in order."""
    problems = _Problems([])
    regions: list[Region] = []
    tenants: list[Tenant] = []
    for file, text in documents:
        raw = _parse_yaml(file, text)
        rs, ts = _read_file(_Reader(file, problems), raw)
        regions += rs
        tenants += ts
    _cross_checks(problems, regions, tenants)
    _raise(problems)
    return Inventory(tuple(regions), tuple(tenants), tuple(f for f, _ in documents))


def inventory_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files an inventory path stands for: itself, or a directory's ``*.yaml``/``*.yml``."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml") and f.is_file())
        if not files:
            raise InventoryError(f"{p}: no *.yaml files in the inventory directory")
        return files
    if not p.exists():
        raise InventoryError(f"{p}: inventory does not exist")
    return [p]


def load_inventory(path: str | os.PathLike[str]) -> Inventory:
    """Read and validate the inventory at ``path`` (a file or a directory of files)."""
    documents = []
    for f in inventory_files(path):
        try:
            documents.append((f, f.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise InventoryError(f"{f}: cannot read: {exc}") from exc
    return parse_inventory(documents)


def check_placement(
    inventory: Inventory,
    tenant: str,
    vnet: str,
    subnet: str,
    ip: str | ipaddress.IPv4Address | None = None,
    stamp: str | None = None,
) -> Placement:
    """Check a provisioning target before anything is touched; raise ``PlacementError``.

    The subnet must be delegated to the HSM service: a missing delegation is the most
    common dedicated-HSM deployment failure on Azure, and it is cheap to catch here.
    This only checks the target against the inventory; which appliances it gets
    (anti-affinity, quotas) is :func:`hsmctl.state.allocation.choose_appliances`.
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
    )
