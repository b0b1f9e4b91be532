"""Helpers for the takeover lab tests and the takeover benchmark.

Only the appliances of ``APPLIANCE_SETS["takeover"]`` (hsm09 … hsm14) are touched. Each
gets a data address of its own (``.200 + N`` in its tenant's ``hsm`` subnet, given with
``--ip``): provisioning picks "the next free address" from the provider database it is
given, and every test module has its own database, so two modules left to choose would
put two appliances on one address (seen: hsm09 and hsm15 both on 198.19.0.4).

A :class:`Rig` is one appliance provisioned once through ``hsmctl provision`` (its own
provider configuration and database); :meth:`Rig.reprovision` brings it back to a fresh
hand-off quickly: a fresh device daemon (no back-off memory of failed logins from earlier
takeovers' refused-login checks), factory reset over the console, then the provisioning
steps themselves (``hsmctl.provider.provisioning.run_step``, what the playbook's tasks
call), which write a new signed bundle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from tests.conftest import HSMCTL, client_netns, provider_config, tenant_config

LAB_DIR = Path("/var/lib/hsmctl-lab")
PROVIDER_KEY = LAB_DIR / "provider" / "provider_key"
PROVIDER_KNOWN_HOSTS = LAB_DIR / "provider" / "known_hosts"
SIGNING_KEY = LAB_DIR / "provider" / "signing_key.pem"
REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


# -- the device, out of band ------------------------------------------------------------------


def console(appliance: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """A root command inside the appliance (the lab's out-of-band path), in-process."""
    from hsmctl.lab import lab as lab_mod

    proc = lab_mod.console(appliance, list(argv))
    if check and proc.returncode != 0:
        raise AssertionError(f"console {appliance} {argv}: {proc.stderr.decode()}")
    return proc


def audit_records(appliance: str) -> list[dict[str, Any]]:
    out = console(appliance, "cat", "/var/log/hsm/audit.jsonl").stdout
    return [json.loads(line) for line in out.splitlines()]


def last_seq(appliance: str) -> int:
    records = audit_records(appliance)
    return int(records[-1]["seq"]) if records else 0


def sshd_log(appliance: str, iface: str = "data") -> list[str]:
    out = console(appliance, "cat", f"/var/log/hsm/sshd-{iface}.log").stdout
    return out.decode("utf-8", "replace").splitlines()


def admin_activity(appliance: str, after_seq: int) -> list[dict[str, Any]]:
    """Every record about the admin account after ``after_seq`` (logins of any outcome,
    sessions, commands)."""
    return [r for r in audit_records(appliance) if r["seq"] > after_seq and r["actor"] == "admin"]


def restart_hsmd(appliance: str) -> None:
    """Kill the device daemon by its pid; the appliance's init restarts it (about 1 s).
    Clears its per-source back-off memory of failed logins."""

    def pids() -> list[int]:
        proc = console(appliance, "pgrep", "-f", "/usr/local/sbin/hsmd", check=False)
        return [int(p) for p in proc.stdout.split()]

    old = pids()
    assert len(old) == 1, old
    console(appliance, "kill", str(old[0]))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = pids()
        if now and old[0] not in now:
            ready = console(appliance, "hsmsh", "-c", "help", check=False)
            if ready.returncode == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"hsmd on {appliance} did not come back")


def factory_reset(appliance: str) -> None:
    from hsmctl.lab import lab as lab_mod

    console(appliance, "hsmsh", "-c", "sysconf factory-reset")
    lab_mod.fabric().detach(appliance)


def data_ip(lab: dict[str, Any], appliance: str, tenant: str) -> str:
    t = next(x for x in lab["tenants"] if x["name"] == tenant)
    subnet = next(
        s for v in t["vnets"] if v["name"] == "vnet1" for s in v["subnets"] if s["name"] == "hsm"
    )
    octets = subnet["cidr"].split("/")[0].split(".")
    return ".".join([*octets[:3], str(200 + int(appliance.removeprefix("hsm")))])


# -- one appliance, provisioned -------------------------------------------------------------------


@dataclass
class Rig:
    """One appliance with its own provider configuration, provisioned to ``tenant``."""

    lab: dict[str, Any]
    appliance: str
    tenant: str
    directory: Path
    request_id: str = ""
    handoff: Path = field(default_factory=Path)

    @property
    def provider_conf(self) -> Path:
        return self.directory / "provider" / "provider.yaml"

    @property
    def netns(self) -> str:
        return client_netns(self.lab, self.tenant)

    @property
    def ip(self) -> str:
        return data_ip(self.lab, self.appliance, self.tenant)

    @property
    def mgmt_ip(self) -> str:
        return str(next(a for a in self.lab["appliances"] if a["id"] == self.appliance)["mgmt_ip"])

    @property
    def identity(self) -> Path:
        t = next(x for x in self.lab["tenants"] if x["name"] == self.tenant)
        return Path(t["identity"])

    def provision(self) -> Rig:
        """Factory state, then ``hsmctl provision --ip`` (ansible-runner, the real path)."""
        restart_hsmd(self.appliance)
        factory_reset(self.appliance)
        conf = provider_config(self.directory / "provider", [self.appliance])
        proc = subprocess.run(
            [HSMCTL, "--config", str(conf), "provision", "--tenant", self.tenant,
             "--vnet", "vnet1", "--subnet", "hsm", "--ip", self.ip, "--json"],
            capture_output=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()
        out = json.loads(proc.stdout)
        assert out["appliance"] == self.appliance, out
        self.handoff = Path(out["handoff"])
        from hsmctl.provider.context import open_context

        ctx = open_context(str(self.provider_conf))
        try:
            alloc = ctx.store.allocation(self.appliance)
            assert alloc is not None
            self.request_id = alloc.request_id
        finally:
            ctx.close()
        return self

    def reprovision(self) -> Path:
        """A fresh hand-off on the same allocation: fresh daemon, factory reset, then the
        provisioning steps (a new one-time password, a new signed bundle)."""
        from hsmctl.provider import provisioning

        restart_hsmd(self.appliance)
        factory_reset(self.appliance)
        result: dict[str, Any] = {}
        for step in provisioning.STEPS:
            result = provisioning.run_step(
                str(self.provider_conf), self.appliance, self.request_id, step.value
            )
        self.handoff = Path(result["handoff"])
        return self.handoff

    def tenant_conf(self, directory: Path) -> Path:
        return tenant_config(directory, self.lab, self.tenant)


def provision_all(rigs: Sequence[Rig]) -> None:
    """``hsmctl provision`` for several rigs at once (each its own provider database)."""
    errors: list[BaseException] = []

    def one(rig: Rig) -> None:
        try:
            rig.provision()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(r,)) for r in rigs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# -- the customer side ----------------------------------------------------------------------------


def takeover_cli(
    netns: str,
    tenant_conf: Path,
    handoff: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[bytes]:
    """``ip netns exec CLIENT hsmctl --config C takeover --handoff B ... --json``."""
    argv = ["ip", "netns", "exec", netns, HSMCTL, "--config", str(tenant_conf), "takeover",
            "--handoff", str(handoff), *extra, "--json"]  # fmt: skip
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(argv, capture_output=True, timeout=timeout, env=full_env, check=False)


def customer_state(tenant_conf: Path, appliance: str) -> Path:
    import yaml

    conf = yaml.safe_load(tenant_conf.read_text())
    return Path(conf["state_dir"]) / "appliances" / appliance


def escrowed(tenant_conf: Path, appliance: str, name: str) -> str | None:
    path = customer_state(tenant_conf, appliance) / "secrets" / name
    return path.read_text().removesuffix("\n") if path.exists() else None


def journal(tenant_conf: Path, appliance: str) -> dict[str, Any] | None:
    path = customer_state(tenant_conf, appliance) / "takeover.json"
    return dict(json.loads(path.read_text())) if path.exists() else None


def one_time_password(rig: Rig, handoff: Path | None = None) -> str:
    from hsmctl.handoff import open_bundle

    opened = open_bundle(
        handoff or rig.handoff,
        LAB_DIR / "provider" / "signing_key.pub.pem",
        rig.identity,
        allow_expired=True,
    )
    return opened.otp.reveal()


def admin_login(
    rig: Rig,
    pinned_keys: Sequence[str],
    password: str | None,
    *,
    with_key: bool = True,
    command: str | None = None,
) -> str:
    """Log in as admin over the data interface from the client namespace (pinned host
    keys); returns the command's output (or "" with no command). Raises the transport's
    errors (AuthenticationFailed, HostKeyMismatch, UnreachableError)."""
    from hsmctl.lab.netns import socket_factory
    from hsmctl.secret import Secret
    from hsmctl.ssh import DeviceConnection, PinnedHostKeys

    conn = DeviceConnection(
        rig.ip,
        username="admin",
        pinned=PinnedHostKeys.of(*pinned_keys),
        key=rig.identity if with_key else None,
        password=Secret(password) if password is not None else None,
        connect_socket=socket_factory(rig.netns),
    )
    with conn:
        return conn.run(command).stdout if command else ""


def escrowed_credential_logs_in(rig: Rig, tenant_conf: Path, timeout: float = 20) -> str:
    """SPEC §7 "the customer never loses access": one of the escrowed credentials (the
    one-time password from the bundle, or the escrowed new password), with the tenant key,
    logs in against the journaled host keys. Returns which one did."""
    from hsmctl.errors import UnreachableError
    from hsmctl.ssh import AuthenticationFailed

    j = journal(tenant_conf, rig.appliance)
    if j is None:
        from hsmctl.handoff import read_bundle

        keys = list(read_bundle(rig.handoff)["data_host_keys"])
    else:
        keys = j["host_keys"]["current"] + j["host_keys"]["staged"]
    candidates = [("one-time", one_time_password(rig))]
    new = escrowed(tenant_conf, rig.appliance, "admin-password")
    if new is not None:
        candidates.append(("escrowed", new))
    # Try the one the device should take first (asked out of band): every refused try
    # counts towards the device's back-off and slows the rest of the test.
    shown = json.loads(console(rig.appliance, "hsmsh", "-c", "hsm show").stdout)
    if shown["owner_state"] == "customer-owned":
        candidates.reverse()
    deadline = time.monotonic() + timeout
    while True:
        for name, password in candidates:
            try:
                admin_login(rig, keys, password)
                return name
            except AuthenticationFailed:
                continue
            except UnreachableError:  # the data sshd restarting after a host-key activation
                break
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{rig.appliance}: no escrowed credential logs in (journal: {j and j['password']})"
            )
        time.sleep(0.3)


def resign_bundle(
    rig: Rig,
    out: Path,
    *,
    now: datetime | None = None,
    validity: timedelta | None = None,
    **changes: Any,
) -> Path:
    """A copy of the rig's bundle with ``changes`` (``data_ip``, ``data_host_keys``...),
    signed again with the provider's real signing key (so only what changed is wrong);
    ``now``/``validity`` move its issue time and lifetime (an expired bundle)."""
    from hsmctl.handoff import make_bundle, read_bundle, write_bundle
    from hsmctl.secret import Secret

    b = read_bundle(rig.handoff)
    issued = datetime.fromisoformat(b["issued_at"].replace("Z", "+00:00"))
    expires = datetime.fromisoformat(b["expires_at"].replace("Z", "+00:00"))
    fields: dict[str, Any] = {
        "appliance": b["appliance"],
        "serial": b["serial"],
        "tenant": b["tenant"],
        "data_ip": b["data_ip"],
        "data_host_keys": b["data_host_keys"],
        "audit_public_key": b["audit_public_key"],
        "request_id": b["request_id"],
        "mgmt_ip": b.get("mgmt_ip"),
        **changes,
    }
    bundle = make_bundle(
        **fields,
        otp=Secret(one_time_password(rig)),
        tenant_public_key_line=Path(f"{rig.identity}.pub").read_text().strip(),
        provider_signing_key_path=SIGNING_KEY,
        validity=validity or (expires - issued),
        now=now or issued,
    )
    write_bundle(out, bundle)
    return out


def verify_receipt(receipt: Path, identity: Path) -> dict[str, Any]:
    from hsmctl.takeover.workflow import verify_receipt as verify

    return verify(receipt, identity)


# -- ansible ----------------------------------------------------------------------------------


def write_inventory(path: Path, hosts: dict[str, dict[str, Any]]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"all": {"hosts": hosts}}, sort_keys=True))
    return path


def ansible_runner_cli(
    netns: str,
    private_dir: Path,
    inventory: Path,
    extravars: dict[str, Any],
    *,
    forks: int = 5,
    timeout: float = 600,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``playbooks/takeover.yml`` the way AWX does, with ``ansible-runner run`` on a
    private data directory that is kept (its artifacts are what the secrets scan reads)."""
    import yaml

    (private_dir / "env").mkdir(parents=True, exist_ok=True)
    (private_dir / "inventory").mkdir(parents=True, exist_ok=True)
    os.chmod(private_dir, 0o700)
    (private_dir / "env" / "extravars").write_text(yaml.safe_dump(extravars))
    (private_dir / "inventory" / "hosts.yml").write_text(inventory.read_text())
    argv = ["ip", "netns", "exec", netns, str(VENV_BIN / "ansible-runner"), "run",
            str(private_dir), "-p", str(REPO / "playbooks" / "takeover.yml"),
            "--forks", str(forks)]  # fmt: skip
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(argv, capture_output=True, timeout=timeout, env=env, check=False)


def runner_outcomes(private_dir: Path) -> dict[str, dict[str, Any]]:
    """Per host: the last module result of the takeover task (from the job events)."""
    outcomes: dict[str, dict[str, Any]] = {}
    for path in sorted((private_dir / "artifacts").glob("*/job_events/*.json")):
        event = json.loads(path.read_text())
        data = event.get("event_data") or {}
        if event.get("event") in ("runner_on_ok", "runner_on_failed") and data.get("task", "") \
                .startswith("Take the appliance over"):  # fmt: skip
            outcomes[data["host"]] = {"status": event["event"], **(data.get("res") or {})}
    return outcomes


# -- secrets where they must not be -------------------------------------------------------------
