"""The customer's token: ``hsm show|init|zeroize|policy show``, the crypto-officer PIN,
the cloning domain (``hsm domain set``) and the backup manifest's signature
(``hsm backup-sign``)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from hsmctl import auditlog
from hsmctl.appliance import accounts, p11service, token
from hsmctl.appliance.commands.common import Context, Reply, as_json, device_record
from hsmctl.appliance.grammar import Command
from hsmctl.appliance.roles import Role
from hsmctl.auditlog.signing import verify_raw_signature
from hsmctl.contract import OwnerState
from hsmctl.errors import UsageError

if TYPE_CHECKING:
    from hsmctl.appliance.daemon import Daemon

BACKUP_MANIFEST_TYPE = "hsmctl-backup-manifest"


def hsm_show(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    device = device_record()
    status = token.customer_status()
    owner = ctx.owner
    info: dict[str, Any] = {
        "id": device.get("id"),
        "serial": device.get("serial"),
        "model": device.get("model"),
        "firmware": device.get("firmware"),
        "label": status.label,
        "initialised": status.initialised,
        "objects": status.objects,
        "co_pin_set": status.co_pin_set,
        "owner_state": owner.state.value,
        "provider_access": owner.provider_access and owner.state is not OwnerState.CUSTOMER_OWNED,
        "monitor": "enabled" if accounts.is_enabled("monitor") else "disabled",
        "audit_key_id": daemon.keys.current().key_id,
        "policy": p11service.POLICY_NAME,
        # The cloning domain's fingerprint (SPEC §12), never its secret; None: no domain.
        "domain": status.domain,
        # The activity log's disk use and its high-water warning (issue 15): health
        # reads it through monitor, so it is in the monitor's view too.
        "log_disk": daemon.log.disk().as_dict(),
    }
    if ctx.role is Role.MONITOR:
        info = {
            k: info[k]
            for k in (
                "id",
                "model",
                "firmware",
                "initialised",
                "owner_state",
                "provider_access",
                "monitor",
                "log_disk",
            )
        }
    return Reply(output=as_json(info))


def hsm_init(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    label = cmd.get_str("label")
    (so_pin,) = secrets
    before = token.customer_status()
    current = so_pin if before.initialised else None
    after = token.customer_init(label, so_pin, current_so_pin=current)
    return Reply(
        output=f"token initialised: label {after.label}, serial {after.serial}",
        log_detail={
            "label": after.label,
            "serial": after.serial,
            "reinitialised": before.initialised,
        },
    )


def hsm_zeroize(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    before = token.customer_status()
    token.customer_zeroize()
    return Reply(output="token zeroized", log_detail={"serial": before.serial})


def co_pin_set(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    token.customer_set_co_pin(secrets[0], secrets[1])
    return Reply(output="crypto-officer PIN set")


def co_pin_change(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    token.customer_change_co_pin(secrets[0], secrets[1])
    return Reply(output="crypto-officer PIN changed")


def policy_show(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    return Reply(output=as_json(p11service.POLICY))


def domain_set(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    so_pin, domain_secret = secrets
    try:
        result = token.customer_domain_set(so_pin, domain_secret)
    except UsageError as exc:  # a secret of the wrong length: nothing made
        return Reply.usage(exc.message)
    fingerprint = str(result["domain"])
    created = bool(result["created"])
    return Reply(
        output=as_json({"domain": fingerprint, "created": created}),
        log_detail={"domain": fingerprint, "created": created},
    )


def backup_sign(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    """Sign a backup manifest's digest with the current audit key. The signed payload is
    canonical JSON of its own type (``hsmctl-backup-manifest``), so the signature can
    never stand for a checkpoint or a key rotation of the log."""
    digest = cmd.get_str("digest")
    signer = daemon.keys.current()
    device = str(device_record().get("id") or daemon.keys.device)
    payload = auditlog.canonical(
        {
            "type": BACKUP_MANIFEST_TYPE,
            "device": device,
            "manifest_sha256": digest,
            "key_id": signer.key_id,
        }
    )
    sig = signer.sign_digest(hashlib.sha256(payload).digest()).hex()
    if not verify_raw_signature(signer.public_key_pem, sig, payload):
        return Reply.failure("the audit key's signature did not verify")
    return Reply(
        output=as_json(
            {
                "type": BACKUP_MANIFEST_TYPE,
                "device": device,
                "manifest_sha256": digest,
                "key_id": signer.key_id,
                "alg": "ECDSA-P256-SHA256",
                "sig": sig,
            }
        ),
        log_detail={"manifest_sha256": digest, "key_id": signer.key_id},
    )
