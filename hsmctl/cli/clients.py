"""``hsmctl client``: register, list and revoke an appliance's application clients
(customer side, inside the tenant network, as the appliance's ``admin``)."""

from __future__ import annotations

from pathlib import Path

import click

from hsmctl.cli.output import config_path, emit, json_option

_identity = click.option(
    "--identity",
    type=click.Path(dir_okay=False),
    help="Tenant identity (OpenSSH private key); default: from the config.",
)


@click.group("client")
def client() -> None:
    """Application clients: each application reaches the HSM's customer token over
    PKCS#11 (remoted over SSH) with its own key and role (SPEC §11)."""


@client.command("register")
@click.argument("appliance")
@click.option("--name", required=True, help="The application's name (a-z 0-9 -).")
@click.option(
    "--role",
    type=click.Choice(["crypto-officer", "crypto-user"]),
    default="crypto-user",
    show_default=True,
)
@click.option(
    "--public-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The application's own SSH public key (default: a new Ed25519 key in the kit).",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    help="The kit directory (default: in the state directory).",
)
@_identity
@json_option
@click.pass_context
def register(
    ctx: click.Context,
    appliance: str,
    name: str,
    role: str,
    public_key: Path | None,
    output: Path | None,
    identity: str | None,
    as_json: bool,
) -> None:
    """Register application NAME on APPLIANCE and write its kit.

    \b
    Output: {"appliance", "client", "role", "kit"}.
    Exit 2: bad name, role or key, duplicate name, kit directory not empty;
    5: the appliance was not taken over from here."""
    from hsmctl.clients.workflow import register as run
    from hsmctl.customer.context import open_tenant_context

    tctx = open_tenant_context(config_path(ctx), identity)
    result = run(tctx, appliance, name, role, public_key, output)
    emit(as_json, result, lambda p: f"{p['appliance']}: client {p['client']} ({p['role']}); "
         f"kit {p['kit']}")  # fmt: skip


@client.command("list")
@click.argument("appliance")
@_identity
@json_option
@click.pass_context
def list_(ctx: click.Context, appliance: str, identity: str | None, as_json: bool) -> None:
    """List APPLIANCE's registered clients.

    \b
    Output: {"appliance", "clients": [{"name", "role", "fingerprint", "registered"}]}."""
    from hsmctl.clients.workflow import list_clients
    from hsmctl.customer.context import open_tenant_context

    tctx = open_tenant_context(config_path(ctx), identity)
    result = list_clients(tctx, appliance)
    emit(as_json, result, lambda p: "\n".join(
        f"{c['name']:<28} {c['role']:<15} {c['fingerprint']} {c['registered']}"
        for c in p["clients"]) or "no clients")  # fmt: skip


@client.command("revoke")
@click.argument("appliance")
@click.option("--name", required=True, help="The application to remove.")
@_identity
@json_option
@click.pass_context
def revoke(
    ctx: click.Context, appliance: str, name: str, identity: str | None, as_json: bool
) -> None:
    """Revoke client NAME on APPLIANCE: its key is removed and its open PKCS#11
    sessions end within a second.

    \b
    Output: {"appliance", "client", "revoked": true}. Exit 2: no such client."""
    from hsmctl.clients.workflow import revoke as run
    from hsmctl.customer.context import open_tenant_context

    tctx = open_tenant_context(config_path(ctx), identity)
    result = run(tctx, appliance, name)
    emit(as_json, result, lambda p: f"{p['appliance']}: client {p['client']} revoked")
