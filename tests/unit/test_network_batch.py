"""``network set``'s ``ip`` steps in one ``ip -batch`` process: the same interface state as
the steps one by one (checked in a private network namespace with a veth pair of its own), the
same error text when a step fails, nothing after a failed step, and no argument that
could smuggle a second command into the batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hsmctl.appliance.commands import network

pytestmark = pytest.mark.unit

root_only = pytest.mark.skipif(
    os.geteuid() != 0, reason="a private network namespace (unshare --net) needs root"
)

STEPS = """
from hsmctl.appliance.commands.network import run_ip_batch
import json, subprocess, sys
subprocess.run(["ip", "link", "add", "data0", "type", "veth", "peer", "name", "peer0"], check=True)
steps = [
    ["addr", "flush", "dev", "data0"],
    ["addr", "add", sys.argv[1], "dev", "data0"],
    ["link", "set", "data0", "up"],
    ["route", "replace", "default", "via", sys.argv[2], "dev", "data0"],
]
if sys.argv[3] == "batch":
    failed = run_ip_batch(steps)
else:
    failed = None
    for argv in steps:
        proc = subprocess.run(["ip", *argv], capture_output=True, text=True)
        if proc.returncode:
            failed = f"{' '.join(['ip', *argv][:3])}: {proc.stderr.strip()}"
            break
def show(*args):
    return subprocess.run(["ip", "-j", *args], capture_output=True, text=True).stdout
addrs = [
    (a["family"], a["local"], a["prefixlen"])
    for link in json.loads(show("addr", "show", "dev", "data0"))
    for a in link["addr_info"]
]
routes = json.loads(show("-4", "route", "show"))
print(json.dumps({"failed": failed, "addrs": addrs, "routes": routes}))
"""


def _in_private_netns(address: str, gateway: str, how: str) -> dict[str, object]:
    proc = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", STEPS, address, gateway, how],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.getcwd(),
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    result: dict[str, object] = json.loads(proc.stdout)
    return result


@root_only
@pytest.mark.parametrize(
    ("address", "gateway"),
    [
        ("198.19.8.20/24", "198.19.8.1"),
        ("198.19.8.20/24", "198.19.9.1"),  # gateway off the subnet: the route step fails
    ],
)
def test_one_batch_leaves_what_the_steps_one_by_one_leave(address: str, gateway: str) -> None:
    batch = _in_private_netns(address, gateway, "batch")
    one_by_one = _in_private_netns(address, gateway, "loop")
    assert batch == one_by_one
    if gateway.startswith("198.19.8."):
        assert batch["failed"] is None
        assert ["inet", "198.19.8.20", 24] in batch["addrs"]
    else:
        assert str(batch["failed"]).startswith("ip route replace: ")


@root_only
def test_a_failed_step_is_named_as_before_and_nothing_after_it_runs() -> None:
    # Runs in this namespace but changes nothing: the device does not exist.
    steps = [
        ["link", "show", "dev", "lo"],
        ["addr", "add", "192.0.2.1/24", "dev", "h39-nonexist"],
        ["link", "add", "h39-never", "type", "veth", "peer", "name", "h39-never1"],
    ]
    failed = network.run_ip_batch(steps)
    alone = subprocess.run(["ip", *steps[1]], capture_output=True, text=True, check=False)
    assert failed == f"ip addr add: {alone.stderr.strip()}"
    shown = subprocess.run(["ip", "link", "show", "h39-never"], capture_output=True, check=False)
    assert shown.returncode != 0


@pytest.mark.parametrize("word", ["1.2.3.4/24\nlink del lo", "a b", "", "x#", 'a"b', "a\\", "a\tb"])
def test_no_word_can_carry_another_command(word: str) -> None:
    with pytest.raises(ValueError):
        network.run_ip_batch([["addr", "add", word, "dev", "data0"]])
