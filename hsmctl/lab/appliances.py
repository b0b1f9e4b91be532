"""The lab's appliances: boot one from the golden image and the firmware snapshot in
its own namespaces, wait until its management sshd answers, read its host keys."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from hsmctl.errors import HsmctlError
from hsmctl.lab import netns, workdir
from hsmctl.lab.networks import veth
from hsmctl.lab.plan import AppliancePlan, LabPlan
from hsmctl.lab.workdir import appliance_dir

BOOT_SCRIPT = Path(__file__).with_name("boot.sh")


def boot_appliance(plan: LabPlan, a: AppliancePlan, golden: Path, firmware: Path) -> dict[str, Any]:
    netns.add(a.netns)
    netns.sysctl(a.netns, net__ipv4__ip_nonlocal_bind="1")
    veth("mgmt0", a.mgmt_peer, a_ns=a.netns, b_ns=plan.mgmt_netns)
    netns.ip("link", "set", a.mgmt_peer, "master", "br-mgmt", "up", netns=plan.mgmt_netns)
    veth("data0", a.data_peer, a_ns=a.netns, b_ns=plan.fabric_netns)
    base = appliance_dir(a.id)
    upper = base / "upper"
    (upper / "etc" / "hsm").mkdir(parents=True, exist_ok=True)
    provider_pub = (workdir.LAB_DIR / "provider" / "provider_key.pub").read_text().strip()
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


def init_pid(launcher_pid: int) -> int | None:
    """The appliance's PID 1 (seen from the host): the launcher's only child."""
    try:
        children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def wait_ready(plan: LabPlan, a: AppliancePlan, launcher_pid: int, timeout: float) -> int:
    """Wait for the management sshd to accept connections; return the init pid."""
    deadline = time.monotonic() + timeout
    log = appliance_dir(a.id) / "console.log"
    while time.monotonic() < deadline:
        init = init_pid(launcher_pid)
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
