"""The proof's read of the activity log, from record 1 or, when the device deleted its
oldest records (acknowledged by an earlier owner's collector), from its base.

``audit key show`` says whether the log still starts at record 1 (``log_base`` null). If
not, trust is carried from the bundle's initial audit key through the deleted segments'
key rotations, the records from the base on are exported and verified as a chain that
starts there, and the deletion of records 1..base must be in them, naming the ack
(:mod:`hsmctl.auditlog.anchor`). What was proved is pinned (``pins.log_base``) so the
first collection and ``logs verify`` start at the same base, offline, with public keys;
unless this state directory already archives the log (the same tenant again), which then
simply continues from its own head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hsmctl import auditlog, devicejson
from hsmctl.auditlog import Head
from hsmctl.auditlog.anchor import AnchorError, LogBase, carry_trust, describe, retirement
from hsmctl.auditlog.report import VerifyReport
from hsmctl.customer.store import ApplianceDir
from hsmctl.ssh import DeviceConnection

Export = Callable[[DeviceConnection, int], list[bytes]]


@dataclass
class ProvedLog:
    lines: list[bytes]
    report: VerifyReport
    base: LogBase | None = None
    problem: str | None = None
    """Why the base (the records before the oldest left) cannot be trusted."""

    @property
    def ok(self) -> bool:
        return self.report.ok and self.problem is None

    def detail(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "records": self.report.records,
            "violations": [str(v) for v in self.report.violations]
            + ([self.problem] if self.problem else []),
        }
        if self.base is not None:
            out["first_seq"] = self.base.seq + 1
            out["retired"] = dict(self.base.retired)
            if self.base.retired:
                out["message"] = describe(self.base.retired)
        return out


def _log_base(conn: DeviceConnection, host: str) -> tuple[int, str, list[str]] | None:
    shown = devicejson.loads_object(conn.run("audit key show").stdout, "audit key show", host)
    base = shown.get("log_base")
    if base is None:
        return None
    rotations = shown.get("retired_key_rotations") or []
    if not (
        isinstance(base, dict)
        and type(base.get("seq")) is int
        and isinstance(base.get("hash"), str)
        and isinstance(rotations, list)
        and all(isinstance(x, str) for x in rotations)
    ):
        raise AnchorError("audit key show: a malformed log_base or retired_key_rotations")
    return int(base["seq"]), str(base["hash"]), [str(x) for x in rotations]


def prove_log(conn: DeviceConnection, state: ApplianceDir, host: str, export: Export) -> ProvedLog:
    """Export and verify the device's whole log (see the module); pin its base if proved."""
    pins = state.load_pins()
    try:
        found = _log_base(conn, host)
    except AnchorError as exc:
        lines = export(conn, 0)
        report = auditlog.verify_lines(lines, pins.audit_keys, device=host)
        return ProvedLog(lines, report, None, str(exc))
    if found is None:
        lines = export(conn, 0)
        return ProvedLog(lines, auditlog.verify_lines(lines, pins.audit_keys, device=host))
    seq, digest, rotations = found
    initial = pins.initial_audit_key_id
    trusted: dict[str, str] = (
        {initial: pins.audit_keys[initial]} if initial in pins.audit_keys else dict(pins.audit_keys)
    )
    lines = export(conn, seq)
    problem = None
    try:
        trusted, retired = carry_trust(trusted, rotations, device=host, base_seq=seq)
    except AnchorError as exc:
        problem, retired = str(exc), frozenset()
    report = auditlog.verify_lines(
        lines, trusted, device=host, start=Head(seq, digest), retired_keys=retired
    )
    base = LogBase(seq, digest, tuple(rotations))
    if problem is None and report.ok:
        if report.last_checkpoint_seq is None:
            problem = f"no signed checkpoint after record {seq}: nothing anchors the log there"
        else:
            records = [devicejson.loads_object(x, "exported record", host) for x in lines]
            try:
                base = LogBase(seq, digest, tuple(rotations), retirement(records, seq))
            except AnchorError as exc:
                problem = str(exc)
    proved = ProvedLog(lines, report, base, problem)
    if proved.ok and not _archived(state):
        # An archive already holds records (this tenant's, before a re-provisioning):
        # it goes on from its own head, and the pinned base stays the one it starts at.
        pins = state.load_pins()
        pins.log_base = base.as_dict()
        state.save_pins(pins)
    return proved


def _archived(state: ApplianceDir) -> bool:
    from hsmctl.collect.appliances import archive_of

    return bool(archive_of(state).cursor().segments)
