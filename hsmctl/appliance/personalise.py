"""First-boot personalisation: what makes one appliance different from the image.

Input is ``/etc/hsm/factory.json`` (the lab writes it; a Vagrant VM gets it from its
provisioner): id, serial, stamp, management address and the provider's public key.
Made here and nowhere else: both interfaces' SSH host keys, the provider's authorised
key, the audit token with its first signing key. The result is ``/etc/hsm/device.json``,
written last, so an interrupted personalisation simply runs again.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from hsmctl import privatefiles
from hsmctl.appliance import paths


def write_atomic(path: Path, data: str, mode: int = 0o644) -> None:
    privatefiles.write_atomic(path, data.encode("utf-8"), mode=mode)


def make_host_keys(directory: Path, comment: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for kind in paths.HOSTKEY_TYPES:
        key = directory / f"ssh_host_{kind}_key"
        if key.exists():
            continue
        for leftover in (key, key.with_suffix(".pub")):
            leftover.unlink(missing_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(key)],
            check=True,
            stdin=subprocess.DEVNULL,
        )


def personalise(factory: dict[str, object]) -> None:
    ident = str(factory["id"])
    make_host_keys(paths.HOSTKEY_DIRS["mgmt"], f"{ident}-mgmt")
    make_host_keys(paths.HOSTKEY_DIRS["data"], f"{ident}-data")
    provider_key = str(factory["provider_public_key"]).strip()
    write_atomic(paths.AUTHORIZED_KEYS / "provider", provider_key + "\n", 0o644)

    from hsmctl.appliance import auditkey

    audit_public = auditkey.initialise(ident)
    mgmt = factory.get("mgmt") or {}
    address = str(mgmt.get("address", "")) if isinstance(mgmt, dict) else ""
    device = {
        "id": ident,
        "serial": str(factory.get("serial", ident)),
        "model": paths.MODEL,
        "stamp": factory.get("stamp"),
        "firmware": paths.FIRMWARE_VERSION,
        "mgmt_ip": address.split("/")[0],
        "audit_public_key": audit_public,
    }
    write_atomic(paths.DEVICE, json.dumps(device, indent=2, sort_keys=True) + "\n", 0o644)
