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

With ``--client app1:crypto-officer --client app2:crypto-user`` (issue 11, item 5), a
second traced run lists the points of the ``clients`` step, and a kill at each of them
(and while each ``client register`` is on the device, and a cut there) must leave, after
the rerun, exactly those two clients on the device, each once, each with the key of its
kit, the key the interrupted run had journaled if it had chosen one.
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
from typing import Any

import pytest

from hsmctl.takeover.faults import ENV, TRACE_ENV, parse
from hsmctl.takeover.workflow import STEPS
from tests.conftest import APPLIANCE_SETS, ensure_lab
from tests.lab.takeover_helpers import (
    Rig,
    console,
    customer_state,
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
CLIENTS = {"app1": "crypto-officer", "app2": "crypto-user"}
CLIENT_FLAGS = tuple(x for name, role in CLIENTS.items() for x in ("--client", f"{name}:{role}"))
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
    return _traced(rigs[0], tmp_path_factory.mktemp("trace"))


def _traced(rig: Rig, base: Path, *extra: str) -> Trace:
    """A takeover (with ``extra`` arguments) on a fresh hand-off, every point traced."""
    rig.reprovision()
    path = base / "trace"
    proc = takeover_cli(
        rig.netns, rig.tenant_conf(base), rig.handoff, *extra, env={TRACE_ENV: str(path)}
    )
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
    # Without --client the clients step sends nothing: the device gets no client accounts.
    step = trace.points[trace.points.index("before:clients") : trace.points.index("after:clients")]
    assert step == ["before:clients"], step
    print(f"\n{len(trace.points)} injection points, {len(trace.durations)} remote commands")


def _inject(rig: Rig, spec: str, base: Path, extra: tuple[str, ...] = ()) -> Outcome:
    started = time.monotonic()
    phases: dict[str, float] = {}

    def lap(name: str) -> None:
        phases[name] = time.monotonic() - started - sum(phases.values())

    handoff = rig.reprovision()
    lap("reprovision")
    conf = rig.tenant_conf(base / re.sub(r"[^A-Za-z0-9_.-]", "_", spec))
    first = takeover_cli(rig.netns, conf, handoff, *extra, env={ENV: spec})
    lap("interrupted")
    out = Outcome(spec, rig.appliance, first.returncode, "", -1, 0.0, phases=phases)
    expected = CUT_STATUSES if parse(spec)[1] == "cut" else (SIGKILL_STATUS,)
    if first.returncode not in expected:
        out.error = f"interrupted run exited {first.returncode}: {first.stderr.decode()[-600:]}"
        return out
    out.access = escrowed_credential_logs_in(rig, conf)
    lap("access")
    interrupted = journal(conf, rig.appliance)
    second = takeover_cli(rig.netns, conf, handoff, *extra)
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
    shown = verify_receipt(receipt, rig.identity)
    if extra:
        out.error = _clients_problem(rig, conf, interrupted, shown["clients"])
    return out


def _clients_problem(
    rig: Rig, conf: Path, interrupted: dict[str, Any] | None, receipt: list[dict[str, Any]]
) -> str | None:
    """What is wrong with the clients after a rerun (None: nothing): exactly CLIENTS on
    the device (read out of band), each once, each with its kit's key; that key is the
    one the interrupted run journaled, if it had journaled one; the receipt names them."""
    from cryptography.hazmat.primitives import serialization

    from hsmctl.ssh import PublicKey

    listed = json.loads(console(rig.appliance, "hsmsh", "-c", "client list").stdout)["clients"]
    pairs = sorted((c["name"], c["role"]) for c in listed)
    if pairs != sorted(CLIENTS.items()):
        return f"the device lists {pairs}"
    state = customer_state(conf, rig.appliance)
    journaled = {c["name"]: c for c in (journal(conf, rig.appliance) or {}).get("clients", [])}
    before = {c["name"]: c for c in (interrupted or {}).get("clients", [])}
    for c in listed:
        name = c["name"]
        kit = state / "clients" / name
        key = kit / f"{name}_key"
        if key.stat().st_mode & 0o777 != 0o600:
            return f"{key} is not 0600"
        private = serialization.load_ssh_private_key(key.read_bytes(), None)
        public = private.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        fingerprint = PublicKey.parse(public.decode()).fingerprint
        if not (
            fingerprint
            == c["fingerprint"]
            == PublicKey.parse((kit / f"{name}_key.pub").read_text()).fingerprint
            == PublicKey.parse(journaled[name]["public_key"]).fingerprint
        ):
            return f"{name}: the device, the kit and the journal disagree on its key"
        chosen = before.get(name, {}).get("public_key")
        if chosen and PublicKey.parse(chosen).fingerprint != fingerprint:
            return f"{name}: the rerun made a new key instead of the journaled one"
        if not (kit / f"{name}.module").is_file():
            return f"{name}: no module file in {kit}"
    left = sorted(p.name for p in (state / "clients").iterdir())
    if left != sorted(CLIENTS):
        return f"the clients directory holds {left}"
    expected = [{"client": n, "role": r} for n, r in CLIENTS.items()]
    if [{"client": c["client"], "role": c["role"]} for c in receipt] != expected:
        return f"the receipt names {receipt}"
    return None


def _run_all(
    rigs: list[Rig], specs: list[str], base: Path, extra: tuple[str, ...] = ()
) -> list[Outcome]:
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
                outcome = _inject(rig, spec, base, extra)
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


# -- the clients step (--client, issue 11 item 5) ------------------------------------------------


@pytest.fixture(scope="module")
def client_trace(rigs: list[Rig], tmp_path_factory: pytest.TempPathFactory) -> Trace:
    return _traced(rigs[0], tmp_path_factory.mktemp("client-trace"), *CLIENT_FLAGS)


def client_specs(trace: Trace) -> list[str]:
    """Every point of the clients step, its boundaries included; a kill and a cut while
    each ``client register`` is on the device."""
    step = trace.points[
        trace.points.index("before:clients") : trace.points.index("after:clients") + 1
    ]
    registers = [p for p in step if p.startswith("send:client-register-")]
    specs = [f"{p}:kill" for p in step]
    specs += [f"{p}:kill@{max(30, int(trace.durations[p] * 500))}" for p in registers]
    specs += [f"{p}:cut@{max(30, int(trace.durations[p] * 500))}" for p in registers]
    return specs


def test_the_trace_with_clients_brackets_the_clients_step(client_trace: Trace) -> None:
    points = client_trace.points
    order = [
        "after:collector",
        "before:clients",
        "send:client-list",
        "send:client-register-app1",
        "kit:app1",
        "send:client-register-app2",
        "kit:app2",
        "after:clients",
        "before:prove",
    ]
    assert [points.index(p) for p in order] == sorted(points.index(p) for p in order), points


def test_kill_or_cut_in_the_clients_step_then_rerun_registers_each_client_once(
    rigs: list[Rig], client_trace: Trace, tmp_path_factory: pytest.TempPathFactory
) -> None:
    specs = client_specs(client_trace)
    started = time.monotonic()
    done = _run_all(rigs, specs, tmp_path_factory.mktemp("client-injections"), CLIENT_FLAGS)
    print(f"\n{len(specs)} injections in the clients step: {time.monotonic() - started:.0f} s")
    print(*_report("clients step", done), sep="\n")
    _check(done, specs)
    kills = [o for o in done if parse(o.spec)[1] == "kill"]
    assert all(o.first == SIGKILL_STATUS for o in kills)
