"""Crash and cut safety of the takeover (SPEC §7, issue 5): interrupt it everywhere, rerun.

One traced run enumerates the injection points (``HSMCTL_FAULT_TRACE``); then, each on a
fresh hand-off (factory reset, re-provision, new bundle) and a fresh customer state:

* ``POINT:kill`` at every point: SIGKILL there;
* ``send:CMD:kill@MS`` for every command that changes the device: SIGKILL while the
  command is on the device and its answer not yet back (half its traced duration);
* ``POINT:cut`` at every step boundary, and ``@MS`` in the middle of the commands that
  matter most: the TCP connection under the SSH session is shut down.

After each interrupted run one of the escrowed credentials (the one-time password or the
escrowed new one, with the tenant key, against the journaled host keys) must log in — the
customer never lost access — and the same command without injection must finish with a
receipt that verifies. Injections run on the six takeover appliances in parallel.
"""

from __future__ import annotations

import json
import queue
import re
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hsmctl.takeover.faults import ENV, TRACE_ENV, parse
from hsmctl.takeover.workflow import STEPS
from tests.conftest import APPLIANCE_SETS, ensure_lab
from tests.lab.takeover_helpers import (
    Rig,
    escrowed_credential_logs_in,
    journal,
    provision_all,
    takeover_cli,
    verify_receipt,
)

# Part of make test (CI), and alone with make test-faults: every injection point, each on
# a fresh hand-off. All injections run in the first test's fixtures (7 to 8 min on two
# cores), so the module's timeout is well above the default's 15 min per test.
pytestmark = [pytest.mark.lab, pytest.mark.faults, pytest.mark.timeout(2400)]

TENANT = "tenant1"
SIGKILL_STATUS = -9
CUT_STATUSES = (0, 4)  # the run may recover on a new connection, or stop as unreachable
READ_ONLY = re.compile(r"-show(#\d+)?$")
MID_CUT_COMMANDS = (
    "send:user-password",
    "send:sysconf-hostkey-activate",
    "send:hsm-init",
    "send:hsm-co-pin-set",
    "send:audit-key-rotate",
)


@dataclass(frozen=True)
class Trace:
    points: list[str]
    durations: dict[str, float]  # send:CMD -> seconds until sent:CMD
    connected: set[str]  # points where a connection was open (a cut has something to cut)

    def commands(self) -> list[str]:
        return [p for p in self.points if p in self.durations]


@dataclass
class Outcome:
    spec: str
    rig: str
    first: int
    access: str
    second: int
    seconds: float
    error: str | None = None
    phases: dict[str, float] = field(default_factory=dict)  # where the seconds went


@pytest.fixture(scope="module")
def rigs(_lab_session: None, tmp_path_factory: pytest.TempPathFactory) -> list[Rig]:
    lab = ensure_lab()
    base = tmp_path_factory.mktemp("faults")
    found = [Rig(lab, a, TENANT, base / a) for a in APPLIANCE_SETS["takeover"]]
    provision_all(found)
    return found


@pytest.fixture(scope="module")
def trace(rigs: list[Rig], tmp_path_factory: pytest.TempPathFactory) -> Trace:
    rig = rigs[0]
    base = tmp_path_factory.mktemp("trace")
    rig.reprovision()
    path = base / "trace"
    proc = takeover_cli(rig.netns, rig.tenant_conf(base), rig.handoff, env={TRACE_ENV: str(path)})
    assert proc.returncode == 0, proc.stderr.decode()
    points: list[str] = []
    times: dict[str, float] = {}
    connected: set[str] = set()
    for line in path.read_text().splitlines():
        name, stamp, conn = line.split("\t")
        assert name not in times, f"point {name} reached twice under one name"
        points.append(name)
        times[name] = float(stamp)
        if conn == "1":
            connected.add(name)
    durations = {
        p: times["sent:" + p.removeprefix("send:")] - times[p]
        for p in points
        if p.startswith("send:")
    }
    return Trace(points, durations, connected)


def test_the_trace_names_every_step_and_command(trace: Trace) -> None:
    for step in STEPS:
        assert f"before:{step.value}" in trace.points
        assert f"after:{step.value}" in trace.points
    # Every remote command of the steps (prove's own checks aside) is bracketed.
    for name in ("user-password", "sysconf-hostkey-activate", "hsm-init", "audit-key-rotate"):
        assert f"send:{name}" in trace.durations
    assert trace.points.index("pending:password") < trace.points.index("send:user-password")
    print(f"\n{len(trace.points)} injection points, {len(trace.durations)} remote commands")


def _inject(rig: Rig, spec: str, base: Path) -> Outcome:
    started = time.monotonic()
    phases: dict[str, float] = {}

    def lap(name: str) -> None:
        phases[name] = time.monotonic() - started - sum(phases.values())

    handoff = rig.reprovision()
    lap("reprovision")
    conf = rig.tenant_conf(base / re.sub(r"[^A-Za-z0-9_.-]", "_", spec))
    first = takeover_cli(rig.netns, conf, handoff, env={ENV: spec})
    lap("interrupted")
    out = Outcome(spec, rig.appliance, first.returncode, "", -1, 0.0, phases=phases)
    expected = CUT_STATUSES if parse(spec)[1] == "cut" else (SIGKILL_STATUS,)
    if first.returncode not in expected:
        out.error = f"interrupted run exited {first.returncode}: {first.stderr.decode()[-600:]}"
        return out
    out.access = escrowed_credential_logs_in(rig, conf)
    lap("access")
    second = takeover_cli(rig.netns, conf, handoff)
    lap("rerun")
    out.second = second.returncode
    out.seconds = time.monotonic() - started
    if second.returncode != 0:
        out.error = f"rerun exited {second.returncode}: {second.stderr.decode()[-600:]}"
        return out
    j = journal(conf, rig.appliance)
    assert j is not None
    if sorted(j["done"]) != sorted(s.value for s in STEPS):
        out.error = f"rerun left steps undone: {j['done']}"
        return out
    receipt = Path(json.loads(second.stdout)["receipt"])
    verify_receipt(receipt, rig.identity)
    return out


def _run_all(rigs: list[Rig], specs: list[str], base: Path) -> list[Outcome]:
    """Every spec once, each rig working through the shared queue in its own thread."""
    todo: queue.Queue[str] = queue.Queue()
    for spec in specs:
        todo.put(spec)
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def worker(rig: Rig) -> None:
        while True:
            try:
                spec = todo.get_nowait()
            except queue.Empty:
                return
            try:
                outcome = _inject(rig, spec, base)
            except Exception as exc:  # a broken assertion in one injection: report it
                outcome = Outcome(
                    spec, rig.appliance, -1, "", -1, 0.0, f"{type(exc).__name__}: {exc}"
                )
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=worker, args=(r,)) for r in rigs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def _report(title: str, outcomes: list[Outcome]) -> Iterator[str]:
    access = sorted({o.access for o in outcomes if o.access})
    yield f"\n{title}: {len(outcomes)} injections, access kept with: {', '.join(access)}"
    slow = max(outcomes, key=lambda o: o.seconds)
    yield f"slowest {slow.spec} on {slow.rig}: {slow.seconds:.1f} s"
    names = ("reprovision", "interrupted", "access", "rerun")
    means = {n: statistics.mean(o.phases.get(n, 0.0) for o in outcomes) for n in names}
    yield "mean seconds per injection: " + ", ".join(f"{n} {v:.1f}" for n, v in means.items())


def _check(outcomes: list[Outcome], specs: list[str]) -> None:
    assert sorted(o.spec for o in outcomes) == sorted(specs)
    failed = [f"{o.spec} on {o.rig}: {o.error}" for o in outcomes if o.error]
    assert not failed, "\n".join(failed)


def kill_specs(trace: Trace) -> list[str]:
    specs = [f"{p}:kill" for p in trace.points]
    specs += [
        f"{p}:kill@{max(30, int(trace.durations[p] * 500))}"
        for p in trace.commands()
        if not READ_ONLY.search(p)
    ]
    return specs


def cut_specs(trace: Trace) -> list[str]:
    boundaries = [p for p in trace.points if p.startswith(("before:", "after:"))]
    # Where no connection is open there is nothing to cut (the run goes on untouched).
    specs = [f"{p}:cut" for p in boundaries if p in trace.connected]
    specs += [
        f"{p}:cut@{max(30, int(trace.durations[p] * 500))}"
        for p in trace.commands()
        if p in MID_CUT_COMMANDS
    ]
    return specs


@pytest.fixture(scope="module")
def outcomes(
    rigs: list[Rig], trace: Trace, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Outcome]:
    """Every injection, kills and cuts in one pool (no rig idles between the two sets)."""
    started = time.monotonic()
    # Earliest points first: they leave the most for the rerun, so the pool ends evenly.
    specs = sorted(
        kill_specs(trace) + cut_specs(trace), key=lambda s: trace.points.index(parse(s)[0])
    )
    done = _run_all(rigs, specs, tmp_path_factory.mktemp("injections"))
    print(
        f"\n{len(specs)} injections on {len(rigs)} appliances: {time.monotonic() - started:.0f} s"
    )
    return {o.spec: o for o in done}


def test_kill_at_every_point_then_rerun_finishes(
    trace: Trace, outcomes: dict[str, Outcome]
) -> None:
    specs = kill_specs(trace)
    mine = [outcomes[s] for s in specs if s in outcomes]
    print(*_report("kill -9", mine), sep="\n")
    _check(mine, specs)
    assert all(o.first == SIGKILL_STATUS for o in mine)


def test_cut_connection_at_every_step_boundary_then_rerun_finishes(
    trace: Trace, outcomes: dict[str, Outcome]
) -> None:
    specs = cut_specs(trace)
    mine = [outcomes[s] for s in specs if s in outcomes]
    print(*_report("cut", mine), sep="\n")
    print("interrupted by the cut (exit 4):", sum(o.first == 4 for o in mine))
    _check(mine, specs)
