"""Provider-side commands: provision, deprovision, fleet, health."""

from __future__ import annotations

from typing import Any

import click

from hsmctl.cli.output import CliProgress, config_path, emit, json_option
from hsmctl.errors import PartialFailure


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
    default=1,
    show_default=True,
    help="Provision this many appliances in parallel.",
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
    count: int,
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
    Output: {"appliance", "ip", "handoff"}; with --count, {"appliances": [...]}.
    Exit 5 when no appliance is free or a quota would be exceeded (nothing changes);
    a failed appliance is left 'failed' with the reason; rerun with the same
    --request-id to resume."""
    from hsmctl.provider.provisioning import provision as run

    outcome = run(
        config_path(ctx),
        tenant=tenant,
        vnet=vnet,
        subnet=subnet,
        ip=ip,
        stamp=stamp,
        request_id=request_id,
        count=count,
        progress=CliProgress(),
    )
    items = [p.as_dict() for p in outcome.provisioned]
    payload: dict[str, Any] = {"appliances": items} if count > 1 else (items[0] if items else {})
    if outcome.failures:
        first = next(iter(outcome.failures.values()))
        raise PartialFailure(
            f"{len(outcome.failures)} appliance(s) failed: {first}",
            results={k: v.exit_code for k, v in outcome.failures.items()},
            detail={**payload, "failed": {k: str(v) for k, v in outcome.failures.items()}},
        )
    emit(as_json, payload, _provisioned_text)


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

    def text(p: dict[str, Any]) -> str:
        lines = [f"{'ID':<8} {'STAMP':<8} {'STATE':<15} {'TENANT':<10} IP"]
        for a in p["appliances"]:
            lines.append(
                f"{a['id']:<8} {a['stamp']:<8} {a['state']:<15} "
                f"{a['tenant'] or '-':<10} {a['ip'] or '-'}"
            )
        return "\n".join(lines)

    emit(as_json, {"appliances": rows}, text)


@fleet.command("show")
@click.argument("appliance")
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
    emit(as_json, payload, lambda p: "\n".join(f"{k}: {v}" for k, v in p.items()))


@click.command()
@click.argument("appliance")
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

    result = run(
        config_path(ctx),
        appliance,
        yes=yes,
        release=release_file,
        force=force,
        reason=reason,
        progress=CliProgress(),
    )
    emit(as_json, dict(result), lambda p: f"{p['appliance']}: {p['state']}")


@click.command()
@click.argument("appliance", required=False)
@click.option("--all", "all_", is_flag=True, help="Every appliance in the inventory (default).")
@json_option
@click.pass_context
def health(ctx: click.Context, appliance: str | None, all_: bool, as_json: bool) -> None:
    """Probe appliances the way the provider may: through the monitoring account
    (hsm show, no secrets) and a provider-key login on the management interface.

    Reports whether each appliance is reachable, its owner state, whether the provider
    key is still accepted and how the monitor login went (ok, refused, unreachable,
    host-key-mismatch, failed). Updates the store: a provisioned appliance that the
    device reports customer-owned, or that refuses the provider key, becomes
    customer-owned.

    \b
    Output: {"appliances": [{"appliance", "reachable", "owner_state",
             "provider_key_accepted", "monitor", "state"}]}.
    Exit code: the most severe over the appliances (3 host key mismatch, 4 unreachable,
    1 failed)."""
    from hsmctl.provider.health import health as run

    if appliance and all_:
        raise click.UsageError("give an appliance id or --all, not both")
    report = run(config_path(ctx), [appliance] if appliance else None, progress=CliProgress())
    payload = report.as_dict()
    if report.exit_code:
        bad = [a for a in report.appliances if a.exit_code]
        raise PartialFailure(
            f"{len(bad)} appliance(s) unhealthy: "
            + "; ".join(f"{a.appliance}: {', '.join(a.errors) or 'failed'}" for a in bad),
            results={a.appliance: a.exit_code for a in report.appliances},
            detail=payload,
        )

    def text(p: dict[str, Any]) -> str:
        lines = [f"{'ID':<8} {'REACHABLE':<10} {'OWNER':<15} {'PROVIDER KEY':<13} MONITOR"]
        for a in p["appliances"]:
            key = {True: "accepted", False: "refused", None: "-"}[a["provider_key_accepted"]]
            lines.append(
                f"{a['appliance']:<8} {('yes' if a['reachable'] else 'no'):<10} "
                f"{a['owner_state'] or '-':<15} {key:<13} {a['monitor']}"
            )
        return "\n".join(lines)

    emit(as_json, payload, text)
