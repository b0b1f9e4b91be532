"""What one lab appliance costs: memory (PSS) per process and boot time, read from the
running lab's own state (``lab.json`` and ``/proc``). Nothing is started or changed.

Memory is the proportional set size (``/proc/PID/smaps_rollup``): a page shared by N
processes counts 1/N to each, so the sum over all appliances is what they take from the
machine (an RSS sum would count the shared Python and libc pages once per process).
Each appliance's processes are its launcher (``unshare``) and everything below it:
``hsm-boot`` (the appliance's init and supervisor), ``hsmd`` (the device daemon), the
management ``sshd`` and, once provisioned, the data ``sshd``; sessions that happen to be
open while it reads are counted as "other".

Boot time per appliance: from its ``hsm-boot`` process start to its management
``sshd`` start (personalisation on first boot, the daemon coming up, then sshd), read
from the processes' start times (``/proc/PID/stat``). The lab's own ``up_seconds``
(``hsmctl lab up`` wall time, networks and all) divided by the number of appliances is
reported beside it.

Usage (root, lab up): ``python -m bench lab [--json] [--samples N]`` — ``--samples``
reads that many times, a second apart, and reports the median of each number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAB_STATE = Path("/var/lib/hsmctl-lab/lab.json")
ROLES = ("launcher", "hsm-boot", "hsmd", "token-forks", "sshd-mgmt", "sshd-data", "other")


def role_of(cmdline: str) -> str:
    """Which part of an appliance a process is, from its command line. Pure."""
    if cmdline.startswith("unshare "):
        return "launcher"
    if "/usr/local/sbin/hsm-boot" in cmdline:
        return "hsm-boot"
    if "/usr/local/sbin/hsmd" in cmdline:
        return "hsmd"
    if "hsmctl.appliance.tokencli --fork-server" in cmdline:
        return "token-forks"  # the token helper's fork server (and a child at work)
    if cmdline.startswith("sshd: /usr/sbin/sshd") or cmdline.startswith("/usr/sbin/sshd"):
        return "sshd-mgmt" if "sshd_mgmt_config" in cmdline else "sshd-data"
    return "other"


def read_rollup(text: str) -> dict[str, int]:
    """``smaps_rollup`` as kB per field. Pure."""
    fields: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[key.strip()] = int(parts[0])
    return fields


@dataclass
class Proc:
    pid: int
    ppid: int
    cmdline: str
    start_ticks: int
    pss_kb: int = 0
    private_kb: int = 0


@dataclass
class Appliance:
    id: str
    kb: dict[str, int] = field(default_factory=dict)  # PSS by role
    private_kb: int = 0
    boot_s: float | None = None

    @property
    def total_kb(self) -> int:
        return sum(self.kb.values())


def _processes() -> dict[int, Proc]:
    procs: dict[int, Proc] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        procs[pid] = Proc(pid, int(fields[1]), cmd.decode(errors="replace"), int(fields[19]))
    return procs


def _below(procs: Mapping[int, Proc], root: int) -> list[Proc]:
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            found.append(procs[pid])
        todo.extend(children.get(pid, []))
    return found


def measure(launchers: Mapping[str, int]) -> list[Appliance]:
    procs = _processes()
    ticks = os.sysconf("SC_CLK_TCK")
    result = []
    for ident, launcher in sorted(launchers.items()):
        a = Appliance(ident, dict.fromkeys(ROLES, 0))
        starts: dict[str, int] = {}
        for p in _below(procs, int(launcher)):
            try:
                rollup = read_rollup(Path(f"/proc/{p.pid}/smaps_rollup").read_text())
            except OSError:
                continue
            role = role_of(p.cmdline)
            a.kb[role] += rollup.get("Pss", 0)
            a.private_kb += rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)
            starts.setdefault(role, p.start_ticks)
            starts[role] = min(starts[role], p.start_ticks)
        if "hsm-boot" in starts and "sshd-mgmt" in starts:
            a.boot_s = (starts["sshd-mgmt"] - starts["hsm-boot"]) / ticks
        result.append(a)
    return result


def _median(values: Iterable[float]) -> float:
    items = list(values)
    return statistics.median(items) if items else 0.0


def summarise(samples: list[list[Appliance]], state: Mapping[str, Any]) -> dict[str, Any]:
    """Medians over samples and appliances. Pure."""
    per_sample_total = [sum(a.total_kb for a in s) for s in samples]
    flat = [a for s in samples for a in s]
    n = len(samples[0]) if samples else 0
    boots = [a.boot_s for a in samples[0] if a.boot_s is not None] if samples else []
    up = state.get("up_seconds")
    return {
        "appliances": n,
        "pss_mb_per_appliance": round(_median(a.total_kb for a in flat) / 1024, 2),
        "pss_mb_by_role": {
            r: round(_median(a.kb.get(r, 0) for a in flat) / 1024, 2) for r in ROLES
        },
        "private_mb_per_appliance": round(_median(a.private_kb for a in flat) / 1024, 2),
        "pss_mb_all_appliances": round(_median(per_sample_total) / 1024, 1),
        "boot_s_median": round(_median(boots), 2),
        "boot_s_max": round(max(boots), 2) if boots else None,
        "lab_up_seconds": up,
        "lab_up_seconds_per_appliance": round(float(up) / n, 3) if up and n else None,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench lab", description=__doc__)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--samples", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        state = json.loads(LAB_STATE.read_text())
    except OSError:
        print("bench lab: no lab is up (hsmctl lab up)", file=sys.stderr)
        return 2
    launchers = {k: int(v) for k, v in (state.get("launchers") or {}).items()}
    samples = []
    for i in range(max(1, args.samples)):
        if i:
            time.sleep(1)
        samples.append(measure(launchers))
    summary = summarise(samples, state)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
        return 0
    print(f"lab: {summary['appliances']} appliances (median of {len(samples)} samples)")
    print(
        f"  memory (PSS) per appliance: {summary['pss_mb_per_appliance']} MB "
        f"(private {summary['private_mb_per_appliance']} MB); all appliances: "
        f"{summary['pss_mb_all_appliances']} MB"
    )
    for role, mb in summary["pss_mb_by_role"].items():
        print(f"    {role:10} {mb:6.2f} MB")
    print(
        f"  boot (hsm-boot start -> management sshd): median {summary['boot_s_median']} s, "
        f"max {summary['boot_s_max']} s"
    )
    print(
        f"  lab up: {summary['lab_up_seconds']} s in all, "
        f"{summary['lab_up_seconds_per_appliance']} s per appliance"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
