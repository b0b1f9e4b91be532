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
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hsmctl import config as config_mod
from hsmctl import privatefiles
from hsmctl.errors import ConflictError, HsmctlError, UsageError
from hsmctl.lab import image, netns, safety
from hsmctl.lab.plan import PREFIX, AppliancePlan, LabPlan, TenantPlan, make_plan, validate_sizes
from hsmctl.progress import NullProgress, Progress

LAB_DIR = Path(os.environ.get("HSMCTL_LAB_DIR", "/var/lib/hsmctl-lab"))
HOST_CONFIG = config_mod.DEFAULT_PATH
NETNS_ETC = Path("/etc/netns")
MARKER = "# written by hsmctl lab up; removed by hsmctl lab down\n"
BOOT_SCRIPT = Path(__file__).with_name("boot.sh")
REPO_ROOT = Path(__file__).resolve().parents[2]
FIRMWARE_FILES = (
    "__init__.py",
    "contract.py",
    "devicejson.py",
    "errors.py",
    "privatefiles.py",
    "secret.py",
    "utc.py",
    "appliance",
    "auditlog",
)


def require_root() -> None:
    if os.geteuid() != 0:
        raise UsageError("the lab needs root (it creates network namespaces and routes)")


def state_path() -> Path:
    return LAB_DIR / "lab.json"


def load_state() -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(state_path().read_text())
    except FileNotFoundError:
        return None
    return data


def save_state(state: dict[str, Any]) -> None:
    LAB_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = json.dumps(state, indent=2, sort_keys=True) + "\n"
    privatefiles.write_atomic(state_path(), text.encode())


def _ssh_keygen(path: Path, kind: str, comment: str) -> None:
    if path.exists():
        return
    args = ["ssh-keygen", "-q", "-N", "", "-C", comment, "-f", str(path), "-t", kind]
    if kind == "ecdsa":
        args += ["-b", "256"]
    netns.run(*args)


def _write_private(path: Path, text: str, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    privatefiles.write_atomic(path, text.encode(), mode=mode)


# -- networks ----------------------------------------------------------------------------


def _veth(a: str, b: str, *, a_ns: str | None, b_ns: str | None) -> None:
    args = ["link", "add", a]
    if a_ns:
        args += ["netns", a_ns]
    args += ["type", "veth", "peer", "name", b]
    if b_ns:
        args += ["netns", b_ns]
    netns.ip(*args)


def _provider_network(plan: LabPlan) -> None:
    netns.add(plan.mgmt_netns)
    netns.add(plan.fabric_netns)
    netns.ip("link", "add", "br-mgmt", "type", "bridge", netns=plan.mgmt_netns)
    netns.ip("link", "set", "br-mgmt", "up", netns=plan.mgmt_netns)
    _veth(plan.host_veth, "uplink", a_ns=None, b_ns=plan.mgmt_netns)
    netns.ip("link", "set", "uplink", "master", "br-mgmt", "up", netns=plan.mgmt_netns)
    netns.ip("addr", "add", f"{plan.host_ip}/{plan.mgmt_net.prefixlen}", "dev", plan.host_veth)
    netns.ip("link", "set", plan.host_veth, "up")


def _tenant_network(tenant: TenantPlan) -> None:
    for vnet in tenant.vnets:
        netns.add(vnet.netns)
        netns.sysctl(vnet.netns, net__ipv4__ip_forward="1")
        for subnet in vnet.subnets:
            netns.ip("link", "add", subnet.bridge, "type", "bridge", netns=vnet.netns)
            netns.ip(
                "addr",
                "add",
                f"{subnet.gateway}/{subnet.cidr.prefixlen}",
                "dev",
                subnet.bridge,
                netns=vnet.netns,
            )
            netns.ip("link", "set", subnet.bridge, "up", netns=vnet.netns)
    vnet = tenant.client_vnet
    subnet = next(s for s in vnet.subnets if s.name == tenant.client_subnet)
    netns.add(tenant.client_netns)
    _veth("eth0", f"c-t{tenant.index}", a_ns=tenant.client_netns, b_ns=vnet.netns)
    netns.ip("link", "set", f"c-t{tenant.index}", "master", subnet.bridge, "up", netns=vnet.netns)
    netns.ip(
        "addr",
        "add",
        f"{tenant.client_ip}/{subnet.cidr.prefixlen}",
        "dev",
        "eth0",
        netns=tenant.client_netns,
    )
    netns.ip("link", "set", "eth0", "up", netns=tenant.client_netns)
    # The customer VM reaches its own virtual network and nothing else.
    netns.ip("route", "add", str(vnet.cidr), "via", str(subnet.gateway), netns=tenant.client_netns)


# -- appliances --------------------------------------------------------------------------


def _firmware_dir() -> Path:
    """A snapshot of the device side of the working tree, bind-mounted read-only."""
    dest = LAB_DIR / "firmware"
    tmp = LAB_DIR / ".firmware.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "hsmctl").mkdir(parents=True)
    src = REPO_ROOT / "hsmctl"
    for name in FIRMWARE_FILES:
        path = src / name
        if path.is_dir():
            shutil.copytree(
                path, tmp / "hsmctl" / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(path, tmp / "hsmctl" / name)
    _build_policy_module(tmp / "hsmctl" / "appliance" / "p11")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def _build_policy_module(p11: Path) -> None:
    """The key-policy PKCS#11 module, built from the snapshot's own ``policy.c`` on the
    host (Debian 12, like the image), so the snapshot's source and binary always agree
    and a change to ``policy.c`` reaches the lab at the next ``lab up`` without an image
    rebuild. Needs gcc and libp11-kit-dev (scripts/install-deps.sh)."""
    proc = subprocess.run(
        ["bash", str(p11 / "build.sh"), str(p11 / "hsm-policy.so")],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise HsmctlError(
            "building the key-policy module (appliance/p11/build.sh) failed; it needs gcc "
            f"and libp11-kit-dev:\n{proc.stderr[-2000:]}"
        )


def appliance_dir(ident: str) -> Path:
    return LAB_DIR / "appliances" / ident


def _boot_appliance(
    plan: LabPlan, a: AppliancePlan, golden: Path, firmware: Path
) -> dict[str, Any]:
    netns.add(a.netns)
    netns.sysctl(a.netns, net__ipv4__ip_nonlocal_bind="1")
    _veth("mgmt0", a.mgmt_peer, a_ns=a.netns, b_ns=plan.mgmt_netns)
    netns.ip("link", "set", a.mgmt_peer, "master", "br-mgmt", "up", netns=plan.mgmt_netns)
    _veth("data0", a.data_peer, a_ns=a.netns, b_ns=plan.fabric_netns)
    base = appliance_dir(a.id)
    upper = base / "upper"
    (upper / "etc" / "hsm").mkdir(parents=True, exist_ok=True)
    provider_pub = (LAB_DIR / "provider" / "provider_key.pub").read_text().strip()
    factory = {
        "id": a.id,
        "serial": a.serial,
        "stamp": a.stamp,
        "mgmt": {"iface": "mgmt0", "address": f"{a.mgmt_ip}/{plan.mgmt_net.prefixlen}"},
        "provider_public_key": provider_pub,
    }
    (upper / "etc" / "hsm" / "factory.json").write_text(json.dumps(factory, indent=2) + "\n")
    console = open(base / "console.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                a.netns,
                "unshare",
                "--mount",
                "--uts",
                "--pid",
                "--fork",
                "--propagation",
                "private",
                str(BOOT_SCRIPT),
                str(golden),
                str(upper),
                str(base / "work"),
                str(base / "root"),
                str(firmware),
                a.id,
            ],
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        console.close()
    return {"id": a.id, "launcher_pid": proc.pid}


def _init_pid(launcher_pid: int) -> int | None:
    """The appliance's PID 1 (seen from the host): the launcher's only child."""
    try:
        children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _wait_ready(plan: LabPlan, a: AppliancePlan, launcher_pid: int, timeout: float) -> int:
    """Wait for the management sshd to accept connections; return the init pid."""
    deadline = time.monotonic() + timeout
    log = appliance_dir(a.id) / "console.log"
    while time.monotonic() < deadline:
        init = _init_pid(launcher_pid)
        if init is not None:
            try:
                sock = socket.create_connection((str(a.mgmt_ip), 22), timeout=0.5)
            except OSError:
                pass
            else:
                sock.close()
                return init
        if not Path(f"/proc/{launcher_pid}").exists():
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise HsmctlError(f"appliance {a.id} did not come up within {timeout:.0f}s:\n{tail}")


def host_key_lines(ident: str, iface: str) -> list[str]:
    """Public host keys of an appliance interface, read from its factory record."""
    directory = appliance_dir(ident) / "upper" / "etc" / "ssh" / iface
    return [p.read_text().strip() for p in sorted(directory.glob("ssh_host_*_key.pub"))]


# -- config and inventory ---------------------------------------------------------------


def _vnets(tenant: TenantPlan) -> list[dict[str, Any]]:
    """A tenant's networks as the inventory and ``lab status`` both spell them."""
    return [
        {
            "name": v.name,
            "cidr": str(v.cidr),
            "subnets": [
                {"name": s.name, "cidr": str(s.cidr), "delegated": s.delegated} for s in v.subnets
            ],
        }
        for v in tenant.vnets
    ]


def _write_configs(plan: LabPlan, state: dict[str, Any]) -> None:
    provider_dir = LAB_DIR / "provider"
    known = []
    for a in plan.appliances:
        for line in host_key_lines(a.id, "mgmt"):
            kind, blob = line.split()[:2]
            known.append(f"{a.mgmt_ip} {kind} {blob}")
    _write_private(provider_dir / "known_hosts", "\n".join(known) + "\n", 0o644)
    inventory = _inventory(plan)
    _write_private(provider_dir / "inventory.yaml", inventory, 0o644)
    HOST_CONFIG.parent.mkdir(parents=True, exist_ok=True)
    if HOST_CONFIG.exists() and not HOST_CONFIG.read_text().startswith(MARKER):
        raise ConflictError(f"{HOST_CONFIG} exists and was not written by the lab; not touching it")
    HOST_CONFIG.write_text(
        MARKER
        + config_mod.dump(
            {
                "role": "provider",
                "state_dir": provider_dir / "state",
                "inventory": provider_dir / "inventory.yaml",
                "provider_key": provider_dir / "provider_key",
                "monitor_key": provider_dir / "monitor_key",
                "signing_key": provider_dir / "signing_key.pem",
                "lab_dir": LAB_DIR,
                "fabric": "lab",
                "out_of_band": "lab",
            }
        )
    )
    for t in plan.tenants:
        tdir = LAB_DIR / "tenants" / t.name
        etc = NETNS_ETC / t.client_netns / "hsmctl"
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hsmctl.yaml").write_text(
            MARKER
            + config_mod.dump(
                {
                    "role": "tenant",
                    "tenant": t.name,
                    "state_dir": tdir / "state",
                    "identity": tdir / "identity",
                    "provider_public_key": provider_dir / "signing_key.pub.pem",
                }
            )
        )


def _inventory(plan: LabPlan) -> str:
    import yaml

    fleet = {
        "regions": [
            {
                "name": "lab",
                "stamps": [
                    {
                        "name": stamp,
                        "appliances": [
                            {
                                "id": a.id,
                                "serial": a.serial,
                                "model": "hsmctl-softhsm2",
                                "mgmt_ip": str(a.mgmt_ip),
                                "mgmt_host_keys": host_key_lines(a.id, "mgmt"),
                            }
                            for a in plan.appliances
                            if a.stamp == stamp
                        ],
                    }
                    for stamp in sorted({a.stamp for a in plan.appliances})
                ],
            }
        ],
        "tenants": [
            {
                "name": t.name,
                "identity_public_key": (LAB_DIR / "tenants" / t.name / "identity.pub")
                .read_text()
                .strip(),
                "vnets": _vnets(t),
            }
            for t in plan.tenants
        ],
    }
    return "# The lab's inventory, written by hsmctl lab up.\n" + yaml.safe_dump(
        fleet, sort_keys=False
    )


# -- public API --------------------------------------------------------------------------


def up(tenants: int, appliances: int, progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or NullProgress()
    validate_sizes(tenants, appliances)
    require_root()
    existing = load_state()
    if existing is not None:
        if existing.get("phase") == "up" and (
            existing["tenants"],
            existing["appliances"],
        ) == (tenants, appliances):
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
    if HOST_CONFIG.exists() and not HOST_CONFIG.read_text().startswith(MARKER):
        raise ConflictError(f"{HOST_CONFIG} exists and was not written by the lab; not touching it")
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

    provider_dir = LAB_DIR / "provider"
    provider_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _ssh_keygen(provider_dir / "provider_key", "ed25519", "hsmctl-lab-provider")
    _ssh_keygen(provider_dir / "monitor_key", "ed25519", "hsmctl-lab-monitor")
    from hsmctl.handoff.identity import ensure_provider_signing_key

    ensure_provider_signing_key(provider_dir)
    for t in plan.tenants:
        tdir = LAB_DIR / "tenants" / t.name
        (tdir / "state").mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(tdir, 0o700)
        _ssh_keygen(tdir / "identity", "ecdsa", f"{t.name}-identity")
    firmware = _firmware_dir()

    _provider_network(plan)
    for t in plan.tenants:
        _tenant_network(t)
    progress.step(f"networks ready: provider management, {tenants} tenant(s)")

    for a in plan.appliances:
        launched = _boot_appliance(plan, a, golden, firmware)
        state["launchers"][a.id] = launched["launcher_pid"]
        save_state(state)
    done = 0

    def ready(a: AppliancePlan) -> tuple[str, int]:
        return a.id, _wait_ready(plan, a, state["launchers"][a.id], timeout=90)

    with ThreadPoolExecutor(max_workers=8) as pool:
        for ident, init_pid in pool.map(ready, plan.appliances):
            state.setdefault("init_pids", {})[ident] = init_pid
            done += 1
            progress.advance(done, appliances, f"appliance {ident} up")
    _write_configs(plan, state)
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
    progress = progress or NullProgress()
    require_root()
    state = load_state() or {}
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
    import ipaddress

    rng = ipaddress.IPv4Network(lab_range)
    if safety.blackhole_present(rng):
        safety.remove_blackhole(rng)
        removed["route"] = True
    if HOST_CONFIG.exists() and HOST_CONFIG.read_text().startswith(MARKER):
        HOST_CONFIG.unlink()
        with contextlib.suppress(OSError):
            HOST_CONFIG.parent.rmdir()
    if NETNS_ETC.is_dir():
        for d in NETNS_ETC.glob(f"{PREFIX}-*"):
            shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()
    shutil.rmtree(LAB_DIR, ignore_errors=True)
    progress.step(f"lab down: {len(removed['namespaces'])} namespaces removed")
    return {"removed_namespaces": removed["namespaces"], "route_removed": removed["route"]}


def status() -> dict[str, Any]:
    state = load_state()
    if state is None or state.get("phase") != "up":
        raise ConflictError("no lab is up (run 'hsmctl lab up')")
    dead = sorted(i for i, pid in (state.get("init_pids") or {}).items() if not _alive(int(pid)))
    if dead:
        raise ConflictError(
            f"the lab is broken (appliances not running: {', '.join(dead)}); "
            "run 'hsmctl lab down' and 'hsmctl lab up'"
        )
    plan = make_plan(state["tenants"], state["appliances"])
    return {
        "provider_key": str(LAB_DIR / "provider" / "provider_key"),
        "state_dir": str(LAB_DIR / "provider" / "state"),
        "appliances": [
            {"id": a.id, "stamp": a.stamp, "mgmt_ip": str(a.mgmt_ip)} for a in plan.appliances
        ],
        "tenants": [
            {
                "name": t.name,
                "client_netns": t.client_netns,
                "client_ip": str(t.client_ip),
                "identity": str(LAB_DIR / "tenants" / t.name / "identity"),
                "state_dir": str(LAB_DIR / "tenants" / t.name / "state"),
                "vnets": _vnets(t),
            }
            for t in plan.tenants
        ],
    }


def console(
    ident: str, argv: list[str], *, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a root command inside an appliance: its serial console / physical access."""
    require_root()
    state = load_state()
    if state is None or state.get("phase") != "up":
        raise ConflictError("no lab is up (run 'hsmctl lab up')")
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
    state = load_state()
    if state is None or state.get("phase") != "up":
        raise ConflictError("no lab is up (run 'hsmctl lab up')")
    return make_plan(state["tenants"], state["appliances"])


def fabric() -> Any:
    """The lab's network-fabric driver for the lab that is up."""
    from hsmctl.lab.fabric import LabFabric

    return LabFabric(current_plan())
