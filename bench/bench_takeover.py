"""Takeover time (SPEC §7): one appliance, and five — one after another, in parallel
threads of one process, and in parallel processes (how ``takeover.yml`` runs them).

Every takeover runs the real workflow (``hsmctl.takeover.workflow.Takeover``) from the
tenant's client namespace against lab appliances hsm09 … hsm13, each freshly handed off
before every run (fresh device daemon, factory reset, provisioning steps, new bundle:
not timed). Where its time goes is measured by wrapping, per takeover:

* **ssh** — ``DeviceConnection.connect`` that logs in: TCP, key exchange, host-key
  check, key + password authentication (yescrypt);
* **refused** — the proofs' deliberately refused logins (one-time password, password
  without key, key without password): mostly the device's PAM delay after a wrong
  password (about 4 s here);
* **pkcs11** — device commands bound by the token: ``hsm init``, ``hsm co-pin set|change``,
  ``audit key rotate``;
* **device** — every other device command (round trip, the device shell, the daemon);
* **wait** — ``time.sleep`` in the workflow (the data sshd coming back after the host-key
  activation);
* **local** — the rest: opening the bundle, journal and escrow writes with fsync, the log
  verification, signing the receipt.

Shares are of the summed per-takeover wall time; for parallel runs the categories
overlap across takeovers, so the batch wall time is the number that shows the speed-up.
Each scenario is the median of ``--runs`` runs.

Usage (root, lab up, no test using hsm09 … hsm13 at the same time):
``python -m bench takeover [--runs N] [--scenarios 1,5seq,5thr,5proc]``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

APPLIANCES = ("hsm09", "hsm10", "hsm11", "hsm12", "hsm13")
TENANT = "tenant1"
PKCS11_COMMANDS = ("hsm init", "hsm co-pin", "audit key rotate")
CATEGORIES = ("ssh", "refused", "device", "pkcs11", "wait", "local")
SCENARIOS = {
    "1": "1 appliance",
    "5seq": "5 sequential",
    "5thr": "5 parallel threads",
    "5proc": "5 parallel processes",
}


# -- measuring one takeover -------------------------------------------------------------------


@dataclass
class Timing:
    total: float = 0.0
    parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))

    def finish(self, total: float) -> Timing:
        self.total = total
        measured = sum(v for k, v in self.parts.items() if k != "local")
        self.parts["local"] = max(0.0, total - measured)
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "parts": self.parts}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Timing:
        return cls(float(data["total"]), {k: float(v) for k, v in data["parts"].items()})


_current = threading.local()


def _charge(category: str, seconds: float) -> None:
    timing: Timing | None = getattr(_current, "timing", None)
    if timing is not None:
        timing.parts[category] += seconds


def _instrument() -> None:
    """Wrap the transport and sleep once per process; charges go to the thread's Timing."""
    from hsmctl.ssh import client
    from hsmctl.takeover import session

    if getattr(client.DeviceConnection, "_bench_wrapped", False):
        return
    connect, execute = client.DeviceConnection.connect, client.DeviceConnection._execute

    def timed_connect(self: client.DeviceConnection) -> client.DeviceConnection:
        t = time.perf_counter()
        kind = "ssh"
        try:
            return connect(self)
        except client.AuthenticationFailed:
            kind = "refused"
            raise
        finally:
            _charge(kind, time.perf_counter() - t)

    def timed_execute(self: client.DeviceConnection, command: str, *a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return execute(self, command, *a, **k)
        finally:
            kind = "pkcs11" if command.startswith(PKCS11_COMMANDS) else "device"
            _charge(kind, time.perf_counter() - t)

    class _Time:
        """The workflow's view of ``time``: sleeps are charged as waiting."""

        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            t = time.perf_counter()
            time.sleep(seconds)
            _charge("wait", time.perf_counter() - t)

    client.DeviceConnection.connect = timed_connect  # type: ignore[method-assign]
    client.DeviceConnection._execute = timed_execute  # type: ignore[method-assign]
    client.DeviceConnection._bench_wrapped = True  # type: ignore[attr-defined]
    # The takeover's waits (reconnecting, the data sshd coming back) live in its session.
    setattr(session, "time", _Time())  # noqa: B010 - the module's own name for time


def _enter_netns(name: str) -> None:
    """Move the calling thread into a network namespace (sockets it opens live there)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if ctypes.CDLL("libc.so.6", use_errno=True).setns(fd, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


def measure(config: Path, handoff: Path) -> Timing:
    """One takeover in this thread (already inside the tenant network)."""
    from hsmctl.customer.context import open_tenant_context
    from hsmctl.takeover.workflow import Options, Takeover

    _instrument()
    timing = Timing()
    _current.timing = timing
    started = time.perf_counter()
    try:
        Takeover(open_tenant_context(str(config)), Options(handoff=handoff)).run()
    finally:
        _current.timing = None
    return timing.finish(time.perf_counter() - started)


# -- scenarios ------------------------------------------------------------------------------


@dataclass
class Run:
    wall: float
    takeovers: list[Timing]


def _in_threads(jobs: Sequence[Callable[[], list[Timing]]], netns: str) -> list[Timing]:
    """Each job in its own thread inside ``netns``; their timings, flattened."""
    results: list[list[Timing] | BaseException] = [RuntimeError("not run")] * len(jobs)

    def one(i: int) -> None:
        try:
            _enter_netns(netns)
            results[i] = jobs[i]()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat: list[Timing] = []
    for r in results:
        if isinstance(r, BaseException):
            raise r
        flat.extend(r)
    return flat


def _process(netns: str, config: Path, handoff: Path) -> subprocess.Popen[bytes]:
    argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "bench.bench_takeover",
            "--worker", str(config), str(handoff)]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])


def _one(config: Path, handoff: Path) -> list[Timing]:
    return [measure(config, handoff)]


def run_scenario(scenario: str, rigs: Sequence[Any], workdir: Path) -> Run:
    from hsmctl.lab.rig import tenant_config

    chosen = rigs[:1] if scenario == "1" else rigs
    _parallel(lambda r: r.reprovision(), chosen)  # fresh hand-offs, not timed
    config = tenant_config(Path(tempfile.mkdtemp(dir=workdir)), chosen[0].lab, TENANT)
    netns = chosen[0].netns
    handoffs = [Path(r.handoff) for r in chosen]
    started = time.perf_counter()
    if scenario in ("1", "5seq"):
        timings = _in_threads([lambda: [measure(config, h) for h in handoffs]], netns)
    elif scenario == "5thr":
        timings = _in_threads([functools.partial(_one, config, h) for h in handoffs], netns)
    else:
        procs = [_process(netns, config, r.handoff) for r in chosen]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(f"a takeover process failed: {[p.returncode for p in procs]}")
        timings = [Timing.from_dict(json.loads(o)) for o in outs]
    return Run(time.perf_counter() - started, timings)


def _parallel(fn: Callable[[Any], object], items: Sequence[Any]) -> None:
    errors: list[BaseException] = []

    def one(item: Any) -> None:
        try:
            fn(item)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# -- report -----------------------------------------------------------------------------


def summarise(runs: Sequence[Run]) -> dict[str, Any]:
    walls = [r.wall for r in runs]
    per = [t.total for r in runs for t in r.takeovers]
    summed = sum(per)
    shares = {
        c: sum(t.parts[c] for r in runs for t in r.takeovers) / summed if summed else 0.0
        for c in CATEGORIES
    }
    return {
        "runs": len(runs),
        "wall": statistics.median(walls),
        "per_takeover": statistics.median(per),
        "shares": shares,
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    head = f"{'scenario':<22} {'runs':>4} {'wall (median)':>14} {'per takeover':>13}"
    head += "".join(f" {c:>7}" for c in CATEGORIES)
    lines = [head, "-" * len(head)]
    for name, s in results.items():
        row = f"{name:<22} {s['runs']:>4} {s['wall']:>12.2f} s {s['per_takeover']:>11.2f} s"
        row += "".join(f" {s['shares'][c] * 100:>6.1f}%" for c in CATEGORIES)
        lines.append(row)
    return "\n".join(lines)


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bench-takeover-"))
    os.chmod(path, 0o700)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench takeover", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "HANDOFF"), help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args(argv)
    if args.worker:  # one takeover in this process (already in the client namespace)
        timing = measure(Path(args.worker[0]), Path(args.worker[1]))
        print(json.dumps(timing.as_dict()))
        return 0
    if os.geteuid() != 0:
        print("bench takeover: needs root and the lab (hsmctl lab up); skipped", file=sys.stderr)
        return 0
    from hsmctl.lab.rig import HSMCTL, Rig, provision_all

    status = subprocess.run([HSMCTL, "lab", "status", "--json"], capture_output=True, check=False)
    if status.returncode != 0:
        print("bench takeover: no lab is up (hsmctl lab up); skipped", file=sys.stderr)
        return 0
    lab = json.loads(status.stdout)
    wanted = [s for s in args.scenarios.split(",") if s]
    with _workdir() as work:
        rigs = [Rig(lab, a, TENANT, work / a) for a in APPLIANCES]
        print(f"provisioning {', '.join(APPLIANCES)} (hsmctl provision) ...", flush=True)
        provision_all(rigs)
        results: dict[str, dict[str, Any]] = {}
        for scenario in wanted:
            runs = []
            for i in range(args.runs):
                run = run_scenario(scenario, rigs, work)
                print(f"  {SCENARIOS[scenario]}: run {i + 1}: {run.wall:.2f} s", flush=True)
                runs.append(run)
            results[SCENARIOS[scenario]] = summarise(runs)
        print(table(results))
        if args.json:
            print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
