"""A client kit for an HA group (SPEC §12): ``hsmctl client register --group NAME``.

The client account (same name, role and SSH key) is registered on every member of the
group, as ``admin`` over each member's data interface; the kit reaches the group through
:mod:`.connector` (each new session on a reachable member, last good first) with every
member's pinned host keys (:func:`.kit.ssh_config`).

Journaled, so an interrupted register re-runs to completion: before any member hears of
the key, the key pair is written (fsynced) into the unfinished kit (``.KIT.partial`` next
to the kit's place) and the journal ``STATE/ha/clients/GROUP/NAME.json`` (0600) records
the public key, the role and the kit's place; after each member accepted the key it
records that member. A rerun with the same name, role and kit place goes on from there:
a member that already holds the client with this key (a register that ended before the
journal was written) counts as done; one holding another key or role is a conflict
(exit 5). Only when every member holds the client is the kit finished and renamed into
place, so a kit always matches a client present on every member.

Before anything is registered, every member still to do is probed (TCP, the data port):
one that does not answer is exit 4 and this run registers nothing. A member that fails
later is exit 4 too; the members done so far stay registered and journaled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from hsmctl import privatefiles
from hsmctl.clients import kit
from hsmctl.clients.request import check_client
from hsmctl.clients.workflow import (
    Appliance,
    _public_key_line,
    kit_public_key,
    new_key,
    start_kit,
)
from hsmctl.customer.context import TenantContext
from hsmctl.errors import ConflictError, HsmctlError, UnreachableError, UsageError
from hsmctl.handoff.identity import ssh_fingerprint

JOURNAL_FORMAT = "hsmctl-group-client/1"


def default_kit(ctx: TenantContext, group: str, name: str) -> Path:
    return (ctx.state_dir / "ha" / "kits" / group / name).absolute()


def journal_path(ctx: TenantContext, group: str, name: str) -> Path:
    return ctx.state_dir / "ha" / "clients" / group / f"{name}.json"


def partial_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def _read_journal(path: Path) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConflictError(f"{path}: not a readable register journal ({exc})") from exc
    if doc.get("format") != JOURNAL_FORMAT or not isinstance(doc.get("members"), dict):
        raise ConflictError(f"{path}: not a register journal hsmctl wrote")
    return doc


def _write_journal(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    privatefiles.write_atomic(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())


def _same_pin(members: list[Appliance]) -> None:
    """The application logs in to whichever member it reaches with one PIN."""
    pins = {m.id: m.state.escrowed("co-pin") for m in members}
    known = {p.reveal() for p in pins.values() if p is not None}
    if len(known) > 1:
        raise UsageError(
            "the members' user PINs differ (each takeover set its own): an application "
            "logs in to whichever member it reaches with one PIN; take the members over "
            "with the same --co-pin-file; nothing changed"
        )


def _register_on(member: Appliance, name: str, role: str, line: str, fp: str) -> tuple[bool, str]:
    """Client ``name`` with this key and role on ``member``: (registered now, label)."""
    with member.connect() as conn:
        label = str(member.reply(conn, "hsm show").get("label") or "")
        listed = member.reply(conn, "client list").get("clients") or []
        existing = next((c for c in listed if isinstance(c, dict) and c.get("name") == name),
                        None)  # fmt: skip
        if existing is not None:
            if existing.get("fingerprint") != fp or existing.get("role") != role:
                raise ConflictError(
                    f"{member.id}: client {name} exists there with another key or role "
                    f"({existing.get('role')}, {existing.get('fingerprint')}); revoke it there "
                    "or choose another --name"
                )
            return False, label
        member.reply(conn, f"client register {name} --role {role}", [line])
        return True, label


def register_group(
    ctx: TenantContext,
    group: str,
    name: str,
    role: str,
    public_key: Path | None = None,
    output: Path | None = None,
) -> dict[str, Any]:
    from hsmctl.keys import ha

    check_client(name, role)
    given = _public_key_line(public_key) if public_key is not None else None
    doc = ha.load_group(ctx, group)
    members: list[Appliance] = [ha._owned(ctx, m) for m in doc["members"]]
    _same_pin(members)
    final = output.absolute() if output is not None else default_kit(ctx, group, name)
    try:
        kit.check_kit_path(final)
    except ValueError as exc:
        raise UsageError(f"--output: {exc}") from exc
    path = journal_path(ctx, group, name)
    partial = partial_dir(final)
    journal = _read_journal(path)
    if journal is not None:
        if journal.get("role") != role or journal.get("kit") != str(final):
            raise ConflictError(
                f"client {name} of group {group} was registered (or begun) with role "
                f"{journal.get('role')} and kit {journal.get('kit')}: run it with those, or "
                "revoke it on the members first; nothing changed"
            )
        if given is not None and given != journal.get("public_key"):
            raise ConflictError(
                f"client {name} of group {group} has another public key in its journal; "
                "nothing changed"
            )
        if journal.get("complete"):
            if (final / f"{name}.module").is_file():
                return _result(group, doc, name, role, final, journal, [])
            raise ConflictError(
                f"client {name} of group {group} is registered but its kit {final} is gone "
                "(the private key was only there): revoke it on every member "
                f"(hsmctl client revoke ID --name {name}), remove {path}, and register "
                "again; nothing changed"
            )
        if not journal.get("complete") and kit_public_key(partial, name) != journal["public_key"]:
            raise ConflictError(f"{partial}: the unfinished kit is missing or holds another key")
    else:
        if final.exists() and (not final.is_dir() or any(final.iterdir())):
            raise UsageError(f"--output {final}: exists and is not empty")
        shutil.rmtree(partial, ignore_errors=True)
        if given is None:
            private, line = new_key(name)
            start_kit(partial, name, line, private)
        else:
            line = given
            start_kit(partial, name, line, None)
        journal = {
            "format": JOURNAL_FORMAT,
            "group": group,
            "client": name,
            "role": role,
            "kit": str(final),
            "public_key": line,
            "fingerprint": ssh_fingerprint(line),
            "members": {},
            "complete": False,
        }
        _write_journal(path, journal)
    line = str(journal["public_key"])
    fp = str(journal["fingerprint"])
    todo = [m for m in members if journal["members"].get(m.id) != "registered"]
    down = [m.id for m in todo if not ha._reachable(ctx, m.id)]
    if down:
        done = sorted(journal["members"])
        raise UnreachableError(
            f"{', '.join(down)}: the data port does not answer; nothing registered in this run"
            + (f" (already registered on {', '.join(done)})" if done else "")
            + "; run the same command again when every member answers"
        )
    registered: list[str] = []
    labels: dict[str, str] = dict(journal.get("labels") or {})
    for member in todo:
        try:
            now, labels[member.id] = _register_on(member, name, role, line, fp)
        except HsmctlError as exc:
            done = sorted(journal["members"])
            exc.message = (
                f"{exc.message} (client {name} of group {group} is registered on "
                f"{', '.join(done) or 'no member yet'}; run the same command again to finish)"
            )
            exc.args = (exc.message,)
            raise
        if now:
            registered.append(member.id)
        journal["members"][member.id] = "registered"
        journal["labels"] = labels
        _write_journal(path, journal)
    if not (final / f"{name}.module").is_file():
        _finish(partial, final, name, role, group, members, labels, doc)
    journal["complete"] = True
    _write_journal(path, journal)
    return _result(group, doc, name, role, final, journal, registered)


def _finish(
    partial: Path,
    final: Path,
    name: str,
    role: str,
    group: str,
    members: list[Appliance],
    labels: dict[str, str],
    doc: dict[str, Any],
) -> None:
    host_keys = [k for m in members for k in m.host_keys]
    targets = [(m.data_ip, int(m.state.pins().get("data_port") or 22)) for m in members]
    files = {
        "known_hosts": (kit.group_known_hosts(group, host_keys), 0o644),
        "ssh_config": (kit.ssh_config(final, name, group, targets), 0o644),
        kit.CONNECTOR: (kit.connector_source().decode(), 0o644),
        f"{name}.module": (kit.group_module_file(final, name, group, targets), 0o644),
        "README": (kit.group_readme(final, name, role, group, doc["members"], labels), 0o644),
    }
    for file_name, (text, mode) in files.items():
        privatefiles.write_atomic(partial / file_name, text.encode(), mode=mode)
    if final.exists():
        final.rmdir()
    final.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(final)
    privatefiles.fsync_dir(final.parent)


def _result(
    group: str,
    doc: dict[str, Any],
    name: str,
    role: str,
    final: Path,
    journal: dict[str, Any],
    registered: list[str],
) -> dict[str, Any]:
    return {
        "group": group,
        "members": list(doc["members"]),
        "client": name,
        "role": role,
        "kit": str(final),
        "fingerprint": journal["fingerprint"],
        "registered": registered,
    }
