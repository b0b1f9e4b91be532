"""The activity log and its key: ``audit show|export|ack|verify|key show|key rotate``."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from hsmctl import auditlog
from hsmctl.appliance import protocol
from hsmctl.appliance.commands.common import Context, Reply, as_json, device_record
from hsmctl.appliance.grammar import Command
from hsmctl.appliance.logwriter import AckRefused, LogUnavailable, Segment, Trimmed

if TYPE_CHECKING:
    from hsmctl.appliance.daemon import Daemon


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
        checkpoint = daemon.checkpoint(force=True, urgent=True)
    log = daemon.log
    with log.lock:
        # Up to the fresh checkpoint, not to whatever was appended since (a login the
        # sshd-log reader writes a moment later): an export ends signed; the next one
        # carries the rest. Across segments: the files are opened here, under the lock,
        # so an ack's deletion cannot cut the stream short.
        through = None if checkpoint is None else int(checkpoint["seq"])
        try:
            pieces = log.pieces(after, through)
        except Trimmed as exc:
            return Reply.failure(str(exc))
        last = log.head.seq if log.head is not None and through is None else (through or 0)
        if pieces:
            log.mark_exported(last)
    sent = sum(p.end - p.start for p in pieces)
    return Reply(stream=pieces, log_detail={"after": after, "bytes": sent, "through": last})


def audit_ack(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    seq = cmd.get_int("seq") or 0
    log = daemon.log
    try:
        acked = log.acknowledge(seq)
    except AckRefused as exc:
        return Reply(
            exit=protocol.EXIT_DENIED,
            error=str(exc),
            outcome="denied",
            log_detail={"seq": seq, "exported_seq": exc.exported, "rule": "beyond-export"},
        )

    def log_deletion(segment: Segment) -> None:
        # Before the file goes: never a silent drop.
        daemon.record(
            "hsmd",
            "system",
            "console",
            "log-segment-deleted",
            "ok",
            {**segment.as_dict(), "acked_seq": acked, "acked_by": ctx.caller_account},
            urgent=True,
        )

    deleted = log.release(log_deletion)
    disk = log.disk()
    return Reply(
        output=as_json(
            {
                "acked_seq": acked,
                "deleted": [s.as_dict() for s in deleted],
                "log_disk": disk.as_dict(),
            }
        ),
        log_detail={
            "seq": seq,
            "acked_seq": acked,
            "deleted_segments": len(deleted),
            "used_bytes": disk.used_bytes,
        },
    )


def audit_verify(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    log = daemon.log
    with log.lock:
        end = log.head.seq if log.head is not None else 0
        start = log.base()
        lines = log.lines(0, end)
    # From the oldest record still on the device: what came before was acknowledged by
    # the collector and deleted (the deletions are in the log).
    report = auditlog.verify_lines(
        lines, daemon.keys.trusted(), device=daemon.keys.device, start=start
    )
    ok = not report.violations
    summary = {
        "verified": ok,
        "records": report.records,
        "first_seq": start.seq + 1 if start is not None else 1,
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
    log = daemon.log
    with log.lock:
        base = log.base()
        rotations = log.retired_rotations() if base is not None else []
    return Reply(
        output=as_json(
            {
                "key_id": current.key_id,
                "public_key": current.public_key_pem,
                # The key of personalisation: with it, the rotation records in the log
                # carry trust to the current key, so the whole log verifies.
                "initial_key_id": auditlog.key_id_for_pem(initial),
                "initial_public_key": initial,
                # Once acknowledged records were deleted: the head before the oldest
                # record left (null: the log starts at record 1), and the deleted
                # segments' key rotations, which carry trust from the initial key there.
                "log_base": None if base is None else {"seq": base.seq, "hash": base.hash},
                "retired_key_rotations": [line.decode("utf-8").rstrip("\n") for line in rotations],
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
