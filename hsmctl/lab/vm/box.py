"""The appliance as a Vagrant box (libvirt provider), built locally from the lab's golden
image: no box download (a provider's own image pipeline is what a real fleet uses).

Two cache levels beside the lab's images (``/var/cache/hsmctl/images``), each built in
a temporary directory and renamed into place:

* ``vmbase-<key>``: the golden image (``vagrant/appliance-image.sh``) plus what a VM
  needs and a container does not: a kernel, an initramfs with the virtio drivers,
  systemd as init, udev and the QEMU guest agent (the out-of-band path); keyed by the
  image's key and this module's package list;
* ``box-<key>``: that plus the firmware snapshot (the device side of the working tree)
  and the guest's boot configuration, as a qcow2 disk in a ``.box`` archive, with the
  kernel and initramfs beside it for direct kernel boot; keyed by the base's key and
  the firmware's content.

The guest's configuration is what makes a VM an appliance at factory state: systemd
starts ``hsm-boot`` (the same init as a lab appliance), which personalises the device on
first boot from the factory record the hypervisor passes on the kernel command line;
the stock sshd, gettys and every other login surface are masked; the management NIC is
named ``mgmt0`` and takes its address from the isolated management network's DHCP
(no route, no DNS), the data NIC is ``data0``, left to the device (``network set``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hsmctl.errors import CommandFailed, UsageError
from hsmctl.lab import image
from hsmctl.progress import NullProgress, Progress

VM_PACKAGES = (
    "linux-image-amd64",
    "initramfs-tools",
    "zstd",
    "systemd-sysv",
    "udev",
    "qemu-guest-agent",
)
# The initramfs holds only what a virtio guest needs to mount its root.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "ext4")
DISK_SIZE = "2G"
BOX_NAME = "hsmctl/appliance"
# MAC prefixes of the two NICs (52:54:00 is QEMU's): udev names the interfaces by them.
MGMT_MAC_PREFIX = "52:54:00:18:c8"
DATA_MAC_PREFIX = "52:54:00:18:c9"

_MASKED = (
    "ssh.service",
    "ssh.socket",
    "getty@tty1.service",
    "serial-getty@ttyS0.service",
    "getty-static.service",
    "e2scrub_reap.service",
    "systemd-networkd-wait-online.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
)

_UDEV_RULES = f"""\
# hsmctl appliance VM: the management and data NICs by their MAC prefix (box.py).
SUBSYSTEM=="net", ACTION=="add", ATTR{{address}}=="{MGMT_MAC_PREFIX}:*", NAME="mgmt0"
SUBSYSTEM=="net", ACTION=="add", ATTR{{address}}=="{DATA_MAC_PREFIX}:*", NAME="data0"
"""

_MGMT_NETWORK = """\
# The management NIC: the isolated management network's DHCP gives the address the
# factory record names (a fixed lease per MAC); nothing else is taken from it.
[Match]
Name=mgmt0

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no

[DHCPv4]
UseRoutes=no
UseGateway=no
UseDNS=no
UseNTP=no
UseHostname=no
UseDomains=no
"""

_UNIT_DROPIN = """\
[Service]
Environment=LANG=C.UTF-8
RuntimeDirectory=sshd hsm
RuntimeDirectoryMode=0755
"""


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def vmbase_key() -> str:
    return _digest(
        image.image_key().encode(),
        ",".join(VM_PACKAGES).encode(),
        ",".join(INITRAMFS_MODULES).encode(),
    )


def firmware_digest(firmware: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(firmware.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(firmware)).encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def box_key(firmware: Path) -> str:
    return _digest(
        vmbase_key().encode(),
        firmware_digest(firmware).encode(),
        (_UDEV_RULES + _MGMT_NETWORK + _UNIT_DROPIN + ",".join(_MASKED)).encode(),
    )


def _run(argv: list[str], what: str, *, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise CommandFailed(
            f"{what} failed", argv=argv, status=proc.returncode, output=proc.stdout + proc.stderr
        )


@contextmanager
def _chroot_mounts(root: Path) -> Iterator[None]:
    """/proc, /sys and /dev for package scripts inside the chroot; always unmounted."""
    mounted: list[Path] = []
    try:
        for fs, target, opts in (
            ("proc", root / "proc", ["-t", "proc"]),
            ("sysfs", root / "sys", ["-t", "sysfs"]),
            ("/dev", root / "dev", ["--bind"]),
        ):
            _run(["mount", *opts, fs, str(target)], f"mounting {target}")
            mounted.append(target)
        yield
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "-l", str(target)], check=False)


def _build_vmbase(progress: Progress) -> Path:
    final = image.CACHE / f"vmbase-{vmbase_key()}"
    if (final / ".complete").exists():
        return final
    golden = image.build(progress)
    tmp = image.CACHE / f".tmp-vmbase-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    root = tmp / "rootfs"
    progress.step("VM base: copying the golden image")
    _run(["cp", "-a", str(golden), str(root)], "copying the golden image")
    conf = root / "etc" / "initramfs-tools"
    conf.joinpath("conf.d").mkdir(parents=True, exist_ok=True)
    conf.joinpath("conf.d", "hsmctl").write_text("MODULES=list\n")
    conf.joinpath("modules").write_text("\n".join(INITRAMFS_MODULES) + "\n")
    shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    progress.step(f"VM base: installing {', '.join(VM_PACKAGES)} (about 30 s, once)")
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LANG": "C.UTF-8",
    }
    with _chroot_mounts(root):
        if sources.exists() and not (root / "etc/apt/sources.list.d/debian.sources").exists():
            shutil.copy(sources, root / "etc/apt/sources.list.d/debian.sources")
        _run(["chroot", str(root), "apt-get", "update", "-qq"], "apt-get update", env=env)
        _run(
            [
                "chroot",
                str(root),
                "apt-get",
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                *VM_PACKAGES,
            ],
            "installing the VM packages",
            env=env,
        )
        _run(["chroot", str(root), "apt-get", "clean"], "apt-get clean", env=env)
    (root / "etc" / "resolv.conf").write_text("")
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise CommandFailed("the VM base has no kernel or initramfs", argv=[], status=1)
    shutil.copy(kernels[-1], tmp / "vmlinuz")
    shutil.copy(initrds[-1], tmp / "initrd.img")
    (tmp / ".complete").write_text(vmbase_key() + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in image.CACHE.glob("vmbase-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _mask(root: Path, unit: str) -> None:
    link = root / "etc" / "systemd" / "system" / unit
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to("/dev/null")


def _enable(root: Path, unit: str, target: str) -> None:
    wants = root / "etc" / "systemd" / "system" / f"{target}.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / unit
    if not link.is_symlink():
        source = root / "etc" / "systemd" / "system" / unit
        dest = f"/etc/systemd/system/{unit}" if source.exists() else f"/lib/systemd/system/{unit}"
        link.symlink_to(dest)


def configure_guest(root: Path, firmware: Path) -> None:
    """The guest's boot configuration and the firmware (see the module docstring)."""
    lib = root / "opt" / "hsmctl" / "lib"
    shutil.rmtree(lib / "hsmctl", ignore_errors=True)
    shutil.copytree(
        firmware / "hsmctl", lib / "hsmctl", ignore=shutil.ignore_patterns("__pycache__")
    )
    (root / "etc" / "fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    (root / "etc" / "hostname").write_text("hsm-appliance\n")
    (root / "etc" / "udev" / "rules.d").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "udev" / "rules.d" / "70-hsmctl-nics.rules").write_text(_UDEV_RULES)
    networkd = root / "etc" / "systemd" / "network"
    networkd.mkdir(parents=True, exist_ok=True)
    (networkd / "10-mgmt0.network").write_text(_MGMT_NETWORK)
    dropin = root / "etc" / "systemd" / "system" / "hsm-appliance.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "hsmctl-vm.conf").write_text(_UNIT_DROPIN)
    for unit in _MASKED:
        _mask(root, unit)
    _enable(root, "hsm-appliance.service", "multi-user.target")
    _enable(root, "systemd-networkd.service", "multi-user.target")
    (root / "etc" / "hsm" / "image-state").write_text("factory\n")


def box_dir(firmware: Path) -> Path:
    return image.CACHE / f"box-{box_key(firmware)}"


def build(firmware: Path, progress: Progress | None = None) -> Path:
    """The box directory (``appliance.box``, ``vmlinuz``, ``initrd.img``), built if
    missing. ``firmware`` is a firmware snapshot (``hsmctl.lab.firmware.firmware_dir``)."""
    progress = progress or NullProgress()
    if os.geteuid() != 0:
        raise UsageError("building the appliance box needs root")
    final = box_dir(firmware)
    if (final / ".complete").exists():
        return final
    base = _build_vmbase(progress)
    tmp = image.CACHE / f".tmp-box-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    root = tmp / "rootfs"
    progress.step("box: the firmware and the guest's boot configuration")
    _run(["cp", "-a", str(base / "rootfs"), str(root)], "copying the VM base")
    configure_guest(root, firmware)
    raw = tmp / "box.raw"
    progress.step(f"box: an ext4 disk of {DISK_SIZE} (qcow2)")
    _run(["truncate", "-s", DISK_SIZE, str(raw)], "creating the disk")
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "hsmroot",
            "-E",
            "root_owner=0:0",
            "-d",
            str(root),
            str(raw),
        ],
        "making the disk's file system",
    )
    shutil.rmtree(root)
    _run(
        ["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(tmp / "box.img")],
        "converting the disk to qcow2",
    )
    raw.unlink()
    metadata = {"provider": "libvirt", "format": "qcow2", "virtual_size": 2}
    (tmp / "metadata.json").write_text(json.dumps(metadata) + "\n")
    (tmp / "Vagrantfile").write_text(
        "# hsmctl appliance box: settings live in the project's vagrant/Vagrantfile.\n"
    )
    with tarfile.open(tmp / "appliance.box", "w") as tar:
        for name in ("metadata.json", "Vagrantfile", "box.img"):
            tar.add(tmp / name, arcname=name)
    (tmp / "box.img").unlink()
    shutil.copy(base / "vmlinuz", tmp / "vmlinuz")
    shutil.copy(base / "initrd.img", tmp / "initrd.img")
    (tmp / ".complete").write_text(box_key(firmware) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in image.CACHE.glob("box-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    progress.step(f"box ready: {final / 'appliance.box'}")
    return final
