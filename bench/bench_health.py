"""``hsmctl health`` at scale (issue 15, item 4): one appliance vs all of the lab (100).

Each run is the real command (``hsmctl --config C health [ID|--all] --json``, a new
process, as the systemd timer runs it) against a provider configuration of its own
(rig.provider_config: the lab's inventory and keys, a fresh state store per scenario),
so nothing in the lab's own store changes. A poll is read-only on the devices (the
monitoring account's ``hsm show``, a provider-key login without a session, the
out-of-band sensor registers); the devices log those logins, as they log every login.
The stores' first run (migration, inventory sync) is not timed.

The two scenarios run interleaved (one run of each per round), so load that drifts on a
shared machine falls on both alike. Reported per scenario: the median wall time of
``--runs`` runs, and the machine's busy CPU seconds over the same runs (from /proc/stat:
the devices' sshd and shells count too); then where the CPU went, per run: this host's
``hsmctl`` process (its rusage), the devices' management sshd (each listener with the
connections it forked and reaped: accept, re-exec, key exchange, authentication, PAM) and
device daemons (``hsmd``: it logs every login), read from /proc over all the lab's
appliances before and after each run; then the ratio all/one, whose target is <= 3.

``--baseline member`` polls the one appliance from the fleet's own configuration (its
100-appliance inventory and a store of its own) instead of a one-appliance provider: the
same command a provider runs for one device of its fleet. Both are reported in
docs/performance.md; the default stays the one-appliance provider, the stricter of the two.

Usage (root, lab up): ``python -m bench health [--runs N] [--one hsm31]
[--baseline alone|member]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.bench_lab import LAB_STATE, _below, _processes, role_of
from hsmctl.lab.rig import HSMCTL, provider_config

TARGET = 3.0


def _busy() -> float:
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / 100.0


def _host_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _device_cpu(launchers: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds so far of every appliance's management sshd (with the connections it
    reaped) and device daemon, summed over the lab."""
    procs = _processes()
    ticks = os.sysconf("SC_CLK_TCK")
    out = {"sshd-mgmt": 0.0, "hsmd": 0.0}
    for launcher in launchers.values():
        for proc in _below(procs, launcher):
            role = role_of(proc.cmdline)
            if role not in out:
                continue
            try:
                stat = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[role] += sum(int(x) for x in stat[11:15]) / ticks
    return out


def _launchers() -> dict[str, int]:
    state = json.loads(LAB_STATE.read_text())
    return {k: int(v) for k, v in (state.get("launchers") or {}).items()}


def _lab_appliances() -> list[str]:
    out = subprocess.run(
        [HSMCTL, "lab", "status", "--json"], capture_output=True, check=True, timeout=60
    )
    return [a["id"] for a in json.loads(out.stdout)["appliances"]]


def _run(conf: Path, target: Sequence[str]) -> tuple[float, float, int]:
    cpu, t = _busy(), time.monotonic()
    proc = subprocess.run(
        [HSMCTL, "--config", str(conf), "health", *target, "--json"],
        capture_output=True,
        timeout=600,
        check=False,
    )
    wall, used = time.monotonic() - t, _busy() - cpu
    body = json.loads(proc.stdout)
    rows = body["appliances"] if proc.returncode == 0 else body["error"]["appliances"]
    return wall, used, len(rows)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench health")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--one", default="hsm31", help="the single appliance (default hsm31)")
    ap.add_argument(
        "--baseline",
        choices=("alone", "member"),
        default="alone",
        help="the single poll from a one-appliance provider (alone, the default) or from "
        "the fleet's own inventory (member)",
    )
    args = ap.parse_args(argv)
    every = _lab_appliances()
    with tempfile.TemporaryDirectory(prefix="bench-health-") as tmp:
        one = provider_config(Path(tmp) / "one", [args.one] if args.baseline == "alone" else every)
        fleet = provider_config(Path(tmp) / "all", every)
        _run(one, [args.one])  # migrate + sync, not timed
        _run(fleet, ["--all"])
        launchers = _launchers()
        scenarios = {"one": (one, [args.one]), "all": (fleet, ["--all"])}
        walls: dict[str, list[float]] = {k: [] for k in scenarios}
        cpus: dict[str, list[float]] = {k: [] for k in scenarios}
        host: dict[str, float] = dict.fromkeys(scenarios, 0.0)
        dev: dict[str, dict[str, float]] = {k: {"sshd-mgmt": 0.0, "hsmd": 0.0} for k in scenarios}
        counts: dict[str, int] = {}
        # Interleaved, one run of each per round: load that drifts (a shared machine)
        # falls on both scenarios alike instead of on whichever ran second.
        for _ in range(args.runs):
            for name, (conf, target) in scenarios.items():
                host0, dev0 = _host_children(), _device_cpu(launchers)
                wall, used, counts[name] = _run(conf, target)
                walls[name].append(wall)
                cpus[name].append(used)
                time.sleep(0.5)  # the devices' sshd reap their last connections
                host[name] += _host_children() - host0
                dev1 = _device_cpu(launchers)
                for k in dev0:
                    dev[name][k] += dev1[k] - dev0[k]
        results = {}
        for name in scenarios:
            results[name] = (statistics.median(walls[name]), statistics.median(cpus[name]))
            runs = ", ".join(f"{w:.2f}" for w in walls[name])
            per = {k: v / args.runs for k, v in dev[name].items()}
            print(
                f"health {name:>3} ({counts[name]:3d} appliances): median "
                f"{results[name][0]:6.2f} s wall, {results[name][1]:6.2f} CPU-s busy "
                f"(runs: {runs}); per run: hsmctl {host[name] / args.runs:.2f} CPU-s, "
                f"devices' sshd {per['sshd-mgmt']:.2f}, hsmd {per['hsmd']:.2f}",
                flush=True,
            )
    ratio = results["all"][0] / results["one"][0]
    verdict = "ok" if ratio <= TARGET else "over target"
    load = Path("/proc/loadavg").read_text().split()[0]
    print(
        f"ratio all/one ({args.baseline}) = {ratio:.2f} (target <= {TARGET:.0f}: {verdict}); "
        f"load average {load}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
