"""``hsmctl client``: register, list and revoke an appliance's application clients
(customer side, inside the tenant network, as the appliance's ``admin``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hsmctl.cli.complete import complete_appliance
from hsmctl.cli.output import config_path, emit, json_option
from hsmctl.cli.render import Col, table

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
@click.argument("appliance", required=False, shell_complete=complete_appliance)
@click.option("--name", required=True, help="The application's name (a-z 0-9 -).")
@click.option(
    "--role",
    type=click.Choice(["crypto-officer", "crypto-user"]),
    default="crypto-user",
    show_default=True,
)
@click.option(
    "--group",
    metavar="NAME",
    help="Register on every member of HA group NAME (hsmctl ha create) instead of one "
    "APPLIANCE; the kit opens each new session on a reachable member.",
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
    appliance: str | None,
    name: str,
    role: str,
    group: str | None,
    public_key: Path | None,
    output: Path | None,
    identity: str | None,
    as_json: bool,
) -> None:
    """Register application NAME on APPLIANCE (or on every member of an HA group with
    --group) and write its kit.

    With --group the client (same name, role and key) is registered on each member as
    that member's admin, and the kit's remote command (ssh with the kit's ssh_config)
    runs a connector that opens each new session on a reachable member: the member that
    answered last first, then the group's order, the next one tried after 0.1 s without
    an answer; a member lost in the middle of a session fails the application's call
    within 0.5 to 1.5 s, and the application reopens its session. Every member's pinned
    data host keys are in the kit. The members must share the user PIN (take them
    over with the same --co-pin-file). The register is journaled: run the same command
    again after an interruption or exit 4 and it finishes (members done are not asked
    again); run again once finished, it changes nothing. Default kit place:
    STATE/ha/kits/GROUP/NAME.

    \b
    Output: {"appliance", "client", "role", "kit", "fingerprint"};
    with --group: {"group", "members", "client", "role", "kit", "fingerprint",
    "registered" (members registered by this run)}.
    Exit 2: bad name, role or key, duplicate name, kit directory not empty, both or
    neither of APPLIANCE and --group, unknown group, members' PINs differ;
    3: a member is another tenant's;
    4: a member does not answer (with --group: nothing registered by this run when
    found before the first registration; run again to finish);
    5: an appliance was not taken over from here, the client exists on a member with
    another key or role, or a begun register had another role or kit place."""
    from hsmctl.customer.context import open_tenant_context
    from hsmctl.errors import UsageError

    if (appliance is None) == (group is None):
        raise UsageError("give either APPLIANCE or --group NAME (one of them); nothing changed")
    tctx = open_tenant_context(config_path(ctx), identity)
    if group is not None:
        from hsmctl.clients.group import register_group

        result = register_group(tctx, group, name, role, public_key, output)
        emit(as_json, result, lambda p: f"group {p['group']} ({', '.join(p['members'])}): "
             f"client {p['client']} ({p['role']}); kit {p['kit']}")  # fmt: skip
        return
    from hsmctl.clients.workflow import register as run

    assert appliance is not None
    result = run(tctx, appliance, name, role, public_key, output)
    emit(as_json, result, lambda p: f"{p['appliance']}: client {p['client']} ({p['role']}); "
         f"kit {p['kit']}")  # fmt: skip


@client.command("list")
@click.argument("appliance", shell_complete=complete_appliance)
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
    emit(as_json, result, _clients_text)


def _clients_text(p: dict[str, Any]) -> str:
    if not p["clients"]:
        return "no clients"
    return table(
        ["NAME", "ROLE", "FINGERPRINT", "REGISTERED"],
        ([c["name"], c["role"], c["fingerprint"], c["registered"]] for c in p["clients"]),
    )


@client.command("revoke")
@click.argument("appliance", shell_complete=complete_appliance)
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


# -- keys -----------------------------------------------------------------------------------

_kit = click.option(
    "--kit",
    "kit_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="A client kit to go through (default: hsmctl's own crypto-officer client "
    "hsmctl-HOST, registered on first use).",
)
_pin_file = click.option(
    "--pin-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The token's user PIN, in an owner-only file (default: the PIN escrowed at the takeover).",
)


_KEY_COLUMNS: list[Col | str] = [
    "LABEL",
    "ID",
    "TYPE",
    Col("SIZE", "right"),
    "LOCAL",
    "EXTRACTABLE",
    "SENSITIVE",
]


def _key_row(k: dict[str, Any]) -> list[object]:
    return [k.get(n) for n in ("label", "id", "type", "size", "local", "extractable", "sensitive")]


def _keys_text(p: dict[str, Any]) -> str:
    return table(_KEY_COLUMNS, map(_key_row, p["keys"])) if p["keys"] else "no keys"


@click.group("key")
def key() -> None:
    """The customer token's keys, through the same remote PKCS#11 path as an application
    (a client kit, p11-kit over SSH, the device's key policy) (SPEC §11)."""


@key.command("list")
@click.argument("appliance", shell_complete=complete_appliance)
@_kit
@_pin_file
@_identity
@json_option
@click.pass_context
def key_list(
    ctx: click.Context,
    appliance: str,
    kit_dir: Path | None,
    pin_file: Path | None,
    identity: str | None,
    as_json: bool,
) -> None:
    """List the private and secret keys on APPLIANCE's customer token.

    \b
    Output: {"appliance", "keys": [{"label", "id", "type", "size", "local",
    "extractable", "sensitive"}]}."""
    from hsmctl.customer.context import open_tenant_context
    from hsmctl.keys.workflow import list_keys

    tctx = open_tenant_context(config_path(ctx), identity)
    result = list_keys(tctx, appliance, kit_dir, pin_file)
    emit(as_json, result, _keys_text)


@key.command("generate")
@click.argument("appliance", shell_complete=complete_appliance)
@click.option("--label", required=True, help="The new key's label (unique on the token).")
@click.option("--type", "key_type", required=True, metavar="rsa:BITS|ec:CURVE|aes:BITS")
@_kit
@_pin_file
@_identity
@json_option
@click.pass_context
def key_generate(
    ctx: click.Context,
    appliance: str,
    label: str,
    key_type: str,
    kit_dir: Path | None,
    pin_file: Path | None,
    identity: str | None,
    as_json: bool,
) -> None:
    """Generate a key on APPLIANCE (sensitive, never extractable).

    \b
    Output: {"appliance", "key": {"label", "id", "type", "size", ...}}.
    Exit 2: bad type or label, the label exists, or the device's key policy refused it
    (the message names the rule; nothing was changed)."""
    from hsmctl.customer.context import open_tenant_context
    from hsmctl.keys.workflow import generate

    tctx = open_tenant_context(config_path(ctx), identity)
    result = generate(tctx, appliance, label, key_type, kit_dir, pin_file)
    emit(as_json, result, lambda p: f"{p['appliance']}: generated\n" + table(
        _KEY_COLUMNS, [_key_row(p["key"])]))  # fmt: skip


@key.command("destroy")
@click.argument("appliance", shell_complete=complete_appliance)
@click.option("--label", required=True, help="The key to destroy (with its public half).")
@click.option("--yes", is_flag=True, help="Confirm: a destroyed key cannot come back.")
@_kit
@_pin_file
@_identity
@json_option
@click.pass_context
def key_destroy(
    ctx: click.Context,
    appliance: str,
    label: str,
    yes: bool,
    kit_dir: Path | None,
    pin_file: Path | None,
    identity: str | None,
    as_json: bool,
) -> None:
    """Destroy the key labelled LABEL on APPLIANCE.

    \b
    Output: {"appliance", "label", "destroyed": [{"label", "id", "type", ...}]}.
    Exit 2: no --yes, no such key, or several keys with that label."""
    from hsmctl.customer.context import open_tenant_context
    from hsmctl.keys.workflow import destroy

    tctx = open_tenant_context(config_path(ctx), identity)
    result = destroy(tctx, appliance, label, yes, kit_dir, pin_file)
    emit(as_json, result, lambda p: f"{p['appliance']}: destroyed {len(p['destroyed'])} key(s)")


@key.command("wrapping-key")
@click.argument("appliance", shell_complete=complete_appliance)
@click.option("--label", required=True, help="The wrapping key's label (unique on the token).")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the public key (PEM) to this new file, for the customer's side.",
)
@_kit
@_pin_file
@_identity
@json_option
@click.pass_context
def key_wrapping_key(
    ctx: click.Context,
    appliance: str,
    label: str,
    output: Path | None,
    kit_dir: Path | None,
    pin_file: Path | None,
    identity: str | None,
    as_json: bool,
) -> None:
    """Make the RSA-3072 import key for BYOK on APPLIANCE and print its public key.

    The private half serves one purpose: the device unwraps RSA-OAEP-SHA256 (or -SHA1)
    with it; every client use of it (decrypt, sign, copy, change) is refused by the
    device. It is sensitive and never leaves the device. Run again with the same label:
    the same public key is printed ("created": false). Wrap keys for it as docs/keys.md
    ("BYOK") shows, then `hsmctl key import`.

    \b
    Output: {"appliance", "label", "id", "bits", "public_key" (PEM), "fingerprint"
    (hex SHA-256 of the DER public key), "created", "scheme", "oaep_hashes" (what
    --oaep-hash of `key import` this key takes: a key made before SHA-256 support
    takes sha1 only)}.
    Exit 2: bad label, the label names another kind of key, --output exists."""
    from hsmctl.customer.context import open_tenant_context
    from hsmctl.keys.byok import make_wrapping_key

    tctx = open_tenant_context(config_path(ctx), identity)
    result = make_wrapping_key(tctx, appliance, label, kit_dir, pin_file, output)
    emit(as_json, result, lambda p: p["public_key"].rstrip("\n") + f"\n{p['appliance']}: "
         f"wrapping key {p['label']} (RSA-{p['bits']}), SHA-256 {p['fingerprint']}")  # fmt: skip


@key.command("import")
@click.argument("appliance", shell_complete=complete_appliance)
@click.option("--label", required=True, help="The imported key's label (unique on the token).")
@click.option(
    "--wrapped",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="RSA-OAEP(ephemeral AES key) || AES-KWP(ephemeral key, the key), as made with OpenSSL.",
)
@click.option("--wrapping-key", "wrapping_key", required=True, metavar="LABEL",
              help="The label of the key made with `hsmctl key wrapping-key`.")  # fmt: skip
@click.option("--type", "key_type", metavar="aes:BITS|ec:CURVE|rsa:BITS",
              help="What the file must hold (default: told by its length).")  # fmt: skip
@click.option("--oaep-hash", "oaep_hash", type=click.Choice(["sha256", "sha1"]),
              default="sha256", show_default=True,
              help="The hash (and MGF1 hash) of the file's RSA-OAEP part: sha1 for blobs "
                   "made for RSA_OAEP_3072_SHA1_AES_256-style imports.")  # fmt: skip
@_kit
@_pin_file
@_identity
@json_option
@click.pass_context
def key_import(
    ctx: click.Context,
    appliance: str,
    label: str,
    wrapped: Path,
    wrapping_key: str,
    key_type: str | None,
    oaep_hash: str,
    kit_dir: Path | None,
    pin_file: Path | None,
    identity: str | None,
    as_json: bool,
) -> None:
    """Import a key wrapped outside the HSM (BYOK) into APPLIANCE's token.

    The file is RSA-OAEP-SHA256 (MGF1-SHA256; --oaep-hash sha1 for SHA-1) of an
    ephemeral AES key, then AES key wrap with padding (RFC 5649) of the key. The key
    lands as a token object that is sensitive, never extractable and CKA_LOCAL=false;
    the ephemeral AES key is destroyed. docs/keys.md ("BYOK") has the OpenSSL commands
    for the customer's side.

    \b
    Output: {"appliance", "key": {"label", "id", "type", "size", "local", ...},
    "wrapping_key", "scheme"}.
    Exit 2: bad label or type, missing or empty file, unknown or wrong wrapping key
    (or one made before SHA-256 support, without --oaep-hash sha1), the label exists,
    a key-policy refusal; 3: the file does not unwrap (altered, wrapped for another key
    or with another OAEP hash) — nothing was imported; 5: not taken over from here."""
    from hsmctl.customer.context import open_tenant_context
    from hsmctl.keys.byok import import_key

    tctx = open_tenant_context(config_path(ctx), identity)
    result = import_key(tctx, appliance, label, wrapped, wrapping_key, key_type, kit_dir, pin_file,
                        oaep_hash)  # fmt: skip
    emit(as_json, result, lambda p: f"{p['appliance']}: imported\n" + table(
        _KEY_COLUMNS, [_key_row(p["key"])]))  # fmt: skip
