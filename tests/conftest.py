"""Shared fixtures: the hsmctl command as a user runs it, and the lab.

The lab is one per machine (fixed names, one blackhole route): tests that need it share
a session-wide lab of 2 tenants and 100 appliances; tests that take it down bring it back
through :func:`ensure_lab`. The session ends with ``hsmctl lab down``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The lab-driving helpers live in hsmctl.lab.rig (shared with the benchmarks); the tests
# keep importing them from here.
from hsmctl.lab.rig import client_netns as client_netns
from hsmctl.lab.rig import factory_reset as factory_reset
from hsmctl.lab.rig import provider_config as provider_config
from hsmctl.lab.rig import tenant_config as tenant_config

REPO = Path(__file__).resolve().parents[1]
HSMCTL = str(Path(sys.executable).with_name("hsmctl"))
TENANTS, APPLIANCES = 2, 100


def hsmctl(
    *args: str,
    input: bytes | None = None,
    netns: str | None = None,
    check: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[bytes]:
    argv = [HSMCTL, *args]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = subprocess.run(
        argv, input=input, capture_output=True, timeout=timeout, env=env, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"hsmctl {' '.join(args)} exited {proc.returncode}:\n{proc.stderr.decode()}"
        )
    return proc


def hsmctl_json(*args: str, **kw: Any) -> Any:
    proc = hsmctl(*args, "--json", check=True, **kw)
    return json.loads(proc.stdout)


def ensure_lab() -> dict[str, Any]:
    status = hsmctl("lab", "status", "--json")
    if status.returncode == 0:
        data = json.loads(status.stdout)
        # A bigger lab (a developer's) serves as well; never tear it down.
        if len(data["appliances"]) >= APPLIANCES and len(data["tenants"]) >= TENANTS:
            return dict(data)
    # Too small, not up, or broken (e.g. left by a run that was killed): start clean.
    hsmctl("lab", "down", check=True)
    return dict(
        hsmctl_json("lab", "up", "--tenants", str(TENANTS), "--appliances", str(APPLIANCES))
    )


def requires_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces, routes)")


@pytest.fixture(scope="session")
def _lab_session() -> Iterator[None]:
    """Leave the machine as the session found it: a lab that was up stays up."""
    requires_root()
    was_up = hsmctl("lab", "status").returncode == 0
    yield
    if not was_up:
        hsmctl("lab", "down")


@pytest.fixture
def lab(_lab_session: None) -> dict[str, Any]:
    """The lab's status (SPEC §5 keys), brought up if needed."""
    return ensure_lab()


# -- per-test provider and tenant configurations -------------------------------------------
#
# Lab tests work on appliances of their own (see APPLIANCE_SETS) and never on anyone
# else's, so test modules can run at the same time against one lab. A test gets a
# provider configuration whose inventory holds only its appliances and whose state
# directory is its own, and a tenant configuration with its own customer state.

LAB_DIR = Path("/var/lib/hsmctl-lab")

APPLIANCE_SETS = {
    "lab": ["hsm01", "hsm02"],
    "firmware": ["hsm03", "hsm04"],
    "provision": ["hsm05", "hsm06", "hsm07", "hsm08"],
    "takeover": ["hsm09", "hsm10", "hsm11", "hsm12", "hsm13", "hsm14"],
    "collect": [f"hsm{i:02d}" for i in range(15, 25)],
    "hardening": ["hsm25", "hsm26"],
    "clients": ["hsm27", "hsm28"],
    "distribution": ["hsm29", "hsm30"],
    "health": [f"hsm{i:02d}" for i in range(31, 35)],
    "fleet": [f"hsm{i:02d}" for i in range(35, 41)],
    "retention": [f"hsm{i:02d}" for i in range(41, 45)],
    "keys": [f"hsm{i:02d}" for i in range(45, 51)],
    # The 100-appliance test provisions, takes over and collects these; its health poll
    # reads every appliance of the lab (monitor only: nothing changes on them).
    "scale": [f"hsm{i}" for i in range(51, 101)],
    # HA groups (issue 12): lent from the scale set's spares (its test provisions 51-71).
    "ha": ["hsm72", "hsm73", "hsm74", "hsm75"],
    # An HA group kit and its failover (issue 12 item 3, client register --group).
    "ha_failover": ["hsm76", "hsm77"],
}


def console(
    appliance: str, *argv: str, input: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    proc = hsmctl("lab", "console", appliance, "--", *argv, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"console {appliance} {argv}: {proc.stderr.decode()}")
    return proc


_NEXT_HOST: dict[str, int] = {}


def unique_ip(tenant: str) -> str:
    """An address in the tenant's ``hsm`` subnet no other provision of this session used:
    every test has its own state store, and the lab's bridges are shared."""
    n = _NEXT_HOST.get(tenant, 100) + 1
    _NEXT_HOST[tenant] = n if n < 199 else 100  # .200 + N is hsmN's (rig.data_ip)
    third = 8 * (int(tenant.removeprefix("tenant")) - 1)
    return f"198.19.{third}.{n}"


def provision(provider_conf: Path, tenant: str, *extra: str) -> dict[str, Any]:
    if "--ip" not in extra and "--count" not in extra:
        extra = (*extra, "--ip", unique_ip(tenant))
    proc = hsmctl(
        "--config",
        str(provider_conf),
        "provision",
        "--tenant",
        tenant,
        "--vnet",
        "vnet1",
        "--subnet",
        "hsm",
        *extra,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return dict(json.loads(proc.stdout))


def takeover(
    lab: dict[str, Any], tenant_conf: Path, tenant: str, handoff: str, *extra: str
) -> dict[str, Any]:
    proc = hsmctl(
        "--config",
        str(tenant_conf),
        "takeover",
        "--handoff",
        handoff,
        *extra,
        "--json",
        netns=client_netns(lab, tenant),
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return dict(json.loads(proc.stdout))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that take the shared lab down run last, so the others share one lab. The
    Vagrant tier (marker ``vagrant``) runs only when asked for (``-m vagrant``: ``make
    test-vm``): it needs the machine without the namespace lab."""
    if "vagrant" not in (config.getoption("markexpr", "") or ""):
        vm_tier = [i for i in items if i.get_closest_marker("vagrant") is not None]
        if vm_tier:
            config.hook.pytest_deselected(items=vm_tier)
            items[:] = [i for i in items if i not in vm_tier]
    last = [
        i for i in items if i.module is not None and i.module.__name__.endswith("test_lifecycle")
    ]
    items[:] = [i for i in items if i not in last] + last
