"""The host side of the VM tier: libvirt's daemons and ``virsh``.

No systemd runs as PID 1 on the lab hosts, so the daemons are started here
(``virtlogd -d``, ``libvirtd -d``) when none runs, and stopped again by ``lab down`` only
if this module started them. QEMU runs as root: ``/dev/kvm`` is there but unusable by
``libvirt-qemu`` (LAB-FACTS.md: with it, every libvirt call re-probes QEMU, ~4 s each)
and the guests run under TCG anyway.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from hsmctl.errors import CommandFailed, ConflictError, UsageError

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
# libvirt's NAT network (192.168.122.0/24, a route off the host): never started by us.
DEFAULT_NET_AUTOSTART = Path("/etc/libvirt/qemu/networks/autostart/default.xml")
SOCKET = Path("/run/libvirt/libvirt-sock")
# Where libvirt keeps persistent definitions: they outlive libvirtd, and come back with it.
CONFIG_DIR = Path("/etc/libvirt/qemu")
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


def running(name: str) -> list[int]:
    """The pids of the live processes of this name (zombies left out)."""
    proc = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True, check=False)
    return [int(p) for p in proc.stdout.split() if _alive(int(p))]


def persisted(prefix: str, config_dir: Path | None = None) -> list[str]:
    """Domains and networks named ``<prefix>-*`` that libvirt keeps on disk, whether or not
    libvirtd runs now (a run interrupted, or a ``lab down`` while libvirtd was stopped,
    leaves them; the next libvirtd loads them again)."""
    config_dir = config_dir or CONFIG_DIR
    found = [p.stem for p in sorted(config_dir.glob(f"{prefix}-*.xml"))]
    found += [p.stem for p in sorted((config_dir / "networks").glob(f"{prefix}-*.xml"))]
    return found


def ensure_daemons(*, refuse_default: bool = True) -> list[int]:
    """Start virtlogd and libvirtd unless they run; the pids of those started here."""
    changed = configure_qemu()
    started: list[int] = []
    if running("libvirtd"):
        if changed:
            raise ConflictError(
                f"{QEMU_CONF} was changed for the VM tier (QEMU as root); restart libvirtd"
            )
        if refuse_default:
            refuse_default_network()
        return started
    # The libvirtd started here must not bring up libvirt's `default` NAT network.
    if DEFAULT_NET_AUTOSTART.is_symlink() or DEFAULT_NET_AUTOSTART.exists():
        DEFAULT_NET_AUTOSTART.unlink()
    for daemon in ("virtlogd", "libvirtd"):
        if not running(daemon):
            subprocess.run([daemon, "-d"], check=True)
            started.extend(running(daemon))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if SOCKET.exists() and run_virsh("version", check=False).returncode == 0:
            if refuse_default:
                refuse_default_network()
            return started
        time.sleep(0.2)
    raise CommandFailed("libvirtd did not answer within 30 s", argv=["virsh", "version"], status=1)


def stop_daemons(pids: list[int], timeout: float = 15) -> None:
    """Stop the daemons started here (libvirtd first) and wait for them to be gone, so
    that a ``lab up`` right after starts its own instead of finding one on its way out."""
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Running (a zombie, waiting for a parent that may never reap it, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


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
