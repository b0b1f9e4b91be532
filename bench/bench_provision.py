"""Provisioning time (issue 15, item 4): one appliance against N in one run, and
``hsmctl provision`` against a plain ``ansible-playbook`` doing the same device steps.

Scenarios, each timed end to end as a user runs it, each the median of ``--runs`` runs,
on lab appliances hsm81 … hsm100 (the benchmark's own; factory-reset before every run,
not timed), each run with a fresh provider configuration and state store of its own,
into tenant1's ``hsm2`` subnet:

* **one** — ``hsmctl provision --tenant tenant1 --vnet vnet1 --subnet hsm2 --json``:
  allocation, then ``provision.yml`` through ansible-runner (five steps);
* **many** — the same with ``--count N`` (default: all 20 benchmark appliances, the
  issue's N): one run;
* **handover** — provision one appliance (as **one**), then ``hsmctl takeover`` of it
  from tenant1's client namespace with a tenant configuration of its own: the two
  together (issue 15 target <= 8 s); the takeover alone is reported as **takeover**;
* **plain1**, **plainN** — the baseline: the same appliances allocated in the store (not
  timed, as ``hsmctl provision`` does before its run), then plain ``ansible-playbook
  provision.yml`` (this virtualenv's, the collection from the package, its inventory
  plugin reading the store, ``-l`` the hosts): the same five device steps per appliance.

Ratios (in the same run): many / one (issue 15 target <= 3x for 20), one / plain1 and
many / plainN (the fleet tooling's overhead over a plain playbook; target <= 1.2x).

CPU seconds, steadier than wall time on a shared machine: every scenario also reports the
user+sys time of the whole process tree it started (``RUSAGE_CHILDREN`` of this process
around the run: hsmctl, ansible-playbook, its workers and modules), and the devices'
(the appliances' processes below their launchers in ``lab.json``: utime, stime and those
of the children they reaped, before and after; all the run's appliances together) as
``SCENARIO_device_cpu`` (**handover**: ``provision_device_cpu``, ``takeover_device_cpu``).

**parts** (``--parts``, once, not among the scenarios): where the CPU of one ``hsmctl
provision --count N`` goes, measured in-process (the same ``provision()`` the command
calls, in this process, with timing hooks): this process's main thread (allocation,
ansible-runner's output loop and event handling), the served steps (each step's thread
CPU, by step), paramiko's transport threads (one per appliance), the rest of this
process; ansible-playbook's main process and its workers (the ``/proc`` stat of the
process tree below this one, read every 20 ms: the main process's own CPU, and its reaped
children's), and the devices'.

Usage (root, lab up, nothing else using hsm81 … hsm100):
``python -m bench provision [--runs N] [--count N] [--scenarios one,many,plain1,plainN]
[--parts] [--json]``.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

APPLIANCES = tuple(f"hsm{i}" for i in range(81, 101))
TENANT, VNET, SUBNET = "tenant1", "vnet1", "hsm2"
SCENARIOS = ("one", "many", "plain1", "plainN", "handover")
HSMCTL = str(Path(sys.executable).with_name("hsmctl"))
ANSIBLE_PLAYBOOK = str(Path(sys.executable).with_name("ansible-playbook"))


def _config(directory: Path, appliances: Sequence[str]) -> Path:
    """A provider configuration of its own whose inventory holds only ``appliances`` and
    lets the tenant hold all of them (the default quota is 2 a stamp, 4 a region)."""
    from hsmctl.lab.rig import provider_config

    conf = provider_config(directory, appliances)
    inv_path = Path(yaml.safe_load(conf.read_text())["inventory"])
    inv = yaml.safe_load(inv_path.read_text())
    for tenant in inv["tenants"]:
        if tenant["name"] == TENANT:
            tenant["quota"] = {"per_stamp": len(APPLIANCES), "per_region": len(APPLIANCES)}
    inv_path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return conf


LAB_STATE = Path("/var/lib/hsmctl-lab/lab.json")


def children_cpu() -> float:
    """User+sys seconds of every process this one started and reaped, and theirs."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def device_cpu(*appliances: str) -> float:
    """User+sys seconds so far of the appliances' processes (below each one's launcher),
    with the children they reaped (sessions, the sshd a host-key activation replaced).
    One pass over /proc for all of them."""
    launchers = json.loads(LAB_STATE.read_text())["launchers"]
    parents: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parents.setdefault(int(fields[1]), []).append(pid)
        ticks[pid] = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    total, todo = 0, [int(launchers[a]) for a in appliances]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo.extend(parents.get(pid, []))
    return total / os.sysconf("SC_CLK_TCK")


def _check(proc: subprocess.CompletedProcess[bytes], what: str) -> None:
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).decode(errors="replace")[-3000:]
        raise SystemExit(f"bench provision: {what} exited {proc.returncode}:\n{tail}")


def run_hsmctl(
    directory: Path, appliances: Sequence[str], out: dict[str, Any] | None = None
) -> float:
    conf = _config(directory, appliances)
    argv = [HSMCTL, "--config", str(conf), "provision", "--tenant", TENANT, "--vnet", VNET,
            "--subnet", SUBNET, "--json"]  # fmt: skip
    if len(appliances) > 1:
        argv[-1:-1] = ["--count", str(len(appliances))]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, timeout=900, check=False)
    took = time.monotonic() - started
    _check(proc, "hsmctl provision")
    if out is not None:
        out.update(json.loads(proc.stdout))
    return took


def run_handover(
    directory: Path, appliance: str, cpu: dict[str, float] | None = None
) -> tuple[float, float]:
    """Provision one appliance, then take it over: (provision seconds, takeover seconds);
    ``cpu`` gets the CPU seconds of each (this host's process tree, the device's)."""
    from hsmctl.lab import control
    from hsmctl.lab.rig import client_netns, restart_hsmd, tenant_config

    restart_hsmd(appliance)  # no back-off memory from an earlier run's refused logins
    out: dict[str, Any] = {}
    cpu0, dev0 = children_cpu(), device_cpu(appliance)
    provisioned = run_hsmctl(directory, [appliance], out)
    cpu1, dev1 = children_cpu(), device_cpu(appliance)
    lab = control.status()
    t_conf = tenant_config(directory / "tenant", lab, TENANT)
    argv = ["ip", "netns", "exec", client_netns(lab, TENANT), HSMCTL, "--config", str(t_conf),
            "takeover", "--handoff", out["handoff"], "--json"]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, timeout=900, check=False)
    took = time.monotonic() - started
    cpu2, dev2 = children_cpu(), device_cpu(appliance)
    _check(proc, "hsmctl takeover")
    if cpu is not None:
        cpu.update(
            provision_cpu=cpu1 - cpu0,
            takeover_cpu=cpu2 - cpu1,
            provision_device_cpu=dev1 - dev0,
            takeover_device_cpu=dev2 - dev1,
        )
    return provisioned, took


def run_plain(directory: Path, appliances: Sequence[str]) -> float:
    """Allocate as ``hsmctl provision`` does (not timed), then plain ansible-playbook."""
    from hsmctl.inventory import check_placement, load_inventory
    from hsmctl.runner.adapter import COLLECTIONS_PATH, PLAYBOOKS
    from hsmctl.state.store import DB_FILE, Store

    conf = _config(directory, appliances)
    body = yaml.safe_load(conf.read_text())
    state_dir = Path(body["state_dir"])
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    inv = load_inventory(Path(body["inventory"]))
    with Store.open(state_dir / DB_FILE) as store:
        store.sync_inventory(inv)
        allocated = store.allocate(
            None, check_placement(inv, TENANT, VNET, SUBNET), count=len(appliances)
        )
    source = directory / "fleet.hsmctl.yml"
    source.write_text(yaml.safe_dump({"plugin": "hsmctl.fleet.hsmctl_state", "config": str(conf)}))
    empty = directory / "empty.cfg"
    empty.write_text("")
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(empty),
        "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS_PATH),
        "ANSIBLE_INVENTORY_ENABLED": "hsmctl.fleet.hsmctl_state",
        "ANSIBLE_INVENTORY_UNPARSED_FAILED": "1",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_DEPRECATION_WARNINGS": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
    }
    hosts = ",".join(a.appliance for a in allocated)
    argv = [ANSIBLE_PLAYBOOK, str(PLAYBOOKS / "provision.yml"), "-i", str(source), "-l", hosts,
            "-f", str(len(allocated))]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, timeout=900, env=env, cwd=directory)
    took = time.monotonic() - started
    _check(proc, "ansible-playbook provision.yml")
    return took


def one_run(scenario: str, count: int, root: Path, times: dict[str, list[float]]) -> float:
    from hsmctl.lab.rig import factory_reset

    appliances = APPLIANCES[:1] if scenario in ("one", "plain1") else APPLIANCES[:count]
    if scenario == "handover":
        appliances = APPLIANCES[-1:]
    factory_reset(*appliances)
    directory = Path(tempfile.mkdtemp(prefix=f"{scenario}-", dir=root))
    cpu0, dev0 = children_cpu(), device_cpu(*appliances)
    if scenario == "handover":
        cpu: dict[str, float] = {}
        provisioned, taken = run_handover(directory, appliances[0], cpu)
        times.setdefault("takeover", []).append(taken)
        times.setdefault("handover_provision", []).append(provisioned)
        for key, value in cpu.items():
            times.setdefault(f"{key}", []).append(value)
        took = provisioned + taken
    elif scenario.startswith("plain"):
        took = run_plain(directory, appliances)
    else:
        took = run_hsmctl(directory, appliances)
    times.setdefault(f"{scenario}_cpu", []).append(children_cpu() - cpu0)
    if scenario != "handover":  # which reports its two parts' device CPU itself
        times.setdefault(f"{scenario}_device_cpu", []).append(device_cpu(*appliances) - dev0)
    return took


TICK = os.sysconf("SC_CLK_TCK")


def parse_stat(text: str) -> tuple[str, int, tuple[int, int, int, int]]:
    """``/proc/PID/stat``: (name, parent pid, (utime, stime, cutime, cstime) in ticks). Pure."""
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return name, int(fields[1]), (utime, stime, cutime, cstime)


class TreeWatch:
    """The last seen CPU ticks of every process below this one (``/proc``, every
    ``interval`` s, in a thread): a process's last reading before it ends is kept."""

    def __init__(self, interval: float = 0.02) -> None:
        import threading

        self.interval = interval
        self.seen: dict[int, tuple[str, int, tuple[int, int, int, int], str]] = {}
        self.cpu = 0.0  # the watch's own thread's CPU seconds (not the measured run's)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            procs: dict[int, tuple[str, int, tuple[int, int, int, int]]] = {}
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        procs[int(entry.name)] = parse_stat(
                            Path(f"/proc/{entry.name}/stat").read_text()
                        )
                    except (OSError, ValueError):
                        continue
            below, grew = {me}, True
            while grew:
                new = {p for p, (_, ppid, _) in procs.items() if ppid in below} - below
                below |= new
                grew = bool(new)
            for pid in below - {me}:
                name, ppid, ticks = procs[pid]
                cmd = self.seen[pid][3] if pid in self.seen else ""
                if not cmd:
                    try:
                        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                        cmd = " ".join(a.decode(errors="replace") for a in argv[:3])
                    except OSError:
                        pass
                self.seen[pid] = (name, ppid, ticks, cmd)
            self.cpu = time.thread_time()
            self._stop.wait(self.interval)

    def ansible(self) -> dict[str, float]:
        """CPU seconds of ansible-playbook's main process (itself) and of its workers
        (the children it reaped), and of the guard that runs it."""
        guards = {p for p, v in self.seen.items() if "hsmctl.runner.guard" in v[3]}
        mains = [p for p, v in self.seen.items() if v[1] in guards and "ansible-playbook" in v[3]]
        out = {"ansible_main": 0.0, "ansible_workers": 0.0, "guard": 0.0}
        for pid in mains:
            _, _, (ut, st, cut, cst), _ = self.seen[pid]
            out["ansible_main"] += (ut + st) / TICK
            out["ansible_workers"] += (cut + cst) / TICK
        for pid in guards:
            _, _, (ut, st, _, _), _ = self.seen[pid]
            out["guard"] += (ut + st) / TICK
        return out


def run_parts(directory: Path, appliances: Sequence[str]) -> dict[str, Any]:
    """One ``provision()`` of ``appliances`` in this process, with timing hooks (see the
    module's docstring, **parts**). Changes nothing of hsmctl's: the hooks wrap."""
    import threading
    from collections import defaultdict

    import paramiko

    from hsmctl.provider import provisioning

    steps: dict[str, float] = defaultdict(float)
    lock = threading.Lock()
    serve, transport_run = provisioning.serve_steps, paramiko.Transport.run
    transports: list[float] = []
    started_transports: list[paramiko.Transport] = []

    def timed_serve(hosts: Any, sessions: Any = None, run: Any = None) -> Any:
        handle = serve(hosts, sessions, run)

        def timed(request: Any) -> Any:
            t = time.thread_time()
            try:
                return handle(request)
            finally:
                with lock:
                    steps[str(request.get("step"))] += time.thread_time() - t

        return timed

    def timed_run(self: paramiko.Transport) -> None:
        with lock:
            started_transports.append(self)
        try:
            transport_run(self)
        finally:
            with lock:
                transports.append(time.thread_time())

    conf = _config(directory, appliances)
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    main0, tree0, dev0 = time.thread_time(), children_cpu(), device_cpu(*appliances)
    provisioning.serve_steps = timed_serve
    paramiko.Transport.run = timed_run  # type: ignore[method-assign]
    started = time.monotonic()
    try:
        with TreeWatch() as watch:
            outcome = provisioning.provision(
                str(conf), tenant=TENANT, vnet=VNET, subnet=SUBNET, count=len(appliances)
            )
    finally:
        provisioning.serve_steps = serve
        paramiko.Transport.run = transport_run  # type: ignore[method-assign]
    took = time.monotonic() - started
    for transport in started_transports:  # closed by the run: their threads end now
        transport.join(60)
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    if outcome.failures:
        raise SystemExit(f"bench provision --parts: failed: {outcome.failures}")
    process = (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime)
    main = time.thread_time() - main0
    served = sum(steps.values())
    return {
        "count": len(appliances),
        "wall_s": round(took, 2),
        "hsmctl_process": round(process, 2),
        "hsmctl_main_thread": round(main, 2),
        "hsmctl_steps": round(served, 2),
        "hsmctl_steps_by_step": {k: round(v, 3) for k, v in sorted(steps.items())},
        "hsmctl_ssh_transports": round(sum(transports), 2),
        "hsmctl_other_threads": round(process - main - served - sum(transports) - watch.cpu, 2),
        "watch_thread_not_counted": round(watch.cpu, 2),
        **{k: round(v, 2) for k, v in watch.ansible().items()},
        "ansible_tree": round(children_cpu() - tree0, 2),
        "devices": round(device_cpu(*appliances) - dev0, 2),
    }


def summarise(times: dict[str, list[float]], count: int) -> dict[str, Any]:
    """Medians and the ratios against the baselines of the same run. Pure."""
    med = {k: statistics.median(v) for k, v in times.items() if v}

    def ratio(a: str, b: str) -> float | None:
        return round(med[a] / med[b], 2) if a in med and b in med and med[b] else None

    return {
        "count": count,
        "median_s": {k: round(v, 2) for k, v in med.items()},
        "runs_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "many_over_one": ratio("many", "one"),
        "one_over_plain1": ratio("one", "plain1"),
        "many_over_plainN": ratio("many", "plainN"),
        # The device's CPU seconds for one provisioning: what bounds N in one run on a
        # small host (each appliance's share of "many" against "one").
        "device_cpu_per_appliance": {
            k: round(med[f"{k}_device_cpu"] / n, 3)
            for k, n in (("one", 1), ("many", count))
            if f"{k}_device_cpu" in med
        },
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench provision", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=len(APPLIANCES))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--parts", action="store_true", help="where the CPU goes (once)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown or not 1 <= args.count <= len(APPLIANCES):
        parser.error(f"scenarios from {SCENARIOS}; --count 1..{len(APPLIANCES)}")
    from hsmctl.lab.rig import factory_reset

    if args.parts:
        appliances = APPLIANCES[: args.count]
        factory_reset(*appliances)
        with tempfile.TemporaryDirectory(prefix="bench-provision-") as tmp:
            try:
                parts = run_parts(Path(tmp), appliances)
            finally:
                factory_reset(*appliances)
        print(json.dumps(parts, indent=None if args.json else 1))
        return 0
    times: dict[str, list[float]] = {s: [] for s in scenarios}
    with tempfile.TemporaryDirectory(prefix="bench-provision-") as tmp:
        try:
            for run in range(args.runs):
                for s in scenarios:  # interleaved, so load drifts hit every scenario alike
                    took = one_run(s, args.count, Path(tmp), times)
                    times[s].append(took)
                    print(f"run {run + 1} {s}: {took:.2f} s", file=sys.stderr, flush=True)
        finally:
            factory_reset(*APPLIANCES[: args.count], APPLIANCES[-1])
    summary = summarise(times, args.count)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
        return 0
    med = summary["median_s"]
    print(f"provision (median of {args.runs} runs; N = {args.count})")
    for s in times:
        if not s.endswith("_cpu"):
            print(f"  {s:8} {med[s]:7.2f} s   runs {summary['runs_s'][s]}")
    print(f"  N in one run / one:        {summary['many_over_one']}x (target <= 3x for 20)")
    print(f"  hsmctl / plain, one:       {summary['one_over_plain1']}x (target <= 1.2x)")
    print(f"  hsmctl / plain, N:         {summary['many_over_plainN']}x (target <= 1.2x)")
    if "handover" in med:
        print(f"  provision + takeover of one: {med['handover']:.2f} s (target <= 8 s)")
    cpu = {k.removesuffix("_cpu"): v for k, v in med.items() if k.endswith("_cpu")}
    if cpu:
        print("  CPU seconds (median; this host's process tree, *_device: the appliances')")
        for name, value in cpu.items():
            print(f"    {name:22} {value:6.2f}")
    for name, value in summary["device_cpu_per_appliance"].items():
        print(f"  device CPU per appliance, {name}: {value:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
