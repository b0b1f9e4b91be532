"""Bring the namespace lab up and down (SPEC §5).

Lifecycle: :func:`up` validates input and the host (nothing created on refusal), routes
the lab range to a blackhole, then builds the provider network, the tenants' virtual
networks and the appliances, and records everything in ``lab.json`` under the lab
directory as it goes, so :func:`down` can always undo a partial lab. :func:`down`
removes everything the lab made, also when ``lab.json`` was lost (it finds the lab by
its name prefix).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hsmctl.errors import ConflictError, UsageError
from hsmctl.lab import image, netns, safety, workdir
from hsmctl.lab.appliances import BOOT_SCRIPT, boot_appliance, host_key_lines, wait_ready
from hsmctl.lab.configs import describe, make_keys, write_configs
from hsmctl.lab.firmware import FIRMWARE_FILES, REPO_ROOT, firmware_dir
from hsmctl.lab.networks import provider_network, tenant_network
from hsmctl.lab.plan import PREFIX, AppliancePlan, LabPlan, make_plan, validate_sizes
from hsmctl.lab.workdir import (
    HOST_CONFIG,
    LAB_DIR,
    MARKER,
    NETNS_ETC,
    appliance_dir,
    load_state,
    require_root,
    save_state,
    state_path,
    up_state,
)
from hsmctl.progress import NullProgress, Progress

# The lab by concern: workdir (the directory and lab.json), networks, firmware (the
# snapshot), appliances (boot, readiness, host keys), configs (keys, configs, inventory).
# Their public names stay importable from here, where tests and the CLI import them.
__all__ = [
    "BOOT_SCRIPT",
    "FIRMWARE_FILES",
    "HOST_CONFIG",
    "LAB_DIR",
    "MARKER",
    "NETNS_ETC",
    "REPO_ROOT",
    "appliance_dir",
    "console",
    "current_plan",
    "down",
    "fabric",
    "host_key_lines",
    "load_state",
    "require_root",
    "save_state",
    "state_path",
    "status",
    "up",
]


DRIVERS = ("namespaces", "vagrant")


def _driver() -> str:
    """The driver of the lab on record: ``vagrant`` for the VM tier, else namespaces."""
    state = load_state() or {}
    return str(state.get("driver", "namespaces"))


def up(
    tenants: int, appliances: int, progress: Progress | None = None, *, driver: str = "namespaces"
) -> dict[str, Any]:
    if driver not in DRIVERS:
        raise UsageError(f"--driver must be one of {', '.join(DRIVERS)}")
    if driver == "vagrant":
        from hsmctl.lab.vm import control as vm

        return vm.up(tenants, appliances, progress)
    progress = progress or NullProgress()
    validate_sizes(tenants, appliances)
    require_root()
    existing = load_state()
    if existing is not None:
        if existing.get("phase") == "up" and (
            existing.get("driver", "namespaces"),
            existing["tenants"],
            existing["appliances"],
        ) == ("namespaces", tenants, appliances):
            progress.step("lab already up with these sizes; nothing to do")
            return status()
        if existing.get("phase") == "up":
            raise ConflictError(
                f"a lab with {existing['tenants']} tenants and {existing['appliances']} "
                "appliances is up; run 'hsmctl lab down' first"
            )
        raise ConflictError("a partial lab exists; run 'hsmctl lab down' first")
    plan = make_plan(tenants, appliances)
    leftovers = netns.list_netns(PREFIX + "-")
    if leftovers or safety.blackhole_present(plan.lab_range):
        raise ConflictError(
            "lab namespaces or routes are left from an earlier run; run 'hsmctl lab down' first"
        )
    safety.check_range_free(plan.lab_range)
    if workdir.foreign_host_config():
        raise ConflictError(
            f"{workdir.HOST_CONFIG} exists and was not written by the lab; not touching it"
        )
    golden = image.build(progress)

    started = time.monotonic()
    state: dict[str, Any] = {
        "phase": "creating",
        "tenants": tenants,
        "appliances": appliances,
        "lab_range": str(plan.lab_range),
        "launchers": {},
    }
    save_state(state)
    safety.add_blackhole(plan.lab_range)
    progress.step(f"blackhole route for {plan.lab_range} added")

    make_keys(plan)
    firmware = firmware_dir()

    provider_network(plan)
    for t in plan.tenants:
        tenant_network(t)
    progress.step(f"networks ready: provider management, {tenants} tenant(s)")

    for a in plan.appliances:
        launched = boot_appliance(plan, a, golden, firmware)
        state["launchers"][a.id] = launched["launcher_pid"]
        save_state(state)
    done = 0

    def ready(a: AppliancePlan) -> tuple[str, int]:
        return a.id, wait_ready(plan, a, state["launchers"][a.id], timeout=90)

    with ThreadPoolExecutor(max_workers=8) as pool:
        for ident, init_pid in pool.map(ready, plan.appliances):
            state.setdefault("init_pids", {})[ident] = init_pid
            done += 1
            progress.advance(done, appliances, f"appliance {ident} up")
    write_configs(plan)
    state["phase"] = "up"
    state["up_seconds"] = round(time.monotonic() - started, 2)
    save_state(state)
    progress.step(f"lab up in {state['up_seconds']} s")
    return status()


def _alive(pid: int) -> bool:
    """Running (a zombie counts as gone: it only waits for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_tree(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def down(progress: Progress | None = None) -> dict[str, Any]:
    require_root()
    recorded = load_state()
    # The lab on record decides; with no record, leftovers of either kind are removed.
    if recorded is not None and recorded.get("driver") == "vagrant":
        from hsmctl.lab.vm import control as vm

        return vm.down(progress)
    from hsmctl.lab.vm import host as vm_host

    # With no record: the VM tier's namespaces, or its libvirt definitions (kept on disk).
    if recorded is None and (netns.list_netns("hsmvm-") or vm_host.persisted("hsmvm")):
        from hsmctl.lab.vm import control as vm

        vm.down(progress)
    if recorded is None and workdir.LAB_DIR != workdir.DEFAULT_LAB_DIR:
        # Nothing recorded in a lab directory of one's own (HSMCTL_LAB_DIR): the lab found
        # by its name prefix is the default directory's, not this one's to remove.
        return {"removed_namespaces": [], "route_removed": False}
    progress = progress or NullProgress()
    state = recorded or {}
    removed: dict[str, Any] = {"namespaces": [], "route": False}
    # The appliances' PID-namespace inits first: killing one kills its whole namespace,
    # and its launcher (unshare) then reaps it and exits by itself; only launchers still
    # there after that are killed (killing them first would leave the inits as zombies).
    for pid in (state.get("init_pids") or {}).values():
        _kill_tree(int(pid))
    launchers = [int(p) for p in (state.get("launchers") or {}).values()]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in launchers):
        time.sleep(0.05)
    for pid in launchers:
        if _alive(pid):
            _kill_tree(pid)
    names = netns.list_netns(PREFIX + "-")
    for name in names:
        for pid in netns.pids(name):
            _kill_tree(pid)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(netns.pids(n) for n in names):
        time.sleep(0.05)
    for name in names:
        netns.ip("netns", "del", name, check=False)
        removed["namespaces"].append(name)
    netns.ip("link", "del", f"{PREFIX}0", check=False)
    lab_range = state.get("lab_range", "198.18.0.0/15")
    rng = ipaddress.IPv4Network(lab_range)
    # A VM tier still up beside this lab (development) keeps the range blackholed.
    if safety.blackhole_present(rng) and not netns.list_netns("hsmvm-"):
        safety.remove_blackhole(rng)
        removed["route"] = True
    host_config = workdir.HOST_CONFIG
    if host_config.exists() and host_config.read_text().startswith(workdir.MARKER):
        host_config.unlink()
        with contextlib.suppress(OSError):
            host_config.parent.rmdir()
    if workdir.NETNS_ETC.is_dir():
        for d in workdir.NETNS_ETC.glob(f"{PREFIX}-*"):
            shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            workdir.NETNS_ETC.rmdir()
    shutil.rmtree(workdir.LAB_DIR, ignore_errors=True)
    progress.step(f"lab down: {len(removed['namespaces'])} namespaces removed")
    return {"removed_namespaces": removed["namespaces"], "route_removed": removed["route"]}


def status() -> dict[str, Any]:
    if _driver() == "vagrant":
        from hsmctl.lab.vm import control as vm

        return vm.status()
    state = up_state()
    dead = sorted(i for i, pid in (state.get("init_pids") or {}).items() if not _alive(int(pid)))
    if dead:
        raise ConflictError(
            f"the lab is broken (appliances not running: {', '.join(dead)}); "
            "run 'hsmctl lab down' and 'hsmctl lab up'"
        )
    return describe(make_plan(state["tenants"], state["appliances"]))


def console(
    ident: str, argv: list[str], *, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a root command inside an appliance: its serial console / physical access."""
    require_root()
    if _driver() == "vagrant":
        from hsmctl.lab.vm import control as vm

        return vm.run_console(ident, argv, input=input)
    state = up_state()
    pid = (state.get("init_pids") or {}).get(ident)
    if pid is None:
        raise UsageError(f"no appliance {ident!r} in the lab")
    if not argv:
        raise UsageError("give the command to run after --")
    return subprocess.run(
        [
            "nsenter",
            "--target",
            str(pid),
            "--mount",
            "--uts",
            "--net",
            "--pid",
            "--root",
            "--wd",
            "--",
            "/usr/bin/env",
            "-i",
            "PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
            "SOFTHSM2_CONF=/etc/softhsm/softhsm2.conf",
            "LANG=C.UTF-8",
            "HSM_CONSOLE=1",
            *argv,
        ],
        input=input,
        capture_output=True,
        check=False,
    )


def current_plan() -> LabPlan:
    if _driver() == "vagrant":
        from hsmctl.lab.vm import control as vm

        return vm.current_plan()
    state = up_state()
    return make_plan(state["tenants"], state["appliances"])


def fabric() -> Any:
    """The lab's network-fabric driver for the lab that is up."""
    if _driver() == "vagrant":
        from hsmctl.lab.vm.fabric import VmFabric

        return VmFabric(current_plan())
    from hsmctl.lab.fabric import LabFabric

    return LabFabric(current_plan())
