"""Register, list and revoke an appliance's application clients, as ``admin`` over the
data interface (the escrowed password of the takeover, the pinned host keys).

Nothing changes on bad input (exit 2) or on an appliance not taken over from this state
directory (exit 5): both are decided before the device is contacted. ``register``
writes the kit into a temporary directory first and renames it into place only after
the device accepted the key, so a refused registration leaves no kit and a kit always
matches a registered client.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from hsmctl import devicejson, privatefiles
from hsmctl.clients import kit
from hsmctl.clients.request import check_client
from hsmctl.customer.context import TenantContext
from hsmctl.customer.store import ApplianceDir
from hsmctl.errors import ConflictError, UsageError
from hsmctl.secret import Secret
from hsmctl.ssh import DeviceConnection, PinnedHostKeys

KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
             "ecdsa-sha2-nistp521", "ssh-rsa")  # fmt: skip


class Appliance:
    """An appliance this customer owns: its pins and the escrowed admin password."""

    def __init__(self, ctx: TenantContext, appliance: str) -> None:
        if not (ctx.state_dir / "appliances" / appliance / "pins.json").is_file():
            raise ConflictError(
                f"{appliance}: not taken over from this state directory ({ctx.state_dir}); "
                "run hsmctl takeover first"
            )
        self.ctx = ctx
        self.id = appliance
        self.state = ApplianceDir(ctx.state_dir, appliance)
        pins = self.state.pins()
        journal = self.state.read("takeover.json") or {}
        password = self.state.escrowed("admin-password")
        if journal.get("password") != "committed" or password is None:
            raise ConflictError(f"{appliance}: the takeover is not finished (not customer-owned)")
        if not pins.get("data_ip") or not pins.get("data_host_keys"):
            raise ConflictError(f"{appliance}: pins.json lacks the data address or host keys")
        self.data_ip = str(pins["data_ip"])
        self.host_keys = [str(k) for k in pins["data_host_keys"]]
        self.password: Secret = password

    def connect(self) -> DeviceConnection:
        conn = DeviceConnection(
            self.data_ip,
            username="admin",
            pinned=PinnedHostKeys.of(*self.host_keys),
            key=self.ctx.identity,
            password=self.password,
        )
        return conn.connect()

    def reply(self, conn: DeviceConnection, command: str, stdin: list[str] | None = None) -> Any:
        out = conn.run(command, stdin or []).stdout
        return devicejson.loads_object(out, f"reply to {command!r}", self.id)


def _public_key_line(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--public-key {path}: cannot read it ({exc})") from exc
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != 1 or lines[0].split()[0] not in KEY_TYPES or len(lines[0].split()) < 2:
        raise UsageError(
            f"--public-key {path}: one OpenSSH public key line (Ed25519, ECDSA or RSA) expected"
        )
    return " ".join(lines[0].split()[:3])


def new_key(name: str) -> tuple[Secret, str]:
    """A new Ed25519 key for client ``name``: (private key, public key line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return Secret(private), f"{public} {kit.ACCOUNT_PREFIX}{name}"


def kit_dir(state: ApplianceDir, name: str) -> Path:
    """Where client ``name``'s kit goes unless the customer says otherwise."""
    return (state.dir / "clients" / name).absolute()


def start_kit(directory: Path, name: str, line: str, private: Secret | None) -> None:
    """The kit's keys in ``directory`` (new, 0700), which is not yet the kit's place: the
    private key (0600) is written and fsynced before the device hears of the public one."""
    directory.mkdir(parents=True, mode=0o700)
    if private is not None:
        privatefiles.write_atomic(kit.key_path(directory, name), private.reveal().encode())
    privatefiles.write_atomic(
        kit.key_path(directory, name).with_suffix(".pub"), (line + "\n").encode(), mode=0o644
    )


def kit_public_key(directory: Path, name: str) -> str | None:
    """The public key line a kit (finished or not) holds, if any."""
    try:
        return kit.key_path(directory, name).with_suffix(".pub").read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def finish_kit(
    directory: Path,
    final: Path,
    *,
    name: str,
    role: str,
    appliance: str,
    data_ip: str,
    host_keys: list[str],
    label: str | None,
) -> None:
    """The rest of the kit (the client is registered by now), naming the paths of its
    final place; then ``directory`` renamed to ``final`` (absent or empty), durably."""
    files = {
        "known_hosts": kit.known_hosts(data_ip, host_keys),
        f"{name}.module": kit.module_file(final, name, data_ip),
        "README": kit.readme(final, name, role, appliance, label),
    }
    for file_name, text in files.items():
        privatefiles.write_atomic(directory / file_name, text.encode(), mode=0o644)
    if final.exists():
        final.rmdir()
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(directory, final)
    privatefiles.fsync_dir(final.parent)


def register(
    ctx: TenantContext,
    appliance: str,
    name: str,
    role: str,
    public_key: Path | None = None,
    output: Path | None = None,
) -> dict[str, Any]:
    check_client(name, role)
    given = _public_key_line(public_key) if public_key is not None else None
    target = Appliance(ctx, appliance)
    final = output.absolute() if output is not None else kit_dir(target.state, name)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise UsageError(f"--output {final}: exists and is not empty")
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if given is None:
            private, line = new_key(name)
            start_kit(tmp, name, line, private)
        else:
            line = given
            start_kit(tmp, name, line, None)
        with target.connect() as conn:
            label = target.reply(conn, "hsm show").get("label")
            reply = target.reply(conn, f"client register {name} --role {role}", [line])
        finish_kit(
            tmp,
            final,
            name=name,
            role=role,
            appliance=appliance,
            data_ip=target.data_ip,
            host_keys=target.host_keys,
            label=str(label) if label else None,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "appliance": appliance,
        "client": name,
        "role": role,
        "kit": str(final),
        "fingerprint": reply.get("fingerprint"),
    }


def list_clients(ctx: TenantContext, appliance: str) -> dict[str, Any]:
    target = Appliance(ctx, appliance)
    with target.connect() as conn:
        reply = target.reply(conn, "client list")
    clients = reply.get("clients")
    if not isinstance(clients, list):
        clients = []
    keys = ("name", "role", "fingerprint", "registered")
    return {
        "appliance": appliance,
        "clients": [{k: c.get(k) for k in keys} for c in clients if isinstance(c, dict)],
    }


def revoke(ctx: TenantContext, appliance: str, name: str) -> dict[str, Any]:
    try:
        kit.check_name(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    target = Appliance(ctx, appliance)
    with target.connect() as conn:
        conn.run(f"client revoke {name}")
    with contextlib.suppress(OSError):
        # The kit made in the state directory is useless now; one written elsewhere
        # (--output) is the customer's to remove.
        shutil.rmtree(target.state.dir / "clients" / name)
    return {"appliance": appliance, "client": name, "revoked": True}
