"""Shared fixtures: the hsmctl command as a user runs it, and the lab.

The lab is one per machine (fixed names, one blackhole route): tests that need it share
a session-wide lab of 2 tenants and 4 appliances; tests that take it down bring it back
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

REPO = Path(__file__).resolve().parents[1]
HSMCTL = str(Path(sys.executable).with_name("hsmctl"))
TENANTS, APPLIANCES = 2, 4


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
