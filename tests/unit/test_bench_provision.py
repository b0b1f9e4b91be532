"""bench provision's measuring parts, without the lab: the CPU seconds of a process tree
(what docs/performance.md quotes as this host's and the device's CPU) and the summary's
medians and ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import bench_provision
from bench.bench_provision import children_cpu, device_cpu, summarise

pytestmark = pytest.mark.unit

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"


def test_children_cpu_counts_a_reaped_child() -> None:
    before = children_cpu()
    subprocess.run([sys.executable, "-c", BURN], check=True)
    assert children_cpu() - before >= 0.25


def test_device_cpu_sums_the_tree_below_the_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A launcher whose child burns CPU, then waits for a grandchild that burns more:
    the sum grows by both (the grandchild through its parent's cutime once reaped)."""
    script = (
        f"import subprocess, sys\n{BURN}"
        f"subprocess.run([sys.executable, '-c', {BURN!r}], check=True)\n"
        "sys.stdout.write('done\\n'); sys.stdout.flush(); sys.stdin.read()\n"
    )
    launcher = subprocess.Popen(
        ["/bin/sh", "-c", f'"{sys.executable}" -c "$0"', script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        state = tmp_path / "lab.json"
        state.write_text(json.dumps({"launchers": {"hsm01": launcher.pid}}))
        monkeypatch.setattr(bench_provision, "LAB_STATE", state)
        assert launcher.stdout is not None
        assert launcher.stdout.readline() == "done\n"
        assert device_cpu("hsm01") >= 0.5
        state.write_text(
            json.dumps({"launchers": {"hsm01": launcher.pid, "hsm02": os.getpid() + 10**7}})
        )
        assert device_cpu("hsm02") == 0.0  # no such process: nothing below it
        assert device_cpu("hsm01", "hsm02") == device_cpu("hsm01") >= 0.5
    finally:
        launcher.communicate("")


def test_summary_medians_and_ratios() -> None:
    times = {
        "one": [3.0, 9.0, 4.0],
        "many": [12.0, 30.0, 14.0],
        "one_cpu": [1.5, 2.0, 1.7],
        "handover": [8.0, 7.0, 9.0],
    }
    summary = summarise(times, 16)
    assert summary["device_cpu_per_appliance"] == {}
    times |= {"one_device_cpu": [0.5, 0.4, 0.6], "many_device_cpu": [8.0, 8.8, 7.2]}
    assert summarise(times, 16)["device_cpu_per_appliance"] == {"one": 0.5, "many": 0.5}
    assert summary["median_s"] == {"one": 4.0, "many": 14.0, "one_cpu": 1.7, "handover": 8.0}
    assert summary["many_over_one"] == 3.5
    assert summary["one_over_plain1"] is None


def test_parse_stat_reads_name_parent_and_ticks() -> None:
    # A name with a space and a parenthesis, as the kernel writes it.
    line = "4242 (ansible (x) y) S 4241 4242 4242 0 -1 4194560 1 2 3 4 17 5 23 7 20 0 1 0"
    assert bench_provision.parse_stat(line) == ("ansible (x) y", 4241, (17, 5, 23, 7))
    _, ppid, ticks = bench_provision.parse_stat(Path("/proc/self/stat").read_text())
    assert ppid == os.getppid() and len(ticks) == 4


def test_tree_watch_splits_ansible_main_and_workers(tmp_path: Path) -> None:
    """A stand-in ``ansible-playbook`` run by the real guard: it burns CPU itself, then
    forks a worker that burns more and reaps it; the watch tells the two apart. The
    stand-in stays until the watch has seen the reaped worker (a deadline, no sleep)."""
    fake = tmp_path / "ansible-playbook"
    fake.write_text(
        f"#!{sys.executable}\nimport os, sys\n{BURN}"
        "pid = os.fork()\nif pid == 0:\n"
        + "".join(f"    {line}\n" for line in BURN.splitlines())
        + "    os._exit(0)\nos.waitpid(pid, 0)\n"
        "sys.stdout.write('reaped\\n'); sys.stdout.flush(); sys.stdin.read()\n"
    )
    fake.chmod(0o700)
    env = {k: v for k, v in os.environ.items() if k != "HSMCTL_RUNNER_PARENT"}
    with bench_provision.TreeWatch(0.01) as watch:
        guard = subprocess.Popen(
            [sys.executable, "-m", "hsmctl.runner.guard", str(fake)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert guard.stdout is not None
            assert guard.stdout.readline() == "reaped\n"
            deadline = time.monotonic() + 60
            while watch.ansible()["ansible_workers"] < 0.2 and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            guard.communicate("")
    parts = watch.ansible()
    assert parts["ansible_main"] >= 0.2
    assert parts["ansible_workers"] >= 0.2
    assert parts["guard"] < 0.2
