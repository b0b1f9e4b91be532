"""Provider-side commands: provision, deprovision, fleet (health: hsmctl.cli.health)."""

from __future__ import annotations

import uuid
from typing import Any

import click

from hsmctl.cli.complete import complete_appliance
from hsmctl.cli.output import config_path, emit, json_option
from hsmctl.cli.progress import CliProgress
from hsmctl.cli.render import key_values, table
from hsmctl.errors import ConflictError, HsmctlError, PartialFailure, UsageError


@click.command()
@click.option("--tenant", required=True, help="Tenant (from the inventory).")
@click.option("--vnet", required=True, help="The tenant's virtual network.")
@click.option("--subnet", required=True, help="A subnet delegated to the HSM service.")
@click.option("--ip", help="Data address in the subnet (default: the next free one).")
@click.option("--stamp", help="Place into this stamp (default: anti-affinity).")
@click.option(
    "--request-id",
    help="Idempotency key: repeating it resumes the request or returns its result.",
)
@click.option(
    "--count",
    type=int,
    default=None,
    help="Provision this many appliances in parallel; the output is then always the "
    "list form, --count 1 included.",
)
@click.option(
    "--use-spares",
    is_flag=True,
    help="Also take the spares each stamp holds back (the inventory's 'spares').",
)
@json_option
@click.pass_context
def provision(
    ctx: click.Context,
    tenant: str,
    vnet: str,
    subnet: str,
    ip: str | None,
    stamp: str | None,
    request_id: str | None,
    count: int | None,
    use_spares: bool,
    as_json: bool,
) -> None:
    """Provision appliances into a tenant subnet and write their hand-off bundles.

    Picks free appliances (stamp anti-affinity within the tenant; quotas of 2 per stamp
    and 4 per region unless the inventory says otherwise), then runs
    playbooks/provision.yml through ansible-runner: verify the appliance (pinned
    management host key, factory state), attach its data port to the subnet, set its
    address, enable monitoring, install the tenant's key with a fresh one-time password,
    and write the hand-off bundle (signed by the provider, the password encrypted to
    the tenant's identity).

    \b
    Output: {"appliance", "ip", "handoff"} without --count; with --count N (1 included)
    always {"appliances": [{"appliance", "ip", "handoff"}, ...]}. Every error's JSON
    carries "request_id" ({"error": {..., "request_id"}}): rerun with --request-id
    REQUEST_ID to resume. Exit 5 when no appliance is free or a quota would be exceeded
    (nothing changes); a failed appliance is left 'failed' with the reason.

    Spares: each stamp holds back the number of available appliances its inventory
    entry names ('spares: N'); they are left alone, and a request only they could serve
    exits 5 saying so, unless --use-spares is given."""
    from hsmctl.provider.provisioning import provision as run

    # The request's id is chosen here when not given, so that every error can name it:
    # the store would make the same kind of id itself (a UUID) for a new request.
    rid = request_id if request_id is not None else str(uuid.uuid4())
    try:
        with CliProgress() as progress:
            outcome = run(
                config_path(ctx),
                tenant=tenant,
                vnet=vnet,
                subnet=subnet,
                ip=ip,
                stamp=stamp,
                request_id=rid,
                count=1 if count is None else count,
                progress=progress,
                use_spares=use_spares,
            )
    except HsmctlError as exc:
        exc.detail.setdefault("request_id", rid)
        if exc.exit_code not in (UsageError.exit_code, ConflictError.exit_code):
            # Something may have been done: say how to pick the request up again.
            exc.message = _resumable(exc.message, rid)
            exc.args = (exc.message, *exc.args[1:])
        raise
    payload = provisioned_payload([p.as_dict() for p in outcome.provisioned], listed=count)
    if outcome.failures:
        first = next(iter(outcome.failures.values()))
        raise PartialFailure(
            _resumable(f"{len(outcome.failures)} appliance(s) failed: {first}", rid),
            results={k: v.exit_code for k, v in outcome.failures.items()},
            detail={
                **payload,
                "failed": {k: str(v) for k, v in outcome.failures.items()},
                "request_id": rid,
            },
        )
    emit(as_json, payload, _provisioned_text)


def provisioned_payload(items: list[dict[str, Any]], *, listed: int | None) -> dict[str, Any]:
    """SPEC §6's two shapes, chosen by whether --count was given (``listed``), never by
    how many appliances there are: automation that passes --count parses one form."""
    if listed is not None:
        return {"appliances": items}
    return items[0] if items else {}


def _resumable(message: str, request_id: str) -> str:
    return f"{message} (request {request_id}: rerun with --request-id {request_id} to resume)"


def _provisioned_text(p: dict[str, Any]) -> str:
    items = p.get("appliances", [p] if "appliance" in p else [])
    return "\n".join(f"{i['appliance']}  {i['ip']}  hand-off: {i['handoff']}" for i in items)


@click.group()
def fleet() -> None:
    """The provider's fleet as recorded in the state store (no device contact)."""


def _row(a: Any) -> dict[str, Any]:
    return {
        "id": a.id,
        "stamp": a.stamp,
        "state": str(a.state),
        "tenant": a.tenant,
        "ip": a.data_ip,
    }


@fleet.command("list")
@json_option
@click.pass_context
def fleet_list(ctx: click.Context, as_json: bool) -> None:
    """List every appliance: id, stamp, state, tenant and data address.

    \b
    States: available, provisioning, provisioned, customer-owned, deprovisioning, failed."""
    from hsmctl.provider.context import open_context

    pctx = open_context(config_path(ctx))
    try:
        rows = [_row(a) for a in pctx.store.list_appliances()]
    finally:
        pctx.close()

    emit(as_json, {"appliances": rows}, _fleet_text)


def _fleet_text(p: dict[str, Any]) -> str:
    return table(
        ["ID", "STAMP", "STATE", "TENANT", "IP"],
        ([a["id"], a["stamp"], a["state"], a["tenant"], a["ip"]] for a in p["appliances"]),
    )


@fleet.command("show")
@click.argument("appliance", shell_complete=complete_appliance)
@json_option
@click.pass_context
def fleet_show(ctx: click.Context, appliance: str, as_json: bool) -> None:
    """Show one appliance: its record, allocation, pinned host keys and journal."""
    from hsmctl.provider.context import open_context
    from hsmctl.state.model import Interface

    pctx = open_context(config_path(ctx))
    try:
        a = pctx.store.get_appliance(appliance)
        alloc = pctx.store.allocation(appliance)
        payload: dict[str, Any] = {
            **_row(a),
            "region": a.region,
            "serial": a.serial,
            "model": a.model,
            "mgmt_ip": a.mgmt_ip,
            "failure_reason": a.failure_reason,
            "allocation": None
            if alloc is None
            else {
                "request_id": alloc.request_id,
                "tenant": alloc.tenant,
                "vnet": alloc.vnet,
                "subnet": alloc.subnet,
                "ip": alloc.ip,
            },
            "host_keys": {
                iface.value: [k.fingerprint for k in pctx.store.host_keys(appliance, iface)]
                for iface in Interface
            },
            "journal": [
                {
                    "time": e.time.isoformat(),
                    "operation": str(e.operation),
                    "step": e.step,
                    "status": str(e.status),
                }
                for e in pctx.store.journal(appliance=appliance)[-20:]
            ],
        }
    finally:
        pctx.close()
    emit(as_json, payload, _show_text)


def _show_text(p: dict[str, Any]) -> str:
    """``fleet show``: the record as aligned ``key  value`` lines, then the journal as a
    table (never a Python repr: nothing is ``None`` or ``{...}`` on screen)."""
    journal = p.get("journal") or []
    if not journal:
        return key_values(p)  # "journal  -"
    text = key_values(p, omit=("journal",))
    rows = ([e["time"], e["operation"], e["step"], e["status"]] for e in journal)
    return f"{text}\n\njournal (last {len(journal)}):\n" + table(
        ["TIME", "OPERATION", "STEP", "STATUS"], rows
    )


@click.command()
@click.argument("appliance", shell_complete=complete_appliance)
@click.option("--yes", is_flag=True, help="Confirm: the appliance is zeroized for good.")
@click.option(
    "--release",
    "release_file",
    type=click.Path(dir_okay=False),
    help="The tenant's signed release (made with 'hsmctl release' in the tenant network).",
)
@click.option("--force", is_flag=True, help="Deprovision without a release (needs --reason).")
@click.option("--reason", help="Why --force is used; recorded in the journal.")
@json_option
@click.pass_context
def deprovision(
    ctx: click.Context,
    appliance: str,
    yes: bool,
    release_file: str | None,
    force: bool,
    reason: str | None,
    as_json: bool,
) -> None:
    """Zeroize APPLIANCE over the out-of-band path and return it to the pool.

    Needs --yes and either the tenant's signed release (checked against the tenant's
    key in the inventory, this appliance and tenant, and the current allocation, so an
    old release cannot be replayed) or --force --reason TEXT (recorded). Then, each step
    journaled: snapshot the audit key and data host keys, factory reset through the
    console (works after the customer revoked the provider's access), verify (token
    wiped, owner state factory, new data host keys, new audit key, the reset in the
    device's own activity log, the provider key accepted again), detach the data port,
    write the zeroization record, and free the appliance and its address.

    \b
    Output: {"appliance", "state"}.
    Exit 2: missing --yes, no release or --force, wrong release file (nothing changed);
    3: a release whose signature does not verify, or a replayed one; 5: the appliance is
    available or still provisioning. Interrupted, the same command finishes the run."""
    from hsmctl.provider.deprovisioning import deprovision as run

    with CliProgress() as progress:
        result = run(
            config_path(ctx),
            appliance,
            yes=yes,
            release=release_file,
            force=force,
            reason=reason,
            progress=progress,
        )
    emit(as_json, dict(result), lambda p: f"{p['appliance']}: {p['state']}")
