"""System configuration: the provider's access, the data interface's host keys, the
factory reset."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import TYPE_CHECKING, Any

from hsmctl.appliance import accounts, paths, protocol, sshpub, store, token
from hsmctl.appliance.commands.audit import rotate_audit_key
from hsmctl.appliance.commands.clients import revoke_all_clients
from hsmctl.appliance.commands.common import (
    Context,
    Reply,
    as_json,
    device_record,
    signal_boot,
)
from hsmctl.appliance.commands.users import lock_provider, provider_guard
from hsmctl.appliance.grammar import Command
from hsmctl.appliance.roles import Role

if TYPE_CHECKING:
    from hsmctl.appliance.daemon import Daemon


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
    signal_boot()
    deadline = time.monotonic() + DATA_SSHD_RESTART_WAIT
    while time.monotonic() < deadline:
        new = _pid_in(pidfile)
        if new is not None and new != old and _alive(new) and not (old and _alive(old)):
            return True
        time.sleep(0.05)
    return False


def _key_lines(directory: Any) -> list[str]:
    out = []
    for kind in paths.HOSTKEY_TYPES:
        pub = directory / f"ssh_host_{kind}_key.pub"
        if pub.exists():
            out.append(" ".join(pub.read_text().split()[:2]))
    return out


def _fingerprint(pub: Any) -> str | None:
    """``ssh-keygen -l -f PUB``'s fingerprint: computed here from the key's blob when
    :mod:`sshpub` can prove the same answer (the device's own Ed25519 and ECDSA keys),
    else from ssh-keygen. None: it does not parse."""
    try:
        lines = pub.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    if len(lines) == 1:
        found = sshpub.fingerprint(lines[0])
        if found is not None:
            return found
    proc = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(pub)], capture_output=True, text=True, check=False
    )
    return proc.stdout.split()[1] if proc.returncode == 0 else None


def _fingerprints(directory: Any) -> list[str]:
    out = []
    for kind in paths.HOSTKEY_TYPES:
        pub = directory / f"ssh_host_{kind}_key.pub"
        if pub.exists():
            found = _fingerprint(pub)
            if found is not None:
                out.append(f"{found} ({kind})")
    return out


def provider_access_show(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    owner = store.Owner.load()
    info = {
        "provider_access": owner.provider_access,
        "provider_key_installed": accounts.has_key("provider"),
        "provider_enabled": accounts.is_enabled("provider"),
        "owner_state": owner.state.value,
    }
    return Reply(output=as_json(info))


def provider_access_revoke(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    lock_provider()
    return Reply(output="provider access revoked")


def hostkey_show(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    info = {
        "active": _fingerprints(paths.HOSTKEY_DIRS["data"]),
        "staged": _fingerprints(paths.HOSTKEY_STAGED),
        "active_keys": _key_lines(paths.HOSTKEY_DIRS["data"]),
        "staged_keys": _key_lines(paths.HOSTKEY_STAGED),
    }
    return Reply(output=as_json(info))


def hostkey_stage(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    from hsmctl.appliance.personalise import make_host_keys

    shutil.rmtree(paths.HOSTKEY_STAGED, ignore_errors=True)
    make_host_keys(paths.HOSTKEY_STAGED, f"{device_record().get('id')}-data")
    staged = _fingerprints(paths.HOSTKEY_STAGED)
    return Reply(output=as_json({"staged": staged}), log_detail={"staged": staged})


def hostkey_activate(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
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
            output=as_json({"active": now}),
            error="host keys activated, but the data interface's sshd has not restarted "
            f"within {DATA_SSHD_RESTART_WAIT:g} s",
            outcome="failed",
            log_detail={"active": now, "sshd_restarted": False},
        )
    return Reply(output=as_json({"active": now}), log_detail={"active": now})


def factory_reset(daemon: Daemon, ctx: Context, cmd: Command, secrets: list[str]) -> Reply:
    from hsmctl.appliance.personalise import make_host_keys

    provider_guard(ctx)
    if store.customer_owned_fact() and ctx.role is not Role.CONSOLE:
        raise store.OwnershipError("a customer-owned device is reset only out of band")
    revoke_all_clients(daemon)
    token.customer_zeroize()
    for user in ("admin", "monitor", "audit"):
        accounts.remove_authorized_key(user)
        accounts.clear_password(user)
        accounts.disable(user)
        accounts.end_sessions(user)
    shutil.rmtree(paths.HOSTKEY_DIRS["data"], ignore_errors=True)
    make_host_keys(paths.HOSTKEY_DIRS["data"], f"{device_record().get('id')}-data")
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
    signal_boot()
    rotated = rotate_audit_key(daemon)
    return Reply(
        output="factory reset done",
        log_detail={"data_hostkeys": "regenerated", **rotated.log_detail},
    )
