"""The activity log and its key: ``audit show|export|verify|key show|key rotate``."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from hsmctl import auditlog
from hsmctl.appliance import protocol
from hsmctl.appliance.commands.common import Context, Reply, as_json, device_record
from hsmctl.appliance.grammar import Command
from hsmctl.appliance.logwriter import LogUnavailable

if TYPE_CHECKING:
    from hsmctl.appliance.daemon import Daemon


def _lines_until(fh: Any, end: int) -> Any:
    """The file's lines up to byte ``end`` (a snapshot while appends go on)."""
    done = 0
    for line in fh:
        if done >= end:
            return
        done += len(line)
        yield line


def audit_show(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    count = cmd.get_int("last") or 20
    lines = daemon.log.tail(count)
    return Reply(output="\n".join(line.decode("utf-8") for line in lines))


def audit_export(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    after = cmd.get_int("after") or 0
    # Export works even when the log cannot be written (SPEC §3): then without a
    # fresh checkpoint, and the collector sees the unsigned tail.
    checkpoint = None
    with contextlib.suppress(LogUnavailable):
        checkpoint = daemon.checkpoint(force=True)
    log = daemon.log
    with log.lock:
        start = log.offset_after(after)
        # Up to the fresh checkpoint, not to whatever was appended since (a login the
        # sshd-log reader writes a moment later): an export ends signed; the next one
        # carries the rest.
        end = log.size if checkpoint is None else log.offset_after(int(checkpoint["seq"]))
        end = max(end, start)
    return Reply(
        stream=(str(log.path), start, end), log_detail={"after": after, "bytes": end - start}
    )


def audit_verify(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    log = daemon.log
    with log.lock:
        end = log.size
    with open(log.path, "rb") as fh:
        report = auditlog.verify_lines(
            _lines_until(fh, end), daemon.keys.trusted(), device=daemon.keys.device
        )
    ok = not report.violations
    summary = {
        "verified": ok,
        "records": report.records,
        "last_seq": report.last_seq,
        "last_checkpoint": report.last_checkpoint_seq,
        "violations": [str(v) for v in report.violations],
    }
    return Reply(
        exit=protocol.EXIT_OK if ok else protocol.EXIT_INTEGRITY,
        output=as_json(summary),
        outcome="ok" if ok else "failed",
        log_detail={"verified": ok, "last_seq": report.last_seq},
    )


def audit_key_show(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    current = daemon.keys.current()
    initial = str(device_record().get("audit_public_key") or current.public_key_pem)
    return Reply(
        output=as_json(
            {
                "key_id": current.key_id,
                "public_key": current.public_key_pem,
                # The key of personalisation: with it, the rotation records in the log
                # carry trust to the current key, so the whole log verifies.
                "initial_key_id": auditlog.key_id_for_pem(initial),
                "initial_public_key": initial,
            }
        )
    )


def audit_key_rotate(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    return rotate_audit_key(daemon)


def rotate_audit_key(daemon: Daemon) -> Reply:
    keys = daemon.keys
    old, new = keys.rotate()
    device = keys.device
    record = daemon.append_signed(
        lambda prev, now: auditlog.make_key_rotation(prev, old, new, device=device, time=now),
        then=lambda: keys.commit(new),
    )
    return Reply(
        output=as_json(
            {
                "key_id": new.key_id,
                "public_key": new.public_key_pem,
                "previous_key_id": old.key_id,
                "rotation_seq": record["seq"],
            }
        ),
        log_detail={"old_key_id": old.key_id, "new_key_id": new.key_id},
    )
