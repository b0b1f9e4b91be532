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
from collections.abc import Sequence
from pathlib import Path

from hsmctl.inventory.entries import FORMAT_VERSION, SERIAL_RE, read_file
from hsmctl.inventory.model import Declared, Inventory, InventoryError, Region, Tenant
from hsmctl.inventory.placement import check_placement
from hsmctl.inventory.reader import NAME_RE, Problems, Reader, parse_yaml

# By concern: reader (strict YAML, field readers), entries (one file's entries),
# placement (a provisioning target against the inventory); here the rules across files.
__all__ = [
    "FORMAT_VERSION",
    "MAX_REPORTED",
    "NAME_RE",
    "SERIAL_RE",
    "check_placement",
    "inventory_files",
    "load_inventory",
    "parse_inventory",
]

MAX_REPORTED = 100


# -- rules across entries and files ------------------------------------------------------


def _unique(p: Problems, what: str, entries: Sequence[tuple[object, Declared]]) -> None:
    first: dict[object, Declared] = {}
    for value, origin in entries:
        if value in first:
            p.add(origin, f"duplicate {what} {value} (first at {first[value]})")
        else:
            first[value] = origin


def _overlaps(
    p: Problems, what: str, nets: Sequence[tuple[ipaddress.IPv4Network, Declared]]
) -> None:
    for i, (a, oa) in enumerate(nets):
        for b, ob in nets[:i]:
            if a.overlaps(b):
                p.add(oa, f"{what} {a} overlaps {b} ({ob})")


def _cross_checks(p: Problems, regions: list[Region], tenants: list[Tenant]) -> None:
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


def _raise(problems: Problems) -> None:
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
    problems = Problems([])
    regions: list[Region] = []
    tenants: list[Tenant] = []
    for file, text in documents:
        raw = parse_yaml(file, text)
        rs, ts = read_file(Reader(file, problems), raw)
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
