"""Device log retention against real appliances (issue 15, item 3).

The appliances of ``APPLIANCE_SETS["retention"]`` get a small segment size (the device
configuration ``/etc/hsm/log.json``, written through the lab console, then a daemon
restart) and are provisioned and taken over by tenant1. Commands are driven through one
console session of the restricted shell (``hsmsh`` as root on the out-of-band path: every
command a real ``command`` + ``result`` record pair), collections run as the customer
does (``ip netns exec CLIENT hsmctl logs collect``, as ``audit``).

Every appliance is put back afterwards: the records the device deleted come back from the
customer's archive (byte for byte: the archive is the device's lines) into one closed
segment, the configuration is removed, the daemon rescans a chain whole from record 1
(``audit verify``), and the appliance is factory reset — so the next run's takeover,
which verifies the log from record 1, works.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hsmctl.collect.archive import Archive
from hsmctl.customer.store import ApplianceDir
from hsmctl.lab.netns import socket_factory
from hsmctl.lab.rig import data_ip as rig_data_ip
from hsmctl.lab.rig import restart_hsmd
from hsmctl.ssh import DeviceConnection, PinnedHostKeys
from tests.conftest import (
    APPLIANCE_SETS,
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

APPS = APPLIANCE_SETS["retention"]
TENANT = "tenant1"
LOG_DIR = "/var/log/hsm"
CHEAP = "sysconf provider-access show"  # a command with a short reply: the records count
FULL = b"activity log is full"


def data_ip(lab: dict[str, Any], appliance: str) -> str:
    t = next(x for x in lab["tenants"] if x["name"] == TENANT)
    subnet = next(s for v in t["vnets"] for s in v["subnets"] if s["name"] == "hsm")
    octets = subnet["cidr"].split("/")[0].split(".")
    return ".".join([*octets[:3], str(200 + int(appliance.removeprefix("hsm")))])


@dataclass
class Device:
    """One taken-over appliance, seen from the customer (collect, audit) and the console."""

    app: str
    lab: dict[str, Any]
    conf: Path
    provider_conf: Path
    netns: str
    state: Path

    # -- customer side ------------------------------------------------------------------

    def collect(self) -> dict[str, Any]:
        proc = hsmctl(
            "--config", str(self.conf), "logs", "collect", "--appliance", self.app, "--json",
            netns=self.netns, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()
        row: dict[str, Any] = json.loads(proc.stdout)["appliances"][0]
        return row

    def archive(self) -> Archive:
        return Archive(self.state / "appliances" / self.app / "archive", self.app)

    def archived_lines(self) -> list[bytes]:
        a = self.archive()
        return b"".join(a.blocks(a.cursor())).splitlines(keepends=True)

    def audit(self) -> DeviceConnection:
        st = ApplianceDir(self.state, self.app)
        pins = st.pins()
        return DeviceConnection(
            pins["data_ip"],
            username="audit",
            pinned=PinnedHostKeys.of(*pins["data_host_keys"]),
            key=st.dir / "secrets" / "audit-collector-key",
            connect_socket=socket_factory(self.netns),
        )

    # -- the device, out of band ----------------------------------------------------------

    def commands(self, n: int, line: str = CHEAP) -> tuple[int, bytes]:
        """``n`` commands in one console session; (how many failed closed, stderr)."""
        proc = console(self.app, "hsmsh", input=(line + "\n").encode() * n, check=False)
        return proc.stderr.count(FULL), proc.stderr

    def show(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(console(self.app, "hsmsh", "-c", "hsm show").stdout)
        return out

    def disk(self) -> dict[str, Any] | None:
        """``hsm show``'s ``log_disk``, or None when the command failed closed."""
        proc = console(self.app, "hsmsh", "-c", "hsm show", check=False)
        if proc.returncode != 0:
            assert FULL in proc.stderr, proc.stderr
            return None
        out: dict[str, Any] = json.loads(proc.stdout)["log_disk"]
        return out

    def files(self) -> list[tuple[str, int]]:
        """The log's files, oldest first (closed segments by name, then the active one)."""
        out = console(
            self.app, "sh", "-c", f"cd {LOG_DIR} && stat -c '%n %s' audit-*.jsonl audit.jsonl",
            check=False,
        ).stdout.decode()  # fmt: skip
        rows = [(n, int(s)) for n, s in (line.split() for line in out.splitlines())]
        closed = sorted(r for r in rows if r[0] != "audit.jsonl")
        return closed + [r for r in rows if r[0] == "audit.jsonl"]

    def device_lines(self) -> list[bytes]:
        """The records on the device: its segments concatenated, oldest first."""
        names = " ".join(n for n, _ in self.files())
        data = console(self.app, "sh", "-c", f"cd {LOG_DIR} && cat {names}").stdout
        return data.splitlines(keepends=True)

    def configure(self, **config: int) -> None:
        console(self.app, "sh", "-c", "cat > /etc/hsm/log.json", input=json.dumps(config).encode())
        restart_hsmd(self.app)


def first_seq_of(name: str) -> int:
    m = re.fullmatch(r"audit-([0-9]+)\.jsonl", name)
    assert m, name
    return int(m.group(1))


def restore(dev: Device, archived: list[bytes] | None = None) -> None:
    """Put the deleted records back from the archive (``archived``: the records from 1 on,
    default ``dev``'s archive): one closed segment from record 1 to just before the active
    file, the others removed, the retention state and configuration gone; then a fresh
    daemon must see one whole chain from record 1."""
    # Closed segments do not change while the daemon runs (a rotation may add one, which
    # then simply follows the restored prefix); the active file is left alone.
    closed = [n for n, _ in dev.files() if n != "audit.jsonl"]
    if closed:
        names = " ".join(closed)
        kept = console(dev.app, "sh", "-c", f"cd {LOG_DIR} && cat {names}").stdout
    else:
        kept = b""
    head = kept or console(dev.app, "head", "-n", "1", f"{LOG_DIR}/audit.jsonl").stdout
    oldest = json.loads(head.splitlines()[0])["seq"]
    archived = dev.archived_lines() if archived is None else archived
    assert len(archived) >= oldest - 1, "records were deleted that were never archived"
    prefix = archived[: oldest - 1] + kept.splitlines(keepends=True)
    if not prefix:
        return
    assert [json.loads(x)["seq"] for x in prefix] == list(range(1, len(prefix) + 1))
    script = (
        f"set -e; cd {LOG_DIR}; cat > .restore.tmp; chmod 600 .restore.tmp; "
        "mv -f .restore.tmp audit-000000000001.jsonl; "
        + "".join(f"rm -f {n}; " for n in closed if n != "audit-000000000001.jsonl")
        + "rm -f audit.retention.json audit.rotations.jsonl /etc/hsm/log.json"
    )
    console(dev.app, "sh", "-c", script, input=b"".join(prefix))
    restart_hsmd(dev.app)
    verify = json.loads(console(dev.app, "hsmsh", "-c", "audit verify").stdout)
    assert verify["verified"] is True and verify["first_seq"] == 1, verify


@pytest.fixture(scope="module")
def fleet(
    _lab_session: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Device]]:
    lab = ensure_lab()
    directory = tmp_path_factory.mktemp("retention")
    conf = tenant_config(directory, lab, TENANT)
    netns = client_netns(lab, TENANT)
    devices: dict[str, Device] = {}
    for app in APPS[:2]:
        restart_hsmd(app)
        factory_reset(app)
        console(app, "rm", "-f", "/etc/hsm/log.json")
        pc = provider_config(directory / "provider" / app, [app])
        out = provision(pc, TENANT, "--ip", data_ip(lab, app))
        # hsm42 keeps monitor: the provider's health reads its log_disk.
        takeover(lab, conf, TENANT, out["handoff"], *(["--keep-monitor"] if app == APPS[1] else []))
        devices[app] = Device(app, lab, conf, pc, netns, directory / f"{TENANT}-state")
    yield devices
    for dev in devices.values():
        dev.collect()  # everything archived, so everything deleted can come back
        restore(dev)
        factory_reset(dev.app)


def deletions(lines: list[bytes]) -> list[dict[str, Any]]:
    return [
        r["detail"]
        for r in map(json.loads, lines)
        if r["event"] == "log-segment-deleted" and r["actor"] == "hsmd"
    ]


def test_segments_go_only_after_the_ack_and_collection_spans_them(
    fleet: dict[str, Device],
) -> None:
    dev = fleet[APPS[0]]
    dev.configure(segment_bytes=32 * 1024, limit_bytes=64 << 20, high_water_percent=70)
    first = dev.collect()
    assert first["verified"] is True and first["acked_seq"] == first["last_seq"]
    acked = dev.show()["log_disk"]["acked_seq"]
    assert acked == first["last_seq"]
    deleted_before = len(deletions(dev.device_lines()))

    # 10,000 commands, no collection: the log rotates and nothing past the ack goes.
    failed, err = dev.commands(10_000)
    assert failed == 0, err[-500:]
    files = dev.files()
    lines = dev.device_lines()
    oldest = json.loads(lines[0])["seq"]
    assert len(files) > 150  # ~20,000 records (~6.5 MB) in 32 KiB segments
    assert oldest <= acked, "a record the collector had not acknowledged was deleted"
    assert len(deletions(lines)) == deleted_before  # no ack, no deletion
    assert all(size <= 32 * 1024 for _, size in files)
    seqs = [json.loads(x)["seq"] for x in lines]
    assert seqs == list(range(oldest, oldest + len(seqs)))
    commands = [r for r in map(json.loads, lines) if r["actor"] == "root"]
    assert sum(1 for r in commands if r["event"] == "command") >= 10_000
    disk = dev.show()["log_disk"]
    assert disk["segments"] == len(files)
    # hsm show's own approval record is written before it reports: one record more.
    assert 0 <= disk["used_bytes"] - sum(s for _, s in files) < 2048
    assert disk["warning"] is False and disk["acked_seq"] == acked

    # A collection after rotation verifies across every segment boundary, then acks.
    second = dev.collect()
    assert second["verified"] is True and second["new_records"] > 20_000
    assert second["acked_seq"] == second["last_seq"]
    verify = hsmctl(
        "--config", str(dev.conf), "logs", "verify", dev.app, "--json", netns=dev.netns
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr.decode()
    assert json.loads(verify.stdout)["last_seq"] == second["last_seq"]

    # The ack let the device delete exactly the segments before the acked record, each
    # logged before it went; the acked record itself is still there.
    after = dev.device_lines()
    now_oldest = json.loads(after[0])["seq"]
    gone = deletions(after)[deleted_before:]
    assert gone and now_oldest <= second["acked_seq"]
    assert all(d["last_seq"] < second["acked_seq"] for d in gone)
    assert [d["first_seq"] for d in gone] == sorted(d["first_seq"] for d in gone)
    assert gone[-1]["last_seq"] + 1 == now_oldest
    archived = dev.archived_lines()
    # What is left on the device is the archive's records from there on, byte for byte.
    assert after[: len(archived) - now_oldest + 1] == archived[now_oldest - 1 :]
    disk = dev.show()["log_disk"]
    assert disk["acked_seq"] == second["acked_seq"] and disk["segments"] < len(files)

    # The next collection starts at the acked record, which the device kept.
    dev.commands(50)
    third = dev.collect()
    assert third["verified"] is True and third["new_records"] > 100
    now_oldest = json.loads(dev.device_lines()[0])["seq"]

    # An ack beyond what was exported is refused, logged as denied, and changes nothing.
    with dev.audit() as conn:
        head = json.loads(conn.run("audit show --last 1").stdout)["seq"]
        beyond = head + 1000
        refused = conn.run(f"audit ack {beyond}", check=False)
        assert refused.status == 77 and "cannot acknowledge" in refused.stderr, refused
        export = conn.run("audit export --after 0", check=False)
        assert export.status != 0 and "were deleted" in export.stderr, export
        verified = json.loads(conn.run("audit verify").stdout)
    assert verified["verified"] is True and verified["first_seq"] == now_oldest
    assert dev.show()["log_disk"]["acked_seq"] == third["acked_seq"]
    denied = [
        r
        for r in map(json.loads, dev.device_lines())
        if r["event"] == "result" and r["detail"].get("command") == f"audit ack {beyond}"
    ]
    assert [(r["actor"], r["outcome"]) for r in denied] == [("audit", "denied")]


def test_a_collector_that_never_acks_gets_the_warning_long_before_fail_closed(
    fleet: dict[str, Device],
) -> None:
    dev = fleet[APPS[1]]
    base = sum(size for _, size in dev.files())
    # Room for about 1 MiB more; the high-water mark a quarter of the way there.
    limit = base + (1 << 20)
    percent = (base + (256 << 10)) * 100 // limit + 1
    dev.configure(segment_bytes=32 * 1024, limit_bytes=limit, high_water_percent=percent)
    with dev.audit() as conn:  # a collector that exports but never acknowledges
        conn.run("audit export --after 0", check=False)
    done, warned_at, health_warned = 0, None, False
    while True:
        failed, _ = dev.commands(100)
        done += 100
        if failed:
            break
        assert done < 20_000, "the log never filled up"
        disk = dev.disk()
        if disk is None:  # filled up by the very next record
            break
        if warned_at is None and disk["warning"]:
            warned_at = done
            health = hsmctl(
                "--config", str(dev.provider_conf), "health", dev.app, "--json",
                timeout=300,
            )  # fmt: skip
            health_warned = b"log-disk-high-water" in health.stdout
    assert warned_at is not None and warned_at * 2 < done, (warned_at, done)
    assert health_warned, "hsmctl health did not report the high-water mark"
    # Full: every command fails closed except audit export.
    refused = console(dev.app, "hsmsh", "-c", "user list", check=False)
    assert refused.returncode != 0 and FULL in refused.stderr
    with dev.audit() as conn:
        export = conn.run("audit export --after 0", check=False)
        assert export.status == 0 and export.stdout_bytes > 0
    # The collection exports, verifies, archives and acks: space comes back.
    row = dev.collect()
    assert row["verified"] is True and row["acked_seq"] == row["last_seq"], row
    disk = dev.show()["log_disk"]
    assert disk["warning"] is False and disk["used_bytes"] < disk["high_water_bytes"], disk
    failed, err = dev.commands(10)
    assert failed == 0, err


def test_only_the_audit_account_acks(fleet: dict[str, Device]) -> None:
    """``audit ack`` is the collector's (``audit``): not even the admin releases the log."""
    dev = fleet[APPS[0]]
    st = ApplianceDir(dev.state, dev.app)
    password = st.escrowed("admin-password")
    assert password is not None
    identity = next(t for t in dev.lab["tenants"] if t["name"] == TENANT)["identity"]
    pins = st.pins()
    admin = DeviceConnection(
        pins["data_ip"],
        username="admin",
        pinned=PinnedHostKeys.of(*pins["data_host_keys"]),
        key=identity,
        password=password,
        connect_socket=socket_factory(dev.netns),
    )
    with admin:
        result = admin.run("audit ack 1", check=False)
    assert result.status == 77 and "not permitted" in result.stderr


def test_a_trimmed_log_is_handed_over_from_its_oldest_record(
    _lab_session: None, tmp_path: Path
) -> None:
    """Re-provisioning after the log was trimmed (issue 15): tenant1's collector acks and
    the device deletes the segments before its ack; the device is factory reset and
    re-provisioned to tenant1 (whose archive goes on from its head), then reset again and
    provisioned to tenant2. tenant2's takeover proof and first collection start at the
    oldest record still on the device, anchored by the first checkpoint after it, with
    trust carried from the bundle's initial audit key through the key rotations the
    deleted records held; ``logs verify`` (offline) says records 1..K-1 were retired and
    by whose ack."""
    lab = ensure_lab()
    app = APPS[2]
    restart_hsmd(app)
    factory_reset(app)
    console(app, "rm", "-f", "/etc/hsm/log.json")
    conf1 = tenant_config(tmp_path, lab, TENANT)
    pc1 = provider_config(tmp_path / "provider1", [app])
    out = provision(pc1, TENANT, "--ip", data_ip(lab, app))
    takeover(lab, conf1, TENANT, out["handoff"])
    dev1 = Device(app, lab, conf1, pc1, client_netns(lab, TENANT), tmp_path / f"{TENANT}-state")
    other = "tenant2"
    conf2 = tenant_config(tmp_path, lab, other)
    dev2 = Device(app, lab, conf2, pc1, client_netns(lab, other), tmp_path / f"{other}-state")
    try:
        dev1.configure(segment_bytes=32 * 1024, limit_bytes=64 << 20, high_water_percent=70)
        failed, err = dev1.commands(1500)
        assert failed == 0, err[-500:]
        first = dev1.collect()
        assert first["verified"] is True and first["acked_seq"] == first["last_seq"]
        trimmed = json.loads(dev1.device_lines()[0])["seq"]
        assert trimmed > 1000, "the ack deleted no segment"
        # The key rotation of tenant1's takeover was in what the ack deleted.
        retired_rotations = [
            r
            for r in map(json.loads, dev1.archived_lines()[: trimmed - 1])
            if r["event"] == "key-rotation"
        ]
        assert retired_rotations

        # The same tenant again: its archive goes on from its own head (still on the
        # device: nobody acknowledged past it), and the proof starts at the base.
        factory_reset(app)
        pc1b = provider_config(tmp_path / "provider1b", [app])
        out1b = provision(pc1b, TENANT, "--ip", data_ip(lab, app))
        takeover(lab, conf1, TENANT, out1b["handoff"])
        again = dev1.collect()
        assert again["verified"] is True and again["new_records"] > 0, again
        verify1 = hsmctl("--config", str(conf1), "logs", "verify", app, "--json", netns=dev1.netns)
        assert verify1.returncode == 0, verify1.stderr.decode()
        whole = json.loads(verify1.stdout)
        assert whole["first_seq"] == 1 and "retired" not in whole, whole
        assert whole["last_seq"] == again["last_seq"]
        trimmed = json.loads(dev1.device_lines()[0])["seq"]

        factory_reset(app)
        pc2 = provider_config(tmp_path / "provider2", [app])
        out2 = provision(pc2, other, "--ip", rig_data_ip(lab, app, other))
        takeover(lab, conf2, other, out2["handoff"])
        oldest = json.loads(dev2.device_lines()[0])["seq"]
        assert oldest == trimmed

        row = dev2.collect()
        assert row["verified"] is True and row["acked_seq"] == row["last_seq"], row
        archive = dev2.archived_lines()
        assert json.loads(archive[0])["seq"] == oldest
        verify = hsmctl("--config", str(conf2), "logs", "verify", app, "--json", netns=dev2.netns)
        assert verify.returncode == 0, verify.stderr.decode()
        report = json.loads(verify.stdout)
        assert report["first_seq"] == oldest and report["last_seq"] == row["last_seq"]
        retired = report["retired"]
        assert retired["first_seq"] == 1 and retired["last_seq"] == oldest - 1, retired
        assert retired["acked_by"] == "audit" and retired["acked_seq"] >= oldest, retired
        assert retired["acked_seq"] == again["acked_seq"], retired
        assert retired["deletion_seq"] >= oldest, retired
    finally:
        # Everything back: tenant1's archive holds records 1.., tenant2's from the oldest.
        with_tenant2 = dev2.archive().cursor() if (dev2.state / "appliances").exists() else None
        lines = dev1.archived_lines()
        if with_tenant2 is not None:
            later = dev2.archived_lines()
            if later:
                start = json.loads(later[0])["seq"]
                lines = lines[: start - 1] + later
        restore(dev1, lines)
        factory_reset(app)
