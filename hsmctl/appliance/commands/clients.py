"""Application clients (SPEC §11): ``client register|list|revoke``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hsmctl import utc
from hsmctl.appliance import accounts, p11service, protocol, store
from hsmctl.appliance.commands.common import Context, Reply, as_json
from hsmctl.appliance.grammar import Command

if TYPE_CHECKING:
    from hsmctl.appliance.daemon import Daemon


def client_register(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    name, role = cmd.get_str("name"), cmd.get_str("role")
    if not store.customer_owned_fact():
        return Reply(exit=protocol.EXIT_DENIED, error="the device is not customer-owned",
                      outcome="denied", log_detail={"rule": "not-customer-owned"})  # fmt: skip
    if name in p11service.load_clients():
        return Reply.usage(f"client {name} is already registered (revoke it first)")
    fingerprint, key_type = accounts.check_client_key(secrets[0])
    accounts.create_client(name, secrets[0])
    entry = {
        "role": role,
        "fingerprint": fingerprint,
        "key_type": key_type,
        "registered": utc.stamp(),
    }
    with daemon.p11.lock:
        clients = p11service.load_clients()
        clients[name] = entry
        p11service.save_clients(clients)
    account = accounts.client_account(name)
    return Reply(
        output=as_json({"client": name, "account": account, **entry}),
        log_detail={"client": name, "account": account, **entry},
    )


def client_list(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    running = daemon.p11.sessions()
    clients = [
        {
            "name": name,
            "role": entry.get("role"),
            "fingerprint": entry.get("fingerprint"),
            "registered": entry.get("registered"),
            "connections": running.get(name, 0),
        }
        for name, entry in sorted(p11service.load_clients().items())
    ]
    return Reply(output=as_json({"clients": clients}))


def client_revoke(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    name = cmd.get_str("name")
    entry = daemon.p11.forget(name)
    if entry is None:
        return Reply.usage(f"no client named {name}")
    ended = daemon.p11.revoke(name)
    ended += accounts.delete_client(name)
    return Reply(
        output=f"client {name} revoked; {ended} process(es) ended",
        log_detail={"client": name, "role": entry.get("role"),
                    "fingerprint": entry.get("fingerprint"), "ended": ended},
    )  # fmt: skip


def revoke_all_clients(daemon: Daemon) -> None:
    for name in list(p11service.load_clients()):
        daemon.p11.forget(name)
        daemon.p11.revoke(name)
        accounts.delete_client(name)
