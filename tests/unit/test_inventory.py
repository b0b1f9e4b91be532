"""Inventory validation: a table of bad documents, each with the message it must produce
(naming the file and the entry), the committed example, the lab's own output, and the
placement checks provisioning runs before touching a device."""

from __future__ import annotations

import base64
import subprocess
from ipaddress import IPv4Address
from pathlib import Path
from string import Template
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsmctl.errors import UsageError
from hsmctl.inventory import (
    Inventory,
    InventoryError,
    PlacementError,
    Quota,
    check_placement,
    load_inventory,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def _line(key: Any) -> str:
    return str(key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode())


K1, K2, K3 = (_line(ed25519.Ed25519PrivateKey.generate()) for _ in range(3))
E1 = _line(ec.generate_private_key(ec.SECP256R1()))
I1, I2 = (_line(ec.generate_private_key(ec.SECP256R1())) for _ in range(2))
P384 = _line(ec.generate_private_key(ec.SECP384R1()))
RSA1024 = _line(rsa.generate_private_key(public_exponent=65537, key_size=1024))
# An ed25519 line whose blob is cut short: valid base64, not a key.
TRUNCATED = "ssh-ed25519 " + base64.b64encode(base64.b64decode(K1.split()[1])[:20]).decode()
KEYS = {
    "K1": K1,
    "K2": K2,
    "K3": K3,
    "E1": E1,
    "I1": I1,
    "I2": I2,
    "P384": P384,
    "RSA1024": RSA1024,
    "TRUNCATED": TRUNCATED,
}

GOOD = """\
version: 1
regions:
  - name: r1
    stamps:
      - name: s1
        mgmt_cidr: 192.0.2.0/25
        appliances:
          - id: hsm01
            serial: "SN0001"
            model: m
            mgmt_ip: 192.0.2.11
            mgmt_host_keys: ["$K1", "$E1"]
          - id: hsm02
            serial: "SN0002"
            model: m
            mgmt_ip: 192.0.2.12
            mgmt_host_keys: ["$K2"]
  - name: r2
    stamps:
      - name: s2
        appliances:
          - {id: hsm03, serial: SN0003, model: m, mgmt_ip: 192.0.2.200, mgmt_host_keys: ["$K3"]}
tenants:
  - name: t1
    identity_public_key: "$I1"
    quota: {per_stamp: 1}
    vnets:
      - name: v1
        region: r1
        cidr: 10.0.0.0/16
        subnets:
          - {name: default, cidr: 10.0.0.0/24, delegated: false}
          - {name: hsm, cidr: 10.0.1.0/24, delegated: true}
  - name: t2
    identity_public_key: "$I2"
    vnets:
      - name: v1
        cidr: 10.0.0.0/16
        subnets: [{name: hsm, cidr: 10.0.1.0/28, delegated: true}]
"""

# One appliance entry, for cases about appliances: $X are the fields to vary.
APPLIANCE = """\
regions:
  - name: r1
    stamps:
      - name: s1
        appliances:
          - id: hsm01
            serial: "SN0001"
            model: m
            mgmt_ip: 192.0.2.11
            mgmt_host_keys: ["$K1"]
"""


def tenant(vnets: str, *, extra: str = "", name: str = "t1", key: str = "$I1") -> str:
    return (
        f'tenants:\n  - name: {name}\n    identity_public_key: "{key}"\n{extra}    vnets:\n{vnets}'
    )


def subnets(*lines: str, cidr: str = "10.0.0.0/16", name: str = "v1") -> str:
    body = "".join(f"          - {line}\n" for line in lines)
    return f"      - name: {name}\n        cidr: {cidr}\n        subnets:\n{body}"


HSM = "{name: hsm, cidr: 10.0.1.0/24, delegated: true}"

# (case id, YAML document, fragment the message must contain). File is always x.yaml.
BAD: list[tuple[str, str, str]] = [
    ("top-level-list", "- 1\n", "x.yaml: expected a mapping, got a list"),
    ("unknown-top-key", "regoins: []\n", "x.yaml: unknown key 'regoins'"),
    ("bad-version", "version: 2\n", "x.yaml: version: unsupported inventory version 2"),
    ("not-yaml", "regions: [\n", "x.yaml: not valid YAML"),
    (
        "duplicate-yaml-key",
        "regions: []\nregions: []\n",
        "x.yaml: not valid YAML: duplicate key 'regions'",
    ),
    ("regions-not-list", "regions: {r1: 1}\n", "x.yaml: regions: expected a list, got a mapping"),
    (
        "unknown-appliance-key",
        APPLIANCE + "            mgmtip: 192.0.2.1\n",
        "x.yaml: regions[r1].stamps[s1].appliances[hsm01]: unknown key 'mgmtip'",
    ),
    (
        "missing-serial",
        APPLIANCE.replace('            serial: "SN0001"\n', ""),
        "x.yaml: regions[r1].stamps[s1].appliances[hsm01]: missing key 'serial'",
    ),
    (
        "serial-is-int",
        APPLIANCE.replace('"SN0001"', "1234"),
        "appliances[hsm01]: serial: expected a string, got int (quote it)",
    ),
    (
        "bad-mgmt-ip",
        APPLIANCE.replace("192.0.2.11", "300.1.1.1"),
        "appliances[hsm01]: mgmt_ip: '300.1.1.1' is not an IPv4 address",
    ),
    (
        "mgmt-ip-outside-stamp",
        APPLIANCE.replace(
            "        appliances:", "        mgmt_cidr: 198.51.100.0/24\n        appliances:"
        ),
        "x.yaml: regions[r1].stamps[s1].appliances[hsm01]: mgmt_ip 192.0.2.11 is outside the "
        "stamp's mgmt_cidr 198.51.100.0/24",
    ),
    (
        "no-host-keys",
        APPLIANCE.replace('["$K1"]', "[]"),
        "appliances[hsm01]: mgmt_host_keys: expected a non-empty list",
    ),
    (
        "host-key-not-base64",
        APPLIANCE.replace('["$K1"]', '["ssh-ed25519 !!notbase64!!"]'),
        "appliances[hsm01]: mgmt_host_keys[0]: key data is not valid base64",
    ),
    (
        "host-key-truncated",
        APPLIANCE.replace("$K1", "$TRUNCATED"),
        "appliances[hsm01]: mgmt_host_keys[0]: malformed ssh-ed25519 key",
    ),
    (
        "host-key-wrong-type",
        APPLIANCE.replace('["$K1"]', '["ssh-dss AAAAB3NzaC1kc3M="]'),
        "mgmt_host_keys[0]: key type 'ssh-dss' is not accepted",
    ),
    (
        "host-key-type-lies",
        APPLIANCE.replace("$K1", "ecdsa-sha2-nistp256 " + K1.split()[1]),
        "appliances[hsm01]: mgmt_host_keys[0]: malformed ecdsa-sha2-nistp256 key",
    ),
    (
        "host-key-rsa-1024",
        APPLIANCE.replace("$K1", "$RSA1024"),
        "mgmt_host_keys[0]: RSA key of 1024 bits",
    ),
    (
        "fingerprint-malformed",
        APPLIANCE + "            mgmt_host_key_fingerprints: ['MD5:00:11']\n",
        "appliances[hsm01]: mgmt_host_key_fingerprints[0]: 'MD5:00:11' is not an OpenSSH SHA256 "
        "fingerprint",
    ),
    (
        "fingerprint-mismatch",
        APPLIANCE + "            mgmt_host_key_fingerprints: ['SHA256:" + "A" * 43 + "']\n",
        f"mgmt_host_key_fingerprints[0]: SHA256:{'A' * 43} matches none of mgmt_host_keys",
    ),
    (
        "duplicate-appliance-id",
        GOOD.replace("id: hsm02", "id: hsm01"),
        "x.yaml: regions[r1].stamps[s1].appliances[hsm01]: duplicate appliance id hsm01 (first "
        "at x.yaml: regions[r1].stamps[s1].appliances[hsm01])",
    ),
    (
        "duplicate-serial",
        GOOD.replace("SN0003", "SN0001"),
        "x.yaml: regions[r2].stamps[s2].appliances[hsm03]: duplicate serial SN0001",
    ),
    (
        "duplicate-mgmt-ip",
        GOOD.replace("192.0.2.200", "192.0.2.11"),
        "x.yaml: regions[r2].stamps[s2].appliances[hsm03]: duplicate mgmt_ip 192.0.2.11",
    ),
    (
        "duplicate-host-key",
        GOOD.replace('["$K3"]', '["$K1"]'),
        "regions[r2].stamps[s2].appliances[hsm03]: duplicate management host key",
    ),
    (
        "duplicate-stamp",
        GOOD.replace("name: s2", "name: s1"),
        "x.yaml: regions[r2].stamps[s1]: duplicate stamp s1",
    ),
    (
        "bad-name",
        GOOD.replace("name: s2", "name: 'stamp two'"),
        "x.yaml: regions[r2].stamps[0]: name: 'stamp two' is not a valid name",
    ),
    (
        "name-is-yaml-bool",
        GOOD.replace("name: t2", "name: no"),
        "x.yaml: tenants[1]: name: expected a string, got a boolean (quote it)",
    ),
    (
        "duplicate-tenant",
        GOOD.replace("name: t2", "name: t1"),
        "x.yaml: tenants[t1]: duplicate tenant t1",
    ),
    (
        "shared-identity",
        GOOD.replace("$I2", "$I1"),
        "x.yaml: tenants[t2]: duplicate identity_public_key",
    ),
    (
        "missing-identity",
        "tenants:\n  - name: t1\n    vnets: []\n",
        "x.yaml: tenants[t1]: missing key 'identity_public_key'",
    ),
    (
        "identity-not-p256",
        tenant("", key="$K1") + "      []\n",
        "x.yaml: tenants[t1]: identity_public_key: key type 'ssh-ed25519' is not accepted here",
    ),
    (
        "identity-p384",
        tenant("", key="$P384") + "      []\n",
        "tenants[t1]: identity_public_key: key type 'ecdsa-sha2-nistp384' is not accepted",
    ),
    (
        "quota-zero",
        tenant(subnets(HSM), extra="    quota: {per_stamp: 0}\n"),
        "x.yaml: tenants[t1].quota: per_stamp: must be at least 1, got 0",
    ),
    (
        "quota-bool",
        tenant(subnets(HSM), extra="    quota: {per_region: true}\n"),
        "tenants[t1].quota: per_region: expected an integer, got a boolean",
    ),
    (
        "quota-unknown-key",
        tenant(subnets(HSM), extra="    quota: {per_zone: 3}\n"),
        "x.yaml: tenants[t1].quota: unknown key 'per_zone'",
    ),
    (
        "vnet-host-bits",
        tenant(subnets(HSM, cidr="10.0.0.1/16")),
        "x.yaml: tenants[t1].vnets[v1]: cidr: '10.0.0.1/16' has host bits set; did you mean "
        "10.0.0.0/16?",
    ),
    (
        "vnet-no-prefix",
        tenant(subnets(HSM, cidr="10.0.0.0")),
        "tenants[t1].vnets[v1]: cidr: '10.0.0.0' has no prefix length",
    ),
    (
        "vnet-ipv6",
        tenant(subnets(HSM, cidr="fd00::/48")),
        "tenants[t1].vnets[v1]: cidr: 'fd00::/48' is IPv6",
    ),
    (
        "vnet-unknown-region",
        tenant(subnets(HSM).replace("        cidr:", "        region: mars\n        cidr:")),
        "x.yaml: tenants[t1].vnets[v1]: region 'mars' is not in the fleet",
    ),
    (
        "subnet-outside-vnet",
        tenant(subnets("{name: hsm, cidr: 10.1.0.0/24, delegated: true}")),
        "x.yaml: tenants[t1].vnets[v1].subnets[hsm]: cidr 10.1.0.0/24 is outside vnet 10.0.0.0/16",
    ),
    (
        "subnets-overlap",
        tenant(subnets(HSM, "{name: b, cidr: 10.0.1.128/25, delegated: true}")),
        "x.yaml: tenants[t1].vnets[v1].subnets[b]: cidr 10.0.1.128/25 overlaps 10.0.1.0/24 "
        "(x.yaml: tenants[t1].vnets[v1].subnets[hsm])",
    ),
    (
        "vnets-overlap",
        tenant(subnets(HSM) + subnets(cidr="10.0.128.0/17", name="v2")),
        "x.yaml: tenants[t1].vnets[v2]: cidr 10.0.128.0/17 overlaps 10.0.0.0/16",
    ),
    (
        "duplicate-vnet",
        tenant(subnets(HSM) + subnets(cidr="10.9.0.0/16")),
        "x.yaml: tenants[t1].vnets[v1]: duplicate vnet v1",
    ),
    (
        "duplicate-subnet",
        tenant(subnets(HSM, "{name: hsm, cidr: 10.0.2.0/24, delegated: true}")),
        "x.yaml: tenants[t1].vnets[v1].subnets[hsm]: duplicate subnet hsm",
    ),
    (
        "subnet-too-small",
        tenant(subnets("{name: hsm, cidr: 10.0.1.0/30, delegated: true}")),
        "tenants[t1].vnets[v1].subnets[hsm]: cidr 10.0.1.0/30 is too small",
    ),
    (
        "delegated-string",
        tenant(subnets("{name: hsm, cidr: 10.0.1.0/24, delegated: 'true'}")),
        "x.yaml: tenants[t1].vnets[v1].subnets[hsm]: delegated: expected true or false, got a "
        "string",
    ),
    (
        "delegated-missing",
        tenant(subnets("{name: hsm, cidr: 10.0.1.0/24}")),
        "x.yaml: tenants[t1].vnets[v1].subnets[hsm]: missing key 'delegated'",
    ),
    (
        "subnets-not-list",
        tenant("      - {name: v1, cidr: 10.0.0.0/16, subnets: hsm}\n"),
        "x.yaml: tenants[t1].vnets[v1]: subnets: expected a list, got a string",
    ),
]


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(Template(text).substitute(KEYS))
    return path


def test_the_corpus_is_big_enough() -> None:
    assert len(BAD) >= 25
    assert len({case for case, _, _ in BAD}) == len(BAD)


@pytest.mark.parametrize(("text", "fragment"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_inventory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, fragment: str
) -> None:
    monkeypatch.chdir(tmp_path)  # messages name the file as the user gave it
    write(tmp_path, text)
    with pytest.raises(InventoryError) as err:
        load_inventory("x.yaml")
    assert fragment in str(err.value), str(err.value)
    assert err.value.exit_code == 2 and isinstance(err.value, UsageError)


def test_good_document_is_valid(tmp_path: Path) -> None:
    inv = load_inventory(write(tmp_path, GOOD))
    assert [a.id for a in inv.appliances] == ["hsm01", "hsm02", "hsm03"]
    assert inv.appliance("hsm03").region == "r2" and inv.appliance("hsm03").stamp == "s2"
    assert inv.tenant("t1").quota == Quota(per_stamp=1, per_region=4)
    assert inv.tenant("t2").quota == Quota(2, 4)  # Azure's defaults
    assert len(inv.appliance("hsm01").mgmt_host_keys) == 2


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("SN0003", "SN0001").replace("name: t2", "name: t1")
    with pytest.raises(InventoryError) as err:
        load_inventory(write(tmp_path, text))
    assert str(err.value).startswith("2 problems in the inventory")
    assert len(err.value.detail["errors"]) == 2  # type: ignore[arg-type]


def test_fingerprints_match_ssh_keygen(tmp_path: Path) -> None:
    inv = load_inventory(write(tmp_path, GOOD))
    for key in inv.appliance("hsm01").mgmt_host_keys:
        pub = tmp_path / "k.pub"
        pub.write_text(key.line + "\n")
        out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.split()[1] == key.fingerprint
    listed = ", ".join(repr(fp) for fp in inv.appliance("hsm01").mgmt_fingerprints)
    doc = GOOD.replace(
        '["$K1", "$E1"]', f'["$K1", "$E1"]\n            mgmt_host_key_fingerprints: [{listed}]'
    )
    assert load_inventory(write(tmp_path, doc)) == inv


def test_directory_of_files_merges_and_names_both_files(tmp_path: Path) -> None:
    inv_dir = tmp_path / "inv"
    inv_dir.mkdir()
    fleet, tenants = GOOD.split("tenants:\n")
    write(inv_dir, fleet, "fleet.yaml")
    write(inv_dir, "tenants:\n" + tenants, "tenants.yaml")
    (inv_dir / "README.txt").write_text("not yaml, ignored")
    assert load_inventory(inv_dir) == load_inventory(write(tmp_path, GOOD))
    write(inv_dir, "tenants:\n" + tenants, "zz-copy.yaml")
    with pytest.raises(InventoryError) as err:
        load_inventory(inv_dir)
    assert (
        f"{inv_dir}/zz-copy.yaml: tenants[t1]: duplicate tenant t1 (first at "
        f"{inv_dir}/tenants.yaml: tenants[t1])" in str(err.value)
    )


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="does not exist"):
        load_inventory(tmp_path / "nope.yaml")
    with pytest.raises(InventoryError, match=r"no \*\.yaml files"):
        load_inventory(tmp_path)


def test_example_inventory_is_valid() -> None:
    inv = load_inventory(REPO / "inventories" / "example")
    assert len(inv.regions) == 2 and len(inv.stamps) >= 4 and len(inv.appliances) >= 6
    assert len(inv.tenants) == 2
    assert all(
        t.vnets and any(s.delegated for v in t.vnets for s in v.subnets) for t in inv.tenants
    )
    assert any(t.quota != Quota() for t in inv.tenants)


def test_lab_inventory_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``lab up`` writes must load under this schema (keys faked, layout real)."""
    from hsmctl.lab import configs, workdir
    from hsmctl.lab.plan import make_plan

    plan = make_plan(3, 5)
    keys = {
        a.id: [
            _line(ed25519.Ed25519PrivateKey.generate()),
            _line(ec.generate_private_key(ec.SECP256R1())),
        ]
        for a in plan.appliances
    }
    for t in plan.tenants:
        (tmp_path / "tenants" / t.name).mkdir(parents=True)
        (tmp_path / "tenants" / t.name / "identity.pub").write_text(
            I1
            if t.index == 1
            else _line(ec.generate_private_key(ec.SECP256R1())) + f" {t.name}-identity\n"
        )
    monkeypatch.setattr(workdir, "LAB_DIR", tmp_path)
    monkeypatch.setattr(configs, "host_key_lines", lambda ident, iface: keys[ident])
    path = tmp_path / "inventory.yaml"
    path.write_text(configs.inventory_yaml(plan))
    inv = load_inventory(path)
    assert sorted(a.id for a in inv.appliances) == sorted(a.id for a in plan.appliances)
    p = check_placement(inv, "tenant2", "vnet1", "hsm")
    assert str(p.cidr) == "198.19.8.0/24"
    with pytest.raises(PlacementError, match="not delegated"):
        check_placement(inv, "tenant1", "vnet1", "default")


# -- placement (the provision flags) ---------------------------------------------------------


@pytest.fixture
def inv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Inventory:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, GOOD)
    return load_inventory("x.yaml")


PLACEMENT_BAD: list[tuple[str, dict[str, Any], str]] = [
    ("unknown-tenant", {"tenant": "nope"}, "x.yaml: no tenant 'nope' (tenants: t1, t2)"),
    (
        "unknown-vnet",
        {"vnet": "nope"},
        "x.yaml: tenants[t1]: tenant t1 has no vnet 'nope' (vnets: v1)",
    ),
    (
        "unknown-subnet",
        {"subnet": "nope"},
        "x.yaml: tenants[t1].vnets[v1]: vnet v1 has no subnet 'nope'",
    ),
    (
        "not-delegated",
        {"subnet": "default"},
        "x.yaml: tenants[t1].vnets[v1].subnets[default]: subnet default (10.0.0.0/24) is not "
        "delegated to the HSM service. A missing delegation is the most common",
    ),
    ("ip-malformed", {"ip": "10.0.1"}, "--ip '10.0.1' is not an IPv4 address"),
    (
        "ip-outside",
        {"ip": "10.0.2.9"},
        "x.yaml: tenants[t1].vnets[v1].subnets[hsm]: address 10.0.2.9 is outside subnet "
        "10.0.1.0/24",
    ),
    ("ip-network-address", {"ip": "10.0.1.0"}, "subnets[hsm]: address 10.0.1.0 is reserved"),
    (
        "ip-reserved-fourth",
        {"ip": "10.0.1.3"},
        "address 10.0.1.3 is reserved (the first four addresses and the last address of a subnet "
        "are); the first usable one is 10.0.1.4",
    ),
    ("ip-broadcast", {"ip": "10.0.1.255"}, "subnets[hsm]: address 10.0.1.255 is reserved"),
    ("unknown-stamp", {"stamp": "s9"}, "x.yaml: no stamp 's9' (stamps: s1, s2)"),
    (
        "stamp-wrong-region",
        {"stamp": "s2"},
        "x.yaml: regions[r2].stamps[s2]: stamp s2 is in region r2, but vnet v1 of tenant t1 is "
        "in region r1",
    ),
]


@pytest.mark.parametrize(
    ("args", "fragment"), [c[1:] for c in PLACEMENT_BAD], ids=[c[0] for c in PLACEMENT_BAD]
)
def test_bad_placement(inv: Inventory, args: dict[str, Any], fragment: str) -> None:
    call = {"tenant": "t1", "vnet": "v1", "subnet": "hsm", **args}
    with pytest.raises(InventoryError) as err:
        check_placement(inv, **call)
    assert fragment in str(err.value), str(err.value)
    assert err.value.exit_code == 2


def test_good_placement(inv: Inventory) -> None:
    p = check_placement(inv, "t1", "v1", "hsm", ip="10.0.1.4", stamp="s1")
    assert (p.tenant, p.vnet, p.subnet, p.ip, p.stamp, p.region) == (
        "t1",
        "v1",
        "hsm",
        IPv4Address("10.0.1.4"),
        "s1",
        "r1",
    )
    assert p.quota == Quota(1, 4)
    assert check_placement(inv, "t1", "v1", "hsm", ip="10.0.1.254").ip == IPv4Address("10.0.1.254")
    any_region = check_placement(inv, "t2", "v1", "hsm", stamp="s2")
    assert any_region.region is None and any_region.stamp == "s2"
