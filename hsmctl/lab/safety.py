"""The lab's network-safety rule (SPEC §4): before any address exists, the whole lab
range goes to a blackhole on the host, so a packet for a lab address with no namespace
behind it fails at once instead of leaving the machine.

The route is added with ``ip route add`` (never ``replace``), after checking that the
range overlaps no route, address or DNS resolver the host already has.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from hsmctl.errors import UsageError
from hsmctl.lab import netns


def _networks_of_routes() -> list[tuple[ipaddress.IPv4Network, str]]:
    found = []
    for route in netns.ip_json("-4", "route", "show", "table", "all"):
        dst = route.get("dst", "")
        if dst in ("", "default"):
            dst = "0.0.0.0/0"
        try:
            net = ipaddress.IPv4Network(dst, strict=False)
        except ValueError:
            continue
        kind, dev, table = route.get("type", ""), route.get("dev", "-"), route.get("table", "main")
        desc = f"{dst} {kind} dev {dev} table {table}"
        found.append((net, desc.replace("  ", " ")))
    return found


def _resolvers(path: Path = Path("/etc/resolv.conf")) -> list[ipaddress.IPv4Address]:
    out: list[ipaddress.IPv4Address] = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                addr = ipaddress.ip_address(parts[1])
            except ValueError:
                continue
            if isinstance(addr, ipaddress.IPv4Address):
                out.append(addr)
    return out


def is_ours(route: dict[str, object], lab_range: ipaddress.IPv4Network) -> bool:
    return route.get("type") == "blackhole" and route.get("dst") == str(lab_range)


def check_range_free(lab_range: ipaddress.IPv4Network) -> None:
    """Refuse (exit 2) if the lab range collides with anything the host uses."""
    problems = []
    for net, desc in _networks_of_routes():
        if net.prefixlen == 0:
            continue  # the default route covers everything; it is what we shadow
        if net.overlaps(lab_range):
            problems.append(f"route {desc}")
    for addr in _resolvers():
        if addr in lab_range:
            problems.append(f"DNS resolver {addr} (/etc/resolv.conf)")
    for link in netns.ip_json("-4", "addr", "show"):
        for info in link.get("addr_info", []):
            local = info.get("local")
            if local and ipaddress.IPv4Address(local) in lab_range:
                problems.append(f"address {local} on {link.get('ifname')}")
    if problems:
        raise UsageError(
            f"the lab range {lab_range} overlaps what this host already uses: "
            + "; ".join(problems)
            + ". Nothing was created."
        )


def blackhole_present(lab_range: ipaddress.IPv4Network) -> bool:
    return any(is_ours(r, lab_range) for r in netns.ip_json("-4", "route", "show", "table", "main"))


def add_blackhole(lab_range: ipaddress.IPv4Network) -> None:
    netns.ip("route", "add", "blackhole", str(lab_range))


def remove_blackhole(lab_range: ipaddress.IPv4Network) -> None:
    if blackhole_present(lab_range):
        netns.ip("route", "del", "blackhole", str(lab_range))
