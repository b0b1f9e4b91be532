"""The device's CPU per provisioning, and per device command (issue 15 item 4).

``python -m bench device [--runs 3] [--repeat 20] [--appliances hsm78,hsm79,hsm80]``

What a provisioning asks of the device, without this host's side: on a factory-fresh
appliance, one management connection as ``provider`` and the eight commands of a
provisioning in its order (``hsm show``, ``network show``, ``network set``, ``user
credential set monitor``, ``user enable monitor``, ``user otp set``, ``sysconf hostkey
show``, ``audit key show``), then the connection closed; the device's
CPU is the appliance's process tree below its launcher (user+sys with reaped children,
``bench_provision.device_cpu``), read before and after, with the connection's sshd
reaped. Then, per command, ``--repeat`` runs of it over one connection (the CPU per
command, the connection's set-up not counted). Each run factory-resets the appliance
first and after (untimed; the data port is never attached: ``network set`` only
configures the device's own interface). Where the CPU went is split by process: the
management sshd (connections and the sessions and shells below them), ``hsmd`` itself,
the processes ``hsmd`` ran (token helper, ``ip``, ``chpasswd``, ...), the rest.

Uses only its own appliances (hsm78-hsm80 by default), never those of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

APPLIANCES = ("hsm78", "hsm79", "hsm80")
TENANT = "tenant1"
LAB_STATE = Path("/var/lib/hsmctl-lab/lab.json")


def _tree() -> tuple[dict[int, list[int]], dict[int, tuple[str, int, int]]]:
    """(children by parent pid, pid -> (name, own ticks, reaped children's ticks))."""
    parents: dict[int, list[int]] = {}
    info: dict[int, tuple[str, int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        pid = int(entry.name)
        parents.setdefault(int(fields[1]), []).append(pid)
        own = int(fields[11]) + int(fields[12])
        reaped = int(fields[13]) + int(fields[14])
        info[pid] = (name, own, reaped)
    return parents, info


def parts(appliance: str) -> dict[str, float]:
    """CPU seconds so far of one appliance's processes, by part: ``sshd`` (the listeners
    with every connection below them, shells included), ``hsmd`` (its own), ``hsmd-children``
    (what it ran and reaped, or still runs), ``other`` (init, launcher, anything else)."""
    launcher = int(json.loads(LAB_STATE.read_text())["launchers"][appliance])
    parents, info = _tree()
    out = {"sshd": 0, "hsmd": 0, "hsmd-children": 0, "other": 0}

    def subtree(pid: int) -> int:
        _name, own, reaped = info.get(pid, ("", 0, 0))
        return own + reaped + sum(subtree(c) for c in parents.get(pid, []))

    def walk(pid: int) -> None:
        name, own, reaped = info.get(pid, ("", 0, 0))
        if name == "sshd":
            out["sshd"] += subtree(pid)
            return
        if name == "hsmd":
            out["hsmd"] += own
            out["hsmd-children"] += reaped + sum(subtree(c) for c in parents.get(pid, []))
            return
        out["other"] += own + reaped
        for child in parents.get(pid, []):
            walk(child)

    walk(launcher)
    tck = os.sysconf("SC_CLK_TCK")
    return {k: v / tck for k, v in out.items()}


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    d = {k: after[k] - before[k] for k in before}
    d["total"] = sum(d.values())
    return d


class Device:
    """The provider's side of one appliance for the measurement (the lab's keys, pins)."""

    def __init__(self, appliance: str, directory: Path) -> None:
        from hsmctl.lab.rig import provider_config
        from hsmctl.provider.context import open_context

        self.appliance = appliance
        self.ctx = open_context(str(provider_config(directory, [appliance])))
        subnet = self.ctx.inventory.tenant(TENANT).vnet("vnet1").subnet("hsm")  # type: ignore[union-attr]
        assert subnet is not None
        # An address in the tenant's subnet (never used: the data port stays detached).
        host = subnet.cidr.network_address + 10 + int(appliance.removeprefix("hsm"))
        self.address = f"{host}/{subnet.cidr.prefixlen}"
        self.gateway = str(subnet.cidr.network_address + 1)
        self.tenant_key = self.ctx.inventory.tenant(TENANT).identity_public_key.line
        self.monitor_key = self.ctx.monitor_public_key()

    def connect(self) -> Any:
        return self.ctx.provider_session(self.appliance).connect()

    def commands(self) -> list[tuple[str, list[Any]]]:
        """The eight commands of a provisioning served by ``hsmctl provision`` (one
        ``hsm show``: its verify step's reading serves the later steps), in its order,
        with their stdin."""
        from hsmctl.secret import generate_password

        otp = generate_password()
        return [
            ("hsm show", []),
            ("network show", []),
            (f"network set --ip {self.address} --gateway {self.gateway}", []),
            ("user credential set monitor", [self.monitor_key]),
            ("user enable monitor", []),
            ("user otp set --expires-hours 72", [self.tenant_key, otp]),
            ("sysconf hostkey show", []),
            ("audit key show", []),
        ]

    def reset(self) -> None:
        from hsmctl.lab.rig import factory_reset

        factory_reset(self.appliance)


def _pids(appliance: str) -> set[int]:
    """Every process of the appliance (below its launcher)."""
    launcher = int(json.loads(LAB_STATE.read_text())["launchers"][appliance])
    parents, _ = _tree()
    found: set[int] = set()
    todo = [launcher]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(parents.get(pid, []))
    return found


def _settle(appliance: str, baseline: set[int]) -> None:
    """Wait (bounded) until the processes the work started are gone, so their CPU is in
    their parents' reaped time, where :func:`parts` reads it."""
    deadline = time.monotonic() + 30
    while _pids(appliance) - baseline and time.monotonic() < deadline:
        time.sleep(0.02)


def measure(appliance: str, work: Callable[[], None]) -> dict[str, float]:
    """The device's CPU for ``work``: processes it leaves behind are waited for."""
    baseline = _pids(appliance)
    before = parts(appliance)
    work()
    _settle(appliance, baseline)
    return _delta(before, parts(appliance))


def provisioning(dev: Device) -> dict[str, float]:
    def work() -> None:
        conn = dev.connect()
        try:
            for line, stdin in dev.commands():
                conn.run(line, stdin)
        finally:
            conn.close()

    return measure(dev.appliance, work)


def per_command(dev: Device, repeat: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    seen: set[str] = set()
    for line, stdin in dev.commands():
        name = line.split(" --")[0]
        if name in seen:
            continue
        seen.add(name)
        conn = dev.connect()
        try:
            conn.run("help")  # the connection's own set-up is not the command's

            def work(conn: Any = conn, line: str = line, stdin: list[Any] = stdin) -> None:
                for _ in range(repeat):
                    conn.run(line, stdin)

            d = measure(dev.appliance, work)
            out[name] = {k: v / repeat for k, v in d.items()}
        finally:
            conn.close()
    return out


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench device", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=20, help="runs of each command (0: none)")
    ap.add_argument("--appliances", default=",".join(APPLIANCES))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(list(argv))
    appliances = [a for a in args.appliances.split(",") if a]
    results: dict[str, Any] = {"provisioning": [], "per_command": []}
    with tempfile.TemporaryDirectory(prefix="bench-device-") as tmp:
        devices = [Device(a, Path(tmp) / a) for a in appliances]
        try:
            for run in range(args.runs):
                for dev in devices:
                    dev.reset()
                    results["provisioning"].append(provisioning(dev))
                    if args.repeat:
                        results["per_command"].append(per_command(dev, args.repeat))
                    dev.reset()
                    print(
                        f"run {run + 1} {dev.appliance}: provisioning "
                        + " ".join(f"{k} {v:.3f}" for k, v in results["provisioning"][-1].items()),
                        flush=True,
                    )
        finally:
            for dev in devices:
                dev.ctx.close()
    prov = results["provisioning"]
    summary = {
        "provisioning_median": {k: statistics.median(p[k] for p in prov) for k in prov[0]},
        "runs": len(prov),
    }
    if results["per_command"]:
        names = results["per_command"][0].keys()
        summary["per_command_ms"] = {
            n: {
                k: round(1000 * statistics.median(r[n][k] for r in results["per_command"]), 2)
                for k in results["per_command"][0][n]
            }
            for n in names
        }
    if args.json:
        print(json.dumps({**summary, "raw": results}, indent=2))
    else:
        print(json.dumps(summary, indent=2))
    return 0
