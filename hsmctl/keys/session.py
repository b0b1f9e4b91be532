"""Opening a tenant's token on an appliance for ``hsmctl key``, backup, restore, BYOK and
HA: which kit (``--kit DIR`` or hsmctl's own crypto-officer client, registered on first
use) and which PIN (``--pin-file``, else the crypto-officer PIN escrowed at the
takeover). The PIN goes from here to ``C_Login`` only: never argv, never the
environment, never the kit. (A module of its own so that those workflows and
:mod:`hsmctl.keys.workflow` depend on it, not on each other.)
"""

from __future__ import annotations

import socket
from pathlib import Path

from hsmctl.clients import kit
from hsmctl.customer.context import TenantContext
from hsmctl.customer.store import ApplianceDir
from hsmctl.errors import ConflictError, UsageError
from hsmctl.keys.remote import RemoteToken
from hsmctl.secret import Secret, read_secret_file

PIN_ESCROW = "co-pin"


def _kit_dir(ctx: TenantContext, appliance: str, given: Path | None) -> Path:
    if given is not None:
        return given.absolute()
    name = kit.own_client_name(socket.gethostname())
    own = ApplianceDir(ctx.state_dir, appliance).dir / "clients" / name
    if not (own / f"{name}.module").is_file():
        from hsmctl.clients.workflow import register

        register(ctx, appliance, name, "crypto-officer")
    return own


def remote_of(kit_dir: Path) -> str:
    modules = sorted(kit_dir.glob("*.module")) if kit_dir.is_dir() else []
    if len(modules) != 1:
        raise UsageError(f"--kit {kit_dir}: a kit directory with one *.module file expected")
    try:
        return kit.remote_line(modules[0].read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"--kit {kit_dir}: {modules[0].name}: {exc}") from exc


def _pin(ctx: TenantContext, appliance: str, pin_file: Path | None) -> Secret:
    if pin_file is not None:
        return read_secret_file(pin_file, what="--pin-file")
    pin = ApplianceDir(ctx.state_dir, appliance).escrowed(PIN_ESCROW)
    if pin is None:
        raise ConflictError(
            f"{appliance}: no crypto-officer PIN escrowed in {ctx.state_dir} (not taken over "
            "from here); give --pin-file"
        )
    return pin


def _token(
    ctx: TenantContext, appliance: str, kit_dir: Path | None, pin_file: Path | None
) -> RemoteToken:
    ApplianceDir(ctx.state_dir, appliance)  # validates the id (exit 2)
    pin = _pin(ctx, appliance, pin_file)
    remote = remote_of(_kit_dir(ctx, appliance, kit_dir))
    return RemoteToken(appliance, remote, pin)
