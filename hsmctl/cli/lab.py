"""``hsmctl lab``: the namespace lab on this host."""

from __future__ import annotations

import sys
from typing import Any

import click

from hsmctl.cli.output import emit, json_option
from hsmctl.cli.progress import CliProgress
from hsmctl.cli.render import table
from hsmctl.errors import CommandFailed
from hsmctl.lab import control as lab_mod
from hsmctl.lab import image as image_mod
from hsmctl.lab.plan import MAX_APPLIANCES, MAX_TENANTS


@click.group()
def lab() -> None:
    """The namespace lab: emulated appliances (real sshd, real SoftHSM) and tenant
    networks in network namespaces on this host. Needs root.

    Addresses come from 198.18.0.0/15, routed to a blackhole on the host before anything
    is created, so nothing addressed to the lab can leave the machine."""


def _fleet_table(payload: dict[str, Any]) -> str:
    appliances = table(
        ["APPLIANCE", "STAMP", "MGMT_IP"],
        ([a["id"], a["stamp"], a["mgmt_ip"]] for a in payload["appliances"]),
    )
    tenants = table(
        ["TENANT", "CLIENT_NETNS", "CLIENT_IP", "SUBNETS"],
        (
            [
                t["name"],
                t["client_netns"],
                t["client_ip"],
                [
                    f"{s['name']}={s['cidr']}{'*' if s['delegated'] else ''}"
                    for v in t["vnets"]
                    for s in v["subnets"]
                ],
            ]
            for t in payload["tenants"]
        ),
    )
    return (
        f"{appliances}\n\n{tenants}\n(* delegated to the HSM service)\n"
        f"provider key: {payload['provider_key']}"
    )


@lab.command()
@click.option(
    "--tenants",
    type=int,
    default=2,
    show_default=True,
    help=f"Tenants, each with a virtual network and a client namespace (1-{MAX_TENANTS}).",
)
@click.option(
    "--appliances",
    type=int,
    default=4,
    show_default=True,
    help=f"Appliances in the whole lab, spread over 2 stamps (1-{MAX_APPLIANCES}).",
)
@click.option(
    "--driver",
    type=click.Choice(lab_mod.DRIVERS),
    default="namespaces",
    show_default=True,
    help="Where the appliances run: namespaces on this host, or libvirt/QEMU VMs made "
    "by Vagrant from a box built locally (docs/vagrant.md; 1-4 tenants, 1-8 appliances).",
)
@json_option
def up(tenants: int, appliances: int, driver: str, as_json: bool) -> None:
    """Bring the lab up (a no-op if it is up with the same sizes; exit 5 with others).

    Builds the appliance image on first use (debootstrap, cached under
    /var/cache/hsmctl/images), then the provider management network, the tenants'
    networks and the appliances. Writes /etc/hsmctl/hsmctl.yaml for the provider and
    /etc/netns/CLIENT_NETNS/hsmctl/hsmctl.yaml for each tenant.

    With --driver vagrant the appliances are VMs: the box is built from the same image
    (cached beside it), libvirt's daemons are started if none run, the management and
    tenant networks are isolated libvirt networks in 198.18.192.0/18, and `vagrant up`
    boots the VMs under QEMU (software emulation: a minute or more per appliance). The
    same configs and `lab status --json` are written; `lab down` destroys it all."""
    with CliProgress() as progress:
        payload = lab_mod.up(tenants, appliances, progress, driver=driver)
    emit(as_json, payload, _fleet_table)


@lab.command()
@json_option
def down(as_json: bool) -> None:
    """Remove everything the lab made: processes, namespaces, veths, the blackhole
    route, configuration and state files. Safe to run at any time."""
    with CliProgress() as progress:
        payload = lab_mod.down(progress)
    emit(as_json, payload, lambda p: f"lab down ({len(p['removed_namespaces'])} namespaces)")


@lab.command()
@json_option
def status(as_json: bool) -> None:
    """Show the lab: appliances, tenants, their networks and key files (exit 5 if no
    lab is up)."""
    emit(as_json, lab_mod.status(), _fleet_table)


@lab.command()
@json_option
def image(as_json: bool) -> None:
    """Build (or find cached) the golden appliance image."""
    with CliProgress() as progress:
        path = image_mod.build(progress)
    emit(as_json, {"image": str(path)}, lambda p: p["image"])


@lab.command()
@json_option
def box(as_json: bool) -> None:
    """Build (or find cached) the appliance's Vagrant box for libvirt (root).

    The golden image (built if missing) plus a kernel, a virtio initramfs, systemd and
    the QEMU guest agent, and the working tree's firmware: a qcow2 disk in
    appliance.box, with vmlinuz and initrd.img beside it for direct kernel boot. Cached
    under /var/cache/hsmctl/images, keyed by the image, the packages and the firmware.
    `lab up --driver vagrant` builds it too; see docs/vagrant.md."""
    from hsmctl.lab.vm import control as vm_control

    with CliProgress() as progress:
        payload = vm_control.build_box(progress)
    emit(as_json, payload, lambda p: p["box"])


@lab.command(context_settings={"ignore_unknown_options": True})
@click.argument("appliance")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@json_option
def console(appliance: str, command: tuple[str, ...], as_json: bool) -> None:
    """Run CMD as root inside APPLIANCE: the serial console / physical access.

    \b
    Usage: hsmctl lab console APPLIANCE -- CMD...
    Standard input is passed to the command. Exits with the command's status."""
    data = None if sys.stdin.isatty() else sys.stdin.buffer.read()
    proc = lab_mod.console(appliance, list(command), input=data)
    if as_json:
        emit(
            True,
            {
                "appliance": appliance,
                "returncode": proc.returncode,
                "stdout": proc.stdout.decode(errors="replace"),
                "stderr": proc.stderr.decode(errors="replace"),
            },
            str,
        )
    else:
        sys.stdout.buffer.write(proc.stdout)
        sys.stderr.buffer.write(proc.stderr)
    if proc.returncode != 0:
        raise CommandFailed(
            f"command exited with status {proc.returncode} on {appliance}",
            argv=list(command),
            status=proc.returncode,
        )


@lab.command()
@click.argument("appliance")
@click.argument("kind", type=click.Choice(["psu1", "psu2", "temp", "fan", "off", "clear"]))
@json_option
def fault(appliance: str, kind: str, as_json: bool) -> None:
    """Inject a hardware fault on a lab appliance (lab only; root), or clear them all.

    \b
    psu1, psu2  that power supply fails
    temp        the temperature rises past its limit
    fan         a fan stops
    off         the appliance stops answering (its management and data links go down;
                the out-of-band sensors still answer and say power off)
    clear       every fault ends; links that 'off' took down come back up

    The faults are sensor readings only the out-of-band path sees (hsmctl health reads
    them); nothing on the device's accounts changes.

    \b
    Output: {"appliance", "fault", "sensors": {...the new readings}}."""
    from hsmctl.lab import faults

    payload = faults.inject(appliance, kind)
    emit(
        as_json,
        payload,
        lambda p: f"{p['appliance']}: {p['fault']}: faults={p['sensors']['faults']}",
    )
