"""``hsmctl health``: poll appliances the way the provider may, store the poll, alert."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hsmctl.cli.complete import complete_appliance
from hsmctl.cli.output import config_path, emit, json_option
from hsmctl.cli.progress import CliProgress
from hsmctl.cli.render import table
from hsmctl.errors import PartialFailure


@click.command()
@click.argument("appliance", required=False, shell_complete=complete_appliance)
@click.option("--all", "all_", is_flag=True, help="Every appliance in the inventory (default).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "prometheus"]),
    default=None,
    help="table (default), json (same as --json) or prometheus (text exposition format).",
)
@click.option(
    "--textfile",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the Prometheus text to this *.prom file, atomically "
    "(node_exporter's textfile collector directory).",
)
@click.option(
    "--syslog",
    metavar="URL",
    help="Send raised and cleared alerts to udp://HOST:PORT or tcp://HOST:PORT "
    "(RFC 5424; default: health_syslog in the configuration).",
)
@click.option(
    "--alert-polls",
    type=click.IntRange(min=1),
    help="Bad polls within the window that raise an alert (default: health_alert_polls, else 3).",
)
@click.option(
    "--alert-window",
    type=click.IntRange(min=1),
    metavar="MINUTES",
    help="The alert window in minutes (default: health_alert_window_minutes, else 60).",
)
@json_option
@click.pass_context
def health(
    ctx: click.Context,
    appliance: str | None,
    all_: bool,
    fmt: str | None,
    textfile: Path | None,
    syslog: str | None,
    alert_polls: int | None,
    alert_window: int | None,
    as_json: bool,
) -> None:
    """Poll appliances the way the provider may, store each poll, raise and clear alerts.

    Per appliance: the monitoring account's hsm show (no secrets) on the management
    interface, a provider-key login only when monitoring does not answer, and the
    hardware sensors (temperature, power supplies, fans) out of band. An appliance whose
    customer disabled monitoring reports "no telemetry (customer choice)" and raises no
    sensor alert. Each poll is stored; an alert is raised after --alert-polls bad polls
    within --alert-window minutes (3 within 60 by default) and cleared by the first good
    poll; both are sent to the syslog receiver (RFC 5424). Run it on a schedule
    (deploy/systemd/hsmctl-health.timer, playbooks/health.yml). The store learns from
    it: a provisioned appliance that the device reports customer-owned, or that refuses
    the provider key, becomes customer-owned.

    \b
    Output: {"appliances": [{"id", "state", "reachable", "alerts": [{"kind", "message",
             "raised_at", "cleared_at"}], "last_ok", "telemetry", "problems", "sensors",
             "appliance", "owner_state", "provider_key_accepted", "monitor"}]}.
    Exit code: the most severe over the appliances (3 host key mismatch, 4 unreachable,
    1 failed); 4 also when the syslog receiver cannot be reached (the poll and its
    alerts are stored all the same). Alerts themselves do not change the exit code."""
    from hsmctl.provider.pollplan import plan_poll

    if appliance and all_:
        raise click.UsageError("give an appliance id or --all, not both")
    if fmt == "json":
        as_json = True
    if as_json and fmt == "prometheus":
        raise click.UsageError("give --json or --format prometheus, not both")
    targets = [appliance] if appliance else None
    # Planned (and the devices contacted) before the heavy imports: see hsmctl.provider.health.
    with plan_poll(config_path(ctx), targets) as plan:
        from hsmctl.provider import metrics
        from hsmctl.provider.health import health as run

        with CliProgress() as progress:
            report = run(
                config_path(ctx),
                targets,
                progress=progress,
                alert_polls=alert_polls,
                alert_window_minutes=alert_window,
                syslog=syslog,
                plan=plan,
            )
    payload = report.as_dict()
    if textfile is not None or fmt == "prometheus":
        text = metrics.render(report)
        if textfile is not None:
            metrics.write_textfile(textfile, text)
    if report.exit_code:
        bad = [a for a in report.appliances if a.exit_code]
        problems = [f"{a.appliance}: {', '.join(a.errors) or 'failed'}" for a in bad]
        if report.notify_error:
            problems.append(f"alerts not sent: {report.notify_error}")
        raise PartialFailure(
            f"{len(bad)} appliance(s) unhealthy: " + "; ".join(problems),
            results={
                **{a.appliance: a.exit_code for a in report.appliances},
                **({"syslog": 4} if report.notify_error else {}),
            },
            detail=payload,
        )
    if fmt == "prometheus":
        click.echo(text, nl=False)
        return
    emit(as_json, payload, _health_text)


def _health_text(p: dict[str, Any]) -> str:
    def key(accepted: bool | None) -> str | None:
        return None if accepted is None else ("accepted" if accepted else "refused")

    return table(
        ["ID", "REACHABLE", "OWNER", "PROVIDER_KEY", "MONITOR", "STATE", "TELEMETRY", "ALERTS"],
        (
            [
                a["appliance"],
                a["reachable"],
                a["owner_state"],
                key(a["provider_key_accepted"]),
                a["monitor"],
                a.get("state"),
                a.get("telemetry"),
                [x["kind"] for x in a.get("alerts", [])],
            ]
            for a in p["appliances"]
        ),
    )
