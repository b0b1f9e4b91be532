"""HA groups end to end (SPEC §12, issue 12 item 3): ``hsmctl ha create|status|sync``.

hsm72 (stamp2) and hsm73 (stamp1) are provisioned into tenant1's delegated subnet with
``--ip`` and taken over with the same ``--domain-file`` (domain A); hsm74 is tenant1's
too but in domain B; hsm75 is taken over by tenant2 into the same state directory (one
operator host keeping both tenants' state), so tenant1 finds it there with tenant2's
receipt. Keys are made through hsmctl's own crypto-officer kit (real sshd, p11-kit
remote, the key-policy layer, SoftHSM) and copied by ``ha sync`` wrapped under the
domain key. An outage is the lab fabric driver detaching a member's data port.

Appliances: ``APPLIANCE_SETS["ha"]`` (hsm72 … hsm75), factory-reset at the end.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from hsmctl.appliance import domainkey
from tests.conftest import APPLIANCE_SETS, HSMCTL, ensure_lab
from tests.lab.takeover_helpers import Rig, console, factory_reset, provision_all, takeover_cli
from tests.lab.test_keys_domain import _SIGN, Domains, _kill_when, verify

pytestmark = pytest.mark.lab

A1, A2, B1, OTHER = APPLIANCE_SETS["ha"]
SECRET_A = "domain-A-secret-for-the-ha-tests-01"
SECRET_B = "domain-B-secret-for-the-ha-tests-02"
# Data addresses of their own: Rig's ``.200 + N`` does not fit hsm72-75, ``unique_ip``
# hands out .101 and above, and a database left to choose takes .4 upwards.
ADDRESSES = {A1: "198.19.0.92", A2: "198.19.0.93", B1: "198.19.0.94", OTHER: "198.19.8.95"}


class HaRig(Rig):
    @property
    def ip(self) -> str:
        return ADDRESSES[self.appliance]


@dataclass
class Lab:
    conf: Path
    netns: str
    state_dir: Path

    def hsmctl(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
        argv = ["ip", "netns", "exec", self.netns, HSMCTL, "--config", str(self.conf), *args]
        return subprocess.run(argv, capture_output=True, timeout=timeout, check=False)

    def ok(self, *args: str) -> Any:
        proc = self.hsmctl(*args, "--json")
        assert proc.returncode == 0, (args, proc.stderr.decode()[-3000:])
        return json.loads(proc.stdout)

    def keys(self, appliance: str) -> set[tuple[str, str, str]]:
        listed = self.ok("key", "list", appliance)["keys"]
        return {(k["label"], k["id"], k["type"]) for k in listed}

    def groups(self) -> list[str]:
        d = self.state_dir / "ha"
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def _secret_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def _domain(appliance: str) -> str | None:
    shown = json.loads(console(appliance, "hsmsh", "-c", "hsm show").stdout)
    domain = shown.get("domain")
    return str(domain) if domain else None


@pytest.fixture(scope="module")
def ha(_lab_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = ensure_lab()
    base = tmp_path_factory.mktemp("ha")
    rigs: list[Rig] = [HaRig(lab, a, "tenant1", base / a) for a in (A1, A2, B1)]
    rigs.append(HaRig(lab, OTHER, "tenant2", base / OTHER))
    try:
        provision_all(rigs)
        conf1 = rigs[0].tenant_conf(base / "customer")
        state_dir = Path(yaml.safe_load(conf1.read_text())["state_dir"])
        # tenant2's configuration with the same state directory (one operator host)
        conf2 = rigs[3].tenant_conf(base / "customer2")
        doc = yaml.safe_load(conf2.read_text())
        doc["state_dir"] = str(state_dir)
        conf2.write_text(yaml.safe_dump(doc))
        a = _secret_file(base / "domain-a", SECRET_A)
        b = _secret_file(base / "domain-b", SECRET_B)
        jobs = [(rigs[0], conf1, a), (rigs[1], conf1, a), (rigs[2], conf1, b),
                (rigs[3], conf2, a)]  # fmt: skip

        def take(job: tuple[Rig, Path, Path]) -> None:
            rig, conf, secret = job
            proc = takeover_cli(rig.netns, conf, rig.handoff, "--domain-file", str(secret))
            assert proc.returncode == 0, (rig.appliance, proc.stderr.decode()[-3000:])

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(take, jobs))
        yield Lab(conf1, rigs[0].netns, state_dir)
    finally:
        factory_reset(A1, A2, B1, OTHER)


def test_members_are_in_different_stamps_and_domains_as_set_up(ha: Lab) -> None:
    lab = ensure_lab()
    stamps = {a["id"]: a.get("stamp") for a in lab["appliances"]}
    assert stamps[A1] != stamps[A2], stamps
    assert _domain(A1) == _domain(A2) == _domain(OTHER) == domainkey.fingerprint(SECRET_A)
    assert _domain(B1) == domainkey.fingerprint(SECRET_B)


def test_bad_input_exit_codes_and_nothing_changed(ha: Lab) -> None:
    cases = [
        ((["g1", A1]), 2),  # a group of one
        ((["g1", A1, A1]), 2),  # a duplicate member
        ((["", A1, A2]), 2),  # an empty name
        ((["Bad_Name", A1, A2]), 2),  # a bad name
        ((["g1"]), 2),  # no members at all
        ((["g1", A1, "hsm99"]), 2),  # an appliance unknown here
        ((["g1", A1, "../etc"]), 2),  # not an appliance id
        ((["g1", A1, B1]), 3),  # another domain
        ((["g1", A1, OTHER]), 3),  # another tenant's appliance
    ]
    for args, code in cases:
        proc = ha.hsmctl("ha", "create", *args, "--json")
        assert proc.returncode == code, (args, proc.returncode, proc.stderr.decode())
        err = json.loads(proc.stdout)["error"]
        assert err["exit_code"] == code and err["message"]
        assert ha.groups() == [], args
    assert ha.hsmctl("ha", "status", "nosuch").returncode == 2
    assert ha.hsmctl("ha", "sync", "nosuch").returncode == 2


@pytest.fixture(scope="module")
def group(ha: Lab) -> str:
    out = ha.ok("ha", "create", "g1", A1, A2)
    assert out == {"group": "g1", "members": [A1, A2],
                   "domain": domainkey.fingerprint(SECRET_A), "created": True}  # fmt: skip
    path = ha.state_dir / "ha" / "g1.json"
    assert path.stat().st_mode & 0o777 == 0o600
    before = path.read_bytes()
    again = ha.ok("ha", "create", "g1", A2, A1)
    assert again["created"] is False and path.read_bytes() == before
    other = ha.hsmctl("ha", "create", "g1", A1, B1)
    assert other.returncode == 5, other.stderr.decode()
    assert path.read_bytes() == before and ha.groups() == ["g1.json"]
    return "g1"


def test_keys_made_on_either_member_appear_on_the_other(ha: Lab, group: str) -> None:
    ha.ok("key", "generate", A1, "--label", "k-ec", "--type", "ec:p256")
    ha.ok("key", "generate", A1, "--label", "k-aes", "--type", "aes:256")
    ha.ok("key", "generate", A2, "--label", "k-ec2", "--type", "ec:p384")
    status = ha.ok("ha", "status", group)
    assert set(status) == {"group", "members"} and status["group"] == group
    assert [m["appliance"] for m in status["members"]] == [A1, A2]
    for m in status["members"]:
        assert set(m) == {"appliance", "reachable", "objects", "in_sync"}
        assert m["reachable"] is True and m["in_sync"] is False
    out = ha.ok("ha", "sync", group)
    copied = {m["appliance"]: {(c["class"], c["label"]) for c in m["copied"]}
              for m in out["members"]}  # fmt: skip
    assert copied[A2] == {("private-key", "k-ec"), ("public-key", "k-ec"),
                          ("secret-key", "k-aes")}  # fmt: skip
    assert copied[A1] == {("private-key", "k-ec2"), ("public-key", "k-ec2")}
    assert ha.keys(A1) == ha.keys(A2)
    # the copy on A2 is A1's key: what it signs verifies with the public key read on A1
    d = Domains(ha.conf, ha.netns, ha.state_dir.parents[1], {}, {})
    on_a1, on_a2 = d.p11(A1, _SIGN, ["k-ec"]), d.p11(A2, _SIGN, ["k-ec"])
    verify("k-ec", on_a1["k-ec"], on_a2["k-ec"]["sig"])
    assert on_a1["k-ec"]["ec_point"] == on_a2["k-ec"]["ec_point"]
    assert {k[0] for k in ha.keys(A1)} == {"hsm-domain", "k-ec", "k-aes", "k-ec2"}
    status = ha.ok("ha", "status", group)
    assert all(m["in_sync"] and m["reachable"] for m in status["members"])
    assert status["members"][0]["objects"] == status["members"][1]["objects"] == 5
    again = ha.ok("ha", "sync", group)  # idempotent
    assert again["copied"] == 0


def test_an_aes_key_copied_by_sync_reports_its_size(ha: Lab, group: str) -> None:
    # SoftHSM keeps no CKA_VALUE_LEN for an unwrapped key (and refuses one in the unwrap
    # template): key list learns it from a wrap under the domain key (issue 12: size null)
    ha.ok("key", "generate", A1, "--label", "k-aes128", "--type", "aes:128")
    ha.ok("ha", "sync", group)
    for member in (A1, A2):
        rows = {k["label"]: k for k in ha.ok("key", "list", member)["keys"]}
        assert rows["k-aes"]["size"] == 256 and rows["k-aes128"]["size"] == 128, rows
        assert rows["k-ec"]["size"] == 256 and rows["k-ec2"]["size"] == 384
    copied = {k["label"]: k for k in ha.ok("key", "list", A2)["keys"]}
    assert copied["k-aes"]["local"] is False  # it was unwrapped there, not generated


def test_keys_made_during_an_outage_reach_the_member_on_the_next_sync(ha: Lab, group: str) -> None:
    from hsmctl.lab.control import fabric

    ha.ok("ha", "sync", group)
    fab = fabric()
    fab.detach(A2)
    try:
        ha.ok("key", "generate", A1, "--label", "k-outage", "--type", "ec:p256")
        proc = ha.hsmctl("ha", "sync", group, "--json")
        assert proc.returncode == 4, proc.stderr.decode()
        report = json.loads(proc.stdout)["error"]
        members = {m["appliance"]: m for m in report["members"]}
        assert members[A2]["reachable"] is False and members[A1]["reachable"] is True
        status = ha.ok("ha", "status", group)
        by = {m["appliance"]: m for m in status["members"]}
        assert by[A2]["reachable"] is False and by[A1]["in_sync"] is True
    finally:
        fab.attach(A2, "tenant1", "vnet1", "hsm")
    out = ha.ok("ha", "sync", group)
    got = {(c["class"], c["label"]) for m in out["members"] for c in m["copied"]
           if m["appliance"] == A2}  # fmt: skip
    assert got == {("private-key", "k-outage"), ("public-key", "k-outage")}
    assert ha.keys(A1) == ha.keys(A2)
    assert all(m["in_sync"] for m in ha.ok("ha", "status", group)["members"])


# --- the destroy journal ------------------------------------------------------------------

_DESTROY = """
for o in list(se.get_objects({})):
    if o[Attribute.LABEL] in req["data"]:
        o.destroy()
"""


def _tombstones(ha: Lab, group: str) -> list[dict[str, Any]]:
    path = ha.state_dir / "ha-destroyed" / f"{group}.json"
    stones: list[dict[str, Any]] = json.loads(path.read_text())["tombstones"]
    return stones


def _pending(ha: Lab, group: str, label: str) -> dict[str, list[str]]:
    return {t["class"]: t["pending"] for t in _tombstones(ha, group) if t["label"] == label}


def _destroyed(report: dict[str, Any]) -> dict[str, set[tuple[str, str]]]:
    return {m["appliance"]: {(d["class"], d["label"]) for d in m["destroyed"]}
            for m in report["members"]}  # fmt: skip


def test_a_key_destroyed_through_hsmctl_is_destroyed_on_the_other_members(
    ha: Lab, group: str
) -> None:
    ha.ok("key", "generate", A1, "--label", "k-del", "--type", "ec:p256")
    ha.ok("key", "generate", A2, "--label", "k-del-aes", "--type", "aes:256")
    ha.ok("ha", "sync", group)
    assert {"k-del", "k-del-aes"} <= {k[0] for k in ha.keys(A2)} & {k[0] for k in ha.keys(A1)}
    ha.ok("key", "destroy", A1, "--label", "k-del", "--yes")
    ha.ok("key", "destroy", A2, "--label", "k-del-aes", "--yes")
    assert _pending(ha, group, "k-del") == {"private-key": [A1, A2], "public-key": [A1, A2]}
    assert _pending(ha, group, "k-del-aes") == {"secret-key": [A1, A2]}
    path = ha.state_dir / "ha-destroyed" / f"{group}.json"
    assert path.stat().st_mode & 0o777 == 0o600
    # each member holds a key the other destroyed: neither is in sync
    status = ha.ok("ha", "status", group)
    assert [m["in_sync"] for m in status["members"]] == [False, False]
    # a destroy the device refuses (no such key) journals nothing
    before = path.read_bytes()
    refused = ha.hsmctl("key", "destroy", A1, "--label", "k-nosuch", "--yes", "--json")
    assert refused.returncode == 2, refused.stderr.decode()
    assert path.read_bytes() == before

    out = ha.ok("ha", "sync", group)
    assert _destroyed(out) == {
        A1: {("secret-key", "k-del-aes")},
        A2: {("private-key", "k-del"), ("public-key", "k-del")},
    }
    assert out["destroyed"] == 3 and out["copied"] == 0
    for member in (A1, A2):
        assert not {"k-del", "k-del-aes"} & {k[0] for k in ha.keys(member)}
    assert ha.keys(A1) == ha.keys(A2)
    assert all(not t["pending"] for t in _tombstones(ha, group))  # settled
    assert all(m["in_sync"] for m in ha.ok("ha", "status", group)["members"])
    again = ha.ok("ha", "sync", group)
    assert again["destroyed"] == 0 and again["copied"] == 0


def test_a_destroy_during_an_outage_reaches_the_member_when_it_returns(ha: Lab, group: str) -> None:
    from hsmctl.lab.control import fabric

    ha.ok("key", "generate", A1, "--label", "k-gone-out", "--type", "ec:p256")
    ha.ok("ha", "sync", group)
    assert "k-gone-out" in {k[0] for k in ha.keys(A2)}
    fab = fabric()
    fab.detach(A2)
    try:
        ha.ok("key", "destroy", A1, "--label", "k-gone-out", "--yes")
        proc = ha.hsmctl("ha", "sync", group, "--json")
        assert proc.returncode == 4, proc.stderr.decode()
        # A1 was seen without it; A2 still to be seen
        assert _pending(ha, group, "k-gone-out") == {"private-key": [A2], "public-key": [A2]}
    finally:
        fab.attach(A2, "tenant1", "vnet1", "hsm")
    out = ha.ok("ha", "sync", group)
    assert _destroyed(out)[A2] == {("private-key", "k-gone-out"), ("public-key", "k-gone-out")}
    assert out["copied"] == 0  # it did not come back to A1
    assert "k-gone-out" not in {k[0] for k in ha.keys(A1)} | {k[0] for k in ha.keys(A2)}
    assert _pending(ha, group, "k-gone-out") == {"private-key": [], "public-key": []}


def _p11_on(appliance: str) -> bool:
    """A PKCS#11 session (p11-kit remote) is open on the appliance's device."""
    pids = subprocess.run(["ip", "netns", "pids", f"hsmlab-{appliance}"],
                          capture_output=True, check=False).stdout.split()  # fmt: skip
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
        except OSError:
            continue
        if b"p11-kit" in cmdline and b"remote" in cmdline:
            return True
    return False


def test_an_interrupted_sync_reruns_to_completion(ha: Lab, group: str) -> None:
    bulk = [f"k-bulk-{i}" for i in range(6)]
    fresh = [f"k-new-{i}" for i in range(3)]
    for label in bulk:
        ha.ok("key", "generate", A1, "--label", label, "--type", "aes:256")
    ha.ok("ha", "sync", group)
    assert set(bulk) <= {k[0] for k in ha.keys(A2)}
    for label in bulk:
        ha.ok("key", "destroy", A1, "--label", label, "--yes")
    for label in fresh:
        ha.ok("key", "generate", A1, "--label", label, "--type", "ec:p256")
    # sync reads A1 first, then A2 (destroying there), then copies to A2: kill -9 once
    # it has a PKCS#11 session on A2
    quiet = time.monotonic() + 60
    while _p11_on(A2) and time.monotonic() < quiet:  # earlier sessions on A2 end first
        time.sleep(0.1)
    argv = ["ip", "netns", "exec", ha.netns, HSMCTL, "--config", str(ha.conf), "ha", "sync",
            group]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = _kill_when(proc, lambda: _p11_on(A2))
    if killed:
        # interrupted: something is still to do on A2 (to destroy or to copy)
        status = ha.ok("ha", "status", group)
        assert {m["appliance"]: m["in_sync"] for m in status["members"]}[A2] is False
    ha.ok("ha", "sync", group)
    on_a2 = {k[0] for k in ha.keys(A2)}
    assert not set(bulk) & on_a2 and set(fresh) <= on_a2
    assert ha.keys(A1) == ha.keys(A2)
    assert all(not t["pending"] for t in _tombstones(ha, group) if t["label"] in bulk)
    assert all(m["in_sync"] for m in ha.ok("ha", "status", group)["members"])


def test_a_key_destroyed_on_the_device_by_another_client_comes_back(ha: Lab, group: str) -> None:
    # documented (docs/keys.md): only a destroy through hsmctl is journaled; to sync a key
    # an application destroyed itself on one member is a key that member lacks
    ha.ok("key", "generate", A1, "--label", "k-direct", "--type", "ec:p256")
    ha.ok("ha", "sync", group)
    d = Domains(ha.conf, ha.netns, ha.state_dir.parents[1], {}, {})
    d.p11(A2, _DESTROY, ["k-direct"])
    assert "k-direct" not in {k[0] for k in ha.keys(A2)}
    out = ha.ok("ha", "sync", group)
    got = {(c["class"], c["label"]) for m in out["members"] for c in m["copied"]
           if m["appliance"] == A2}  # fmt: skip
    assert got == {("private-key", "k-direct"), ("public-key", "k-direct")}
    assert out["destroyed"] == 0 and ha.keys(A1) == ha.keys(A2)


def test_more_bad_input_exits_2_3_5_with_a_message_and_nothing_changed(
    ha: Lab, group: str, tmp_path: Path
) -> None:
    """Issue 12's bad input beyond ``ha create``'s (SPEC §6: 2 usage, 3 integrity, 5
    wrong state): backup and restore within and across the members' domains, a destroy
    in a group, damaged group and destroy-journal files. Each: the code, a message, the
    members' keys and the journal as they were."""
    ha.ok("ha", "sync", group)
    backup = tmp_path / "a1.backup"
    ha.ok("backup", A1, "--output", str(backup))
    keys = {m: ha.keys(m) for m in (A1, A2, B1)}
    journal = ha.state_dir / "ha-destroyed" / f"{group}.json"
    stones = journal.read_bytes() if journal.exists() else None
    loose = tmp_path / "pin"
    loose.write_text("123456\n")
    loose.chmod(0o644)
    cases: list[tuple[str, list[str], int]] = [
        ("restore: missing file", ["restore", A2, "--backup", str(tmp_path / "nope")], 2),
        ("restore: a directory", ["restore", A2, "--backup", str(tmp_path)], 2),
        ("restore: another domain", ["restore", B1, "--backup", str(backup)], 3),
        ("restore: not an appliance id", ["restore", "../x", "--backup", str(backup)], 2),
        ("backup: output a directory", ["backup", A1, "--output", str(tmp_path)], 2),
        ("backup: unknown appliance", ["backup", "hsm99", "--output", str(tmp_path / "o")], 5),
        ("backup: PIN file readable by others",
         ["backup", A1, "--output", str(tmp_path / "o"), "--pin-file", str(loose)], 2),
        ("destroy in a group: unknown label", ["key", "destroy", A1, "--label", "k-none",
                                               "--yes"], 2),
        ("destroy in a group: no --yes", ["key", "destroy", A1, "--label", "k-ec"], 2),
        ("destroy in a group: bad label", ["key", "destroy", A1, "--label", "-x", "--yes"], 2),
        ("sync: bad group name", ["ha", "sync", "Bad_Name"], 2),
        ("status: unknown group", ["ha", "status", "nosuch"], 2),
    ]  # fmt: skip
    for name, args, code in cases:
        proc = ha.hsmctl(*args, "--json")
        assert proc.returncode == code, (name, proc.returncode, proc.stderr.decode()[-2000:])
        err = json.loads(proc.stdout)["error"]
        assert err["exit_code"] == code and err["message"], (name, err)
    assert not (tmp_path / "o").exists()

    # a damaged group file, then a damaged destroy journal: exit 3, nothing changed
    path = ha.state_dir / "ha" / f"{group}.json"
    good = path.read_bytes()
    try:
        path.write_bytes(good.replace(b'"members"', b'"memberz"'))
        for verb in ("status", "sync"):
            proc = ha.hsmctl("ha", verb, group, "--json")
            assert proc.returncode == 3, (verb, proc.stderr.decode())
            assert json.loads(proc.stdout)["error"]["message"]
        proc = ha.hsmctl("key", "destroy", A1, "--label", "k-ec", "--yes", "--json")
        assert proc.returncode == 3, proc.stderr.decode()  # cannot journal: not destroyed
    finally:
        path.write_bytes(good)
    journal.parent.mkdir(parents=True, exist_ok=True)
    try:
        journal.write_text('{"format": "something else"}\n')
        proc = ha.hsmctl("ha", "sync", group, "--json")
        assert proc.returncode == 3, proc.stderr.decode()
        proc = ha.hsmctl("key", "destroy", A2, "--label", "k-ec", "--yes", "--json")
        assert proc.returncode == 3, proc.stderr.decode()
    finally:
        if stones is None:
            journal.unlink()
        else:
            journal.write_bytes(stones)
    assert {m: ha.keys(m) for m in (A1, A2, B1)} == keys
    assert (journal.read_bytes() if journal.exists() else None) == stones
    assert all(m["in_sync"] for m in ha.ok("ha", "status", group)["members"])


# -- restore checks its target; an imported AES key's size (helper-33) ---------------------


def _own_kit(ha: Lab, appliance: str) -> Path:
    """hsmctl's own crypto-officer kit for ``appliance`` (made by its first key list)."""
    import socket

    from hsmctl.clients import kit

    ha.keys(appliance)
    own = ha.state_dir / "appliances" / appliance / "clients"
    found = own / kit.own_client_name(socket.gethostname())
    assert (found / "known_hosts").is_file(), found
    return found


def _device_events(appliance: str, after: int, *names: str) -> list[dict[str, Any]]:
    from tests.lab.takeover_helpers import audit_records

    return [r for r in audit_records(appliance) if int(r["seq"]) > after
            and r.get("event") in names]  # fmt: skip


def test_restore_and_backup_refuse_a_target_not_this_tenants_or_a_kit_of_another(
    ha: Lab, tmp_path: Path
) -> None:
    """The target must be this tenant's (its receipt signed by this tenant's identity:
    hsm75 is tenant2's, in the same state directory: exit 5) and ``--kit`` must reach
    only it (its known_hosts holds only the target's pinned keys: another appliance's
    kit is exit 2). Refused before any device is asked: nothing changed, nothing on the
    devices' PKCS#11 path."""
    from tests.lab.takeover_helpers import audit_records

    backup = tmp_path / "a1.backup"
    ha.ok("backup", A1, "--output", str(backup))
    kit_a1, kit_b1 = _own_kit(ha, A1), _own_kit(ha, B1)
    keys_b1 = ha.keys(B1)
    since = {a: int(audit_records(a)[-1]["seq"]) for a in (B1, OTHER)}
    cases: list[tuple[str, list[str], int, str]] = [
        ("restore into tenant2's appliance", ["restore", OTHER, "--backup", str(backup)], 5,
         "not this tenant's"),
        ("backup of tenant2's appliance", ["backup", OTHER, "--output", str(tmp_path / "o")],
         5, "not this tenant's"),
        ("restore through another appliance's kit",
         ["restore", B1, "--backup", str(backup), "--kit", str(kit_a1)], 2, "known_hosts"),
        ("backup through another appliance's kit",
         ["backup", B1, "--output", str(tmp_path / "o"), "--kit", str(kit_a1)], 2,
         "known_hosts"),
    ]  # fmt: skip
    for name, args, code, words in cases:
        proc = ha.hsmctl(*args, "--json")
        assert proc.returncode == code, (name, proc.returncode, proc.stderr.decode()[-2000:])
        err = json.loads(proc.stdout)["error"]
        assert err["exit_code"] == code and words in err["message"], (name, err)
        assert "nothing changed" in err["message"], (name, err)
    assert not (tmp_path / "o").exists()
    for a in (B1, OTHER):  # no PKCS#11 service was even asked for
        assert not _device_events(a, since[a], "pkcs11-connect", "key-imported"), a
    # B1's own kit passes the check: the restore goes on to the domain check (exit 3)
    proc = ha.hsmctl("restore", B1, "--backup", str(backup), "--kit", str(kit_b1), "--json")
    assert proc.returncode == 3, proc.stderr.decode()[-2000:]
    assert "domain" in json.loads(proc.stdout)["error"]["message"]
    assert ha.keys(B1) == keys_b1


_WRAP_FOR_THE_DEVICE = """
import os, sys
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
kek = serialization.load_pem_public_key(open(sys.argv[1], "rb").read())
for bits, out in zip((256, 128), sys.argv[2:]):
    eph = os.urandom(32)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    blob = kek.encrypt(eph, oaep) + aes_key_wrap_with_padding(eph, os.urandom(bits // 8))
    open(out, "wb").write(blob)
"""

_SIZE_RECORDS = """
out["records"] = sorted(
    [o[Attribute.LABEL], bytes(o[Attribute.VALUE]).decode()]
    for o in se.get_objects({Attribute.CLASS: ObjectClass.DATA,
                             Attribute.APPLICATION: "hsmctl key size"}))
"""


def test_imported_aes_keys_report_their_size_in_key_list_and_destroy_removes_it(
    ha: Lab, tmp_path: Path
) -> None:
    """BYOK AES-256 and AES-128 keys (wrapped here the way the customer does: RSA-OAEP
    over an ephemeral AES key, then AES key wrap with padding) on B1 (outside the group):
    ``key list`` says 256 and 128, not null, as the import did; a destroy takes the size
    record with the key."""
    import sys

    ha.ok("key", "wrapping-key", B1, "--label", "ha-kek", "--output", str(tmp_path / "kek.pem"))
    blobs = [tmp_path / "aes256.wrapped", tmp_path / "aes128.wrapped"]
    subprocess.run([sys.executable, "-c", _WRAP_FOR_THE_DEVICE, str(tmp_path / "kek.pem"),
                    *map(str, blobs)], check=True, timeout=60)  # fmt: skip
    made = {}
    for label, blob in zip(("byok-aes256", "byok-aes128"), blobs, strict=True):
        made[label] = ha.ok("key", "import", B1, "--label", label, "--wrapped", str(blob),
                            "--wrapping-key", "ha-kek")["key"]  # fmt: skip
    assert made["byok-aes256"]["size"] == 256 and made["byok-aes128"]["size"] == 128, made
    rows = {k["label"]: k for k in ha.ok("key", "list", B1)["keys"]}
    for label, bits in (("byok-aes256", 256), ("byok-aes128", 128)):
        row = rows[label]
        assert row["type"] == "aes" and row["size"] == bits, row
        assert row["local"] is False and row["extractable"] is False, row
        assert row == made[label]
    d = Domains(ha.conf, ha.netns, ha.state_dir.parent.parent, {}, {})  # BASE/customer/…
    assert d.state(B1) == ha.state_dir / "appliances" / B1
    records = d.p11(B1, _SIZE_RECORDS)["records"]
    assert [r[0] for r in records] == ["byok-aes128", "byok-aes256"], records
    ha.ok("key", "destroy", B1, "--label", "byok-aes256", "--yes")
    records = d.p11(B1, _SIZE_RECORDS)["records"]
    assert [r[0] for r in records] == ["byok-aes128"], records
    rows = {k["label"]: k for k in ha.ok("key", "list", B1)["keys"]}
    assert "byok-aes256" not in rows and rows["byok-aes128"]["size"] == 128
