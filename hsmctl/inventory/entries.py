"""One inventory file's entries: regions, stamps, appliances (with their host keys),
tenants, their quotas, vnets and subnets, each checked on its own."""

from __future__ import annotations

import re
from typing import Any

from hsmctl.inventory.model import (
    HOST_KEY_TYPES,
    IDENTITY_KEY_TYPE,
    MAX_SUBNET_PREFIX,
    Appliance,
    Declared,
    Quota,
    Region,
    Stamp,
    Subnet,
    Tenant,
    Vnet,
)
from hsmctl.inventory.reader import Reader, type_name
from hsmctl.sshkeys import PublicKey, is_fingerprint

FORMAT_VERSION = 1
SERIAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

_TOP = (set[str](), {"version", "regions", "tenants"})
_REGION = ({"name", "stamps"}, set[str]())
_STAMP = ({"name", "appliances"}, {"mgmt_cidr", "spares"})
_APPLIANCE = (
    {"id", "serial", "model", "mgmt_ip", "mgmt_host_keys"},
    {"mgmt_host_key_fingerprints"},
)
_TENANT = ({"name", "identity_public_key", "vnets"}, {"quota"})
_VNET = ({"name", "cidr", "subnets"}, {"region"})
_SUBNET = ({"name", "cidr", "delegated"}, set[str]())
_QUOTA = (set[str](), {"per_stamp", "per_region"})


def read_file(r: Reader, raw: object) -> tuple[list[Region], list[Tenant]]:
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


def _region(r: Reader, entry: str, raw: object) -> Region | None:
    m = r.fields(entry, raw, _REGION)
    if m is None:
        return None
    name = r.name(entry, m)
    stamps = [_stamp(r, e, v, name or "?") for e, v in r.items(entry, m, "stamps", "name")]
    if name is None:
        return None
    return Region(name, tuple(s for s in stamps if s), Declared(r.file, entry))


def _stamp(r: Reader, entry: str, raw: object, region: str) -> Stamp | None:
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
    spares = r.integer(entry, m, "spares", 0) if "spares" in m else 0
    if spares is not None and spares > len(appliances):
        r.error(
            entry,
            f"spares: {spares} is more than the stamp's {len(appliances)} appliance(s); "
            "a stamp can hold back at most the appliances it has",
        )
        spares = None
    if name is None or spares is None:
        return None
    return Stamp(name, region, tuple(appliances), mgmt_cidr, Declared(r.file, entry), spares)


def _appliance(r: Reader, entry: str, raw: object, region: str, stamp: str) -> Appliance | None:
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


def _host_keys(r: Reader, entry: str, m: dict[str, Any]) -> tuple[PublicKey, ...] | None:
    raw = m.get("mgmt_host_keys")
    if "mgmt_host_keys" not in m:
        return None
    if not isinstance(raw, list) or not raw:
        r.error(entry, f"mgmt_host_keys: expected a non-empty list, got {type_name(raw)}")
        return None
    keys: list[PublicKey] = []
    ok = True
    for i, text in enumerate(raw):
        label = f"mgmt_host_keys[{i}]"
        if not isinstance(text, str):
            r.error(entry, f"{label}: expected a key line, got {type_name(text)}")
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
            r.error(entry, f"mgmt_host_key_fingerprints: expected a list, got {type_name(fps)}")
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


def _tenant(r: Reader, entry: str, raw: object) -> Tenant | None:
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


def _quota(r: Reader, entry: str, raw: object) -> Quota | None:
    m = r.fields(entry, raw, _QUOTA)
    if m is None:
        return None
    default = Quota()
    per_stamp = r.integer(entry, m, "per_stamp", 1)
    per_region = r.integer(entry, m, "per_region", 1)
    if ("per_stamp" in m and per_stamp is None) or ("per_region" in m and per_region is None):
        return None
    return Quota(per_stamp or default.per_stamp, per_region or default.per_region)


def _vnet(r: Reader, entry: str, raw: object) -> Vnet | None:
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


def _subnet(r: Reader, entry: str, raw: object) -> Subnet | None:
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
