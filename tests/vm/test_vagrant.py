"""The Vagrant tier (issue 16, SPEC §14): one appliance VM booted by ``vagrant up`` from
the box built locally from the image script, one tenant network; the whole flow from the
host — provision, takeover (from the tenant's client namespace on the tenant's libvirt
bridge), log collection, ``logs verify`` — then ``lab down`` and nothing left.

Not beside the namespace lab: both use 198.18.0.0/15 and TCG needs the CPU. ``make test``
leaves these out; ``make test-vm`` (run by ``.ci/run`` after ``make test``) runs them.
A capture on the host's uplink runs for the whole module and must see no packet of the
lab range and no frame of a VM's MAC.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hsmctl.lab import workdir
from hsmctl.lab.vm import control as vm
from hsmctl.lab.vm import host as vm_host
from tests.conftest import hsmctl, hsmctl_json, requires_root

pytestmark = [pytest.mark.vagrant, pytest.mark.timeout(2400)]
LAB_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
VM_MAC_PREFIX = bytes.fromhex("52540018")
DATA_MAC = "52:54:00:18:c9:01"
TIMES: dict[str, float] = {}


def uplink() -> str:
    out = subprocess.run(
        ["ip", "-j", "route", "show", "default"], capture_output=True, text=True, check=True
    ).stdout
    routes = json.loads(out)
    if not routes:
        pytest.fail("no default route: no uplink to watch")
    return str(routes[0]["dev"])


class UplinkCapture:
    """Every frame on the uplink (both directions), kept only if it carries a lab-range
    address (IPv4 or ARP) or comes from or goes to a VM's MAC."""

    def __init__(self, dev: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        self.sock.bind((dev, 0))
        self.sock.settimeout(0.5)
        self.frames = 0
        self.offending: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                frame = self.sock.recv(65535)
            except TimeoutError:
                continue
            self.frames += 1
            why = self.offends(frame)
            if why:
                self.offending.append(why)

    @staticmethod
    def offends(frame: bytes) -> str | None:
        if len(frame) < 14:
            return None
        dst, src = frame[0:6], frame[6:12]
        if dst[:4] == VM_MAC_PREFIX or src[:4] == VM_MAC_PREFIX:
            return f"frame of a VM MAC {src.hex(':')} -> {dst.hex(':')}"
        ethertype, body = struct.unpack("!H", frame[12:14])[0], frame[14:]
        if ethertype == 0x8100 and len(body) >= 4:
            ethertype, body = struct.unpack("!H", body[2:4])[0], body[4:]
        addrs: list[bytes] = []
        if ethertype == 0x0800 and len(body) >= 20:
            addrs = [body[12:16], body[16:20]]
        elif ethertype == 0x0806 and len(body) >= 28:
            addrs = [body[14:18], body[24:28]]
        for raw in addrs:
            if ipaddress.IPv4Address(raw) in LAB_RANGE:
                return f"lab address {ipaddress.IPv4Address(raw)} on the uplink"
        return None

    def close(self) -> None:
        if not self.stop.is_set():
            self.stop.set()
            self.thread.join(5)
            self.sock.close()


def leftovers() -> list[str]:
    found = []
    virsh = ["virsh", "-q", "-c", "qemu:///system"]
    if Path("/run/libvirt/libvirt-sock").exists():
        for what in (["list", "--all", "--name"], ["net-list", "--all", "--name"]):
            out = subprocess.run([*virsh, *what], capture_output=True, text=True).stdout
            found += [f"libvirt {n}" for n in out.split() if n.startswith("hsmvm-")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [f"link {line.split(': ')[1]}" for line in links.splitlines() if "hsmvm" in line]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {n}" for n in netns.split() if n.startswith("hsmvm-")]
    procs = subprocess.run(["pgrep", "-af", "dnsmasq|qemu-system"], capture_output=True, text=True)
    found += [f"process {p}" for p in procs.stdout.splitlines() if "hsmvm" in p]
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for line in routes.splitlines():
        dst = line.split()[0] if line.split()[0] != "blackhole" else line.split()[1]
        try:
            net = ipaddress.IPv4Network(dst, strict=False)
        except ValueError:
            continue
        if net.overlaps(LAB_RANGE):
            found.append(f"route {line}")
    return found


def interrupted_run_leftovers() -> None:
    """What a run stopped part-way leaves: a definition of the tier's own name kept on disk
    by libvirt, with libvirtd no longer running (the next libvirtd loads it again)."""
    started = vm_host.ensure_daemons()
    stale = Path("/run/hsmvm-stale-net.xml")
    stale.write_text("<network><name>hsmvm-mgmt</name><bridge name='hsmvm-stale'/></network>")
    try:
        vm_host.virsh("net-define", str(stale))
    finally:
        stale.unlink()
        vm_host.stop_daemons(started)
    assert "hsmvm-mgmt" in vm_host.persisted("hsmvm")


@pytest.fixture(scope="module")
def vmlab() -> Iterator[dict[str, Any]]:
    requires_root()
    if workdir.load_state() is not None:
        pytest.fail("a lab is up: the VM tier runs alone ('hsmctl lab down' first)")
    # What of the lab range the host had before (nothing, in CI and on a user's host; a
    # developer's namespace lab beside this tier, otherwise): lab down must leave the same.
    before = leftovers()
    if os.environ.get("CI"):
        assert before == []
    capture = UplinkCapture(uplink())
    # lab up starts from what an interrupted run left (a network of the tier's name).
    interrupted_run_leftovers()
    started = time.monotonic()
    try:
        up = hsmctl(
            "lab", "up", "--driver", "vagrant", "--tenants", "1", "--appliances", "1", check=True
        )
        TIMES["lab up (box, networks, vagrant up)"] = time.monotonic() - started
        assert b"removed what an interrupted run left in libvirt: hsmvm-mgmt" in up.stderr
        yield {"status": hsmctl_json("lab", "status"), "capture": capture, "before": before}
    finally:
        hsmctl("lab", "down")  # a no-op when the last test brought it down
        capture.close()
        print("\nVM tier times:", json.dumps({k: round(v, 1) for k, v in TIMES.items()}))


def provider(*args: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return hsmctl("--config", str(workdir.HOST_CONFIG), *args, **kw)


def in_client(status: dict[str, Any], *args: str) -> subprocess.CompletedProcess[bytes]:
    return hsmctl(*args, netns=status["tenants"][0]["client_netns"], timeout=1800)


def timed(name: str, proc: subprocess.CompletedProcess[bytes], began: float) -> Any:
    TIMES[name] = time.monotonic() - began
    assert proc.returncode == 0, f"{name}: {proc.stdout.decode()}\n{proc.stderr.decode()}"
    return json.loads(proc.stdout) if proc.stdout.strip().startswith(b"{") else None


def test_the_vm_is_an_appliance_at_factory_state(vmlab: dict[str, Any]) -> None:
    status = vmlab["status"]
    assert [a["id"] for a in status["appliances"]] == ["hsm01"]
    assert status["appliances"][0]["mgmt_ip"] == "198.18.200.11"
    shown = hsmctl("lab", "console", "hsm01", "--", "hsmsh", "-c", "hsm show", check=True)
    text = shown.stdout.decode()
    assert "hsm01" in text
    # The console is the guest agent, as root, with no account and no network.
    who = hsmctl("lab", "console", "hsm01", "--", "id", "-u", check=True)
    assert who.stdout.decode().strip() == "0"
    # The stock sshd and every getty are masked; only the appliance's two sshd listen.
    units = hsmctl(
        "lab", "console", "hsm01", "--", "systemctl", "is-enabled", "ssh.service", "getty@tty1"
    )
    assert units.stdout.decode().split() == ["masked", "masked"]
    # No route out of the management network in the guest (DHCP gives an address only).
    routes = hsmctl("lab", "console", "hsm01", "--", "ip", "-4", "route", check=True)
    assert "default" not in routes.stdout.decode()
    # Isolated networks: no <forward> (no NAT, no routing), no host address on a tenant
    # network, and libvirt's own `default` network is not running.
    virsh = ("virsh", "-q", "-c", "qemu:///system")
    for net in ("hsmvm-mgmt", "hsmvm-t1"):
        xml = subprocess.run([*virsh, "net-dumpxml", net], capture_output=True, text=True)
        assert xml.returncode == 0 and "<forward" not in xml.stdout, xml.stdout
        assert ("<ip " in xml.stdout) == (net == "hsmvm-mgmt")
    active = subprocess.run([*virsh, "net-list", "--name"], capture_output=True, text=True)
    assert "default" not in active.stdout.split()
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "0"
    # The data port starts unplugged (factory state), as in the namespace lab.
    link = subprocess.run(
        [
            "virsh",
            "-q",
            "-c",
            "qemu:///system",
            "domif-getlink",
            "hsmvm-hsm01",
            "52:54:00:18:c9:01",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert link.stdout.split()[-1] == "down"


def test_provision_takeover_collect_verify_against_the_vm(vmlab: dict[str, Any]) -> None:
    status = vmlab["status"]
    began = time.monotonic()
    provisioned = timed(
        "provision",
        provider(
            "provision",
            "--tenant",
            "tenant1",
            "--vnet",
            "vnet1",
            "--subnet",
            "hsm",
            "--request-id",
            "vm-tier-1",
            "--json",
            timeout=1800,
        ),
        began,
    )
    assert provisioned["appliance"] == "hsm01"
    handoff = provisioned["handoff"]

    began = time.monotonic()
    taken = timed("takeover", in_client(status, "takeover", "--handoff", handoff, "--json"), began)
    began = time.monotonic()
    timed("takeover verify", in_client(status, "takeover", "verify", taken["receipt"]), began)

    # The provider's path is closed, and with it Vagrant's: it logs in as `provider`.
    env = vm.vagrant_env(workdir.LAB_DIR / "topology.json")
    refused = subprocess.run(
        ["vagrant", "ssh", "hsm01", "-c", "hsm show"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert refused.returncode != 0, refused.stdout
    access = hsmctl("lab", "console", "hsm01", "--", "hsmsh", "-c", "sysconf provider-access show")
    assert "revoked" in access.stdout.decode() or "false" in access.stdout.decode().lower()

    began = time.monotonic()
    collected = timed(
        "logs collect",
        in_client(status, "logs", "collect", "--appliance", "hsm01", "--json"),
        began,
    )
    assert collected is not None
    began = time.monotonic()
    timed("logs verify", in_client(status, "logs", "verify", "hsm01"), began)


def test_lab_down_leaves_nothing_and_no_packet_left_the_host(vmlab: dict[str, Any]) -> None:
    """Last in the module: ``lab down`` (``vagrant destroy`` and the rest), then nothing
    of the tier is left — no VM, libvirt network, bridge, dnsmasq, namespace or route —
    and the capture on the uplink, running since before ``lab up``, saw nothing of it."""
    began = time.monotonic()
    hsmctl("lab", "down", check=True)
    TIMES["lab down (vagrant destroy)"] = time.monotonic() - began
    assert leftovers() == vmlab["before"]
    assert vm_host.persisted("hsmvm") == []
    # With nothing on record and libvirtd stopped, lab down still finds the tier's
    # definitions libvirt keeps on disk, removes them, and stops the libvirtd it started.
    interrupted_run_leftovers()
    daemons = vm_host.running("libvirtd")  # none (a zombie waiting to be reaped is none)
    hsmctl("lab", "down", check=True)
    assert vm_host.persisted("hsmvm") == []
    assert vm_host.running("libvirtd") == daemons
    assert leftovers() == vmlab["before"]
    capture: UplinkCapture = vmlab["capture"]
    capture.close()
    assert capture.offending == []
