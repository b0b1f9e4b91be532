"""``hsmctl ha create|status|sync``: HA groups of appliances in one cloning domain
(SPEC §12; customer side, inside the tenant network)."""

from __future__ import annotations

from typing import Any

import click

from hsmctl.cli.complete import complete_appliance
from hsmctl.cli.output import config_path, emit, json_option

_identity = click.option(
    "--identity",
    type=click.Path(dir_okay=False),
    help="Tenant identity (OpenSSH private key); default: from the config.",
)


@click.group("ha")
def ha() -> None:
    """HA groups: two or more appliances of this tenant in one cloning domain (placed
    across stamps), whose key objects hsmctl ha sync keeps alike (SPEC §12)."""


@ha.command("create")
@click.argument("name")
@click.argument("appliances", nargs=-1, shell_complete=complete_appliance)
@_identity
@json_option
@click.pass_context
def create(
    ctx: click.Context, name: str, appliances: tuple[str, ...], identity: str | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Make HA group NAME of APPLIANCES (two or more, each once).

    Every member must be taken over from this state directory with a receipt of this
    tenant, and all must be in the same cloning domain ('domain' of hsm show). Another
    tenant's appliance or another domain: exit 3; a group of one, a duplicate, a bad
    name, an appliance unknown here: exit 2; the same group again with the same members
    changes nothing, with other members: exit 5. The group is kept in the state
    directory (ha/NAME.json, 0600).

    \b
    Output: {"group", "members", "domain", "created"}."""
    from hsmctl.customer.context import open_tenant_context
    from hsmctl.keys.ha import create as run

    tctx = open_tenant_context(config_path(ctx), identity)
    result = run(tctx, name, list(appliances))
    emit(as_json, result, lambda p: f"HA group {p['group']}: {', '.join(p['members'])} "
         f"(domain {p['domain'][:16]}...){'' if p['created'] else ', already there'}")  # fmt: skip


def _status_text(p: dict[str, Any]) -> str:
    lines = [f"HA group {p['group']}:"]
    for m in p["members"]:
        if not m["reachable"]:
            lines.append(f"  {m['appliance']}: unreachable")
        else:
            state = "in sync" if m["in_sync"] else "NOT in sync"
            lines.append(f"  {m['appliance']}: {m['objects']} key objects, {state}")
    return "\n".join(lines)


@ha.command("status")
@click.argument("name")
@_identity
@json_option
@click.pass_context
def status(ctx: click.Context, name: str, identity: str | None, as_json: bool) -> None:
    """Each member of HA group NAME: reachable, how many key objects it holds, and
    whether it holds every object the reachable members hold together (matched as
    restore matches them: class, type, label, id, public-key hash) and none that
    'hsmctl key destroy' destroyed on a member (the group's destroy journal).

    An unreachable member is reported (reachable false), not an error; a member that
    is no longer this tenant's or left the domain: exit 3.

    \b
    Output: {"group", "members": [{"appliance", "reachable", "objects", "in_sync"}]}."""
    from hsmctl.customer.context import open_tenant_context
    from hsmctl.keys.ha import status as run

    tctx = open_tenant_context(config_path(ctx), identity)
    emit(as_json, run(tctx, name), _status_text)


def _sync_text(p: dict[str, Any]) -> str:
    lines = [f"HA group {p['group']}: {p['copied']} key objects copied, "
             f"{p['destroyed']} destroyed"]  # fmt: skip
    for m in p["members"]:
        gone = f", {len(m['destroyed'])} destroyed" if m["destroyed"] else ""
        what = f"{len(m['copied'])} added{gone}" if m["reachable"] else "unreachable"
        lines.append(f"  {m['appliance']}: {what}")
    return "\n".join(lines)


@ha.command("sync")
@click.argument("name")
@_identity
@json_option
@click.pass_context
def sync(ctx: click.Context, name: str, identity: str | None, as_json: bool) -> None:
    """Destroy on each member of HA group NAME what was destroyed through hsmctl, then
    copy to it the key objects it lacks, from the others.

    A key destroyed with 'hsmctl key destroy' on a member is journaled first (a
    tombstone in the state directory, STATE/ha-destroyed/NAME.json): sync destroys it on
    every other member and never copies it back; a member that does not answer is
    destroyed on at its next sync. A key destroyed on a device by anything else
    (an application's own PKCS#11 call) is not journaled: sync copies it back.
    Private and secret keys travel wrapped under the cloning domain's key (wrapped on
    one device, unwrapped on the other: no plaintext leaves a device), public keys as
    public data. Running it again changes nothing; an interrupted run, rerun, completes.
    A member that does not answer is reported and the others are synced (exit 4); a
    damaged group or destroy-journal file, a member of another tenant or domain: exit 3.

    \b
    Output: {"group", "members": [{"appliance", "reachable", "copied": [{"label",
    "id", "class"}], "destroyed": [{"label", "id", "class"}], "objects"}], "copied",
    "destroyed"}."""
    from hsmctl.customer.context import open_tenant_context
    from hsmctl.keys.ha import sync as run

    tctx = open_tenant_context(config_path(ctx), identity)
    emit(as_json, run(tctx, name), _sync_text)
