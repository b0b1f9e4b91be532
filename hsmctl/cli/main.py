"""``hsmctl`` entry point: the group, global options and the one exit-code handler."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from hsmctl import __version__
from hsmctl.cli import backup as backup_cli
from hsmctl.cli import clients as clients_cli
from hsmctl.cli import customer as customer_cli
from hsmctl.cli import fleet as fleet_cli  # noqa: F401  (fleet capacity, fleet reconcile)
from hsmctl.cli import ha as ha_cli
from hsmctl.cli import health as health_cli
from hsmctl.cli import lab as lab_cli
from hsmctl.cli import logs as logs_cli
from hsmctl.cli import provider as provider_cli
from hsmctl.cli.output import error
from hsmctl.errors import HsmctlError, UnreachableError

EPILOG = """\b
Exit codes: 0 ok; 1 operation failed; 2 usage or input error (nothing changed);
3 integrity or identity violation; 4 unreachable or timeout; 5 conflict
(no capacity, quota, busy, wrong state); 130 interrupted (Ctrl-C).

\b
Configuration: --config FILE, else $HSMCTL_CONFIG, else /etc/hsmctl/hsmctl.yaml.
Every command accepts --json after the subcommand."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(__version__, prog_name="hsmctl")
@click.option(
    "--config",
    "config_path",
    metavar="FILE",
    envvar=None,
    help="Configuration file (default: $HSMCTL_CONFIG or /etc/hsmctl/hsmctl.yaml).",
)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """hsmctl: provision dedicated HSM appliances, hand them over, and collect their
    verified activity logs.

    Provider engineers manage the fleet and the lab from the orchestrator host;
    customer operators run the takeover and log collection from inside their own
    network."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


cli.add_command(lab_cli.lab)
cli.add_command(provider_cli.provision)
cli.add_command(provider_cli.fleet)
cli.add_command(provider_cli.deprovision)
cli.add_command(health_cli.health)
cli.add_command(customer_cli.takeover)
cli.add_command(customer_cli.release)
cli.add_command(logs_cli.logs)
cli.add_command(clients_cli.client)
cli.add_command(clients_cli.key)
cli.add_command(backup_cli.domain)
cli.add_command(backup_cli.backup)
cli.add_command(backup_cli.restore)
cli.add_command(ha_cli.ha)


def _wants_json(argv: list[str]) -> bool:
    return "--json" in argv


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=args, prog_name="hsmctl", standalone_mode=False)
    except HsmctlError as exc:
        _fail(args, exc.exit_code, str(exc), exc.detail)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.Abort as exc:
        # click's main() turns an EOFError or a KeyboardInterrupt escaping a command into
        # Abort (``raise Abort() from e``); only a real abort (a prompt's end of input)
        # is "aborted". Ctrl-C is 130, the shell's code for SIGINT. A bare EOFError is
        # how paramiko reports a dropped connection: the SSH transport translates every
        # path it knows, so one reaching here escaped that boundary; a lost connection
        # is still exit 4 (unreachable: retry later), never a silent "aborted" exit 1.
        cause = exc.__cause__
        if isinstance(cause, KeyboardInterrupt):
            error("interrupted")
            return 130
        if isinstance(cause, EOFError):
            lost = UnreachableError(
                "the connection closed unexpectedly (an end of input no boundary translated:"
                " please report it)"
            )
            _fail(args, lost.exit_code, str(lost), lost.detail)
            return lost.exit_code
        error("aborted")
        return 1
    except click.exceptions.NoArgsIsHelpError as exc:
        # `hsmctl` or `hsmctl fleet` alone: the help once, on stderr, exit 2 (a usage
        # error, as click's own standalone mode does) — not "error: <help>" + usage again.
        if _wants_json(args):
            _fail(args, 2, f"{exc.ctx.command_path}: a command is required", {})
        click.echo(exc.format_message(), err=True)
        return 2
    except click.ClickException as exc:
        code = exc.exit_code if exc.exit_code else 2
        _fail(args, code, exc.format_message(), {})
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            click.echo(exc.ctx.get_usage(), err=True)
        return code
    except KeyboardInterrupt:
        error("interrupted")
        return 130
    except Exception as exc:
        # A bug, not an input: still one JSON object and exit 1, never a traceback.
        if isinstance(exc, BrokenPipeError):
            # stdout's reader left (`hsmctl fleet list | head -1`): no one to tell, and
            # the interpreter's own flush at exit must not fail a second time.
            import contextlib
            import os

            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        _fail(args, 1, f"internal error: {type(exc).__name__}: {exc}", {})
        return 1
    return 0


def _fail(args: list[str], code: int, message: str, detail: dict[str, Any]) -> None:
    error(message)
    if _wants_json(args):
        # The detail never overrides the exit code or the message, and a value JSON cannot
        # hold is written as text: the error report itself must not fail.
        body = {**detail, "exit_code": code, "message": message}
        click.echo(json.dumps({"error": body}, default=str))


def run() -> None:
    sys.exit(main())
