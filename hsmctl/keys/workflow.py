"""``hsmctl key list|generate|destroy``: which kit, which PIN, then :mod:`remote`.

The kit: ``--kit DIR`` (any client's kit; ``generate`` and ``destroy`` need a
crypto-officer's), or by default hsmctl's own client on this host, ``hsmctl-HOST``
(crypto-officer), registered as ``admin`` on first use with its kit in the state
directory (``appliances/ID/clients/hsmctl-HOST``) and reused afterwards; ``client list``
shows it, ``client revoke`` removes it. The PIN: ``--pin-file`` (owner-only, SPEC §6),
else the crypto-officer PIN this state directory escrowed at the takeover. It goes from
here to ``C_Login`` only: never argv, never the environment, never the kit.

Bad input (type, label, a PIN file readable by others, an unknown or ambiguous label)
exits 2 before anything changes; a refusal of the device's key policy exits 2 naming
the rule (the device changed nothing and logged it ``denied``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hsmctl.customer.context import TenantContext
from hsmctl.errors import UsageError
from hsmctl.keys import spec
from hsmctl.keys.session import PIN_ESCROW, _kit_dir, _pin, _token, remote_of

# Opening a token (kit, PIN) lives in :mod:`hsmctl.keys.session`, which backup, BYOK and
# HA use too; the names stay importable from here.
__all__ = ["PIN_ESCROW", "_kit_dir", "_pin", "_token", "destroy", "generate", "list_keys",
           "remote_of"]  # fmt: skip


def list_keys(
    ctx: TenantContext, appliance: str, kit_dir: Path | None = None, pin_file: Path | None = None
) -> dict[str, Any]:
    with _token(ctx, appliance, kit_dir, pin_file) as token:
        rows = token.keys()
    return {"appliance": appliance, "keys": [r.as_dict() for r in rows]}


def generate(
    ctx: TenantContext,
    appliance: str,
    label: str,
    key_type: str,
    kit_dir: Path | None = None,
    pin_file: Path | None = None,
) -> dict[str, Any]:
    try:
        spec.check_label(label)
        wanted = spec.parse_type(key_type)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    with _token(ctx, appliance, kit_dir, pin_file) as token:
        if token.keys(label):
            raise UsageError(f"{appliance}: a key labelled {label!r} exists; nothing changed")
        made = token.generate(wanted, label, os.urandom(8))
    return {"appliance": appliance, "key": made.as_dict()}


def destroy(
    ctx: TenantContext,
    appliance: str,
    label: str,
    yes: bool,
    kit_dir: Path | None = None,
    pin_file: Path | None = None,
) -> dict[str, Any]:
    try:
        spec.check_label(label)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if not yes:
        raise UsageError(f"destroying {label!r} cannot be undone: add --yes")
    from hsmctl.keys.domain import DomainToken
    from hsmctl.keys.ha import journaled_destroy

    plain = _token(ctx, appliance, kit_dir, pin_file)
    # A member of an HA group: tombstones first, so ha sync destroys the key on the
    # other members instead of copying it back (hsmctl/keys/ha.py).
    token = DomainToken(plain.appliance, plain.remote, plain.pin)
    with token, journaled_destroy(ctx, appliance, token, label):
        gone = token.destroy(label)
    return {"appliance": appliance, "label": label, "destroyed": [r.as_dict() for r in gone]}
