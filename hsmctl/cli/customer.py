"""Customer-side commands (run inside the tenant network): takeover, release."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hsmctl.cli.complete import complete_appliance
from hsmctl.cli.output import config_path, emit, json_option
from hsmctl.cli.progress import CliProgress


@click.group(invoke_without_command=True)
@click.option(
    "--handoff",
    "handoff",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The hand-off bundle from the provider.",
)
@click.option(
    "--identity",
    type=click.Path(dir_okay=False),
    help="Tenant identity (OpenSSH private key); default: from the config.",
)
@click.option(
    "--new-password-file",
    type=click.Path(dir_okay=False),
    help="The new admin password (default: generated and escrowed).",
)
@click.option(
    "--so-pin-file",
    type=click.Path(dir_okay=False),
    help="The token's security-officer PIN (default: generated and escrowed).",
)
@click.option(
    "--co-pin-file",
    type=click.Path(dir_okay=False),
    help="The crypto-officer PIN (default: generated and escrowed).",
)
@click.option(
    "--domain-file",
    type=click.Path(dir_okay=False),
    help="A cloning-domain secret (16 to 1024 bytes, owner-only file): the token joins that "
    "domain after the crypto-officer PIN is set (escrowed first; default: no domain).",
)
@click.option(
    "--keep-monitor", is_flag=True, help="Keep the provider's health monitoring account enabled."
)
@click.option(
    "--client",
    "clients",
    multiple=True,
    metavar="NAME:ROLE",
    help="Also register application client NAME with ROLE (crypto-officer or crypto-user) "
    "on the token's PKCS#11 service, as `hsmctl client register --name NAME --role ROLE` "
    "does: a new Ed25519 key pair and the kit in the state directory "
    "(appliances/ID/clients/NAME: NAME_key 0600, NAME.module, known_hosts, README). "
    "Repeatable; NAME: 1 to 28 of a-z 0-9 -, a letter first, not ending with '-'; each "
    "name once. Default: no clients. Journaled like every step: an interrupted run "
    "registers nothing twice. A rerun must give the same set once the step has started "
    "(else exit 2); a name the device lists with another key exits 3.",
)
@json_option
@click.pass_context
def takeover(
    ctx: click.Context,
    handoff: Path | None,
    identity: str | None,
    new_password_file: str | None,
    so_pin_file: str | None,
    co_pin_file: str | None,
    domain_file: str | None,
    keep_monitor: bool,
    clients: tuple[str, ...],
    as_json: bool,
) -> None:
    """Take an appliance over from the provider (SPEC §7): lockout-safe and resumable.

    Opens the hand-off bundle (provider signature, expiry, decryption with your
    identity), connects with the host key pinned from the bundle, changes the one-time
    password (the device is customer-owned from that instant), revokes the provider's
    access, disables monitoring (unless --keep-monitor), rotates the data-interface host
    keys, initialises the token with your SO PIN and sets the crypto-officer PIN, rotates
    the audit key, installs the log collector's key, registers the application clients
    of --client (none by default), proves all of it and writes a receipt signed with
    your identity.

    Secrets not given are generated; every secret is escrowed (0600, fsynced) in your
    state directory before it is used. Interrupted at any point, the same command
    finishes the job.

    \b
    Example, with two application clients (their kits under the state directory):
      hsmctl takeover --handoff hsm09-REQUEST.json --json \\
          --client app1:crypto-officer --client app2:crypto-user

    \b
    Output: {"appliance", "state": "customer-owned", "receipt",
             "clients": [{"client", "role", "kit"}]}.
    Exit 3: tampered or expired bundle, host key mismatch, a --client name the device
    lists with another key; 2: bad input (weak password, PIN out of range, readable
    secret file, another tenant's identity, malformed or duplicate --client, a --client
    set other than the interrupted run's, a kit directory already there); 5: another
    unfinished takeover of the same appliance."""
    if ctx.invoked_subcommand is not None:
        return
    if handoff is None:
        raise click.UsageError("--handoff FILE is required (or use: takeover verify RECEIPT)")
    from hsmctl.clients.request import parse_clients
    from hsmctl.customer.context import open_tenant_context
    from hsmctl.secret import read_secret_file
    from hsmctl.takeover.workflow import Options
    from hsmctl.takeover.workflow import takeover as run

    requested = parse_clients(clients)  # exit 2 on bad input, before anything else
    opts = Options(
        handoff=handoff,
        new_password=read_secret_file(new_password_file, what="--new-password-file")
        if new_password_file
        else None,
        so_pin=read_secret_file(so_pin_file, what="--so-pin-file") if so_pin_file else None,
        co_pin=read_secret_file(co_pin_file, what="--co-pin-file") if co_pin_file else None,
        keep_monitor=keep_monitor,
        domain_secret=read_secret_file(domain_file, what="--domain-file") if domain_file else None,
        clients=requested,
    )
    tctx = open_tenant_context(config_path(ctx), identity)
    with CliProgress() as progress:
        result = run(tctx, opts, progress)
    emit(as_json, result, lambda p: f"{p['appliance']}: {p['state']}; receipt {p['receipt']}")


@takeover.command("verify")
@click.argument("receipt", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--identity",
    type=click.Path(dir_okay=False),
    help="Tenant identity whose signature to expect; default: from the config.",
)
@json_option
@click.pass_context
def takeover_verify(ctx: click.Context, receipt: Path, identity: str | None, as_json: bool) -> None:
    """Verify a takeover receipt: signed by this tenant's identity, every check passed
    (exit 3 otherwise)."""
    from hsmctl.customer.context import open_tenant_context
    from hsmctl.takeover.workflow import verify_receipt

    tctx = open_tenant_context(config_path(ctx), identity)
    result = verify_receipt(receipt, tctx.identity)
    emit(as_json, result, lambda p: f"{p['appliance']}: receipt verified ({p['checks']} checks)")


@click.command()
@click.argument("appliance", shell_complete=complete_appliance)
@click.option("--reason", help="Why the appliance is released (recorded).")
@click.option(
    "--identity",
    type=click.Path(dir_okay=False),
    help="Tenant identity to sign with; default: from the config.",
)
@json_option
@click.pass_context
def release(
    ctx: click.Context, appliance: str, reason: str | None, identity: str | None, as_json: bool
) -> None:
    """Sign a release of APPLIANCE with the tenant identity, for the provider's
    `hsmctl deprovision` (which refuses without one or --force).

    \b
    Output: {"appliance", "release"} (the release file's path)."""
    from hsmctl.customer.context import open_tenant_context
    from hsmctl.handoff import make_release, write_document

    tctx = open_tenant_context(config_path(ctx), identity)
    tenant = tctx.tenant
    if tenant is None:
        raise click.UsageError("the tenant configuration does not name its tenant")
    doc = make_release(appliance, tenant, tctx.identity, reason=reason)
    state = tctx.appliance(appliance)
    path = write_document(state.dir / "release.json", doc)
    payload: dict[str, Any] = {"appliance": appliance, "release": str(path)}
    emit(as_json, payload, lambda p: f"release for {p['appliance']}: {p['release']}")
