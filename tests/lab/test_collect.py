"""Activity-log collection against real appliances (issue 6, SPEC §8).

Ten appliances of ``APPLIANCE_SETS["collect"]`` (hsm15 … hsm24) are provisioned (each its
own provider database, data address ``.200 + N``) and taken over by tenant1 once per
module; every collection runs as the customer does: ``ip netns exec CLIENT hsmctl logs
collect`` as the ``audit`` account. Tampering is done the way an attacker with root on the
device would, through the lab console, and every tampered log is restored afterwards so
the appliances stay usable.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hsmctl.collect.archive import Archive
from hsmctl.customer.store import ApplianceDir
from hsmctl.lab.netns import socket_factory
from hsmctl.secret import Secret
from hsmctl.ssh import DeviceConnection, PinnedHostKeys
from tests.conftest import (
    APPLIANCE_SETS,
    HSMCTL,
    REPO,
    client_netns,
    console,
    ensure_lab,
    factory_reset,
    hsmctl,
    provider_config,
    provision,
    takeover,
    tenant_config,
)

pytestmark = pytest.mark.lab

APPS = APPLIANCE_SETS["collect"]
TENANT = "tenant1"
LOG = "/var/log/hsm/audit.jsonl"
OWN_SESSION_TAIL = {
    # What the device writes after the export it served: the export's result, the end of
    # the session and its checkpoint, and the session's login (sshd's log is read
    # asynchronously, so a login record can land after the session's own records); then
    # the collector's `audit ack` on the same connection: its session, command and result.
    ("audit", "session-start"),
    ("audit", "command"),
    ("audit", "result"),
    ("audit", "session-end"),
    ("hsmd", "checkpoint"),
    ("audit", "login"),
}


# -- the fleet ------------------------------------------------------------------------------------


def data_ip(lab: dict[str, Any], appliance: str) -> str:
    t = next(x for x in lab["tenants"] if x["name"] == TENANT)
    subnet = next(s for v in t["vnets"] for s in v["subnets"] if s["name"] == "hsm")
    octets = subnet["cidr"].split("/")[0].split(".")
    return ".".join([*octets[:3], str(200 + int(appliance.removeprefix("hsm")))])


def hsmd_pids(app: str) -> list[int]:
    out = console(app, "pgrep", "-f", "/usr/local/sbin/hsmd", check=False).stdout
    return [int(p) for p in out.split()]


def restart_hsmd(app: str) -> None:
    """Kill the device daemon; the appliance's init restarts it and it rescans the log."""
    old = hsmd_pids(app)
    for pid in old:
        console(app, "kill", str(pid))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = hsmd_pids(app)
        fresh = now and not set(old) & set(now)
        if fresh and console(app, "hsmsh", "-c", "help", check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"hsmd on {app} did not come back")


def device_lines(app: str) -> list[bytes]:
    return console(app, "cat", LOG).stdout.splitlines(keepends=True)


@dataclass
class Fleet:
    lab: dict[str, Any]
    conf: Path
    netns: str
    state: Path
    directory: Path

    def collect(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
        return hsmctl(
            "--config", str(self.conf), "logs", "collect", *args, "--json",
            netns=self.netns, timeout=timeout,
        )  # fmt: skip

    def argv(self, *args: str) -> list[str]:
        return [
            "ip", "netns", "exec", self.netns, HSMCTL, "--config", str(self.conf),
            "logs", "collect", *args, "--json",
        ]  # fmt: skip

    def archive(self, app: str) -> Archive:
        return Archive(self.state / "appliances" / app / "archive", app)

    def archived(self, app: str) -> bytes:
        a = self.archive(app)
        return b"".join(a.blocks(a.cursor()))

    def files(self, app: str) -> dict[str, bytes]:
        d = self.archive(app).dir
        return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "lock"}

    def head(self, app: str) -> int:
        return self.archive(app).cursor().seq

    def admin(self, app: str) -> DeviceConnection:
        st = ApplianceDir(self.state, app)
        pins = st.pins()
        password = st.escrowed("admin-password")
        assert password is not None
        identity = next(t for t in self.lab["tenants"] if t["name"] == TENANT)["identity"]
        return DeviceConnection(
            pins["data_ip"],
            username="admin",
            pinned=PinnedHostKeys.of(*pins["data_host_keys"]),
            key=identity,
            password=Secret(password.reveal()),
            connect_socket=socket_factory(self.netns),
        )

    def activity(self, app: str, sessions: int = 2) -> None:
        """Admin sessions on the device (each adds login, commands, results, a checkpoint)."""
        for _ in range(sessions):
            with self.admin(app) as conn:
                conn.run("hsm show")
                conn.run("user list")

    def assert_archive_is_the_device_log(self, app: str) -> int:
        """The archive is the device's log byte for byte, up to the archive's head; what
        the device holds beyond it is only the collecting session's own end."""
        head = self.head(app)
        device = device_lines(app)
        archived = self.archived(app)
        assert archived == b"".join(device[:head])
        seqs = [json.loads(line)["seq"] for line in archived.splitlines()]
        assert seqs == list(range(1, head + 1))  # no gap, no duplicate
        tail = [json.loads(line) for line in device[head:]]
        assert {(r["actor"], r["event"]) for r in tail} <= OWN_SESSION_TAIL, tail
        return head


def report(proc: subprocess.CompletedProcess[bytes]) -> dict[str, dict[str, Any]]:
    doc = json.loads(proc.stdout)
    items = doc["appliances"] if "appliances" in doc else doc["error"]["appliances"]
    return {a["appliance"]: a for a in items}


@pytest.fixture(scope="module")
def fleet(_lab_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    lab = ensure_lab()
    directory = tmp_path_factory.mktemp("collect")
    conf = tenant_config(directory, lab, TENANT)
    fl = Fleet(lab, conf, client_netns(lab, TENANT), directory / f"{TENANT}-state", directory)

    def setup(app: str) -> None:
        restart_hsmd(app)  # a fresh daemon: no back-off memory from earlier runs
        factory_reset(app)
        pc = provider_config(directory / "provider" / app, [app])
        out = provision(pc, TENANT, "--ip", data_ip(lab, app))
        assert out["appliance"] == app
        takeover(lab, conf, TENANT, out["handoff"])

    with ThreadPoolExecutor(4) as ex:
        list(ex.map(setup, APPS))
    yield fl


# -- incremental collection ---------------------------------------------------------------------


def test_collect_then_activity_then_exactly_the_new_records(fleet: Fleet) -> None:
    app = "hsm15"
    first = fleet.collect("--appliance", app)
    assert first.returncode == 0, first.stderr.decode()
    one = report(first)[app]
    assert one["verified"] is True and one["new_records"] == one["last_seq"] > 10
    fleet.assert_archive_is_the_device_log(app)

    fleet.activity(app, sessions=3)
    existing = len(device_lines(app))
    second = fleet.collect("--appliance", app)
    assert second.returncode == 0, second.stderr.decode()
    two = report(second)[app]
    assert two["new_records"] == two["last_seq"] - one["last_seq"]
    assert two["last_seq"] >= existing  # every record that existed is now archived
    head = fleet.assert_archive_is_the_device_log(app)
    new = [json.loads(x) for x in fleet.archived(app).splitlines()[one["last_seq"] :]]
    assert sum(1 for r in new if r["actor"] == "admin" and r["event"] == "command") == 6

    verify = hsmctl(
        "--config", str(fleet.conf), "logs", "verify", app, "--json", netns=fleet.netns
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr.decode()
    assert json.loads(verify.stdout)["last_seq"] == head

    out = fleet.directory / "export.jsonl"
    export = hsmctl(
        "--config", str(fleet.conf), "logs", "export", app, "--after", str(one["last_seq"]),
        "--output", str(out), "--json", netns=fleet.netns,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr.decode()
    assert out.read_bytes() == b"".join(device_lines(app)[one["last_seq"] : head])


def test_the_awx_playbook_collects(fleet: Fleet) -> None:
    fleet.activity("hsm15", sessions=1)
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1"}
    proc = subprocess.run(
        [
            str(Path(HSMCTL).with_name("ansible-playbook")), "-i", "localhost,", "-c", "local",
            str(REPO / "playbooks" / "collect_logs.yml"),
            "-e", json.dumps({
                "hsmctl_prefix": ["ip", "netns", "exec", fleet.netns],
                "hsmctl_bin": HSMCTL, "hsmctl_config": str(fleet.conf),
                "hsm_appliances": ["hsm15"], "ansible_python_interpreter": sys.executable,
            }),
        ],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hsm15:" in proc.stdout and "new, verified through" in proc.stdout
    fleet.assert_archive_is_the_device_log("hsm15")


# -- concurrency, reachability ------------------------------------------------------------------


def _lock_is_held(fleet: Fleet, app: str) -> bool:
    import fcntl

    path = fleet.archive(app).dir / "lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_ten_in_parallel_while_another_collection_runs(fleet: Fleet) -> None:
    with ThreadPoolExecutor(5) as ex:
        list(ex.map(lambda a: fleet.activity(a, 1), APPS))
    busy = "hsm15"
    # A collection of hsm15 that holds its archive lock for a while: every fsync it makes
    # is delayed by 4 s (strace fault injection), so the runs below certainly overlap it.
    slow = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=fsync",
         "-e", "inject=fsync:delay_exit=4000000", *fleet.argv("--appliance", busy, "--wait", "60")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _lock_is_held(fleet, busy):
            assert slow.poll() is None, slow.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        at_once = fleet.collect("--all", "--parallel", "10")  # --wait 0: busy is busy
        assert at_once.returncode == 5, at_once.stderr.decode()
        got = report(at_once)
        assert sorted(got) == sorted(APPS)
        assert got[busy]["error"]["exit_code"] == 5 and got[busy]["verified"] is False
        assert "busy" in got[busy]["error"]["message"]
        for app in APPS:
            if app != busy:
                assert got[app]["verified"] is True and got[app]["new_records"] > 0, got[app]
        # Waiting instead: the second run on hsm15 queues behind the first.
        waiting = fleet.collect("--all", "--parallel", "10", "--wait", "120")
        assert waiting.returncode == 0, waiting.stderr.decode()
        out, err = slow.communicate(timeout=120)
        assert slow.returncode == 0, err.decode()
        assert json.loads(out)["appliances"][0]["verified"] is True
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait()
    for app in APPS:
        fleet.assert_archive_is_the_device_log(app)
        check = hsmctl("--config", str(fleet.conf), "logs", "verify", app, netns=fleet.netns)
        assert check.returncode == 0, check.stderr.decode()


def test_an_unreachable_appliance_is_4_and_the_others_are_collected(fleet: Fleet) -> None:
    from hsmctl.lab import control as lab_mod

    down = "hsm16"
    fabric = lab_mod.fabric()
    fabric.detach(down)
    try:
        proc = fleet.collect("--all", "--parallel", "10", "--connect-timeout", "3")
        assert proc.returncode == 4, proc.stderr.decode()
        got = report(proc)
        assert got[down]["error"]["exit_code"] == 4 and got[down]["verified"] is False
        assert all(got[a]["verified"] for a in APPS if a != down)
    finally:
        fabric.attach(down, TENANT, "vnet1", "hsm")
    deadline = time.monotonic() + 30
    while fleet.collect("--appliance", down).returncode != 0:
        assert time.monotonic() < deadline, "the appliance did not come back"
        time.sleep(1)
    fleet.assert_archive_is_the_device_log(down)


# -- durability ---------------------------------------------------------------------------------


_SYSCALL = re.compile(r"^(\d+) +(?:<\.\.\. (\w+) resumed>|(\w+)\()(.*)$")
_RESULT = re.compile(r"^(.*)\)\s+=\s+(\S.*)$")


def parse_strace(text: str) -> list[tuple[int, str, str, str]]:
    """(index of completion, syscall, arguments, result) in completion order; a call
    interrupted by another thread is joined with its ``resumed`` half."""
    pending: dict[tuple[str, str], str] = {}
    calls = []
    for line in text.splitlines():
        m = _SYSCALL.match(line)
        if not m:
            continue
        pid, resumed, name, rest = m.group(1), m.group(2), m.group(3), m.group(4)
        if name and rest.endswith("<unfinished ...>"):
            pending[(pid, name)] = rest[: -len("<unfinished ...>")]
            continue
        if resumed:
            name, rest = resumed, pending.pop((pid, resumed), "") + rest
        done = _RESULT.match(rest)
        if done:
            calls.append((len(calls), name, done.group(1), done.group(2)))
    return calls


def test_records_are_fsynced_before_the_cursor_moves(fleet: Fleet) -> None:
    app = "hsm17"
    fleet.activity(app, 2)
    trace = fleet.directory / "collect.strace"
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-s", "256", "-o", str(trace),
         "-e", "trace=openat,write,fsync,fdatasync,rename", *fleet.argv("--appliance", app)],
        capture_output=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    archive = str(fleet.archive(app).dir)
    fds: dict[str, str] = {}
    seg_writes, seg_syncs, cursor_renames, dir_syncs, tmp_syncs = [], [], [], [], []
    for i, name, args, result in parse_strace(trace.read_text()):
        fd = args.split(",")[0]
        if name == "openat" and result.split()[0].isdigit():
            path = args.split('"')[1]
            fds[result.split()[0]] = path
        elif name == "write" and re.search(r"/seg-\d{12}\.jsonl$", fds.get(fd, "")):
            seg_writes.append(i)
        elif name in ("fsync", "fdatasync"):
            path = fds.get(fd, "")
            if re.search(r"/seg-\d{12}\.jsonl$", path):
                seg_syncs.append(i)
            elif path == archive:
                dir_syncs.append(i)
            elif "/.cursor.json." in path:
                tmp_syncs.append(i)
        elif name == "rename" and args.endswith(f'"{archive}/cursor.json"'):
            cursor_renames.append(i)
    assert seg_writes, "the run wrote no records"
    assert len(cursor_renames) == 1
    commit = cursor_renames[0]
    # write -> fsync -> (directory fsync) -> cursor written, fsynced, renamed -> dir fsync
    assert max(seg_writes) < max(seg_syncs) < commit
    assert any(max(seg_syncs) < d < commit for d in dir_syncs)
    assert any(t < commit for t in tmp_syncs)
    assert any(d > commit for d in dir_syncs)
    fleet.assert_archive_is_the_device_log(app)


def test_killed_50_times_while_the_device_logs(fleet: Fleet) -> None:
    app = "hsm18"
    fleet.collect("--appliance", app)
    stop = threading.Event()
    errors: list[BaseException] = []

    def keep_logging() -> None:
        try:
            while not stop.is_set():
                fleet.activity(app, 1)
        except BaseException as exc:  # surfaces below
            errors.append(exc)

    worker = threading.Thread(target=keep_logging)
    worker.start()
    durations: list[float] = []
    for _ in range(3):
        start = time.monotonic()
        assert fleet.collect("--appliance", app).returncode == 0
        durations.append(time.monotonic() - start)
    typical = statistics.median(durations)
    rng = random.Random(6)
    finished = killed = 0
    try:
        # 50 kills at points spread over a whole run; ``typical`` follows how long runs
        # really take now (a shared machine's load changes while the test runs).
        while killed < 50:
            assert killed + finished < 150, (killed, finished)
            start = time.monotonic()
            run = subprocess.Popen(
                fleet.argv("--appliance", app, "--wait", "30"),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            deadline = start + rng.uniform(0.05, typical)
            while run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if run.poll() is None:
                run.send_signal(signal.SIGKILL)
                killed += 1
            else:
                finished += 1
                assert run.returncode == 0, run.stderr.read() if run.stderr else b""
                durations.append(time.monotonic() - start)
                typical = statistics.median(durations[-5:])
            run.wait()
            if run.stderr:
                run.stderr.close()
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
    final = fleet.collect("--appliance", app)
    assert final.returncode == 0, final.stderr.decode()
    fleet.assert_archive_is_the_device_log(app)
    check = hsmctl("--config", str(fleet.conf), "logs", "verify", app, netns=fleet.netns)
    assert check.returncode == 0, check.stderr.decode()


# -- tampering on the device (root on the box) -------------------------------------------------

TAMPER = r"""
import hashlib, json, sys
PATH = "/var/log/hsm/audit.jsonl"
op, k = sys.argv[1], int(sys.argv[2])
with open(PATH, "rb") as fh:
    lines = fh.read().splitlines(keepends=True)

def canon(rec):
    return json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

def rehash(i):
    # What a tamperer without the key does: recompute hash and prev from line i on.
    prev = json.loads(lines[i - 1])["hash"] if i else "0" * 64
    for j in range(i, len(lines)):
        rec = json.loads(lines[j])
        rec["prev"] = prev
        del rec["hash"]
        rec["hash"] = hashlib.sha256(canon(rec)).hexdigest()
        prev = rec["hash"]
        lines[j] = canon(rec) + b"\n"

if op == "edit":                      # change a character of record k in place
    line = lines[k - 1]
    i = line.rindex(b'Z"}')
    lines[k - 1] = line[: i - 1] + str((int(line[i - 1 : i]) + 1) % 10).encode() + line[i:]
elif op == "delete":                  # remove record k
    del lines[k - 1]
elif op == "swap":                    # swap records k and k+1
    lines[k - 1], lines[k] = lines[k], lines[k - 1]
elif op == "truncate":                # keep the first k records
    del lines[k:]
elif op == "forge":                   # checkpoint k: another signature, chain recomputed
    rec = json.loads(lines[k - 1])
    assert rec["event"] == "checkpoint", rec
    sig = rec["detail"]["sig"]
    rec["detail"]["sig"] = ("1" if sig[0] != "1" else "2") + sig[1:]
    lines[k - 1] = canon(rec) + b"\n"
    rehash(k - 1)
with open(PATH, "r+b") as fh:         # in place: the daemon keeps its file
    fh.write(b"".join(lines))
    fh.truncate()
"""


def tamper(app: str, op: str, k: int) -> None:
    console(app, "python3", "-c", TAMPER, op, str(k))


def put_log(app: str, data: bytes) -> None:
    console(app, "sh", "-c", f"cat > {LOG}.new && mv {LOG}.new {LOG}", input=data)


def first_checkpoint_after(app: str, seq: int) -> int:
    for line in device_lines(app):
        rec = json.loads(line)
        if rec["seq"] > seq and rec["event"] == "checkpoint":
            return int(rec["seq"])
    raise AssertionError("no checkpoint")


CASES = {
    # name: (appliance, how the attacker changes the log, violation, restart hsmd)
    "edited": ("hsm19", "edit", "hash-mismatch", False),
    "deleted": ("hsm20", "delete", "gap", True),
    "swapped": ("hsm21", "swap", "reordered", False),
    "truncated": ("hsm22", "truncate", "truncated", False),
    "older copy": ("hsm23", "older", "rollback", True),
    "forged checkpoint": ("hsm24", "forge", "bad-signature", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tampering_is_exit_3_and_the_archive_is_untouched(fleet: Fleet, case: str) -> None:
    app, op, kind, restart = CASES[case]
    assert fleet.collect("--appliance", app).returncode == 0
    old_copy = b"".join(device_lines(app))  # an older log, for the rollback case
    fleet.activity(app, 2)
    assert fleet.collect("--appliance", app).returncode == 0
    head = fleet.head(app)
    fleet.activity(app, 2)  # records the archive does not have yet
    original = b"".join(device_lines(app))
    before = fleet.files(app)
    try:
        if op == "older":
            put_log(app, old_copy)  # replaced by a copy from before the last collection
            expected = head
        elif op == "truncate":
            tamper(app, op, head - 5)
            expected = head
        elif op == "forge":
            expected = first_checkpoint_after(app, head)
            tamper(app, op, expected)
        else:
            expected = head + 2
            tamper(app, op, expected)
        if restart:
            restart_hsmd(app)
        if op == "older":
            fleet.activity(app, 6)  # the device writes on, past the archived head
        proc = fleet.collect("--appliance", app)
        assert proc.returncode == 3, proc.stderr.decode()
        err = report(proc)[app]["error"]
        assert err["exit_code"] == 3
        assert err["violations"][0]["kind"] == kind, err
        assert err["violations"][0]["seq"] == expected, err
        assert app in err["message"] and f"record {expected}" in err["message"]
        assert f"record {expected}" in proc.stderr.decode()
        assert fleet.files(app) == before  # archive and cursor byte for byte
    finally:
        put_log(app, original)
        restart_hsmd(app)
    # Restored, the device again holds what was archived: collection goes on.
    assert fleet.collect("--appliance", app).returncode == 0
    fleet.assert_archive_is_the_device_log(app)
