"""SPEC §7 step 7: prove the takeover by observing it, never by assuming it.

Everything read from the device comes over a fresh session (tenant key + escrowed
password); the refused logins run beside its reads (each waits out its own delay), and
their back-off (the device slows a source after failures) does not delay this run: the
two that fail at once start after that session is open, the one-time password's (failed
only after the device's delay) beside its login. Where this tenancy starts in the log is
a pure function of the exported records (:func:`transfer_window`), tested from data.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from hsmctl import devicejson, utc
from hsmctl.auditlog import Head
from hsmctl.contract import OwnerState
from hsmctl.device import CLIENTS, HSM_INFO, PROVIDER_ACCESS, Switch
from hsmctl.ssh import DeviceConnection, PublicKey
from hsmctl.takeover.logproof import prove_log
from hsmctl.takeover.options import token_label
from hsmctl.takeover.records import Check, PasswordState
from hsmctl.takeover.session import AdminSession


@dataclass(frozen=True)
class Proof:
    checks: tuple[Check, ...]
    log_head: Head  # the device's log head when it was proved
    provisioned_seq: int
    transfer_seq: int | None


# The proof reads the device's log into memory: bounded, so a device that streams without
# end is refused (exit 3) instead of exhausting the customer's host. A real log at
# takeover time is far smaller (about 350 bytes a record).
MAX_PROOF_EXPORT = 256 * 1024 * 1024


def export_log(conn: DeviceConnection, after: int = 0) -> list[bytes]:
    sink = io.BytesIO()
    conn.run_stream(f"audit export --after {after}", sink, max_stdout=MAX_PROOF_EXPORT)
    return sink.getvalue().splitlines()


def _is_otp_set(record: dict[str, Any]) -> bool:
    detail = record.get("detail") or {}
    return (
        record.get("event") == "result"
        and record.get("outcome") == "ok"
        and str(detail.get("command", "")).startswith("user otp set")
    )


def transfer_window(records: Sequence[dict[str, Any]], started_at: str) -> dict[str, Any]:
    """Where this tenancy starts in the log and whether anyone else used it first. Pure.

    The tenancy starts at the last successful ``user otp set`` (the one-time credential
    of this hand-off; a re-provisioned device has earlier tenancies before it). After it
    come the first ``ownership-transfer`` and, before that, only this takeover's own
    admin sessions: an ``ok`` admin login or session between the two that is older than
    the journal's start (taken before our first connection) is someone else's.
    """
    provisioned = max((r["seq"] for r in records if _is_otp_set(r)), default=0)
    transfer = next(
        (
            r["seq"]
            for r in records
            if r["event"] == "ownership-transfer" and r["seq"] > provisioned
        ),
        None,
    )
    started = utc.parse(started_at)
    early = [
        r["seq"]
        for r in records
        if provisioned < r["seq"] < (transfer or r["seq"] + 1)
        and r["actor"] == "admin"
        and r["event"] in ("login", "session-start")
        and r["outcome"] == "ok"
        and utc.parse(r["time"]) < started
    ]
    return {"provisioned_seq": provisioned, "transfer_seq": transfer, "earlier_sessions": early}


def prove(session: AdminSession, *, keep_monitor: bool) -> Proof:
    """Each check and its result, in the order the receipt lists them."""
    checks: list[Check] = []

    def check(name: str, ok: bool, detail: Any = None) -> None:
        checks.append(Check(name, bool(ok), detail))

    state, bundle, record = session.state, session.bundle, session.journal.record
    host = bundle.appliance
    new = state.escrowed("admin-password")
    assert new is not None
    # The refused logins run while this session reads: a wrong one-time password waits
    # out the device's delay after a failed password (PAM, ~2-4 s, about 40% of a takeover
    # when it ran last, alone). The device's defence is unchanged: the same three attempts
    # from the same address, each counted for its back-off and logged. The one-time
    # password's starts first, beside this session's own login: the device counts its
    # failure only after that delay, long after our login is through, so no login of
    # ours waits behind it; the other two fail at once, so they start once this session
    # is open. Results are listed last.
    pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="refused")
    refusals = [pool.submit(session.refused, bundle.otp)]
    try:
        session.drop()
        conn = session.admin()  # password state committed: key + escrowed password only
        check(
            "key-and-password-work", conn.connected and record.password is PasswordState.COMMITTED
        )
        refusals += [
            pool.submit(session.refused, new, with_key=False),
            pool.submit(session.refused, None),
        ]
        access = PROVIDER_ACCESS.on(conn, host)
        check("provider-access-revoked", access.revoked, access.as_dict())
        info = HSM_INFO.on(conn, host)
        check(
            "customer-owned", info.owner_state is OwnerState.CUSTOMER_OWNED, info.owner_state.value
        )
        check(
            "monitor",
            (info.monitor is Switch.DISABLED) != keep_monitor,
            {"monitor": info.monitor.value, "keep_monitor": keep_monitor},
        )
        check(
            "token-initialised",
            info.initialised and info.label == token_label(bundle),
            {"label": info.label},
        )
        so, co = state.escrowed("so-pin"), state.escrowed("co-pin")
        assert so is not None and co is not None
        # Knowing a PIN is shown by using it: re-set the CO PIN as SO, change it to itself.
        ok_so = conn.run("hsm co-pin set", [so, co], check=False).ok
        ok_co = conn.run("hsm co-pin change", [co, co], check=False).ok
        check("token-answers-new-pins", ok_so and ok_co, {"so_pin": ok_so, "co_pin": ok_co})
        # Exactly the clients of --client, with the keys of their kits: none by default (so
        # also no account someone else left on the token's service).
        listed = CLIENTS.on(conn, host)
        wanted = sorted((c.name, c.role, c.fingerprint) for c in record.clients or ())
        shown = sorted((c.name, c.role, c.fingerprint) for c in listed.clients)
        check("clients-registered", shown == wanted, [c.as_dict() for c in listed.clients])

        presented = conn.host_key().to_line()
        current = [PublicKey.parse(k).to_line() for k in record.host_keys.current]
        original = [PublicKey.parse(k).to_line() for k in bundle.data_host_keys]
        check(
            "host-keys-rotated",
            presented in current and presented not in original,
            {"fingerprint": conn.host_key_fingerprint()},
        )
        check(
            "audit-key-rotated",
            info.audit_key_id == record.audit_key_id and record.audit_key_id != bundle.audit_key_id,
            {"key_id": info.audit_key_id},
        )

        # From record 1, or from the base of a log trimmed before this tenancy (logproof).
        proved = prove_log(conn, state, host, export_log)
        lines, report = proved.lines, proved.report
        check("activity-log-verifies", proved.ok, proved.detail())
        records = [devicejson.loads_object(line, "exported record", host) for line in lines]
        window = transfer_window(records, record.started_at)
        check(
            "log-holds-the-transfer",
            window["transfer_seq"] is not None,
            {"seq": window["transfer_seq"], "provisioned_seq": window["provisioned_seq"]},
        )
        check(
            "no-admin-session-before-the-customer",
            not window["earlier_sessions"],
            {"earlier_sessions": window["earlier_sessions"]},
        )
        session.drop()
        refused = tuple(f.result() for f in refusals)
    finally:
        pool.shutdown()
    check("one-time-password-refused", refused[0])
    check("password-without-key-refused", refused[1])
    check("key-without-password-refused", refused[2])
    return Proof(
        tuple(checks),
        Head(report.head.seq, report.head.hash),
        window["provisioned_seq"],
        window["transfer_seq"],
    )
