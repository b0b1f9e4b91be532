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
from tests.lab.test_keys_domain import _SIGN, Domains, verify

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
