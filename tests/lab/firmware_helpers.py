"""Helpers for the firmware lab tests: the out-of-band console, pinned SSH sessions on
both interfaces, provisioning by hand, and the device's activity log.

Only hsm03 (tenant1) and hsm04 (tenant2) are ever touched (conftest's APPLIANCE_SETS
"firmware"); their data addresses follow the lab's rule (rig.data_ip: .200 + N for hsmN,
so .203 and .204), clear of what the provider's allocator hands out to other tests and of
every other appliance's (.233 was hsm33's once the lab grew to 100 appliances: the
health test's takeover reached hsm03 there and refused its host key). The console is
the lab's own function (what ``hsmctl lab console`` runs), called in-process to spare a
CLI start per call.
Every secret a test invents is registered in :data:`SECRETS` so the grep test can look
for it everywhere it must not be.
"""

from __future__ import annotations

import json
import secrets
import socket
import string
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from hsmctl.lab import control as lab_driver
from hsmctl.lab import netns

LAB_DIR = Path("/var/lib/hsmctl-lab")
PROVIDER_KEY = LAB_DIR / "provider" / "provider_key"
MONITOR_KEY = LAB_DIR / "provider" / "monitor_key"
PROVIDER_KNOWN_HOSTS = LAB_DIR / "provider" / "known_hosts"
TIMEOUT = 20.0

SECRETS: set[str] = set()
"""Every password and PIN the tests used (the grep test's needles)."""


def new_secret(kind: str = "pw") -> str:
    """A fresh password/PIN meeting the device policy (12+ chars, 4 classes); registered."""
    body = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(14))
    value = f"{kind}-{body}Aa9"
    SECRETS.add(value)
    return value


# --- the appliances this module may use ---------------------------------------------------


@dataclass(frozen=True)
class Appliance:
    id: str
    mgmt_ip: str
    tenant: str
    client_netns: str
    identity: Path
    data_ip: str
    prefix: int
    gateway: str

    @property
    def upper(self) -> Path:
        return LAB_DIR / "appliances" / self.id / "upper"

    @property
    def console_log(self) -> Path:
        return LAB_DIR / "appliances" / self.id / "console.log"

    @property
    def tenant_public_key(self) -> str:
        return Path(f"{self.identity}.pub").read_text().strip()


def appliance(lab: dict[str, Any], ident: str, tenant: str, host: int) -> Appliance:
    a = next(x for x in lab["appliances"] if x["id"] == ident)
    t = next(x for x in lab["tenants"] if x["name"] == tenant)
    subnet = next(
        s for v in t["vnets"] if v["name"] == "vnet1" for s in v["subnets"] if s["name"] == "hsm"
    )
    base, prefix = subnet["cidr"].split("/")
    octets = base.split(".")
    return Appliance(
        id=ident,
        mgmt_ip=a["mgmt_ip"],
        tenant=tenant,
        client_netns=t["client_netns"],
        identity=Path(t["identity"]),
        data_ip=".".join([*octets[:3], str(host)]),
        prefix=int(prefix),
        gateway=".".join([*octets[:3], "1"]),
    )


# --- console (out-of-band) -----------------------------------------------------------------


def console(
    app: Appliance, *argv: str, input: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """``hsmctl lab console APP -- ARGV`` (the lab's own function, without a CLI start)."""
    proc = lab_driver.console(app.id, list(argv), input=input)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"console {app.id} {' '.join(argv)} exited {proc.returncode}: {proc.stderr!r}"
        )
    return proc


def audit_records(app: Appliance) -> list[dict[str, Any]]:
    out = console(app, "cat", "/var/log/hsm/audit.jsonl").stdout
    return [json.loads(line) for line in out.splitlines()]


def last_seq(app: Appliance) -> int:
    records = audit_records(app)
    return int(records[-1]["seq"]) if records else 0


def wait_for_records(
    app: Appliance,
    match: Callable[[dict[str, Any]], bool],
    *,
    after: int = 0,
    count: int = 1,
    timeout: float = 10.0,
) -> list[dict[str, Any]]:
    """Records after ``after`` that ``match``, once at least ``count`` exist (sshd's login
    lines reach the log through the daemon's tailer, a fraction of a second later)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in audit_records(app) if r["seq"] > after and match(r)]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def hsmd_pid(app: Appliance) -> int:
    out = console(app, "pgrep", "-f", "/usr/local/sbin/hsmd").stdout.split()
    return int(out[0])


def restart_hsmd(app: Appliance) -> None:
    """Kill the daemon by pid; the appliance's init restarts it within about a second."""
    old = hsmd_pid(app)
    console(app, "kill", str(old))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        proc = console(app, "pgrep", "-f", "/usr/local/sbin/hsmd", check=False)
        pids = [int(p) for p in proc.stdout.split()]
        if pids and old not in pids:
            ready = console(app, "hsmsh", "-c", "help", check=False)
            if ready.returncode == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"hsmd on {app.id} did not come back")


# --- SSH with pinned host keys -----------------------------------------------------------


@dataclass
class Run:
    exit: int
    out: bytes
    err: bytes

    @property
    def text(self) -> str:
        return self.out.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.out)


class Conn:
    """One SSH connection to an appliance, host key pinned.

    Lifecycle: :func:`connect` opens the transport and checks the host key; the
    ``auth_*`` methods authenticate (raising paramiko's AuthenticationException); then
    ``run``/``shell``/``channel`` as often as wanted; ``close``.
    """

    def __init__(self, sock: socket.socket, host: str, known: paramiko.HostKeys) -> None:
        self.host = host
        self.transport = paramiko.Transport(sock)
        self.transport.banner_timeout = TIMEOUT
        self.transport.auth_timeout = TIMEOUT
        try:
            self.transport.start_client(timeout=TIMEOUT)
            key = self.transport.get_remote_server_key()
            if not known.check(host, key):
                raise paramiko.BadHostKeyException(host, key, key)
        except BaseException:
            self.transport.close()
            raise

    def auth_key(self, user: str, pkey: paramiko.PKey) -> list[str]:
        """Public-key step; returns the methods still needed (partial success)."""
        return list(self.transport.auth_publickey(user, pkey))

    def auth_password(self, user: str, password: str) -> list[str]:
        return list(self.transport.auth_password(user, password, fallback=False))

    @property
    def authenticated(self) -> bool:
        return self.transport.is_authenticated()

    def run(self, line: str | bytes, stdin: Sequence[str] = (), timeout: float = 60) -> Run:
        chan = self.transport.open_session(timeout=TIMEOUT)
        chan.settimeout(timeout)
        chan.exec_command(line)
        if stdin:
            chan.sendall("".join(f"{s}\n" for s in stdin).encode())
        chan.shutdown_write()
        out = chan.makefile("rb").read()
        err = chan.makefile_stderr("rb").read()
        status = chan.recv_exit_status()
        chan.close()
        return Run(status, out, err)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_key(path: Path) -> paramiko.PKey:
    return paramiko.PKey.from_path(str(path))


def provider_known() -> paramiko.HostKeys:
    return paramiko.HostKeys(str(PROVIDER_KNOWN_HOSTS))


def data_known(app: Appliance) -> paramiko.HostKeys:
    """Pin the data interface's current host keys, read over the out-of-band console."""
    known = paramiko.HostKeys()
    for kind in ("ed25519", "ecdsa"):
        line = console(app, "cat", f"/etc/ssh/data/ssh_host_{kind}_key.pub").stdout.decode()
        entry = paramiko.hostkeys.HostKeyEntry.from_line(f"{app.data_ip} {line.strip()}")
        assert entry is not None and entry.key is not None
        known.add(app.data_ip, entry.key.get_name(), entry.key)
    return known


def mgmt_conn(app: Appliance) -> Conn:
    sock = socket.create_connection((app.mgmt_ip, 22), timeout=TIMEOUT)
    return Conn(sock, app.mgmt_ip, provider_known())


def data_conn(app: Appliance, known: paramiko.HostKeys, netns_name: str | None = None) -> Conn:
    sock = netns.connect_in(netns_name or app.client_netns, app.data_ip, 22, timeout=TIMEOUT)
    return Conn(sock, app.data_ip, known)


def wait_for_port(app: Appliance, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            netns.connect_in(app.client_netns, app.data_ip, 22, timeout=2).close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# --- the device in a known state ---------------------------------------------------------


@dataclass
class Device:
    """An appliance brought to a state by a fixture, with the secrets that got it there."""

    app: Appliance
    known: paramiko.HostKeys = field(default_factory=paramiko.HostKeys)
    otp: str = ""
    password: str = ""
    audit_key: paramiko.PKey | None = None

    def provider(self) -> Conn:
        conn = mgmt_conn(self.app)
        conn.auth_key("provider", load_key(PROVIDER_KEY))
        return conn

    def admin(self, password: str | None = None) -> Conn:
        conn = data_conn(self.app, self.known)
        try:
            rest = conn.auth_key("admin", load_key(self.app.identity))
            assert rest == ["password"], rest
            conn.auth_password("admin", password or self.password or self.otp)
            assert conn.authenticated
        except BaseException:
            conn.close()
            raise
        return conn

    def audit(self) -> Conn:
        assert self.audit_key is not None
        conn = data_conn(self.app, self.known)
        conn.auth_key("audit", self.audit_key)
        return conn


def factory_reset(app: Appliance) -> None:
    console(app, "hsmsh", "-c", "sysconf factory-reset")


def attach(app: Appliance) -> None:
    fabric = lab_driver.fabric()
    where = fabric.attachment(app.id)
    if where.tenant not in (None, app.tenant):
        fabric.detach(app.id)
    fabric.attach(app.id, app.tenant, "vnet1", "hsm")


def provision(app: Appliance) -> Device:
    """A fresh daemon (no back-off memory from earlier tests), factory reset, attach,
    then ``network set`` and ``user otp set`` as the provider."""
    restart_hsmd(app)
    factory_reset(app)
    attach(app)
    dev = Device(app, otp=new_secret("otp"))
    with dev.provider() as p:
        r = p.run(f"network set --ip {app.data_ip}/{app.prefix} --gateway {app.gateway}")
        assert r.exit == 0, r
        r = p.run("user otp set", stdin=[app.tenant_public_key, dev.otp])
        assert r.exit == 0, r
    wait_for_port(app)
    dev.known = data_known(app)
    return dev


def take_over(dev: Device, *, audit: bool = True) -> Device:
    """The first password change (customer-owned), then an ``audit`` key if asked."""
    dev.password = new_secret("admin")
    with dev.admin(dev.otp) as a:
        r = a.run("user password", stdin=[dev.password])
        assert r.exit == 0, r
    if audit:
        key = paramiko.ECDSAKey.generate(bits=256)
        with dev.admin() as a:
            line = f"{key.get_name()} {key.get_base64()} audit-collector"
            r = a.run("user credential set audit", stdin=[line])
            assert r.exit == 0, r
            r = a.run("user enable audit")
            assert r.exit == 0, r
        dev.audit_key = key
    return dev


# --- looking for secrets where they must not be --------------------------------------------
