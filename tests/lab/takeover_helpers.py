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
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

# The lab rig is shared with the benchmarks (hsmctl.lab.rig); the tests import it from here.
from hsmctl.lab.rig import Rig as Rig
from hsmctl.lab.rig import client_netns as client_netns
from hsmctl.lab.rig import console as console
from hsmctl.lab.rig import customer_state as customer_state
from hsmctl.lab.rig import data_ip as data_ip
from hsmctl.lab.rig import escrowed as escrowed
from hsmctl.lab.rig import factory_reset as factory_reset
from hsmctl.lab.rig import provision_all as provision_all
from hsmctl.lab.rig import restart_hsmd as restart_hsmd
from hsmctl.lab.rig import takeover_cli as takeover_cli

LAB_DIR = Path("/var/lib/hsmctl-lab")
PROVIDER_KEY = LAB_DIR / "provider" / "provider_key"
PROVIDER_KNOWN_HOSTS = LAB_DIR / "provider" / "known_hosts"
SIGNING_KEY = LAB_DIR / "provider" / "signing_key.pem"
REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


# -- the device, out of band ------------------------------------------------------------------


def audit_records(appliance: str) -> list[dict[str, Any]]:
    out = console(appliance, "cat", "/var/log/hsm/audit.jsonl").stdout
    return [json.loads(line) for line in out.splitlines()]


def settle_logins(appliance: str, timeout: float = 20.0) -> None:
    """Wait until the device has logged every login sshd has written so far. hsmd reads
    sshd's log files when inotify reports a write, ~50 ms after it
    (hsmctl.appliance.sshdlog.Tailer), so under load a login can reach the activity log
    after the client's command returned: a test
    that takes "the log's end" must take it after that, or the login shows up later as
    if it were new activity.

    hsmd persists its read offsets after every read that logged something; lines after
    the persisted offset were either not read yet or held no login. So: settled when
    what follows the persisted offset is whole lines none of which is an event
    (:func:`hsmctl.appliance.sshdlog.parse`, the daemon's own parser)."""
    from hsmctl.appliance.sshdlog import parse

    probe = (
        "import json, pathlib\n"
        "try: o = json.loads(pathlib.Path('/var/lib/hsm/state/sshd-offsets.json').read_text())\n"
        "except FileNotFoundError: o = {}\n"
        "out = {}\n"
        "for f in ('mgmt', 'data'):\n"
        "    try: fh = open(f'/var/log/hsm/sshd-{f}.log', 'rb')\n"
        "    except FileNotFoundError: out[f] = ''; continue\n"
        "    with fh:\n"
        "        n = o.get(f, 0)\n"
        "        fh.seek(n if n <= fh.seek(0, 2) else 0)\n"
        "        out[f] = fh.read().decode('utf-8', 'replace')\n"
        "print(json.dumps(out))\n"
    )
    deadline = time.monotonic() + timeout
    while True:
        tails = json.loads(console(appliance, "python3", "-I", "-c", probe).stdout)
        pending = {
            iface: tail
            for iface, tail in tails.items()
            if (tail and not tail.endswith("\n"))
            or any(parse(line) is not None for line in tail.splitlines())
        }
        if not pending:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{appliance}: sshd log not caught up: {pending}")
        time.sleep(0.1)


def last_seq(appliance: str) -> int:
    """The activity log's last sequence number, once every login so far is in it."""
    settle_logins(appliance)
    records = audit_records(appliance)
    return int(records[-1]["seq"]) if records else 0


def sshd_log(appliance: str, iface: str = "data") -> list[str]:
    out = console(appliance, "cat", f"/var/log/hsm/sshd-{iface}.log").stdout
    return out.decode("utf-8", "replace").splitlines()


def admin_activity(appliance: str, after_seq: int) -> list[dict[str, Any]]:
    """Every record about the admin account after ``after_seq`` (logins of any outcome,
    sessions, commands)."""
    return [r for r in audit_records(appliance) if r["seq"] > after_seq and r["actor"] == "admin"]


# -- the customer side ----------------------------------------------------------------------------


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
    # The playbook calls hsmctl.fleet.hsm_takeover: the collection inside the package.
    from hsmctl.runner.adapter import COLLECTIONS_PATH

    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS_PATH),
    }
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
