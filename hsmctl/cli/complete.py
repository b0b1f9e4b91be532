"""Shell completion of appliance ids (click's completion: see docs/cli.md for the
``eval "$(_HSMCTL_COMPLETE=bash_source hsmctl)"`` lines).

The ids come from this host's own records, read only, never from a device or a
database server (a Tab key must not wait on the network):

- a tenant configuration (``role: tenant``): the appliances taken over from its state
  directory (``appliances/ID/pins.json``);
- a provider configuration: the SQLite state store opened read-only (nothing created or
  migrated), or, with a ``database_url`` (PostgreSQL), the inventory's fleet file.

Completion must never break the shell: any error (no configuration, a bad one, no store
yet) gives no completions, and nothing is printed.
"""

from __future__ import annotations

from pathlib import Path

import click
from click.shell_completion import CompletionItem

from hsmctl import config as config_mod


def appliance_ids(config: config_mod.Config) -> list[str]:
    """Every appliance id this configuration's host knows, sorted (may raise)."""
    if config.role == "tenant":
        from hsmctl.customer.store import ApplianceDir

        state: Path = config.require("state_dir")
        return ApplianceDir.taken_over_ids(state)
    if config.database_url:
        from hsmctl.inventory.load import load_inventory

        return sorted(a.id for a in load_inventory(config.require("inventory")).appliances)
    from hsmctl.state.store import DB_FILE, Store

    db = Path(config.require("state_dir")) / DB_FILE
    if not db.is_file():
        return []
    with Store.open_read_only(db) as store:
        return sorted(a.id for a in store.list_appliances())


def complete_appliance(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """click's ``shell_complete`` callback for an appliance id argument or option."""
    try:
        explicit = ctx.find_root().params.get("config_path")
        ids = appliance_ids(config_mod.load(explicit))
    except Exception:
        return []
    return [CompletionItem(i) for i in ids if i.startswith(incomplete)]
