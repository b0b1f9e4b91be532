"""Bring the VM tier up and down: ``hsmctl lab up --driver vagrant`` (SPEC §14).

The same lab directory, record (``lab.json``, with ``"driver": "vagrant"``), configs,
inventory and ``lab status --json`` as the namespace lab, so the same provision →
takeover → collect commands run against VMs. What differs:

* appliances are libvirt/QEMU domains made by ``vagrant up`` from the locally built box
  (:mod:`hsmctl.lab.vm.box`); the factory record rides on the kernel command line;
* the management network is an isolated libvirt network (a fixed DHCP lease per MAC,
  no route handed out); the host reaches appliances on its bridge;
* each tenant's ``hsm`` subnet bridge (in the tenant's virtual-network namespace, as in
  the namespace lab, with its router and customer VM) is joined by a veth to an
  isolated libvirt network with no host address, where the appliances' data NICs are;
* the fabric driver verifies that pre-wiring and sets the data link up or down; the
  console is the QEMU guest agent.

Network safety is the namespace lab's: the whole 198.18.0.0/15 goes to a blackhole
before anything is made (when a namespace lab is up too — while developing — its route
is already there and stays its own), and nothing here forwards or NATs.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from hsmctl.errors import CommandFailed, ConflictError, UsageError
from hsmctl.lab import netns, safety, workdir
from hsmctl.lab.configs import describe, make_keys, write_configs
from hsmctl.lab.firmware import REPO_ROOT, firmware_dir
from hsmctl.lab.networks import tenant_network, veth
from hsmctl.lab.plan import LAB_RANGE, LabPlan
from hsmctl.lab.vm import box, console, host
from hsmctl.lab.vm.plan import (
    MGMT_NET,
    MGMT_NETWORK,
    PREFIX,
    VM_RANGE,
    VmAppliance,
    make_plan,
    tenant_network_name,
    validate_sizes,
    vm_appliance,
    vm_appliances,
)
from hsmctl.progress import NullProgress, Progress

DRIVER = "vagrant"
VAGRANT_DIR = REPO_ROOT / "vagrant"
VAGRANT_HOME = Path(os.environ.get("HSMCTL_VAGRANT_HOME", "/var/cache/hsmctl/vagrant.d"))
POOL = "hsmctl"
POOL_DIR = Path("/var/cache/hsmctl/libvirt-pool")
# TCG's translation cache defaults to 1 GiB per guest (LAB-FACTS.md); 128 MB is plenty.
EMULATOR = """#!/bin/sh
# Written by hsmctl lab up --driver vagrant: QEMU with a smaller TCG translation cache.
n=$#
prev=""
for a in "$@"; do
  if [ "$prev" = "-accel" ] && [ "$a" = "tcg" ]; then a="tcg,tb-size=128"; fi
  set -- "$@" "$a"
  prev=$a
done
shift "$n"
exec /usr/bin/qemu-system-x86_64 "$@"
"""


def vagrant_env(topology: Path | None = None) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "VAGRANT_HOME": str(VAGRANT_HOME),
        "VAGRANT_CWD": str(VAGRANT_DIR),
        "VAGRANT_DOTFILE_PATH": str(workdir.LAB_DIR / "vagrant"),
        "VAGRANT_DEFAULT_PROVIDER": "libvirt",
        "VAGRANT_CHECKPOINT_DISABLE": "1",
        "LIBVIRT_DEFAULT_URI": host.URI,
    }
    if topology is not None:
        env["HSMCTL_VAGRANT_TOPOLOGY"] = str(topology)
    return env


def _vagrant(args: list[str], log: Path, topology: Path | None, what: str) -> None:
    with open(log, "ab") as out:
        proc = subprocess.run(
            ["vagrant", *args],
            env=vagrant_env(topology),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if proc.returncode != 0:
        # The log goes with the lab directory at lab down: its end rides in the message.
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-12:])
        raise CommandFailed(
            f"{what} failed (log: {log}):\n{tail}",
            argv=["vagrant", *args],
            status=proc.returncode,
            output=log.read_text(errors="replace")[-3000:],
        )


def _factory_cmdline(plan: LabPlan, v: VmAppliance) -> str:
    provider_pub = (workdir.LAB_DIR / "provider" / "provider_key.pub").read_text().strip()
    factory = {
        "id": v.plan.id,
        "serial": v.plan.serial,
        "stamp": v.plan.stamp,
        "mgmt": {"iface": "mgmt0", "address": f"{v.plan.mgmt_ip}/{plan.mgmt_net.prefixlen}"},
        "provider_public_key": provider_pub,
    }
    blob = base64.urlsafe_b64encode(json.dumps(factory, separators=(",", ":")).encode()).decode()
    return f"root=/dev/vda rw console=ttyS0 net.ifnames=0 hsmctl.factory={blob}"


def _network_xml(plan: LabPlan) -> dict[str, str]:
    hosts = "".join(
        f"<host mac='{v.mgmt_mac}' name='{v.plan.id}' ip='{v.plan.mgmt_ip}'/>"
        for v in vm_appliances(plan)
    )
    nets = {
        MGMT_NETWORK: (
            f"<network><name>{MGMT_NETWORK}</name>"
            f"<bridge name='{MGMT_NETWORK}' stp='off'/>"
            "<dns enable='no'/>"
            f"<ip address='{plan.host_ip}' netmask='{MGMT_NET.netmask}'>"
            f"<dhcp><range start='{MGMT_NET.network_address + 200}' "
            f"end='{MGMT_NET.network_address + 250}'/>{hosts}</dhcp></ip></network>"
        )
    }
    for t in plan.tenants:
        name = tenant_network_name(t.index)
        # No <ip>: the host has no address on a tenant network and no dnsmasq serves it.
        nets[name] = f"<network><name>{name}</name><bridge name='{name}' stp='off'/></network>"
    return nets


def _define_networks(plan: LabPlan, state: dict[str, Any]) -> None:
    for name, xml in _network_xml(plan).items():
        path = workdir.LAB_DIR / f"net-{name}.xml"
        path.write_text(xml + "\n")
        state.setdefault("networks", []).append(name)
        workdir.save_state(state)
        host.virsh("net-define", str(path))
        host.virsh("net-start", name)
    for t in plan.tenants:
        tenant_network(t)
        vnet = t.vnets[0]
        hsm = next(s for s in vnet.subnets if s.name == "hsm")
        outer, inner = f"{PREFIX}-t{t.index}x", f"vx-t{t.index}"
        veth(outer, inner, a_ns=None, b_ns=vnet.netns)
        netns.ip("link", "set", outer, "master", tenant_network_name(t.index), "up")
        netns.ip("link", "set", inner, "master", hsm.bridge, "up", netns=vnet.netns)


def _bridge_ip_forward_off() -> None:
    # The host forwards nothing between the lab's bridges (LAB-FACTS: ip_forward stays 0).
    value = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
    if value != "0":
        raise ConflictError("net.ipv4.ip_forward is on in this host; the VM tier needs it off")


def _check_vm_range_free() -> bool:
    """True when the blackhole is already there (a namespace lab is up beside us)."""
    present = safety.blackhole_present(LAB_RANGE)
    if not present:
        safety.check_range_free(LAB_RANGE)
        return False
    if not netns.list_netns("hsmlab-"):
        # No lab on record and no namespace lab whose route it is: a run's leftover, which
        # this lab would otherwise take as another's and leave behind at its lab down.
        raise ConflictError(
            f"a blackhole route for {LAB_RANGE} is left from an earlier run; "
            "run 'hsmctl lab down' first"
        )
    for route in netns.ip_json("-4", "route", "show", "table", "all"):
        dst = route.get("dst", "")
        if dst in ("", "default") or safety.is_ours(route, LAB_RANGE):
            continue
        with contextlib.suppress(ValueError):
            if ipaddress.IPv4Network(dst, strict=False).overlaps(VM_RANGE):
                raise UsageError(f"{VM_RANGE} is in use on this host ({dst}); nothing was created")
    return True


def up(tenants: int, appliances: int, progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or NullProgress()
    validate_sizes(tenants, appliances)
    workdir.require_root()
    host.require_tools()
    existing = workdir.load_state()
    if existing is not None:
        if existing.get("phase") == "up" and (
            existing.get("driver"),
            existing["tenants"],
            existing["appliances"],
        ) == (DRIVER, tenants, appliances):
            progress.step("lab already up with these sizes; nothing to do")
            return status()
        raise ConflictError("a lab is up (or partly made); run 'hsmctl lab down' first")
    if netns.list_netns(PREFIX + "-"):
        raise ConflictError(
            "VM-tier namespaces are left from an earlier run; run 'hsmctl lab down'"
        )
    if workdir.foreign_host_config():
        raise ConflictError(
            f"{workdir.HOST_CONFIG} exists and was not written by the lab; not touching it"
        )
    _bridge_ip_forward_off()
    shared_route = _check_vm_range_free()
    plan = make_plan(tenants, appliances)
    started = time.monotonic()
    state: dict[str, Any] = {
        "phase": "creating",
        "driver": DRIVER,
        "tenants": tenants,
        "appliances": appliances,
        "lab_range": str(LAB_RANGE),
        "route_owned": not shared_route,
    }
    workdir.save_state(state)
    if not shared_route:
        safety.add_blackhole(LAB_RANGE)
        progress.step(f"blackhole route for {LAB_RANGE} added")
    make_keys(plan)
    firmware = firmware_dir(workdir.LAB_DIR)
    built = box.build(firmware, progress)
    state["daemons"] = host.ensure_daemons()
    workdir.save_state(state)
    # No lab is on record, so any domain or network of this tier's prefix that libvirt still
    # has is left from an interrupted run (libvirt keeps definitions across its restarts).
    stale = _remove_ours()
    if stale:
        progress.step(f"removed what an interrupted run left in libvirt: {', '.join(stale)}")
    box_name = f"{box.BOX_NAME}-{built.name.removeprefix('box-')}"
    _add_box(box_name, built / "appliance.box", progress)
    _ensure_pool()
    _define_networks(plan, state)
    progress.step(f"networks ready: management, {tenants} tenant(s) (libvirt, isolated)")
    emulator = workdir.LAB_DIR / "qemu-tcg"
    emulator.write_text(EMULATOR)
    emulator.chmod(0o755)
    topology = _write_topology(plan, built, box_name, emulator)
    progress.step(f"vagrant up: {appliances} appliance VM(s) (QEMU TCG; a minute or more each)")
    state["vagrant"] = True
    workdir.save_state(state)
    _vagrant(
        ["up", "--provider", "libvirt", "--no-provision"],
        workdir.LAB_DIR / "vagrant-up.log",
        topology,
        "vagrant up",
    )
    for v in vm_appliances(plan):
        _wait_console(v)
        _read_host_keys(v)
        # Factory state: the data port is not plugged into any tenant network yet.
        host.virsh("domif-setlink", v.domain, v.data_mac, "down")
        progress.step(f"appliance {v.plan.id} up ({v.domain})")
    write_configs(plan, driver=DRIVER)
    state["phase"] = "up"
    state["up_seconds"] = round(time.monotonic() - started, 2)
    workdir.save_state(state)
    progress.step(f"lab up in {state['up_seconds']} s")
    return status()


def build_box(progress: Progress | None = None) -> dict[str, str]:
    """The box alone (``hsmctl lab box``): a firmware snapshot of the working tree in a
    scratch directory, then the cached box for it."""
    import tempfile

    workdir.require_root()
    with tempfile.TemporaryDirectory(prefix="hsmctl-box-") as scratch:
        built = box.build(firmware_dir(Path(scratch)), progress)
    return {
        "box": str(built / "appliance.box"),
        "kernel": str(built / "vmlinuz"),
        "initrd": str(built / "initrd.img"),
        "name": f"{box.BOX_NAME}-{built.name.removeprefix('box-')}",
    }


def _add_box(name: str, path: Path, progress: Progress) -> None:
    VAGRANT_HOME.mkdir(parents=True, exist_ok=True)
    listed = subprocess.run(
        ["vagrant", "box", "list"], env=vagrant_env(), capture_output=True, text=True, check=False
    ).stdout
    if any(line.split(" ", 1)[0] == name for line in listed.splitlines()):
        return
    progress.step(f"vagrant box add {name}")
    for line in listed.splitlines():  # older hsmctl boxes: one at a time is kept
        old = line.split(" ", 1)[0]
        if old.startswith(box.BOX_NAME + "-"):
            subprocess.run(
                ["vagrant", "box", "remove", "--force", "--all", old],
                env=vagrant_env(),
                capture_output=True,
                check=False,
            )
    log = workdir.LAB_DIR / "vagrant-box.log"
    _vagrant(["box", "add", "--force", "--name", name, str(path)], log, None, "vagrant box add")


def _ensure_pool() -> None:
    if host.run_virsh("pool-info", POOL, check=False).returncode == 0:
        if "running" not in host.virsh("pool-info", POOL):
            host.virsh("pool-start", POOL)
        return
    POOL_DIR.mkdir(parents=True, exist_ok=True)
    host.virsh("pool-define-as", POOL, "dir", "--target", str(POOL_DIR))
    host.virsh("pool-start", POOL)
    # Box volumes of earlier firmware go with their boxes; the pool itself is a cache.


def _write_topology(plan: LabPlan, built: Path, box_name: str, emulator: Path) -> Path:
    consoles = workdir.LAB_DIR / "consoles"
    consoles.mkdir(parents=True, exist_ok=True)
    topology = {
        "box": box_name,
        "driver": "qemu",
        "emulator": str(emulator),
        "pool": POOL,
        "kernel": str(built / "vmlinuz"),
        "initrd": str(built / "initrd.img"),
        "provider_key": str(workdir.LAB_DIR / "provider" / "provider_key"),
        "mgmt_network": MGMT_NETWORK,
        "mgmt_cidr": str(MGMT_NET),
        "boot_timeout": 900,
        "appliances": [
            {
                "id": v.plan.id,
                "mgmt_mac": v.mgmt_mac,
                "data_mac": v.data_mac,
                "data_network": v.data_network,
                "cmdline": _factory_cmdline(plan, v),
                "serial_log": str(consoles / f"{v.plan.id}.log"),
            }
            for v in vm_appliances(plan)
        ],
    }
    path = workdir.LAB_DIR / "topology.json"
    path.write_text(json.dumps(topology, indent=2) + "\n")
    return path


def _wait_console(v: VmAppliance, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if console.ping(v.domain):
            return
        time.sleep(1)
    raise CommandFailed(f"{v.plan.id}: the guest agent did not come up", argv=[], status=1)


def _read_host_keys(v: VmAppliance) -> None:
    """The appliance's management host keys, read over the console (the provider's own
    trusted path) into the place the inventory writer reads them from."""
    for iface in ("mgmt", "data"):
        proc = console.run(v.domain, ["sh", "-c", f"cat /etc/ssh/{iface}/ssh_host_*_key.pub"])
        if proc.returncode != 0:
            raise CommandFailed(
                f"{v.plan.id}: reading its host keys failed", argv=[], status=proc.returncode
            )
        directory = workdir.appliance_dir(v.plan.id) / "upper" / "etc" / "ssh" / iface
        directory.mkdir(parents=True, exist_ok=True)
        for line in proc.stdout.decode().splitlines():
            kind = line.split()[0]
            name = {"ssh-ed25519": "ed25519", "ecdsa-sha2-nistp256": "ecdsa"}.get(kind)
            if name:
                (directory / f"ssh_host_{name}_key.pub").write_text(line.strip() + "\n")


def _remove_ours() -> list[str]:
    """Destroy and undefine every libvirt domain and network of this tier's prefix."""
    removed = []
    for domain in host.run_virsh("list", "--all", "--name", check=False).stdout.split():
        if domain.startswith(PREFIX + "-"):
            host.run_virsh("destroy", domain, check=False)
            host.run_virsh("undefine", domain, "--remove-all-storage", check=False)
            removed.append(domain)
    for name in host.run_virsh("net-list", "--all", "--name", check=False).stdout.split():
        if name.startswith(PREFIX + "-"):
            host.run_virsh("net-destroy", name, check=False)
            host.run_virsh("net-undefine", name, check=False)
            removed.append(name)
    return removed


def down(progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or NullProgress()
    workdir.require_root()
    state = workdir.load_state() or {}
    if state and state.get("driver") != DRIVER:
        # Never this tier's cleanup over another lab's record (its route, its directory).
        raise ConflictError("the lab on record is not the VM tier's; use 'hsmctl lab down'")
    topology = workdir.LAB_DIR / "topology.json"
    if state.get("vagrant") and topology.exists():
        with contextlib.suppress(CommandFailed):
            _vagrant(
                ["destroy", "--force"],
                workdir.LAB_DIR / "vagrant-destroy.log",
                topology,
                "vagrant destroy",
            )
    # Whatever vagrant left (or never got to): our domains and networks by name. Kept on
    # disk by libvirt, they are removed even when libvirtd is not running now (it is
    # started for that, and stopped again).
    daemons = [int(p) for p in state.get("daemons") or []]
    if shutil.which("virsh"):
        if not Path(host.SOCKET).exists() and host.persisted(PREFIX):
            daemons += host.ensure_daemons(refuse_default=False)
        if Path(host.SOCKET).exists():
            _remove_ours()
    removed = []
    for name in netns.list_netns(PREFIX + "-"):
        for pid in netns.pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        netns.ip("netns", "del", name, check=False)
        removed.append(name)
    links = netns.ip_json("link", "show")
    for link in links:
        name = str(link.get("ifname", ""))
        if name.startswith(PREFIX + "-"):
            netns.ip("link", "del", name, check=False)
    host.stop_daemons(daemons)
    route = False
    # The blackhole goes only if this tier added it; with no record, only if no namespace
    # lab is left whose route it also is.
    owned = state.get("route_owned") if state else not netns.list_netns("hsmlab-")
    if owned and safety.blackhole_present(LAB_RANGE):
        safety.remove_blackhole(LAB_RANGE)
        route = True
    host_config = workdir.HOST_CONFIG
    if host_config.exists() and host_config.read_text().startswith(workdir.MARKER):
        host_config.unlink()
    for d in workdir.NETNS_ETC.glob(f"{PREFIX}-*") if workdir.NETNS_ETC.is_dir() else []:
        shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(workdir.LAB_DIR, ignore_errors=True)
    progress.step(f"lab down: VMs destroyed, {len(removed)} namespaces removed")
    return {"removed_namespaces": removed, "route_removed": route}


def status() -> dict[str, Any]:
    state = workdir.up_state()
    return describe(make_plan(state["tenants"], state["appliances"]))


def current_plan() -> LabPlan:
    state = workdir.up_state()
    return make_plan(state["tenants"], state["appliances"])


def run_console(
    ident: str, argv: list[str], *, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    workdir.require_root()
    if not argv:
        raise UsageError("give the command to run after --")
    v = vm_appliance(current_plan(), ident)
    return console.run(v.domain, argv, input=input)
