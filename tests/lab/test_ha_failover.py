"""An HA group's client kit and failover (SPEC §12, issue 12 item 3):
``hsmctl client register --group`` and an application that keeps signing when a member
goes away.

hsm76 (stamp2) and hsm77 (stamp1) are provisioned into tenant1's hsm subnet (.96/.97)
and taken over with the same ``--domain-file`` and ``--co-pin-file``; ``ha create``
groups them. The application is python-pkcs11 loading ``p11-kit-proxy.so`` as a non-root
user in the tenant's client namespace with only the group kit's module file installed
(real ssh, the kit's connector, sshd, p11-kit remote, the key-policy module, SoftHSM).
It signs in a loop, reopening its session (``lib.reinitialize()``) after an error; every
signature is verified with the public key read on hsm76 before the loop. The member the
application is on is detached with the lab fabric driver (its data port leaves the
tenant's network), and the gap between the last good signature before and the first
good one after is measured. A key made during the outage reaches the returning member
on the next ``ha sync``.

Appliances: ``APPLIANCE_SETS["ha_failover"]`` (hsm76, hsm77), factory-reset at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tests.conftest import APPLIANCE_SETS, HSMCTL, ensure_lab
from tests.lab.p11_helpers import PROXY, PYTHON
from tests.lab.takeover_helpers import Rig, console, factory_reset, provision_all, takeover_cli
from tests.lab.test_keys_domain import _SIGN, Domains

pytestmark = pytest.mark.lab

A, B = APPLIANCE_SETS["ha_failover"]
TENANT = "tenant1"
GROUP = "gfo"
APP = "fo-app"
APP_USER = "hsmtest-fo"
KEY = "fo-ec"
SECRET = "domain-secret-of-the-failover-test-01"
ADDRESSES = {A: "198.19.0.96", B: "198.19.0.97"}
GAP_LIMIT = 2.0  # seconds (the "within 2 s")


class FoRig(Rig):
    @property
    def ip(self) -> str:
        return ADDRESSES[self.appliance]


@dataclass
class Lab:
    conf: Path
    netns: str
    base: Path
    state_dir: Path
    home: Path
    labels: dict[str, str] = field(default_factory=dict)

    def hsmctl(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
        argv = ["ip", "netns", "exec", self.netns, HSMCTL, "--config", str(self.conf), *args]
        return subprocess.run(argv, capture_output=True, timeout=timeout, check=False)

    def ok(self, *args: str) -> Any:
        proc = self.hsmctl(*args, "--json")
        assert proc.returncode == 0, (args, proc.stderr.decode()[-3000:])
        return json.loads(proc.stdout)

    def fails(self, code: int, *args: str) -> dict[str, Any]:
        proc = self.hsmctl(*args, "--json")
        assert proc.returncode == code, (args, proc.returncode, proc.stderr.decode()[-3000:])
        err: dict[str, Any] = json.loads(proc.stdout)["error"]
        assert err["exit_code"] == code and err["message"]
        return err

    def clients(self, appliance: str) -> dict[str, dict[str, Any]]:
        listed = self.ok("client", "list", appliance)["clients"]
        return {c["name"]: c for c in listed}

    def kit(self) -> Path:
        return self.home / "kit"

    def chown(self) -> None:
        subprocess.run(["chown", "-R", f"{APP_USER}:", str(self.home)], check=True)

    def app_argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, "runuser", "-u", APP_USER, "--", "env",
                "-i", f"HOME={self.home}", "PATH=/usr/bin:/bin", "LANG=C.UTF-8",
                *argv]  # fmt: skip


def _secret_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def fo(_lab_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = ensure_lab()
    base = tmp_path_factory.mktemp("hafo")
    rigs: list[Rig] = [FoRig(lab, a, TENANT, base / a) for a in (A, B)]
    home = Path("/home") / APP_USER
    subprocess.run(["userdel", "-r", APP_USER], capture_output=True, check=False)
    try:
        provision_all(rigs)
        conf = rigs[0].tenant_conf(base / "customer")
        state_dir = Path(yaml.safe_load(conf.read_text())["state_dir"])
        domain = _secret_file(base / "domain", SECRET)
        pin = _secret_file(base / "co-pin", "fo-" + os.urandom(12).hex())

        def take(rig: Rig) -> None:
            proc = takeover_cli(rig.netns, conf, rig.handoff, "--domain-file", str(domain),
                                "--co-pin-file", str(pin))  # fmt: skip
            assert proc.returncode == 0, (rig.appliance, proc.stderr.decode()[-3000:])

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(take, rigs))
        subprocess.run(["useradd", "--create-home", "--home-dir", str(home), APP_USER],
                       check=True)  # fmt: skip
        (home / "pin").write_text(pin.read_text().strip())
        (home / "pin").chmod(0o600)
        fo = Lab(conf, rigs[0].netns, base, state_dir, home)
        for a in (A, B):
            shown = json.loads(console(a, "hsmsh", "-c", "hsm show").stdout)
            fo.labels[a] = str(shown["label"])
        fo.chown()
        yield fo
    finally:
        from hsmctl.lab.control import fabric

        fab = fabric()
        for a in (A, B):  # a failed test may have left one detached
            fab.attach(a, TENANT, "vnet1", "hsm")
        factory_reset(A, B)
        subprocess.run(["userdel", "-r", APP_USER], capture_output=True, check=False)


@pytest.fixture(scope="module")
def group(fo: Lab) -> str:
    out = fo.ok("ha", "create", GROUP, A, B)
    assert out["members"] == [A, B]
    return GROUP


# -- register --group ----------------------------------------------------------------------


def test_register_bad_input_exit_codes_and_nothing_changed(fo: Lab, group: str) -> None:
    kit = str(fo.kit())
    fo.fails(2, "client", "register", "--group", "nosuch", "--name", APP, "--output", kit)
    fo.fails(2, "client", "register", A, "--group", group, "--name", APP, "--output", kit)
    fo.fails(2, "client", "register", "--name", APP, "--output", kit)
    fo.fails(2, "client", "register", "--group", group, "--name", "Bad_Name", "--output", kit)
    fo.fails(2, "client", "register", "--group", group, "--name", APP, "--output",
             str(fo.base / "with space"))  # fmt: skip
    assert not fo.kit().exists()
    assert not (fo.state_dir / "ha" / "clients").exists()
    for a in (A, B):
        assert APP not in fo.clients(a)


def test_a_member_unreachable_is_exit_4_then_a_rerun_finishes(fo: Lab, group: str) -> None:
    from hsmctl.lab.control import fabric

    fab = fabric()
    fab.detach(B)
    try:
        err = fo.fails(4, "client", "register", "--group", group, "--name", APP, "--role",
                       "crypto-officer", "--output", str(fo.kit()))  # fmt: skip
        assert B in err["message"] and "again" in err["message"]
        assert APP not in fo.clients(A)  # probed before anything: nothing registered
        assert not fo.kit().exists()
    finally:
        fab.attach(B, TENANT, "vnet1", "hsm")
    # a role other than the begun register's: exit 5, nothing changed
    fo.fails(5, "client", "register", "--group", group, "--name", APP, "--role",
             "crypto-user", "--output", str(fo.kit()))  # fmt: skip
    out = fo.ok("client", "register", "--group", group, "--name", APP, "--role",
                "crypto-officer", "--output", str(fo.kit()))  # fmt: skip
    assert set(out) == {"group", "members", "client", "role", "kit", "fingerprint", "registered"}
    assert out["registered"] == [A, B] and out["kit"] == str(fo.kit())
    for a in (A, B):
        c = fo.clients(a)[APP]
        assert c["role"] == "crypto-officer" and c["fingerprint"] == out["fingerprint"]
    kit = fo.kit()
    assert (kit / f"{APP}_key").stat().st_mode & 0o777 == 0o600
    known = (kit / "known_hosts").read_text().splitlines()
    assert len(known) >= 2 and all(k.startswith(f"hsm-group-{group} ") for k in known)
    config = (kit / "ssh_config").read_text()
    assert f"{ADDRESSES[A]}:22 {ADDRESSES[B]}:22" in config
    assert "StrictHostKeyChecking yes" in config and "ProxyUseFdpass yes" in config
    module = (kit / f"{APP}.module").read_text()
    assert (f"remote: |/usr/bin/python3 -I -S {kit / 'connect.py'} --session {kit} "
            f"hsm-group-{group} {ADDRESSES[A]}:22 {ADDRESSES[B]}:22\n") in module  # fmt: skip
    pin = (fo.home / "pin").read_text()
    for path in kit.iterdir():
        assert pin not in path.read_text(errors="replace"), path
    again = fo.ok("client", "register", "--group", group, "--name", APP, "--role",
                  "crypto-officer", "--output", str(fo.kit()))  # fmt: skip
    assert again["registered"] == [] and again["fingerprint"] == out["fingerprint"]
    fo.chown()


def test_an_interrupted_register_finishes_on_the_rerun(fo: Lab, group: str) -> None:
    """kill -9 once the journal records the first member; the rerun completes."""
    name, kit = "fo-kill", fo.base / "kit-kill"
    journal = fo.state_dir / "ha" / "clients" / group / f"{name}.json"
    argv = [
        "ip",
        "netns",
        "exec",
        fo.netns,
        HSMCTL,
        "--config",
        str(fo.conf),
        "client",
        "register",
        "--group",
        group,
        "--name",
        name,
        "--output",
        str(kit),
        "--json",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 180
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if json.loads(journal.read_text())["members"]:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
            except (FileNotFoundError, ValueError, KeyError):
                pass
            time.sleep(0.005)
    finally:
        proc.wait(60)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    out = fo.ok("client", "register", "--group", group, "--name", name, "--output", str(kit))
    for a in (A, B):
        assert fo.clients(a)[name]["fingerprint"] == out["fingerprint"]
    assert (kit / f"{name}.module").is_file()
    assert not list(kit.parent.glob(f".{kit.name}.*"))


# -- failover ------------------------------------------------------------------------------

_APP = r"""
import hashlib, json, os, sys, time
import pkcs11
from pkcs11 import Mechanism, ObjectClass
proxy, labels, key_label, stop = sys.argv[1], set(sys.argv[2].split(",")), sys.argv[3], sys.argv[4]
pin = open(os.path.expanduser("~/pin")).read().strip()
lib = pkcs11.lib(proxy)

def emit(**kw):
    kw["t"] = time.monotonic()
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()

session = None
n = 0
while not os.path.exists(stop):
    try:
        if session is None:
            t0 = time.monotonic()
            token = next(t for t in lib.get_tokens() if t.label in labels)
            t1 = time.monotonic()
            session = token.open(user_pin=pin)
            t2 = time.monotonic()
            key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=key_label)
            emit(event="open", label=token.label, token_s=t1 - t0, login_s=t2 - t1,
                 key_s=time.monotonic() - t2)
        msg = b"failover %d " % n + os.urandom(8)
        sig = key.sign(hashlib.sha256(msg).digest(), mechanism=Mechanism.ECDSA)
        emit(event="sig", label=token.label, msg=msg.hex(), sig=bytes(sig).hex())
        n += 1
        if n == 20:  # what reopening costs with every member up, for comparison
            session.close()
            session = None
            t0 = time.monotonic()
            lib.reinitialize()
            emit(event="reinit-healthy", took=time.monotonic() - t0)
    except Exception as exc:  # the member went away: reopen on another
        emit(event="error", error=type(exc).__name__)
        session = None
        try:
            t0 = time.monotonic()
            lib.reinitialize()
            emit(event="reinit", took=time.monotonic() - t0)
        except Exception as exc2:
            emit(event="reinit-error", error=type(exc2).__name__)
emit(event="end")
"""


class App:
    """The application process and the lines it printed, read as they come."""

    def __init__(self, fo: Lab, stop: Path) -> None:
        script = fo.home / "app.py"
        script.write_text(_APP)
        fo.chown()
        labels = ",".join(fo.labels.values())
        argv = fo.app_argv(PYTHON, str(script), PROXY, labels, KEY, str(stop))
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=fo.home)  # fmt: skip
        self.lines: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self.changed:
                self.lines.append(json.loads(raw))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def close(self) -> None:
        self.proc.wait(60)
        self._reader.join(60)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def wait_for(self, what: str, cond: Any, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not cond(self.lines):
                left = deadline - time.monotonic()
                ended = self.proc.poll() is not None and not self._reader.is_alive()
                if left <= 0 or ended:
                    err = ""
                    if ended and self.proc.stderr is not None:
                        err = self.proc.stderr.read().decode()[-3000:]
                    raise AssertionError(f"application: no {what}: {self.lines[-5:]} {err}")
                self.changed.wait(min(left, 1.0))


def _verify(point_hex: str, line: dict[str, Any]) -> bool:
    point = bytes.fromhex(point_hex)[2:]  # DER OCTET STRING around 04||X||Y
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    sig = bytes.fromhex(line["sig"])
    der = encode_dss_signature(int.from_bytes(sig[:32]), int.from_bytes(sig[32:]))
    try:
        key.verify(der, bytes.fromhex(line["msg"]), ec.ECDSA(hashes.SHA256()))
    except Exception:
        return False
    return True


_PROFILE = r"""
import json, os, subprocess, sys, threading, time
argv = sys.argv[1:]
t0 = time.monotonic()
marks = []
p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

def read_err():
    for line in p.stderr:
        marks.append((round(time.monotonic() - t0, 4), line.decode(errors="replace").strip()))

threading.Thread(target=read_err, daemon=True).start()
p.stdin.write(b"\x00")  # p11-kit's RPC handshake: the protocol version byte
p.stdin.flush()
got = p.stdout.read(1)
t_ready = time.monotonic() - t0
p.stdin.close()
p.wait()
keep = ("Connecting", "Executing proxy", "Local version", "Remote protocol",
        "SSH2_MSG_KEXINIT sent", "SSH2_MSG_NEWKEYS received", "Server host key",
        "Authenticating", "Authenticated",
        "Sending command", "Requesting", "Entering interactive")
print(json.dumps({"service_ready_s": round(t_ready, 4), "byte": got.hex(),
                  "marks": [m for m in marks if any(k in m[1] for k in keep)]}))
"""


def _connect_profile(fo: Lab, *extra: str, tries: int = 3) -> list[dict[str, Any]]:
    """Where a new session's time goes: the kit's ssh (-v, lines time-stamped as they
    arrive) up to the device's p11-kit answering the RPC handshake byte."""
    argv = [*kit_remote_argv(fo)[:-1], "-v", *extra, kit_remote_argv(fo)[-1]]
    out = []
    for _ in range(tries):
        proc = subprocess.run(fo.app_argv(PYTHON, "-c", _PROFILE, *argv), capture_output=True,
                              timeout=120, check=False, cwd=fo.home)  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        out.append(json.loads(proc.stdout.decode().splitlines()[-1]))
    return out


def kit_remote_argv(fo: Lab) -> list[str]:
    """The kit's ssh as its standby holder runs it (a new session, no holder)."""
    from hsmctl.clients.kit import group_ssh_command

    return group_ssh_command(fo.kit(), GROUP)


def _failover(lines: list[dict[str, Any]], point: str, lost: str, other: str) -> dict[str, Any]:
    """The gap between the last good signature on the lost member and the first good one
    on the other after it, and where the time went (every signature verified)."""
    sigs = [x for x in lines if x["event"] == "sig"]
    good = [x for x in sigs if _verify(point, x)]
    last_before = max(x["t"] for x in good if x["label"] == lost)
    first_after = min(x["t"] for x in good if x["label"] == other and x["t"] > last_before)
    errors = [x for x in lines if x["event"] in ("error", "reinit-error")]
    opens = [{k: round(v, 3) for k, v in x.items() if k.endswith("_s")}
             for x in lines if x["event"] == "open"][2:]  # fmt: skip
    healthy = [round(x["took"], 3) for x in lines if x["event"] == "reinit-healthy"]
    return {
        "gap_s": round(first_after - last_before, 3),
        "detected_s": round(min(x["t"] for x in errors) - last_before, 3) if errors else None,
        "signatures": len(sigs),
        "bad": len(sigs) - len(good),
        "errors": [x["error"] for x in errors],
        "reinit_s": [round(x["took"], 3) for x in lines if x["event"] == "reinit"],
        "reinit_healthy_s": healthy,
        "opens": opens,  # the sessions reopened after the detach: their steps
        "load": round(os.getloadavg()[0], 2),
    }


@pytest.fixture(scope="module")
def installed(fo: Lab, group: str) -> str:
    """The group kit installed for the application's user, the signing key on both
    members; the key's public point (hex)."""
    if not (fo.kit() / f"{APP}.module").is_file():  # run alone: make the kit
        fo.ok("client", "register", "--group", group, "--name", APP, "--role",
              "crypto-officer", "--output", str(fo.kit()))  # fmt: skip
    fo.ok("key", "generate", A, "--label", KEY, "--type", "ec:p256")
    fo.ok("ha", "sync", group)
    d = Domains(fo.conf, fo.netns, fo.base, {}, {})
    point = str(d.p11(A, _SIGN, [KEY])[KEY]["ec_point"])
    assert d.p11(B, _SIGN, [KEY])[KEY]["ec_point"] == point
    modules = fo.home / ".config" / "pkcs11" / "modules"
    modules.mkdir(parents=True, exist_ok=True)
    (modules / f"{APP}.module").write_text((fo.kit() / f"{APP}.module").read_text())
    fo.chown()
    return point


def test_an_application_carries_on_within_2_s_when_its_member_is_detached(
    fo: Lab, group: str, installed: str
) -> None:
    from hsmctl.lab.control import fabric

    point = installed
    # the kit's key exchange against OpenSSH's default (sntrup761x25519-sha512)
    for extra in ((), ("-o", "KexAlgorithms=sntrup761x25519-sha512@openssh.com")):
        for p in _connect_profile(fo, *extra):
            print("new session:", " ".join(extra), json.dumps(p))
    by_label = {v: k for k, v in fo.labels.items()}
    stop = fo.home / "stop"
    since = _log_ends()
    app = App(fo, stop)
    fab = fabric()
    detached: str | None = None
    try:
        app.wait_for("signatures", lambda ls: sum(x["event"] == "sig" for x in ls) >= 50)
        last = [x for x in app.lines if x["event"] == "sig"][-1]
        detached = by_label[last["label"]]
        other = B if detached == A else A
        # the kit's standby: a session opened ahead on the other member (connector.py)
        _wait_for_record(other, since[other], "pkcs11-connect")
        t_detach = time.monotonic()
        fab.detach(detached)

        def after(ls: list[dict[str, Any]]) -> bool:
            label = fo.labels[other]
            return sum(1 for x in ls if x["event"] == "sig" and x["label"] == label
                       and x["t"] > t_detach) >= 50  # fmt: skip

        app.wait_for(f"signatures on {other} after the detach", after)
        early = _failover(list(app.lines), point, fo.labels[detached], fo.labels[other])
        print("failover (before the outage's key):", json.dumps(early))
        # a key made during the outage, on the member that is up
        fo.ok("key", "generate", other, "--label", "fo-outage", "--type", "ec:p256")
        stop.touch()
        app.wait_for("end", lambda ls: ls and ls[-1]["event"] == "end")
        assert app.proc.wait(60) == 0
    finally:
        stop.touch()
        if app.proc.poll() is None:
            app.proc.kill()
        app.close()
        if detached is not None:
            fab.attach(detached, TENANT, "vnet1", "hsm")
    report = _failover(app.lines, point, fo.labels[detached], fo.labels[other])
    print("failover:", json.dumps(report))
    assert not report["bad"], f"{report['bad']} of {report['signatures']} signatures do not verify"
    assert report["gap_s"] < GAP_LIMIT, report
    # the returning member gets the outage's key on the next sync
    out = fo.ok("ha", "sync", group)
    got = {(c["class"], c["label"]) for m in out["members"] for c in m["copied"]
           if m["appliance"] == detached}  # fmt: skip
    assert got == {("private-key", "fo-outage"), ("public-key", "fo-outage")}, out
    status = fo.ok("ha", "status", group)
    assert all(m["in_sync"] and m["reachable"] for m in status["members"]), status


def _log_ends() -> dict[str, int]:
    from tests.lab.takeover_helpers import audit_records

    return {a: int(audit_records(a)[-1]["seq"]) for a in (A, B)}


def _wait_for_record(appliance: str, after: int, event: str, timeout: float = 120,
                     **detail: Any) -> dict[str, Any]:  # fmt: skip
    """The first record of ``event`` by the application's client after ``after`` (with
    these detail values), waited for."""
    from tests.lab.takeover_helpers import audit_records

    deadline = time.monotonic() + timeout
    while True:
        for r in audit_records(appliance):
            d = r.get("detail") or {}
            if (int(r["seq"]) > after and r.get("event") == event and d.get("client") == APP
                    and all(d.get(k) == v for k, v in detail.items())):  # fmt: skip
                return dict(r)
        assert time.monotonic() < deadline, f"{appliance}: no {event} {detail} of {APP}"
        time.sleep(0.5)


def _p11_processes(appliance: str) -> int:
    out = console(appliance, "sh", "-c", "pgrep -f '^/usr/bin/p11-kit remote' | wc -l")
    return int(out.stdout.decode().strip() or 0)


def test_a_standby_never_used_is_logged_so_and_leaves_nothing_on_the_device(
    fo: Lab, installed: str
) -> None:
    """An application that ends while its standby was never used: the standby's
    connection is closed with it (the holder ends with the application), the member logs
    its disconnect with ``sessions: 0``, and no p11-kit remote is left on either member."""
    since = _log_ends()
    stop = fo.home / "stop-2"
    app = App(fo, stop)
    try:
        app.wait_for("signatures", lambda ls: sum(x["event"] == "sig" for x in ls) >= 25)
        last = [x for x in app.lines if x["event"] == "sig"][-1]
        on = {v: k for k, v in fo.labels.items()}[last["label"]]
        spare = B if on == A else A
        connect = _wait_for_record(spare, since[spare], "pkcs11-connect")
        stop.touch()
        app.wait_for("end", lambda ls: ls and ls[-1]["event"] == "end")
        assert app.proc.wait(60) == 0
    finally:
        stop.touch()
        if app.proc.poll() is None:
            app.proc.kill()
        app.close()
    gone = _wait_for_record(spare, since[spare], "pkcs11-disconnect", used=False,
                            pid=connect["detail"]["pid"])  # fmt: skip
    assert gone["outcome"] == "ok"
    # the session the application did use is told apart
    _wait_for_record(on, since[on], "pkcs11-disconnect", used=True)
    deadline = time.monotonic() + 60
    while any(_p11_processes(a) for a in (A, B)):
        assert time.monotonic() < deadline, "p11-kit remote left running on a member"
        time.sleep(0.5)
