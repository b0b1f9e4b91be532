"""The table from a device command's words to its handler (``commands/``), and the one
place a handler's errors become a reply.

A handler takes the parsed command and the stdin secrets and returns a :class:`Reply`:
text for the caller, an exit status, an outcome for the activity log, and detail for the
log that never holds a secret.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from hsmctl.appliance import accounts, protocol, store, token
from hsmctl.appliance.commands import audit, clients, hsm, network, sysconf, users
from hsmctl.appliance.commands.common import Context, Reply
from hsmctl.appliance.grammar import Command, help_text
from hsmctl.appliance.roles import authorize_spec
from hsmctl.errors import HsmctlError, UsageError

if TYPE_CHECKING:
    from hsmctl.appliance.daemon import Daemon

__all__ = ["Context", "Handler", "Handlers", "Reply"]

Handler = Callable[["Daemon", Context, Command, list[str]], Reply]


def _help(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    state = ctx.owner.device_state()
    return Reply(output=help_text(lambda spec: authorize_spec(ctx.role, spec, state)))


def _exit(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    return Reply()


TABLE: dict[tuple[str, ...], Handler] = {
    ("help",): _help,
    ("exit",): _exit,
    ("hsm", "show"): hsm.hsm_show,
    ("hsm", "policy", "show"): hsm.policy_show,
    ("client", "register"): clients.client_register,
    ("client", "list"): clients.client_list,
    ("client", "revoke"): clients.client_revoke,
    ("hsm", "init"): hsm.hsm_init,
    ("hsm", "zeroize"): hsm.hsm_zeroize,
    ("hsm", "domain", "set"): hsm.domain_set,
    ("hsm", "backup-sign"): hsm.backup_sign,
    ("hsm", "co-pin", "set"): hsm.co_pin_set,
    ("hsm", "co-pin", "change"): hsm.co_pin_change,
    ("user", "password"): users.user_password,
    ("user", "list"): users.user_list,
    ("user", "enable"): users.user_enable,
    ("user", "disable"): users.user_disable,
    ("user", "credential", "set"): users.credential_set,
    ("user", "otp", "set"): users.otp_set,
    ("sysconf", "provider-access", "show"): sysconf.provider_access_show,
    ("sysconf", "provider-access", "revoke"): sysconf.provider_access_revoke,
    ("sysconf", "hostkey", "show"): sysconf.hostkey_show,
    ("sysconf", "hostkey", "stage"): sysconf.hostkey_stage,
    ("sysconf", "hostkey", "activate"): sysconf.hostkey_activate,
    ("sysconf", "factory-reset"): sysconf.factory_reset,
    ("network", "show"): network.network_show,
    ("network", "set"): network.network_set,
    ("audit", "show"): audit.audit_show,
    ("audit", "export"): audit.audit_export,
    ("audit", "ack"): audit.audit_ack,
    ("audit", "verify"): audit.audit_verify,
    ("audit", "key", "show"): audit.audit_key_show,
    ("audit", "key", "rotate"): audit.audit_key_rotate,
}


class Handlers:
    """The daemon's handlers: created once with the daemon, ``run`` per command."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.table = TABLE

    def run(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        need = len(cmd.spec.stdin)
        if len(secrets) != need:
            return Reply.usage(f"{cmd.spec.name} reads {need} value(s) from stdin")
        handler = self.table[cmd.words]
        try:
            return handler(self.daemon, ctx, cmd, secrets)
        except token.TokenError as exc:
            if isinstance(exc, UsageError):
                return Reply.usage(exc.message)
            return Reply(
                exit=protocol.EXIT_FAILED,
                error=exc.message,
                outcome="failed",
                log_detail={"token_error": type(exc).__name__},
            )
        except accounts.AccountError as exc:
            return Reply.usage(str(exc))
        except store.OwnershipError as exc:
            return Reply(
                exit=protocol.EXIT_DENIED,
                error=str(exc),
                outcome="denied",
                log_detail={"rule": "customer-owned"},
            )
        except HsmctlError as exc:
            return Reply.failure(exc.message)
