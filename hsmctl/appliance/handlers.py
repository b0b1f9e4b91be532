"""What each device command does, once the daemon has parsed, authorised and logged it.

A handler takes the parsed command and the stdin secrets and returns a :class:`Reply`:
text for the caller, an exit status, an outcome for the activity log, and detail for the
log that never holds a secret.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hsmctl import auditlog, contract, utc
from hsmctl.appliance import accounts, faults, p11service, paths, protocol, store, token
from hsmctl.appliance.grammar import Command, help_text
from hsmctl.appliance.logwriter import LogUnavailable
from hsmctl.appliance.roles import Role, authorize_spec
from hsmctl.contract import OwnerState
from hsmctl.errors import HsmctlError, UsageError

if TYPE_CHECKING:
    from hsmctl.appliance.daemon import Daemon


@dataclass
class Reply:
    exit: int = protocol.EXIT_OK
    output: str = ""
    error: str | None = None
    outcome: str = "ok"
    log_detail: dict[str, Any] = field(default_factory=dict)
    stream: tuple[str, int, int] | None = None

    @classmethod
    def failure(cls, message: str, exit: int = protocol.EXIT_FAILED) -> Reply:
        return cls(exit=exit, error=message, outcome="failed")

    @classmethod
    def usage(cls, message: str) -> Reply:
        return cls(exit=protocol.EXIT_USAGE, error=message, outcome="failed")


@dataclass
class Context:
    caller_account: str
    role: Role
    source: str
    owner: store.Owner


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True)


def _device() -> dict[str, Any]:
    data: dict[str, Any] = store.read_json(paths.DEVICE, {})
    return data


def _signal_boot() -> None:
    """Ask the appliance's init to reconcile the data-interface sshd."""
    try:
        pid = int(paths.BOOT_PID.read_text().split()[0])
        os.kill(pid, signal.SIGUSR1)
    except (OSError, ValueError, IndexError):
        pass


DATA_SSHD_RESTART_WAIT = 15.0  # seconds; the init stops the old sshd within 5 s


def _pid_in(path: Any) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _restart_data_sshd() -> bool:
    """Have the init restart the data-interface sshd and wait until the old listener is
    gone and a new one listens (sshd writes its pid file once it listens). False: not
    done in time. Connections the old one accepted carry on (see :mod:`origin`)."""
    pidfile = paths.SSHD_PIDS["data"]
    old = _pid_in(pidfile)
    _signal_boot()
    deadline = time.monotonic() + DATA_SSHD_RESTART_WAIT
    while time.monotonic() < deadline:
        new = _pid_in(pidfile)
        if new is not None and new != old and _alive(new) and not (old and _alive(old)):
            return True
        time.sleep(0.05)
    return False


def _lines_until(fh: Any, end: int) -> Any:
    """The file's lines up to byte ``end`` (a snapshot while appends go on)."""
    done = 0
    for line in fh:
        if done >= end:
            return
        done += len(line)
        yield line


def _key_lines(directory: Any) -> list[str]:
    out = []
    for kind in paths.HOSTKEY_TYPES:
        pub = directory / f"ssh_host_{kind}_key.pub"
        if pub.exists():
            out.append(" ".join(pub.read_text().split()[:2]))
    return out


def _fingerprints(directory: Any) -> list[str]:
    out = []
    for kind in paths.HOSTKEY_TYPES:
        pub = directory / f"ssh_host_{kind}_key.pub"
        if pub.exists():
            proc = subprocess.run(
                ["ssh-keygen", "-l", "-f", str(pub)], capture_output=True, text=True, check=False
            )
            if proc.returncode == 0:
                out.append(f"{proc.stdout.split()[1]} ({kind})")
    return out


class Handlers:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.table: dict[tuple[str, ...], Callable[[Context, Command, list[str]], Reply]] = {
            ("help",): self.help,
            ("exit",): lambda ctx, cmd, s: Reply(),
            ("hsm", "show"): self.hsm_show,
            ("hsm", "policy", "show"): lambda ctx, cmd, s: Reply(output=_json(p11service.POLICY)),
            ("client", "register"): self.client_register,
            ("client", "list"): self.client_list,
            ("client", "revoke"): self.client_revoke,
            ("hsm", "init"): self.hsm_init,
            ("hsm", "zeroize"): self.hsm_zeroize,
            ("hsm", "co-pin", "set"): self.co_pin_set,
            ("hsm", "co-pin", "change"): self.co_pin_change,
            ("user", "password"): self.user_password,
            ("user", "list"): lambda ctx, cmd, s: Reply(output=_json(accounts.listing())),
            ("user", "enable"): self.user_enable,
            ("user", "disable"): self.user_disable,
            ("user", "credential", "set"): self.credential_set,
            ("user", "otp", "set"): self.otp_set,
            ("sysconf", "provider-access", "show"): self.provider_access_show,
            ("sysconf", "provider-access", "revoke"): self.provider_access_revoke,
            ("sysconf", "hostkey", "show"): self.hostkey_show,
            ("sysconf", "hostkey", "stage"): self.hostkey_stage,
            ("sysconf", "hostkey", "activate"): self.hostkey_activate,
            ("sysconf", "factory-reset"): self.factory_reset,
            ("network", "show"): self.network_show,
            ("network", "set"): self.network_set,
            ("audit", "show"): self.audit_show,
            ("audit", "export"): self.audit_export,
            ("audit", "verify"): self.audit_verify,
            ("audit", "key", "show"): self.audit_key_show,
            ("audit", "key", "rotate"): self.audit_key_rotate,
        }

    def run(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        need = len(cmd.spec.stdin)
        if len(secrets) != need:
            return Reply.usage(f"{cmd.spec.name} reads {need} value(s) from stdin")
        handler = self.table[cmd.words]
        try:
            return handler(ctx, cmd, secrets)
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

    # -- general -----------------------------------------------------------------------

    def help(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        state = ctx.owner.device_state()
        return Reply(output=help_text(lambda spec: authorize_spec(ctx.role, spec, state)))

    # -- hsm ---------------------------------------------------------------------------

    def hsm_show(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        device = _device()
        status = token.customer_status()
        owner = ctx.owner
        info: dict[str, Any] = {
            "id": device.get("id"),
            "serial": device.get("serial"),
            "model": device.get("model"),
            "firmware": device.get("firmware"),
            "label": status.label,
            "initialised": status.initialised,
            "objects": status.objects,
            "co_pin_set": status.co_pin_set,
            "owner_state": owner.state.value,
            "provider_access": owner.provider_access
            and owner.state is not OwnerState.CUSTOMER_OWNED,
            "monitor": "enabled" if accounts.is_enabled("monitor") else "disabled",
            "audit_key_id": self.daemon.keys.current().key_id,
            "policy": p11service.POLICY_NAME,
        }
        if ctx.role is Role.MONITOR:
            info = {
                k: info[k]
                for k in (
                    "id",
                    "model",
                    "firmware",
                    "initialised",
                    "owner_state",
                    "provider_access",
                    "monitor",
                )
            }
        return Reply(output=_json(info))

    def hsm_init(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        label = cmd.get_str("label")
        (so_pin,) = secrets
        before = token.customer_status()
        current = so_pin if before.initialised else None
        after = token.customer_init(label, so_pin, current_so_pin=current)
        return Reply(
            output=f"token initialised: label {after.label}, serial {after.serial}",
            log_detail={
                "label": after.label,
                "serial": after.serial,
                "reinitialised": before.initialised,
            },
        )

    def hsm_zeroize(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        before = token.customer_status()
        token.customer_zeroize()
        return Reply(output="token zeroized", log_detail={"serial": before.serial})

    def co_pin_set(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        token.customer_set_co_pin(secrets[0], secrets[1])
        return Reply(output="crypto-officer PIN set")

    def co_pin_change(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        token.customer_change_co_pin(secrets[0], secrets[1])
        return Reply(output="crypto-officer PIN changed")

    # -- application clients (SPEC §11) ---------------------------------------------------

    def client_register(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
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
        with self.daemon.p11.lock:
            clients = p11service.load_clients()
            clients[name] = entry
            p11service.save_clients(clients)
        account = accounts.client_account(name)
        return Reply(
            output=_json({"client": name, "account": account, **entry}),
            log_detail={"client": name, "account": account, **entry},
        )

    def client_list(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        running = self.daemon.p11.sessions()
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
        return Reply(output=_json({"clients": clients}))

    def client_revoke(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        name = cmd.get_str("name")
        entry = self.daemon.p11.forget(name)
        if entry is None:
            return Reply.usage(f"no client named {name}")
        ended = self.daemon.p11.revoke(name)
        ended += accounts.delete_client(name)
        return Reply(
            output=f"client {name} revoked; {ended} process(es) ended",
            log_detail={"client": name, "role": entry.get("role"),
                        "fingerprint": entry.get("fingerprint"), "ended": ended},
        )  # fmt: skip

    def _revoke_all_clients(self) -> None:
        for name in list(p11service.load_clients()):
            self.daemon.p11.forget(name)
            self.daemon.p11.revoke(name)
            accounts.delete_client(name)

    # -- users -------------------------------------------------------------------------

    def user_password(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        (password,) = secrets
        accounts.check_password_policy(password)
        user = ctx.caller_account
        owner = ctx.owner
        if not (user == "admin" and not owner.device_state().otp_changed):
            accounts.set_password(user, password)
            return Reply(output="password changed")
        if owner.state is OwnerState.FACTORY:
            return Reply.failure("the admin account has not been provisioned yet")
        # The first change by the admin makes the device customer-owned in the same
        # operation, in this order, so that no crash at any point leaves the provider
        # enabled once the customer's password works: (1) the one-way fact on disk,
        # (2) the provider locked out, (3) the new password, (4) ``otp_changed``. A crash
        # after (1) leaves the provider out and the admin able to finish the change with
        # the one-time password; a crash after (3) is recognised by the shadow entry
        # (:meth:`store.Owner.load`).
        now = time.time()
        fresh = not store.customer_owned_fact()
        store.record_ownership(now)
        owner.state = OwnerState.CUSTOMER_OWNED
        owner.owned_since = owner.owned_since or now
        owner.otp_expires = None
        owner.provider_access = False
        owner.save()
        self._lock_provider()
        if fresh:
            self.daemon.record(
                "hsmd",
                "system",
                "console",
                "ownership-transfer",
                "ok",
                {"owner": "customer", "provider_access": "revoked"},
            )
        faults.reached("user-password:owned")
        accounts.set_password(user, password)
        faults.reached("user-password:changed")
        owner.otp_changed = True
        owner.save()
        return Reply(
            output="password changed; the device is now customer-owned and the "
            "provider's access is revoked",
            log_detail={"first_change": True},
        )

    @staticmethod
    def _provider_guard(ctx: Context) -> None:
        """Re-check inside the handler, under the device-wide order, that the provider
        still has powers: the role table decided on the same state, but a handler that
        changes what the provider controls checks the one-way fact itself."""
        if ctx.role is Role.PROVIDER and (
            store.customer_owned_fact() or ctx.owner.device_state().customer_owned
        ):
            raise store.OwnershipError("device is customer-owned; provider access has been revoked")

    def _lock_provider(self) -> None:
        owner = store.Owner.load()
        owner.provider_access = False
        owner.save()
        accounts.remove_authorized_key("provider")
        accounts.disable("provider")
        accounts.end_sessions("provider")

    def _managed(self, ctx: Context, name: str) -> None:
        if name not in ("monitor", "audit") and ctx.role is not Role.CONSOLE:
            raise accounts.AccountError(f"{name} cannot be managed this way")

    def user_enable(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        name = cmd.get_str("name")
        self._managed(ctx, name)
        self._provider_guard(ctx)
        if not accounts.has_key(name):
            return Reply.failure(
                f"{name} has no credential; set one first (user credential set {name})"
            )
        accounts.enable(name)
        return Reply(output=f"{name} enabled", log_detail={"account": name})

    def user_disable(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        name = cmd.get_str("name")
        self._managed(ctx, name)
        self._provider_guard(ctx)
        accounts.disable(name)
        accounts.end_sessions(name)
        return Reply(output=f"{name} disabled", log_detail={"account": name})

    def credential_set(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        name = cmd.get_str("name")
        self._managed(ctx, name)
        self._provider_guard(ctx)
        fingerprint = accounts.check_public_key(secrets[0])
        accounts.set_authorized_key(name, secrets[0])
        return Reply(
            output=f"{name} credential set: {fingerprint}",
            log_detail={"account": name, "fingerprint": fingerprint},
        )

    def otp_set(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        key, password = secrets
        self._provider_guard(ctx)
        if store.customer_owned_fact():
            # Not even from the console: a customer-owned device gets a new one-time
            # credential only after the out-of-band factory reset.
            raise store.OwnershipError(
                "device is customer-owned; a one-time password needs a factory reset first"
            )
        accounts.check_password_policy(password)
        fingerprint = accounts.check_public_key(key)
        hours = cmd.get_int("expires_hours") or contract.OTP_VALID_HOURS
        owner = ctx.owner
        owner.state = OwnerState.PROVISIONED
        owner.otp_expires = time.time() + hours * 3600
        owner.otp_changed = False
        accounts.set_authorized_key("admin", key)
        accounts.set_password("admin", password)
        owner.otp_hash = store.shadow_hash("admin")
        owner.save()
        accounts.enable("admin")
        return Reply(
            output=f"admin credential set ({fingerprint}); one-time password expires in {hours} h",
            log_detail={"fingerprint": fingerprint, "expires_hours": hours},
        )

    # -- sysconf -----------------------------------------------------------------------

    def provider_access_show(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        owner = store.Owner.load()
        info = {
            "provider_access": owner.provider_access,
            "provider_key_installed": accounts.has_key("provider"),
            "provider_enabled": accounts.is_enabled("provider"),
            "owner_state": owner.state.value,
        }
        return Reply(output=_json(info))

    def provider_access_revoke(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        self._lock_provider()
        return Reply(output="provider access revoked")

    def hostkey_show(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        info = {
            "active": _fingerprints(paths.HOSTKEY_DIRS["data"]),
            "staged": _fingerprints(paths.HOSTKEY_STAGED),
            "active_keys": _key_lines(paths.HOSTKEY_DIRS["data"]),
            "staged_keys": _key_lines(paths.HOSTKEY_STAGED),
        }
        return Reply(output=_json(info))

    def hostkey_stage(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        from hsmctl.appliance.personalise import make_host_keys

        shutil.rmtree(paths.HOSTKEY_STAGED, ignore_errors=True)
        make_host_keys(paths.HOSTKEY_STAGED, f"{_device().get('id')}-data")
        staged = _fingerprints(paths.HOSTKEY_STAGED)
        return Reply(output=_json({"staged": staged}), log_detail={"staged": staged})

    def hostkey_activate(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        if not paths.HOSTKEY_STAGED.is_dir():
            return Reply.failure(
                "no staged host keys (sysconf hostkey stage)", exit=protocol.EXIT_FAILED
            )
        active = paths.HOSTKEY_DIRS["data"]
        # File by file (a directory rename across overlay layers fails with EXDEV); each
        # file is replaced atomically. The running sshd's connections re-read them; it is
        # restarted below all the same, so that nothing serves from before the activation.
        for staged in sorted(paths.HOSTKEY_STAGED.iterdir()):
            tmp = active / f".{staged.name}.tmp"
            shutil.copy2(staged, tmp)
            os.replace(tmp, active / staged.name)
        shutil.rmtree(paths.HOSTKEY_STAGED)
        now = _fingerprints(active)
        # Returns once the data interface serves the new keys from a fresh sshd, so the
        # caller's next connection needs no retry. Without a data address there is none.
        if store.read_json(paths.NETWORK, {}).get("address") and not _restart_data_sshd():
            return Reply(
                exit=protocol.EXIT_FAILED,
                output=_json({"active": now}),
                error="host keys activated, but the data interface's sshd has not restarted "
                f"within {DATA_SSHD_RESTART_WAIT:g} s",
                outcome="failed",
                log_detail={"active": now, "sshd_restarted": False},
            )
        return Reply(output=_json({"active": now}), log_detail={"active": now})

    def factory_reset(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        from hsmctl.appliance.personalise import make_host_keys

        self._provider_guard(ctx)
        if store.customer_owned_fact() and ctx.role is not Role.CONSOLE:
            raise store.OwnershipError("a customer-owned device is reset only out of band")
        self._revoke_all_clients()
        token.customer_zeroize()
        for user in ("admin", "monitor", "audit"):
            accounts.remove_authorized_key(user)
            accounts.clear_password(user)
            accounts.disable(user)
            accounts.end_sessions(user)
        shutil.rmtree(paths.HOSTKEY_DIRS["data"], ignore_errors=True)
        make_host_keys(paths.HOSTKEY_DIRS["data"], f"{_device().get('id')}-data")
        paths.NETWORK.unlink(missing_ok=True)
        subprocess.run(["ip", "addr", "flush", "dev", "data0"], check=False, capture_output=True)
        # The customer's accounts are gone: only now may the one-way fact go, and only
        # then does the provider get its key back.
        store.clear_ownership()
        store.Owner().save()
        factory = store.read_json(paths.FACTORY, {})
        if factory.get("provider_public_key"):
            accounts.set_authorized_key("provider", factory["provider_public_key"])
            accounts.enable("provider")
        _signal_boot()
        rotated = self._rotate_audit_key()
        return Reply(
            output="factory reset done",
            log_detail={"data_hostkeys": "regenerated", **rotated.log_detail},
        )

    # -- network -----------------------------------------------------------------------

    def network_show(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        config = store.read_json(paths.NETWORK, {})
        addrs = subprocess.run(
            ["ip", "-br", "-4", "addr"], capture_output=True, text=True, check=False
        ).stdout
        return Reply(output=_json({"data": config, "interfaces": addrs.splitlines()}))

    def network_set(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        self._provider_guard(ctx)
        iface = cmd.get_interface("ip")
        gateway = cmd.get_address("gateway")
        dev = "data0"
        steps = [
            ["ip", "addr", "flush", "dev", dev],
            ["ip", "addr", "add", str(iface), "dev", dev],
            ["ip", "link", "set", dev, "up"],
            ["ip", "route", "replace", "default", "via", str(gateway), "dev", dev],
        ]
        for argv in steps:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                return Reply.failure(f"{' '.join(argv[:3])}: {proc.stderr.strip()}")
        store.write_json(
            paths.NETWORK, {"address": str(iface), "gateway": str(gateway), "device": dev}
        )
        _signal_boot()
        return Reply(
            output=f"data interface {iface} via {gateway}",
            log_detail={"address": str(iface), "gateway": str(gateway)},
        )

    # -- audit -------------------------------------------------------------------------

    def audit_show(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        count = cmd.get_int("last") or 20
        lines = self.daemon.log.tail(count)
        return Reply(output="\n".join(line.decode("utf-8") for line in lines))

    def audit_export(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        after = cmd.get_int("after") or 0
        # Export works even when the log cannot be written (SPEC §3): then without a
        # fresh checkpoint, and the collector sees the unsigned tail.
        with contextlib.suppress(LogUnavailable):
            self.daemon.checkpoint(force=True)
        log = self.daemon.log
        with log.lock:
            start = log.offset_after(after)
            end = log.size
        return Reply(
            stream=(str(log.path), start, end), log_detail={"after": after, "bytes": end - start}
        )

    def audit_verify(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        log = self.daemon.log
        with log.lock:
            end = log.size
        with open(log.path, "rb") as fh:
            report = auditlog.verify_lines(
                _lines_until(fh, end), self.daemon.keys.trusted(), device=self.daemon.keys.device
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
            output=_json(summary),
            outcome="ok" if ok else "failed",
            log_detail={"verified": ok, "last_seq": report.last_seq},
        )

    def audit_key_show(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        current = self.daemon.keys.current()
        initial = str(_device().get("audit_public_key") or current.public_key_pem)
        return Reply(
            output=_json(
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

    def audit_key_rotate(self, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
        return self._rotate_audit_key()

    def _rotate_audit_key(self) -> Reply:
        keys = self.daemon.keys
        old, new = keys.rotate()
        device = keys.device
        record = self.daemon.append_signed(
            lambda prev, now: auditlog.make_key_rotation(prev, old, new, device=device, time=now),
            then=lambda: keys.commit(new),
        )
        return Reply(
            output=_json(
                {
                    "key_id": new.key_id,
                    "public_key": new.public_key_pem,
                    "previous_key_id": old.key_id,
                    "rotation_seq": record["seq"],
                }
            ),
            log_detail={"old_key_id": old.key_id, "new_key_id": new.key_id},
        )
