"""``hsmctl health`` at scale (issue 15, item 4): one appliance vs all of the lab (100).

Each run is the real command (``hsmctl --config C health [ID|--all] --json``, a new
process, as the systemd timer runs it) against a provider configuration of its own
(rig.provider_config: the lab's inventory and keys, a fresh state store per scenario),
so nothing in the lab's own store changes. A poll is read-only on the devices (the
monitoring account's ``hsm show``, a provider-key login without a session, the
out-of-band sensor registers); the devices log those logins, as they log every login.
The stores' first run (migration, inventory sync) is not timed.

Reported per scenario: the median wall time of ``--runs`` runs, and the machine's busy
CPU seconds over the same runs (from /proc/stat: the devices' sshd and shells count
too); then the ratio all/one, whose target is <= 3.

Usage (root, lab up): ``python -m bench health [--runs N] [--one hsm31]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from hsmctl.lab.rig import HSMCTL, provider_config

TARGET = 3.0


def _busy() -> float:
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / 100.0


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
    args = ap.parse_args(argv)
    every = _lab_appliances()
    with tempfile.TemporaryDirectory(prefix="bench-health-") as tmp:
        one = provider_config(Path(tmp) / "one", [args.one])
        fleet = provider_config(Path(tmp) / "all", every)
        _run(one, [args.one])  # migrate + sync, not timed
        _run(fleet, ["--all"])
        results = {}
        for name, conf, target in (
            ("one", one, [args.one]),
            ("all", fleet, ["--all"]),
        ):
            walls, cpus = [], []
            for _ in range(args.runs):
                wall, used, n = _run(conf, target)
                walls.append(wall)
                cpus.append(used)
            results[name] = (statistics.median(walls), statistics.median(cpus), n)
            runs = ", ".join(f"{w:.2f}" for w in walls)
            print(
                f"health {name:>3} ({n:3d} appliances): median {results[name][0]:6.2f} s wall, "
                f"{results[name][1]:6.2f} CPU-s busy (runs: {runs})",
                flush=True,
            )
    ratio = results["all"][0] / results["one"][0]
    verdict = "ok" if ratio <= TARGET else "over target"
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"ratio all/one = {ratio:.2f} (target <= {TARGET:.0f}: {verdict}); load average {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
