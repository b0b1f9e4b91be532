"""The host side of the VM tier: libvirt's daemons and ``virsh``.

No systemd runs as PID 1 on the lab hosts, so the daemons are started here
(``virtlogd -d``, ``libvirtd -d``) when none runs, and stopped again by ``lab down`` only
if this module started them. QEMU runs as root: ``/dev/kvm`` is there but unusable by
``libvirt-qemu`` (LAB-FACTS.md: with it, every libvirt call re-probes QEMU, ~4 s each)
and the guests run under TCG anyway.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from hsmctl.errors import CommandFailed, ConflictError, UsageError

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
# libvirt's NAT network (192.168.122.0/24, a route off the host): never started by us.
DEFAULT_NET_AUTOSTART = Path("/etc/libvirt/qemu/networks/autostart/default.xml")
SOCKET = Path("/run/libvirt/libvirt-sock")
URI = "qemu:///system"
TOOLS = ("vagrant", "virsh", "libvirtd", "virtlogd", "qemu-img", "mkfs.ext4", "qemu-system-x86_64")


def require_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    if missing:
        raise UsageError(
            "the Vagrant tier needs " + ", ".join(missing) + " (scripts/install-deps.sh --vm "
            "installs vagrant-libvirt, libvirt and QEMU)"
        )


def configure_qemu(conf: Path = QEMU_CONF) -> bool:
    """QEMU as root (``user``/``group``); True when the file changed."""
    text = conf.read_text()
    new = text
    for key in ("user", "group"):
        pattern = re.compile(rf"^#?\s*{key}\s*=.*$", re.M)
        line = f'{key} = "root"'
        if re.search(rf"^{re.escape(line)}$", new, re.M):
            continue
        new, n = pattern.subn(line, new, count=1)
        if n == 0:
            new += f"\n{line}\n"
    if new != text:
        conf.write_text(new)
        return True
    return False


def _pids(name: str) -> list[int]:
    proc = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True, check=False)
    return [int(p) for p in proc.stdout.split()]


def ensure_daemons() -> list[int]:
    """Start virtlogd and libvirtd unless they run; the pids of those started here."""
    changed = configure_qemu()
    started: list[int] = []
    if _pids("libvirtd"):
        if changed:
            raise ConflictError(
                f"{QEMU_CONF} was changed for the VM tier (QEMU as root); restart libvirtd"
            )
        refuse_default_network()
        return started
    # The libvirtd started here must not bring up libvirt's `default` NAT network.
    if DEFAULT_NET_AUTOSTART.is_symlink() or DEFAULT_NET_AUTOSTART.exists():
        DEFAULT_NET_AUTOSTART.unlink()
    for daemon in ("virtlogd", "libvirtd"):
        if not _pids(daemon):
            subprocess.run([daemon, "-d"], check=True)
            started.extend(_pids(daemon))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if SOCKET.exists() and run_virsh("version", check=False).returncode == 0:
            refuse_default_network()
            return started
        time.sleep(0.2)
    raise CommandFailed("libvirtd did not answer within 30 s", argv=["virsh", "version"], status=1)


def refuse_default_network() -> None:
    """The tier never runs beside libvirt's ``default`` network: it NATs off the host."""
    if "default" in run_virsh("net-list", "--name", check=False).stdout.split():
        raise ConflictError(
            "libvirt's `default` (NAT) network is running; the VM tier will not run beside "
            "it (virsh net-destroy default; virsh net-autostart --disable default)"
        )


def run_virsh(
    *args: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    argv = ["virsh", "-q", "-c", URI, *args]
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise CommandFailed(
            f"virsh {args[0] if args else ''} failed",
            argv=argv,
            status=proc.returncode,
            output=proc.stdout + proc.stderr,
        )
    return proc


def virsh(*args: str) -> str:
    return run_virsh(*args).stdout
