"""``hsmctl domain set``, ``hsmctl backup`` and ``hsmctl restore``: keys that outlive a
device (SPEC §12; customer side, inside the tenant network)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hsmctl.cli.complete import complete_appliance
from hsmctl.cli.output import config_path, emit, json_option

_identity = click.option(
    "--identity",
    type=click.Path(dir_okay=False),
    help="Tenant identity (OpenSSH private key); default: from the config.",
)
_kit = click.option(
    "--kit",
    "kit_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="A crypto-officer client kit to go through (default: hsmctl's own crypto-officer "
    "client hsmctl-HOST, registered on first use).",
)
_pin_file = click.option(
    "--pin-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The token's user PIN, in an owner-only file (default: the PIN escrowed at the takeover).",
)


@click.group("domain")
def domain() -> None:
    """The cloning domain: appliances given the same domain secret hold the same domain
    key and can exchange keys wrapped under it, and nothing else can (SPEC §12)."""


@domain.command("set")
@click.argument("appliance", shell_complete=complete_appliance)
@click.option(
    "--domain-file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The domain secret (16 to 1024 bytes), in an owner-only file; escrowed first.",
)
@_identity
@json_option
@click.pass_context
def domain_set(
    ctx: click.Context, appliance: str, domain_file: Path, identity: str | None, as_json: bool
) -> None:
    """Put APPLIANCE's token into the cloning domain of the secret in --domain-file.

    The secret is escrowed in the state directory, then sent with the escrowed SO PIN on
    the device's stdin ('hsm domain set'). The same domain again changes nothing; a token
    in another domain is refused (exit 5: zeroize and init it first).

    \b
    Output: {"appliance", "domain" (fingerprint), "created"}."""
    from hsmctl.customer.context import open_tenant_context
    from hsmctl.keys.domain import set_domain

    tctx = open_tenant_context(config_path(ctx), identity)
    result = set_domain(tctx, appliance, domain_file)
    emit(as_json, result, lambda p: f"{p['appliance']}: cloning domain {p['domain']}")


def _backup_text(p: dict[str, Any]) -> str:
    text = f"{p['appliance']}: {p['objects']} key objects -> {p['backup']} ({p['bytes']} bytes)"
    for s in p["skipped"]:
        text += f"\n  not cloneable (made outside the domain), left out: {s['label']} ({s['id']})"
    return text


@click.command("backup")
@click.argument("appliance", shell_complete=complete_appliance)
@click.option(
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The backup file (written to a temporary file, then renamed).",
)
@_kit
@_pin_file
@_identity
@json_option
@click.pass_context
def backup(
    ctx: click.Context,
    appliance: str,
    output: Path,
    kit_dir: Path | None,
    pin_file: Path | None,
    identity: str | None,
    as_json: bool,
) -> None:
    """Back up every key object of APPLIANCE's token, wrapped under the domain key.

    Private and secret keys leave wrapped under the cloning domain's key (AES key wrap
    with padding), public keys as public data; the manifest (labels, ids, types,
    public-key hashes, the domain's fingerprint, the blobs) is signed by the device's
    audit key. A token in no domain: exit 5.

    \b
    Output: {"appliance", "backup", "domain", "objects", "bytes", "manifest_sha256",
    "skipped": [{"label", "id", "class"}]}."""
    from hsmctl.customer.context import open_tenant_context
    from hsmctl.keys.backup import backup as run

    tctx = open_tenant_context(config_path(ctx), identity)
    emit(as_json, run(tctx, appliance, output, kit_dir, pin_file), _backup_text)


@click.command("restore")
@click.argument("appliance", shell_complete=complete_appliance)
@click.option(
    "--backup",
    "backup_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A file written by hsmctl backup.",
)
@_kit
@_pin_file
@_identity
@json_option
@click.pass_context
def restore(
    ctx: click.Context,
    appliance: str,
    backup_file: Path,
    kit_dir: Path | None,
    pin_file: Path | None,
    identity: str | None,
    as_json: bool,
) -> None:
    """Restore a backup into APPLIANCE (the same device after zeroize and init, or
    another device of the same cloning domain).

    The file is verified first (its form, the manifest's digest, the audit key's
    signature against the key pinned for the source appliance): a damaged or edited
    file, or a target in another domain, is exit 3 with nothing changed. Only missing
    objects are added, so restoring twice adds nothing.

    \b
    Output: {"appliance", "backup", "source", "domain", "objects",
    "restored": [{"label", "id", "class"}], "present"}."""
    from hsmctl.customer.context import open_tenant_context
    from hsmctl.keys.backup import restore as run

    tctx = open_tenant_context(config_path(ctx), identity)
    result = run(tctx, appliance, backup_file, kit_dir, pin_file)
    emit(as_json, result, lambda p: f"{p['appliance']}: restored {len(p['restored'])} of "
         f"{p['objects']} key objects ({p['present']} already present)")  # fmt: skip
