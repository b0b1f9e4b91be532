"""``hsmctl fleet capacity`` and ``hsmctl fleet reconcile``: added to the ``fleet`` group
of :mod:`hsmctl.cli.provider` when this module is imported (``hsmctl.cli.main`` does)."""

from __future__ import annotations

from typing import Any

import click

from hsmctl.cli.output import config_path, emit, json_option
from hsmctl.cli.progress import CliProgress
from hsmctl.cli.provider import fleet
from hsmctl.cli.render import table
from hsmctl.errors import PartialFailure


@fleet.command("capacity")
@json_option
@click.pass_context
def fleet_capacity(ctx: click.Context, as_json: bool) -> None:
    """Capacity per region and stamp, from the inventory and the state store (no device
    contact).

    \b
    available       what 'hsmctl provision' can still take (spares excluded)
    spares          available appliances the stamp holds back now (the inventory's
                    'spares: N' on the stamp; provisioning takes them only with
                    --use-spares)
    provisioning, provisioned, customer_owned, deprovisioning, failed: by state

    \b
    Output: {"stamps": [{"region", "stamp", "total", "available", "spares",
             "spares_configured", "provisioning", "provisioned", "customer_owned",
             "deprovisioning", "failed"}], "totals": {the same numbers, summed}}.
    Exit 2: the inventory is invalid (a bad 'spares' value included)."""
    from hsmctl.provider.capacity import capacity

    emit(as_json, capacity(config_path(ctx)).as_dict(), _capacity_text)


def _capacity_text(p: dict[str, Any]) -> str:
    cols = ["REGION", "STAMP", "TOTAL", "AVAILABLE", "SPARES", "PROVISIONED", "CUSTOMER", "FAILED"]
    keys = ["total", "available", "spares", "provisioned", "customer_owned", "failed"]
    rows = [[s["region"], s["stamp"], *(s[k] for k in keys)] for s in p["stamps"]]
    rows.append(["all", "", *(p["totals"][k] for k in keys)])
    return table(cols, rows)


@fleet.command("reconcile")
@click.option(
    "--apply",
    "apply_",
    is_flag=True,
    help="Fix what can be proved (fabric attachment, the store following a customer "
    "takeover); journaled. Never logs in to a device.",
)
@json_option
@click.pass_context
def fleet_reconcile(ctx: click.Context, apply_: bool, as_json: bool) -> None:
    """Compare the state store with the devices, the network fabric and the inventory,
    and report drift.

    Each device's owner state and data address are read over the out-of-band console
    (read-only commands: 'hsm show', 'network show'; they appear in the device's
    activity log), its data port's place from the fabric. Drift kinds: state (store
    state vs device owner state), attachment (data port not where the allocation
    says), address (device data address vs the allocated one), orphan (allocated to a
    tenant the inventory no longer has), not-in-inventory.

    \b
    --apply fixes only what it can prove, each fix journaled (operation 'reconcile'):
      attachment   re-plug the data port into the allocated subnet (the device's owner
                   state agrees with the store), or unplug an available appliance that
                   is in factory state
      state        provisioned in the store, customer-owned on the device: the store
                   follows the device
    Everything else (orphans, resets behind the store's back, a customer-owned device
    the store calls free, addresses) is reported with why it needs a person. A
    customer-owned device's accounts, keys and secrets are never touched.

    \b
    Output: {"checked", "applied", "drift": [{"kind", "appliance", "store", "device",
             "fixable", "why", "fix"(, "fixed", "result" with --apply)}], "errors":
             [{"appliance", "error"}]}.
    Exit 0 when every device was read, drift or not (drift is the report, not a
    failure: test "drift" in the JSON); 4 a device could not be reached; 1 a device
    read or a fix failed (the most severe wins)."""
    from hsmctl.provider.reconcile import reconcile

    with CliProgress() as progress:
        report = reconcile(config_path(ctx), apply=apply_, progress=progress)
    payload = report.as_dict()
    if report.exit_code:
        problems = [f"{e.appliance}: {e.error}" for e in report.errors] + [
            f"{d.appliance}: {d.kind.value}: {d.result}" for d in report.drift if d.fixed is False
        ]
        raise PartialFailure(
            "; ".join(problems) or "reconcile failed",
            results={
                **{e.appliance: e.exit_code for e in report.errors},
                **{f"{d.appliance}/{d.kind.value}": 1 for d in report.drift if d.fixed is False},
            },
            detail=payload,
        )
    emit(as_json, payload, _reconcile_text)


def _reconcile_text(p: dict[str, Any]) -> str:
    if not p["drift"]:
        return f"no drift ({p['checked']} appliance(s) checked)"
    rows = [
        [
            d["appliance"],
            d["kind"],
            d["store"],
            d["device"],
            ("fixed" if d["fixed"] else "not fixed")
            if "fixed" in d
            else ("fixable" if d["fixable"] else "no"),
            d["why"],
        ]
        for d in p["drift"]
    ]
    return table(["ID", "KIND", "STORE", "DEVICE", "FIX", "WHY"], rows)
