"""Where log collection finds its appliances: the customer's state directory.

The layout is :mod:`hsmctl.customer.store`'s; this module only asks it: the tenant's
state directory from the config, the appliances taken over from there, one appliance's
archive (``appliances/ID/archive``).
"""

from __future__ import annotations

from pathlib import Path

from hsmctl.collect.archive import SEGMENT_BYTES, Archive
from hsmctl.customer.context import load_tenant_config
from hsmctl.customer.store import ApplianceDir
from hsmctl.errors import UsageError

ARCHIVE = "archive"


def state_dir(config_path: str | None) -> Path:
    """The tenant's state directory. Collection needs nothing else from the config: not
    the tenant identity, so a collection job can run without it."""
    path: Path = load_tenant_config(config_path).require("state_dir")
    return path


def collected_appliances(state: Path) -> list[str]:
    """Appliances whose takeover installed a collector key (``--all``)."""
    found = []
    for appliance in ApplianceDir.taken_over_ids(state):
        pins = ApplianceDir(state, appliance).load_pins()
        if pins.audit_account_key and pins.data_ip:
            found.append(appliance)
    return found


def taken_over(state: Path, appliance: str) -> ApplianceDir:
    """The appliance's state, which a takeover from ``state`` pinned; else UsageError."""
    st = ApplianceDir.taken_over(state, appliance)
    if st is None:
        raise UsageError(f"{appliance}: not taken over from this state directory ({state})")
    return st


def archive_of(st: ApplianceDir, *, segment_bytes: int = SEGMENT_BYTES) -> Archive:
    """The appliance's verified activity-log archive (created on first use)."""
    return Archive(st.dir / ARCHIVE, st.appliance, segment_bytes=segment_bytes)
