"""``hsmctl logs``: collect, verify and export appliances' activity logs (customer side)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hsmctl.cli.complete import complete_appliance
from hsmctl.cli.output import config_path, emit, json_option
from hsmctl.cli.progress import CliProgress
from hsmctl.cli.render import Col, table
from hsmctl.errors import PartialFailure

_wait_option = click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="How long to wait for a busy archive before exit 5 "
    "(default: 0 for collect, 60 for verify and export).",
)


@click.group()
def logs() -> None:
    """Collect, verify and export appliances' activity logs (run inside the tenant
    network, as the appliances' `audit` account)."""


@logs.command("collect")
@click.option(
    "--appliance",
    "appliances",
    multiple=True,
    metavar="ID",
    help="Appliance to collect.",
    shell_complete=complete_appliance,
)
@click.option("--all", "all_", is_flag=True, help="Every appliance taken over from here.")
@click.option(
    "--parallel",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Appliances collected at the same time.",
)
@click.option(
    "--workers",
    type=click.IntRange(0, 64),
    default=None,
    help="Processes verifying large logs (0: in the collecting thread, the default when the "
    "compiled byte scan is built; else the default is one per CPU).",
)
@_wait_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=3600,
    show_default=True,
    metavar="SECONDS",
    help="Limit for one appliance's whole run, from taking its archive lock (connection "
    "included); a stalled export ends sooner, after 120 s without a byte.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0.1),
    default=10,
    show_default=True,
    metavar="SECONDS",
)
@click.option(
    "--key-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="CREDENTIALS_DIRECTORY",
    help="Directory with collector keys named collector-key_ID or ID "
    "(default: $CREDENTIALS_DIRECTORY, e.g. systemd LoadCredential=); else the escrow.",
)
@json_option
@click.pass_context
def collect(
    ctx: click.Context,
    appliances: tuple[str, ...],
    all_: bool,
    parallel: int,
    workers: int | None,
    wait: float | None,
    timeout: float,
    connect_timeout: float,
    key_dir: Path | None,
    as_json: bool,
) -> None:
    """Pull each appliance's new activity-log records, verify them and archive them.

    Incremental (from the archive's head, which the device must still hold), verified
    before anything is stored (hash chain, no gaps, checkpoint and key-rotation
    signatures against the pinned audit keys), appended to the appliance's archive in
    the state directory; the cursor moves only after the records are fsynced.

    \b
    Output: {"appliances": [{"appliance", "new_records", "last_seq", "verified"}]}.
    Exit 3: the log was tampered with (the report names the records; the archive is
    unchanged); 4: unreachable; 5: the archive is busy; over several appliances the most
    severe (3, 4, 1, 5) — the others are still collected."""
    from hsmctl.collect.appliances import collected_appliances, state_dir
    from hsmctl.collect.collector import CollectOptions, Collector

    if all_ == bool(appliances):
        raise click.UsageError("give --appliance ID (repeatable) or --all")
    state = state_dir(config_path(ctx))
    targets = collected_appliances(state) if all_ else list(appliances)
    options = CollectOptions(
        lock_wait=0.0 if wait is None else wait,
        timeout=timeout,
        connect_timeout=connect_timeout,
        parallel=parallel,
        key_dir=key_dir,
        **({} if workers is None else {"workers": workers}),
    )
    with CliProgress(quiet=as_json) as progress:
        report = Collector(state, options, progress).run(targets)
    payload = report.as_dict()
    if report.exit_code:
        bad = [o for o in report.appliances if o.error is not None]
        raise PartialFailure(
            f"{len(bad)} of {len(report.appliances)} appliance(s) failed: "
            + "; ".join(str(o.error) for o in bad),
            results={o.appliance: o.exit_code for o in report.appliances},
            detail=payload,
        )

    emit(as_json, payload, _collected_text)


def _collected_text(p: dict[str, Any]) -> str:
    if not p["appliances"]:
        return "no appliances to collect"
    return table(
        ["ID", Col("NEW", "right"), Col("LAST_SEQ", "right"), "VERIFIED"],
        ([a["appliance"], a["new_records"], a["last_seq"], a["verified"]] for a in p["appliances"]),
    )


@logs.command("verify")
@click.argument("appliance", shell_complete=complete_appliance)
@_wait_option
@click.option("--workers", type=click.IntRange(0, 64), default=None)
@json_option
@click.pass_context
def verify(
    ctx: click.Context, appliance: str, wait: float | None, workers: int | None, as_json: bool
) -> None:
    """Re-verify APPLIANCE's whole archive offline, from record 1, with the pinned audit
    keys only; and check the cursor says what the chain proves. Exit 3 on any violation.

    \b
    Output: {"appliance", "verified", "records", "last_seq", "last_checkpoint",
    "segments", "trusted_keys", "retired_keys"}."""
    from hsmctl.collect.appliances import state_dir
    from hsmctl.collect.verify import verify_archive

    report = verify_archive(
        state_dir(config_path(ctx)),
        appliance,
        wait=60.0 if wait is None else wait,
        workers=workers,
    )
    emit(
        as_json,
        report.as_dict(),
        lambda p: (
            f"{p['appliance']}: {p['records']} records verified through {p['last_seq']} "
            f"({p['segments']} segments)"
        ),
    )


@logs.command("export")
@click.argument("appliance", shell_complete=complete_appliance)
@click.option(
    "--after", type=click.IntRange(min=0), default=0, metavar="SEQ", help="Records after SEQ."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "syslog"]),
    default="jsonl",
    show_default=True,
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to FILE (whole or not at all) instead of stdout.",
)
@click.option(
    "--syslog",
    metavar="URL",
    help="Send to a syslog receiver: tcp://HOST:PORT (RFC 6587 octet counting) or "
    "udp://HOST:PORT (one message per datagram).",
)
@_wait_option
@json_option
@click.pass_context
def export(
    ctx: click.Context,
    appliance: str,
    after: int,
    fmt: str,
    output: Path | None,
    syslog: str | None,
    wait: float | None,
    as_json: bool,
) -> None:
    """Export APPLIANCE's archived (verified) records after --after SEQ as JSON lines or
    RFC 5424 syslog, to stdout, a file or a syslog receiver.

    \b
    With --json (needs --output or --syslog): {"appliance", "records", "first_seq",
    "last_seq", "format", "destination"}."""
    from hsmctl.collect.appliances import state_dir
    from hsmctl.collect.export import Format, export_appliance

    if as_json and output is None and syslog is None:
        raise click.UsageError("--json prints a summary on stdout: give --output or --syslog")
    result = export_appliance(
        state_dir(config_path(ctx)),
        appliance,
        after=after,
        fmt=Format(fmt),
        output=output,
        syslog=syslog,
        wait=60.0 if wait is None else wait,
    )
    if as_json or output is not None or syslog is not None:
        emit(
            as_json,
            result.as_dict(),
            lambda p: f"{p['appliance']}: {p['records']} records to {p['destination']}",
        )
