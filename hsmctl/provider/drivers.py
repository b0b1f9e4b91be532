"""Two drivers keep hsmctl independent of where devices live (SPEC §4).

* The **network fabric** attaches a device's data port to a tenant subnet and detaches it
  (lab: namespaces and bridges; Vagrant: pre-wired, verified only; a real SDN later).
* The **out-of-band path** reaches a device's console without any account on it, for
  zeroize and factory reset (lab: entering the appliance's namespaces as root; Vagrant
  VMs: the QEMU guest agent on a virtio-serial channel — not ``vagrant ssh``, which is
  an account's login and ends with the takeover; a BMC or serial server later).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Protocol

from hsmctl.errors import CommandFailed, ConfigError


@dataclass(frozen=True)
class ConsoleResult:
    status: int
    stdout: str
    stderr: str


class Placement(Protocol):
    """Where a data port is plugged in (all None: detached)."""

    @property
    def tenant(self) -> str | None: ...
    @property
    def vnet(self) -> str | None: ...
    @property
    def subnet(self) -> str | None: ...


class Fabric(Protocol):
    def attach(self, appliance: str, tenant: str, vnet: str, subnet: str) -> object: ...

    def attachment(self, appliance: str) -> Placement: ...

    def detach(self, appliance: str) -> object: ...


class OutOfBand(Protocol):
    def run(self, appliance: str, line: str, stdin: bytes | None = None) -> ConsoleResult:
        """Run one device-shell line on the console (as the device's root)."""
        ...


class LabOutOfBand:
    def run(self, appliance: str, line: str, stdin: bytes | None = None) -> ConsoleResult:
        from hsmctl.lab import control as lab

        proc = lab.console(appliance, ["hsmsh", "-c", line], input=stdin)
        return ConsoleResult(
            proc.returncode,
            proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"),
        )


def console_checked(oob: OutOfBand, appliance: str, line: str) -> str:
    result = oob.run(appliance, line)
    if result.status != 0:
        raise CommandFailed(
            f"{appliance}: console command {line!r} failed: {result.stderr.strip()}",
            argv=shlex.split(line),
            status=result.status,
            output=result.stderr,
        )
    return result.stdout


def fabric_for(kind: str) -> Fabric:
    # ``vagrant``: the VM tier's (pre-wired, verified; link up/down); the lab's control
    # hands out the driver of the lab that is up.
    if kind in ("lab", "vagrant"):
        from hsmctl.lab import control as lab

        fabric: Fabric = lab.fabric()
        return fabric
    raise ConfigError(f"unknown network fabric driver {kind!r} (known: lab, vagrant)")


def out_of_band_for(kind: str) -> OutOfBand:
    # ``vagrant``: the QEMU guest agent (hsmctl.lab.vm.console), reached the same way.
    if kind in ("lab", "vagrant"):
        return LabOutOfBand()
    raise ConfigError(f"unknown out-of-band driver {kind!r} (known: lab, vagrant)")
