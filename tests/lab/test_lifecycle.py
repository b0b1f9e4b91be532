"""Lab lifecycle (issue 2): bad input creates nothing, up is idempotent, down leaves
nothing behind. These tests take the shared lab down; later tests bring it back."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TENANTS, hsmctl, requires_root

pytestmark = pytest.mark.lab


def host_snapshot() -> dict[str, Any]:
    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout

    return {
        "netns": sorted(line.split()[0] for line in out("ip", "netns", "list").splitlines()),
        "routes": out("ip", "-4", "route", "show", "table", "all"),
        "links": sorted(
            line.split(":")[1].strip() for line in out("ip", "-o", "link").splitlines()
        ),
        "mounts": out("cat", "/proc/self/mounts"),
        "etc_hsmctl": os.path.exists("/etc/hsmctl"),
        "etc_netns": sorted(os.listdir("/etc/netns")) if os.path.isdir("/etc/netns") else [],
        "lab_dir": os.path.exists("/var/lib/hsmctl-lab"),
    }


def lab_traces(snap: dict[str, Any]) -> list[str]:
    found = [n for n in snap["netns"] if n.startswith("hsmlab")]
    found += [
        line for line in snap["routes"].splitlines() if "198.18." in line or "198.19." in line
    ]
    found += [link for link in snap["links"] if link.startswith("hsmlab")]
    found += [
        m for m in snap["mounts"].splitlines() if "hsmctl-lab" in m or "/run/netns/hsmlab" in m
    ]
    if snap["etc_hsmctl"]:
        found.append("/etc/hsmctl")
    found += [d for d in snap["etc_netns"] if d.startswith("hsmlab")]
    if snap["lab_dir"]:
        found.append("/var/lib/hsmctl-lab")
    return found


def lab_processes() -> list[str]:
    out = subprocess.run(
        ["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True
    ).stdout
    return [
        line
        for line in out.splitlines()
        if "/etc/hsm/sshd_" in line
        or "hsm-boot" in line
        or "/usr/local/sbin/hsmd" in line
        or "hsmlab-" in line
    ]


@pytest.fixture
def no_lab() -> None:
    requires_root()
    hsmctl("lab", "down")


# These tests take the lab down anyway: a small one shows the same (the next module's
# ensure_lab() brings the full-size lab back once).
SMALL = ("--tenants", str(TENANTS), "--appliances", "4")


def small_lab() -> dict[str, Any]:
    proc = hsmctl("lab", "up", *SMALL, "--json")
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_down_leaves_nothing_behind(no_lab: None) -> None:
    before = host_snapshot()
    assert lab_traces(before) == []
    small_lab()
    assert lab_traces(host_snapshot())
    proc = hsmctl("lab", "down", "--json")
    assert proc.returncode == 0, proc.stderr
    after = host_snapshot()
    assert lab_traces(after) == []
    assert lab_processes() == []
    assert after["routes"] == before["routes"]
    assert after["netns"] == before["netns"]
    # Down with nothing up is fine too.
    assert hsmctl("lab", "down").returncode == 0


def test_fresh_lab_provider_key_logs_in_everywhere(no_lab: None) -> None:
    from tests.lab.test_lab import provider_logs_in

    lab = small_lab()
    provider_logs_in(lab, [a["id"] for a in lab["appliances"]])


def test_up_twice_with_the_same_sizes_equals_once(no_lab: None) -> None:
    first = small_lab()
    state = json.loads(Path("/var/lib/hsmctl-lab/lab.json").read_text())
    keys = Path("/var/lib/hsmctl-lab/provider/known_hosts").read_text()
    again = hsmctl("lab", "up", *SMALL, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == first
    assert json.loads(Path("/var/lib/hsmctl-lab/lab.json").read_text()) == state
    assert Path("/var/lib/hsmctl-lab/provider/known_hosts").read_text() == keys
    other = hsmctl("lab", "up", "--tenants", "1", "--appliances", "2")
    assert other.returncode == 5
    assert b"lab down" in other.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--appliances", "0"], b"--appliances must be between 1 and 128"),
        (["--tenants", "300"], b"--tenants must be between 1 and 32"),
        (["--tenants", "0"], b"--tenants must be between 1 and 32"),
        (["--appliances", "many"], b"is not a valid integer"),
    ],
)
def test_bad_sizes_exit_2_and_create_nothing(no_lab: None, args: list[str], message: bytes) -> None:
    before = host_snapshot()
    proc = hsmctl("lab", "up", *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert host_snapshot() == before


def test_non_root_is_refused_and_nothing_is_created(no_lab: None) -> None:
    before = host_snapshot()
    proc = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "hsmctl"),
            "lab",
            "up",
        ],
        capture_output=True,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr
    assert b"needs root" in proc.stderr
    assert host_snapshot() == before


def test_overlapping_host_route_is_refused_and_nothing_is_created(no_lab: None) -> None:
    # A veth pair with its peer down: the route leads nowhere (no dummy driver needed).
    subprocess.run(
        ["ip", "link", "add", "hsmtest0", "type", "veth", "peer", "name", "hsmtest1"], check=True
    )
    try:
        subprocess.run(["ip", "link", "set", "hsmtest0", "up"], check=True)
        subprocess.run(["ip", "route", "add", "198.18.77.0/24", "dev", "hsmtest0"], check=True)
        before = host_snapshot()
        proc = hsmctl("lab", "up")
        assert proc.returncode == 2
        assert b"198.18.77.0/24" in proc.stderr and b"overlaps" in proc.stderr
        assert host_snapshot() == before
    finally:
        subprocess.run(["ip", "link", "del", "hsmtest0"], check=False)
