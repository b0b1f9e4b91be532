"""The takeover as a journaled state machine (SPEC §7; STYLE.md 4).

The steps are plain data (:data:`STEPS`); what to do at each is decided from the
journal and what the device says, and every decision is recorded *before* the action it
leads to. Lifecycle of one run: open the bundle → load (or start) the journal keyed by
the bundle → connect (pins from the journal first, then the bundle) → run every step not
yet done → prove → sign the receipt. Interrupt it anywhere (kill -9, a cut connection)
and the same command finishes the job:

* every secret is escrowed (0600, fsynced) before the device hears of it;
* the password change is journaled ``pending`` before it is sent and ``committed`` only
  after a fresh login with the new password; on resume the new password is tried first,
  the one-time one only while the change may not have happened;
* host keys are staged, journaled, then activated; while a rotation is in flight both
  the old and the staged keys are accepted, and only those, until a connection shows
  the device serving a staged key;
* a journal whose password change was never sent (``one-time``) is not a commitment: a
  new bundle for the same appliance (the device re-provisioned, or the first bundle
  refused for a host-key mismatch) replaces it; otherwise another bundle exits 5.

The customer never loses access: at every instant one of the escrowed credentials logs in.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsmctl import auditlog, contract, devicejson, utc
from hsmctl.customer.context import TenantContext
from hsmctl.customer.store import ApplianceState
from hsmctl.errors import (
    ConflictError,
    HsmctlError,
    IntegrityError,
    UnreachableError,
    UsageError,
)
from hsmctl.handoff import OpenedBundle, open_bundle, sign_document, write_document
from hsmctl.handoff.identity import TenantIdentity
from hsmctl.progress import NullProgress, Progress
from hsmctl.secret import Secret, generate_password, generate_pin
from hsmctl.ssh import AuthenticationFailed, DeviceConnection, PinnedHostKeys, PublicKey
from hsmctl.takeover import faults

JOURNAL = "takeover.json"
RECEIPT = "receipt.json"
RECEIPT_FORMAT = "hsmctl-receipt/1"


class Step(enum.StrEnum):
    ESCROW = "escrow"  # the new admin password, SO PIN, CO PIN, collector key
    PASSWORD = "password"  # noqa: S105 - a step name: one-time -> escrowed password
    REVOKE = "revoke"  # provider access, monitor
    HOSTKEYS = "hostkeys"  # stage, journal, activate, re-pin
    HSM_INIT = "hsm-init"  # token with the customer's SO PIN
    CO_PIN = "co-pin"  # crypto-officer PIN
    AUDIT_KEY = "audit-key"  # rotate, pin the new public key
    COLLECTOR = "collector"  # the audit account's key for log collection
    PROVE = "prove"  # the checks of the receipt
    RECEIPT = "receipt"


STEPS: tuple[Step, ...] = tuple(Step)


class PasswordState(enum.StrEnum):
    ONE_TIME = "one-time"  # nothing sent yet
    PENDING = "pending"  # the change may have happened
    COMMITTED = "committed"  # proved by a fresh login with the new password


@dataclass
class Options:
    handoff: Path
    new_password: Secret | None = None
    so_pin: Secret | None = None
    co_pin: Secret | None = None
    keep_monitor: bool = False


HOSTKEY_ACTIVATION_WAIT = 20.0  # seconds for the data sshd to come back with the new keys


def _same_keys(a: Sequence[str], b: Sequence[str]) -> bool:
    return {PublicKey.parse(k).to_line() for k in a} == {PublicKey.parse(k).to_line() for k in b}


def token_label(bundle: OpenedBundle) -> str:
    return f"{bundle.tenant}-{bundle.appliance}"[:32]


# -- input checks: before anything is sent ---------------------------------------------------


def check_inputs(opts: Options) -> None:
    if opts.new_password is not None:
        try:
            contract.check_password_policy(opts.new_password.reveal())
        except contract.PasswordPolicyError as exc:
            raise UsageError(f"--new-password-file: {exc}") from exc
    for flag, pin in (("--so-pin-file", opts.so_pin), ("--co-pin-file", opts.co_pin)):
        if pin is None:
            continue
        size = len(pin.reveal().encode("utf-8"))
        if not 4 <= size <= 255:
            raise UsageError(f"{flag}: a PIN is 4 to 255 bytes (SoftHSM's range), got {size}")
        if any(ch in pin.reveal() for ch in "\n\r\x00"):
            raise UsageError(f"{flag}: a PIN cannot contain line breaks or NUL")


# -- the run --------------------------------------------------------------------------------


class Takeover:
    """One takeover run. Create with the context and options, call :meth:`run`."""

    def __init__(self, ctx: TenantContext, opts: Options, progress: Progress | None = None):
        self.ctx = ctx
        self.opts = opts
        self.progress = progress or NullProgress()
        self.identity = TenantIdentity.load(ctx.identity)
        self.conn: DeviceConnection | None = None
        self.ran: list[Step] = []  # the steps this run did (none: it was already finished)

    # journal ------------------------------------------------------------------------------

    def _save(self) -> None:
        self.state.write(JOURNAL, self.journal)

    def _mark(self, step: Step) -> None:
        self.journal["done"] = sorted({*self.journal["done"], step.value})
        self._save()
        faults.reached(f"after:{step.value}", self.conn)

    def _done(self, step: Step) -> bool:
        return step.value in self.journal["done"]

    # connection ---------------------------------------------------------------------------

    def _pins(self) -> PinnedHostKeys:
        keys = self.journal["host_keys"]["current"] + self.journal["host_keys"]["staged"]
        return PinnedHostKeys.of(*keys)

    def _connect_with(self, password: Secret) -> DeviceConnection:
        # A rerun can land while the data sshd restarts (a run killed during a host-key
        # activation): give it a moment.
        deadline = time.monotonic() + 10
        while True:
            conn = DeviceConnection(
                self.bundle.data_ip,
                username="admin",
                pinned=self._pins(),
                key=self.ctx.identity,
                password=password,
            )
            try:
                return conn.connect()
            except UnreachableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _admin(self) -> DeviceConnection:
        """A session as admin with whichever credential the journal says is live."""
        if self.conn is not None and self.conn.connected:
            return self.conn
        pw_state = PasswordState(self.journal["password"])
        new = self.state.escrowed("admin-password")
        candidates: list[Secret] = []
        if pw_state is not PasswordState.ONE_TIME and new is not None:
            candidates.append(new)
        if pw_state is not PasswordState.COMMITTED:
            candidates.append(self.bundle.otp)
        last: HsmctlError | None = None
        for password in candidates:
            try:
                self.conn = self._connect_with(password)
            except AuthenticationFailed as exc:
                last = exc
                continue
            self._observe_host_key(self.conn)
            if password is new and pw_state is PasswordState.PENDING:
                # The change happened before an interruption: the new password logs in.
                self.journal["password"] = PasswordState.COMMITTED.value
                self._save()
            return self.conn
        if last is None:  # committed, but the escrowed password is gone
            raise HsmctlError(
                f"{self.bundle.appliance}: the journal says the admin password was changed, "
                f"but {self.state.secret_path('admin-password')} is missing; restore it"
            )
        raise last

    def _observe_host_key(self, conn: DeviceConnection) -> None:
        """A staged key answering means activation happened before an interruption."""
        presented = conn.host_key().to_line()
        keys = self.journal["host_keys"]
        staged = [PublicKey.parse(k).to_line() for k in keys["staged"]]
        if presented in staged:
            keys["previous"] = keys["current"]
            keys["current"], keys["staged"] = keys["staged"], []
            keys["rotated"] = True
            self._save()

    def _run(self, command: str, stdin: Sequence[Secret | str] = ()) -> str:
        conn = self._admin()
        words = command.split()
        # The command's words, not its option values: the same name on every appliance.
        point = "-".join(words[: next((i for i, w in enumerate(words) if w[:2] == "--"), None)])
        faults.reached(f"send:{point}", conn)
        out = conn.run(command, stdin).stdout
        faults.reached(f"sent:{point}", conn)
        return out

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # steps ----------------------------------------------------------------------------------

    def step_escrow(self) -> None:
        s = self.state
        given = {
            "admin-password": self.opts.new_password,
            "so-pin": self.opts.so_pin,
            "co-pin": self.opts.co_pin,
        }
        for name, value in given.items():
            existing = s.escrowed(name)
            if value is None:
                if existing is None:
                    s.escrow(
                        name, generate_password() if name == "admin-password" else generate_pin()
                    )
                continue
            if value == existing:
                continue
            if existing is not None and self._done(Step.ESCROW):
                # Escrowed secrets are in use from here on: changing one now could lock
                # the customer out of a half-done device.
                raise ConflictError(
                    f"a different {name} is already escrowed for {self.bundle.appliance} "
                    "by this unfinished takeover; rerun without it"
                )
            # Nothing has used the escrow yet (this step is not done): the value given wins.
            s.escrow(name, value)
        if s.escrowed("audit-collector-key") is None:
            s.escrow("audit-collector-key", _new_ssh_key(self.bundle.appliance))
        self._mark(Step.ESCROW)

    def step_password(self) -> None:
        new = self.state.escrowed("admin-password")
        assert new is not None
        if PasswordState(self.journal["password"]) is PasswordState.ONE_TIME:
            self._admin()  # log in with the one-time password before anything changes
            self.journal["password"] = PasswordState.PENDING.value
            self.journal["first_login_at"] = self.journal.get("first_login_at") or utc.stamp()
            self._save()
            faults.reached("pending:password", self.conn)
        if PasswordState(self.journal["password"]) is PasswordState.PENDING:
            conn = self._admin()
            if PasswordState(self.journal["password"]) is PasswordState.PENDING:
                # Still on the one-time password: make the change.
                faults.reached("send:user-password", conn)
                conn.run("user password", [new])
                faults.reached("sent:user-password", conn)
            self._drop()
            self.conn = self._connect_with(new)  # prove it before committing
            self.journal["password"] = PasswordState.COMMITTED.value
            self._save()
        self._mark(Step.PASSWORD)

    def step_revoke(self) -> None:
        self._run("sysconf provider-access revoke")
        if not self.opts.keep_monitor:
            self._run("user disable monitor")
        self._mark(Step.REVOKE)

    def step_hostkeys(self) -> None:
        keys = self.journal["host_keys"]
        self._admin()  # observes a rotation that happened before an interruption
        if not keys.get("rotated"):
            info = self._reply("sysconf hostkey show")
            journaled = keys["staged"]
            on_device = journaled and (
                _same_keys(info["staged_keys"], journaled)
                or _same_keys(info["active_keys"], journaled)
            )
            if not on_device:
                # Nothing staged yet, or the device does not hold what we journaled (its
                # stage never happened): stage, and journal the new keys before activating.
                shown = self._reply("sysconf hostkey stage")
                info = self._reply("sysconf hostkey show")
                keys["staged"] = list(info["staged_keys"])
                keys["staged_fingerprints"] = shown["staged"]
                self._save()
            if not _same_keys(info["active_keys"], keys["staged"]):
                self._run("sysconf hostkey activate")
            self._drop()
            self._await_new_host_key()
        pins = self.state.pins()
        pins["data_host_keys"] = keys["current"]
        self.state.save_pins(pins)
        self._mark(Step.HOSTKEYS)

    def _await_new_host_key(self) -> None:
        """Reconnect until the device serves a staged key. ``activate`` returns once the
        data sshd has restarted, but a rerun after an interruption can land while it
        restarts; until then the old and the staged keys stay pinned, so an interruption
        here never leaves us pinned to keys the device does not serve."""
        deadline = time.monotonic() + HOSTKEY_ACTIVATION_WAIT
        keys = self.journal["host_keys"]
        while True:
            self._admin()
            if keys.get("rotated"):
                return
            self._drop()
            if time.monotonic() > deadline:
                raise UnreachableError(
                    f"{self.bundle.appliance}: the data interface does not serve its new host "
                    f"keys {HOSTKEY_ACTIVATION_WAIT:g} s after activation; run the takeover again"
                )
            time.sleep(0.2)

    def _hsm_show(self) -> dict[str, Any]:
        return self._reply("hsm show")

    def _reply(self, command: str) -> dict[str, Any]:
        """A command's JSON reply; anything else from the device is an IntegrityError."""
        reply = self._run(command)
        return devicejson.loads_object(reply, f"reply to {command!r}", self.bundle.appliance)

    def step_hsm_init(self) -> None:
        so = self.state.escrowed("so-pin")
        assert so is not None
        label = token_label(self.bundle)
        if not self.journal.get("hsm_init_sent"):
            self.journal["hsm_init_sent"] = True
            self._save()
        info = self._hsm_show()
        if not (info.get("initialised") and info.get("label") == label):
            self._run(f"hsm init --label {label}", [so])
        self._mark(Step.HSM_INIT)

    def step_co_pin(self) -> None:
        so, co = self.state.escrowed("so-pin"), self.state.escrowed("co-pin")
        assert so is not None and co is not None
        self._run("hsm co-pin set", [so, co])
        self._mark(Step.CO_PIN)

    def step_audit_key(self) -> None:
        pins = self.state.pins()
        current = self._reply("audit key show")
        before = self.journal.get("audit_key_before")
        if before is None or current["key_id"] == before:
            # Not rotated yet (or the rotation never reached the device): note the key
            # we rotate away from, then rotate.
            self.journal["audit_key_before"] = current["key_id"]
            self._save()
            rotated = self._reply("audit key rotate")
            current = {"key_id": rotated["key_id"], "public_key": rotated["public_key"]}
        pins["audit_keys"][current["key_id"]] = current["public_key"]
        self.state.save_pins(pins)
        self.journal["audit_key_id"] = current["key_id"]
        self._save()
        self._mark(Step.AUDIT_KEY)

    def step_collector(self) -> None:
        key = self.state.escrowed("audit-collector-key")
        assert key is not None
        public = _public_line(key, f"{self.bundle.tenant}-collector")
        self._run("user credential set audit", [public])
        self._run("user enable audit")
        pins = self.state.pins()
        pins["audit_account_key"] = public
        self.state.save_pins(pins)
        self._mark(Step.COLLECTOR)

    def step_prove(self) -> None:
        checks = prove(self)
        self.journal["checks"] = checks
        self._save()
        failed = [c["name"] for c in checks if not c["ok"]]
        if failed:
            raise IntegrityError(
                f"{self.bundle.appliance}: takeover checks failed: {', '.join(failed)}",
                detail={"checks": checks},
            )
        self._mark(Step.PROVE)

    def step_receipt(self) -> None:
        self.receipt_path = write_receipt(self)
        self._mark(Step.RECEIPT)

    # the executor ----------------------------------------------------------------------------

    def _open(self) -> None:
        path = self.opts.handoff
        # The signature and contents first; expiry only matters for a fresh start.
        bundle = open_bundle(path, self.ctx.provider_public_key, self.identity, allow_expired=True)
        if self.ctx.tenant and bundle.tenant != self.ctx.tenant:
            raise UsageError(f"the bundle is for tenant {bundle.tenant}, not {self.ctx.tenant}")
        self.bundle = bundle
        self.state: ApplianceState = self.ctx.appliance(bundle.appliance)
        journal = self.state.read(JOURNAL)
        replaced: dict[str, Any] | None = None
        if journal is not None and journal["bundle_id"] != bundle.bundle_id:
            finished = Step.RECEIPT.value in journal["done"]
            untouched = PasswordState(journal["password"]) is PasswordState.ONE_TIME
            if not (finished or untouched):
                raise ConflictError(
                    f"{bundle.appliance} has an unfinished takeover from another hand-off "
                    f"bundle (request {journal.get('request_id')}); finish that one first"
                )
            # A finished takeover then a re-provisioned device, or a takeover that never
            # changed anything on the device: the new bundle starts afresh.
            replaced, journal = journal, None
        if journal is None:
            if bundle.expired:
                from hsmctl.handoff import BundleExpired

                raise BundleExpired(
                    f"hand-off bundle for {bundle.appliance} expired at "
                    f"{bundle.expires_at.isoformat()}; ask the provider for a new one"
                )
            if replaced is not None:
                retired = self.state.retire_secrets(str(replaced["bundle_id"])[:16])
                if retired is not None:
                    self.progress.step(f"{bundle.appliance}: earlier escrow kept in {retired}")
            journal = {
                "bundle_id": bundle.bundle_id,
                "appliance": bundle.appliance,
                "request_id": bundle.request_id,
                # Before any connection: every admin session of this takeover is later.
                "started_at": utc.precise(),
                "password": PasswordState.ONE_TIME.value,
                "host_keys": {"current": list(bundle.data_host_keys), "staged": []},
                "done": [],
            }
            self.journal = journal
            pins = self.state.pins()
            pins["data_host_keys"] = list(bundle.data_host_keys)
            pins["audit_keys"].setdefault(bundle.audit_key_id, bundle.audit_public_key)
            pins["initial_audit_key_id"] = bundle.audit_key_id
            pins["data_ip"] = bundle.data_ip
            self.state.save_pins(pins)
            self._save()
        self.journal = journal

    def run(self) -> dict[str, Any]:
        check_inputs(self.opts)
        self._open()
        actions: dict[Step, Callable[[], None]] = {
            Step.ESCROW: self.step_escrow,
            Step.PASSWORD: self.step_password,
            Step.REVOKE: self.step_revoke,
            Step.HOSTKEYS: self.step_hostkeys,
            Step.HSM_INIT: self.step_hsm_init,
            Step.CO_PIN: self.step_co_pin,
            Step.AUDIT_KEY: self.step_audit_key,
            Step.COLLECTOR: self.step_collector,
            Step.PROVE: self.step_prove,
            Step.RECEIPT: self.step_receipt,
        }
        try:
            for step in STEPS:
                if self._done(step):
                    continue
                self.progress.step(f"{self.bundle.appliance}: {step.value}")
                faults.reached(f"before:{step.value}", self.conn)
                self.ran.append(step)
                actions[step]()
        finally:
            self._drop()
        return {
            "appliance": self.bundle.appliance,
            "state": "customer-owned",
            "receipt": str(self.state.dir / RECEIPT),
        }


# -- helpers ---------------------------------------------------------------------------------


def _new_ssh_key(appliance: str) -> Secret:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    return Secret(pem.decode("ascii").rstrip("\n"))


def _public_line(private: Secret, comment: str) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_private_key(private.reveal().encode("ascii") + b"\n", None)
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return f"{pub.decode('ascii')} {comment}"


def export_log(conn: DeviceConnection, after: int = 0) -> list[bytes]:
    import io

    sink = io.BytesIO()
    conn.run_stream(f"audit export --after {after}", sink)
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


def prove(t: Takeover) -> list[dict[str, Any]]:
    """SPEC §7 step 7: each check and its result (never assumed, always observed).

    Everything read from the device comes over a fresh session (tenant key + escrowed
    password); the refused logins come last, so their back-off (the device slows a
    source after failures) does not delay this run.
    """
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: Any = None) -> None:
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    new = t.state.escrowed("admin-password")
    assert new is not None
    t._drop()
    conn = t._admin()  # password state committed: key + escrowed password only
    check(
        "key-and-password-work",
        conn.connected and PasswordState(t.journal["password"]) is PasswordState.COMMITTED,
    )
    host = t.bundle.appliance
    access = devicejson.loads_object(
        conn.run("sysconf provider-access show").stdout,
        "reply to 'sysconf provider-access show'",
        host,
    )
    check(
        "provider-access-revoked",
        not access["provider_access"]
        and not access["provider_key_installed"]
        and not access["provider_enabled"],
        access,
    )
    info = devicejson.loads_object(conn.run("hsm show").stdout, "reply to 'hsm show'", host)
    check("customer-owned", info.get("owner_state") == "customer-owned", info.get("owner_state"))
    check(
        "monitor",
        (info.get("monitor") == "disabled") != t.opts.keep_monitor,
        {"monitor": info.get("monitor"), "keep_monitor": t.opts.keep_monitor},
    )
    check(
        "token-initialised",
        info.get("initialised") is True and info.get("label") == token_label(t.bundle),
        {"label": info.get("label")},
    )
    so, co = t.state.escrowed("so-pin"), t.state.escrowed("co-pin")
    assert so is not None and co is not None
    # Knowing a PIN is shown by using it: re-set the CO PIN as SO, change it to itself.
    ok_so = conn.run("hsm co-pin set", [so, co], check=False).ok
    ok_co = conn.run("hsm co-pin change", [co, co], check=False).ok
    check("token-answers-new-pins", ok_so and ok_co, {"so_pin": ok_so, "co_pin": ok_co})

    presented = conn.host_key().to_line()
    current = [PublicKey.parse(k).to_line() for k in t.journal["host_keys"]["current"]]
    original = [PublicKey.parse(k).to_line() for k in t.bundle.data_host_keys]
    check(
        "host-keys-rotated",
        presented in current and presented not in original,
        {"fingerprint": conn.host_key_fingerprint()},
    )
    audit_key = t.journal.get("audit_key_id")
    check(
        "audit-key-rotated",
        info.get("audit_key_id") == audit_key and audit_key != t.bundle.audit_key_id,
        {"key_id": info.get("audit_key_id")},
    )

    lines = export_log(conn)
    pins = t.state.pins()
    report = auditlog.verify_lines(lines, pins["audit_keys"], device=t.bundle.appliance)
    check(
        "activity-log-verifies",
        report.ok,
        {"records": report.records, "violations": [str(v) for v in report.violations]},
    )
    records = [devicejson.loads_object(line, "exported record", host) for line in lines]
    window = transfer_window(records, t.journal["started_at"])
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
    t.journal["log_head"] = {"seq": report.head.seq, "hash": report.head.hash}
    t.journal["transfer_seq"] = window["transfer_seq"]
    t.journal["provisioned_seq"] = window["provisioned_seq"]
    t._drop()

    def refused(password: Secret | None, with_key: bool) -> bool:
        c = DeviceConnection(
            t.bundle.data_ip,
            username="admin",
            pinned=t._pins(),
            key=t.ctx.identity if with_key else None,
            password=password,
        )
        try:
            c.connect()
        except AuthenticationFailed:
            return True
        finally:
            c.close()
        return False

    check("one-time-password-refused", refused(t.bundle.otp, True))
    check("password-without-key-refused", refused(new, False))
    check("key-without-password-refused", refused(None, True))
    return checks


def write_receipt(t: Takeover) -> Path:
    pins = t.state.pins()
    keys = [PublicKey.parse(k) for k in t.journal["host_keys"]["current"]]
    doc = {
        "format": RECEIPT_FORMAT,
        "appliance": t.bundle.appliance,
        "tenant": t.bundle.tenant,
        "time": utc.stamp(),
        "bundle_id": t.bundle.bundle_id,
        "request_id": t.bundle.request_id,
        "data_ip": t.bundle.data_ip,
        "host_key_fingerprints": [k.fingerprint for k in keys],
        "audit_key": {
            "initial": pins.get("initial_audit_key_id"),
            "current": t.journal.get("audit_key_id"),
        },
        "keep_monitor": t.opts.keep_monitor,
        "checks": t.journal["checks"],
        "log": {
            "provisioned_seq": t.journal.get("provisioned_seq"),
            "transfer_seq": t.journal.get("transfer_seq"),
            "head": t.journal["log_head"],
        },
    }
    signed = sign_document(doc, t.identity)
    return write_document(t.state.dir / RECEIPT, signed)


def verify_receipt(path: Path, identity: Path) -> dict[str, Any]:
    """Check a receipt's signature (by this tenant's identity) and that every check
    passed; raise IntegrityError otherwise."""
    from hsmctl.handoff import read_document, verify_document

    doc = read_document(path, what="receipt")
    if doc.get("format") != RECEIPT_FORMAT:
        raise IntegrityError(f"{path}: not a takeover receipt")
    ident = TenantIdentity.load(identity)
    verify_document(doc, ident.public_key_line)
    failed = [c["name"] for c in doc.get("checks", []) if not c.get("ok")]
    if failed or not doc.get("checks"):
        raise IntegrityError(f"{path}: checks failed: {', '.join(failed) or 'none recorded'}")
    return {
        "appliance": doc["appliance"],
        "verified": True,
        "checks": len(doc["checks"]),
        "time": doc["time"],
        "host_key_fingerprints": doc["host_key_fingerprints"],
        "audit_key": doc["audit_key"],
    }


def takeover(ctx: TenantContext, opts: Options, progress: Progress | None = None) -> dict[str, Any]:
    t = Takeover(ctx, opts, progress)
    return t.run()
