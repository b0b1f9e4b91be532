"""Bad input to the provider commands (issue 4): a table of cases, each must exit 2 with a
message naming the file and entry where there is one, print exactly one JSON object on
stdout with --json, and leave the state store exactly as it was (``Store.snapshot``).

No lab: a SQLite store and an inventory in tmp_path (tests/provider_env.py), whose
appliances have loopback management addresses and no working drivers, so a case that
wrongly got past validation could not reach a device. Deprovisioning's other refusals
and decisions are in test_deprovision.py, health's in test_health.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from hsmctl.cli.main import main
from hsmctl.handoff import make_release, write_document
from hsmctl.inventory import check_placement, load_inventory
from hsmctl.state.model import ApplianceState
from tests.provider_env import ProviderEnv, make_env

pytestmark = pytest.mark.unit

ALLOCATED = "unit01"  # allocated to t1 by request r-existing, provisioned


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> ProviderEnv:
    e = make_env(tmp_path_factory.mktemp("provider"))
    inv = load_inventory(e.inventory)
    with e.store() as store:
        (alloc,) = store.allocate("r-existing", check_placement(inv, "t1", "v1", "hsm"))
        assert alloc.appliance == ALLOCATED
        store.set_state(ALLOCATED, ApplianceState.PROVISIONED)
    _files(e)
    return e


def _files(e: ProviderEnv) -> None:
    """Release files and broken configurations/inventories the cases point at."""
    r = e.root
    write_document(r / "release-ok.json", make_release(ALLOCATED, "t1", e.identities["t1"]))
    write_document(r / "release-unit02.json", make_release("unit02", "t1", e.identities["t1"]))
    (r / "release-not-json.json").write_text("this is not a release\n")
    (r / "release-bundle.json").write_text(json.dumps({"format": "hsmctl-handoff/1"}))
    inv = yaml.safe_load(e.inventory.read_text())

    def inventory(name: str, change: Callable[[dict[str, Any]], None]) -> None:
        doc = json.loads(json.dumps(inv))
        change(doc)
        (r / name).write_text(yaml.safe_dump(doc, sort_keys=False))
        e.write_config(f"conf-{name}", inventory=str(r / name))

    inventory("inv-unknown-key.yaml", lambda d: d["regions"][0]["stamps"][0].update(colour="red"))
    inventory(
        "inv-duplicate-id.yaml",
        lambda d: d["regions"][1]["stamps"][0]["appliances"][0].update(id="unit01"),
    )
    inventory(
        "inv-subnet-outside.yaml",
        lambda d: d["tenants"][0]["vnets"][0]["subnets"][0].update(cidr="10.99.1.0/24"),
    )
    (r / "inv-broken.yaml").write_text("regions:\n  - name: r1\n    stamps: [\n")
    e.write_config("conf-inv-broken.yaml", inventory=str(r / "inv-broken.yaml"))
    e.write_config("conf-unknown-key.yaml", invetory=str(e.inventory))
    e.write_config("conf-tenant.yaml", role="tenant")
    conf = yaml.safe_load(e.config.read_text())
    del conf["inventory"]
    (r / "conf-no-inventory.yaml").write_text(yaml.safe_dump(conf))


def P(*extra: str, **change: str) -> list[str]:
    """``provision`` with good flags, changed or extended."""
    flags = {"--tenant": "t1", "--vnet": "v1", "--subnet": "hsm"}
    flags.update({f"--{k}": v for k, v in change.items()})
    argv = ["provision"]
    for k, v in flags.items():
        argv += [k, v]
    return argv + list(extra)


def D(*extra: str, appliance: str = ALLOCATED) -> list[str]:
    return ["deprovision", appliance, *extra]


INV = "{root}/inventory.yaml"
SUBNET = INV + ": tenants[t1].vnets[v1].subnets[hsm]"
RESERVED = "is reserved (the first four addresses and the last address of a subnet are)"

# (case id, argv after `hsmctl --config CONF`, fragments the message must hold, config).
# Placeholders: {root} the environment's directory.
CASES: list[tuple[str, list[str], list[str], str]] = [
    # -- placement: tenant, network, subnet, stamp -----------------------------------------
    ("unknown-tenant", P(tenant="nope"), [INV + ": no tenant 'nope' (tenants: t1, t2)"], ""),
    (
        "unknown-vnet",
        P(vnet="nope"),
        [INV + ": tenants[t1]: tenant t1 has no vnet 'nope' (vnets: v1)"],
        "",
    ),
    (
        "unknown-subnet",
        P(subnet="nope"),
        [INV + ": tenants[t1].vnets[v1]: vnet v1 has no subnet 'nope' (subnets: hsm, default)"],
        "",
    ),
    ("unknown-stamp", P("--stamp", "s9"), [INV + ": no stamp 's9' (stamps: s1, s2, s3)"], ""),
    (
        "stamp-in-another-region",
        P("--stamp", "s3"),
        [INV + ": regions[r2].stamps[s3]: stamp s3 is in region r2, but vnet v1"],
        "",
    ),
    (
        "subnet-not-delegated",
        P(subnet="default"),
        [
            INV + ": tenants[t1].vnets[v1].subnets[default]: subnet default (10.10.2.0/24) "
            "is not delegated to the HSM service"
        ],
        "",
    ),
    # -- --ip ----------------------------------------------------------------------------------
    (
        "ip-outside-subnet",
        P("--ip", "10.10.2.9"),
        [SUBNET + ": address 10.10.2.9 is outside subnet 10.10.1.0/24"],
        "",
    ),
    (
        "ip-network-address",
        P("--ip", "10.10.1.0"),
        [SUBNET + ": address 10.10.1.0 " + RESERVED],
        "",
    ),
    ("ip-gateway", P("--ip", "10.10.1.1"), [SUBNET + ": address 10.10.1.1 " + RESERVED], ""),
    (
        "ip-fourth-reserved",
        P("--ip", "10.10.1.3"),
        [SUBNET + ": address 10.10.1.3 " + RESERVED, "the first usable one is 10.10.1.4"],
        "",
    ),
    (
        "ip-last-address",
        P("--ip", "10.10.1.255"),
        [SUBNET + ": address 10.10.1.255 " + RESERVED],
        "",
    ),
    ("ip-malformed", P("--ip", "10.10.1"), ["--ip '10.10.1' is not an IPv4 address"], ""),
    ("ip-not-an-address", P("--ip", "hsm-one"), ["--ip 'hsm-one' is not an IPv4 address"], ""),
    ("ip-v6", P("--ip", "2001:db8::5"), ["--ip 2001:db8::5: only IPv4 is supported"], ""),
    # -- --count, --request-id, missing flags ---------------------------------------------------
    ("count-zero", P("--count", "0"), ["--count must be between 1 and 64"], ""),
    ("count-100", P("--count", "100"), ["--count must be between 1 and 64"], ""),
    ("count-negative", P("--count", "-1"), ["--count must be between 1 and 64"], ""),
    ("count-not-a-number", P("--count", "two"), ["'two' is not a valid integer"], ""),
    (
        "ip-with-count-2",
        P("--ip", "10.10.1.10", "--count", "2"),
        ["--ip names one address; it cannot be combined with --count"],
        "",
    ),
    ("missing-tenant", ["provision", "--vnet", "v1", "--subnet", "hsm"], ["'--tenant'"], ""),
    (
        "bad-request-id",
        P("--request-id", "has space"),
        ["request id 'has space' is not valid"],
        "",
    ),
    (
        "request-id-reused-with-other-flags",
        P("--request-id", "r-existing", "--ip", "10.10.1.50"),
        ["request r-existing was made with different parameters", "use a new request id"],
        "",
    ),
    # -- deprovision ---------------------------------------------------------------------------
    ("deprovision-without-yes", D("--release", "{root}/release-ok.json"), ["add --yes"], ""),
    ("deprovision-without-authority", D("--yes"), ["needs the tenant's signed release"], ""),
    ("force-without-reason", D("--yes", "--force"), ["--force needs --reason"], ""),
    ("force-blank-reason", D("--yes", "--force", "--reason", "  "), ["--force needs --reason"], ""),
    (
        "release-and-force",
        D("--yes", "--release", "{root}/release-ok.json", "--force", "--reason", "x"),
        ["either --release FILE or --force --reason TEXT, not both"],
        "",
    ),
    (
        "reason-without-force",
        D("--yes", "--release", "{root}/release-ok.json", "--reason", "x"),
        ["--reason goes with --force"],
        "",
    ),
    (
        "release-file-missing",
        D("--yes", "--release", "{root}/no-such-release.json"),
        ["release {root}/no-such-release.json: No such file or directory"],
        "",
    ),
    (
        "release-file-not-json",
        D("--yes", "--release", "{root}/release-not-json.json"),
        ["--release {root}/release-not-json.json: not a release document"],
        "",
    ),
    (
        "release-file-is-a-bundle",
        D("--yes", "--release", "{root}/release-bundle.json"),
        ["--release {root}/release-bundle.json: not a release document (format 'hsmctl-handoff/1'"],
        "",
    ),
    (
        "release-for-another-appliance",
        D("--yes", "--release", "{root}/release-unit02.json"),
        [
            "--release {root}/release-unit02.json: this release is for appliance 'unit02', "
            "not 'unit01'"
        ],
        "",
    ),
    (
        "deprovision-unknown-appliance",
        D("--yes", "--force", "--reason", "x", appliance="nope"),
        [INV + ": no appliance 'nope'"],
        "",
    ),
    # -- health and fleet ------------------------------------------------------------------------
    ("health-id-and-all", ["health", ALLOCATED, "--all"], ["an appliance id or --all"], ""),
    ("health-unknown-appliance", ["health", "nope"], [INV + ": no appliance 'nope'"], ""),
    (
        "fleet-show-unknown",
        ["fleet", "show", "nope"],
        ["no appliance 'nope' in the state store"],
        "",
    ),
    # -- configuration and inventory files --------------------------------------------------------
    (
        "config-missing",
        P(),
        ["configuration file {root}/missing.yaml does not exist"],
        "{root}/missing.yaml",
    ),
    (
        "config-unknown-key",
        P(),
        ["configuration file {root}/conf-unknown-key.yaml: unknown keys: invetory"],
        "{root}/conf-unknown-key.yaml",
    ),
    (
        "config-of-a-tenant",
        P(),
        ["{root}/conf-tenant.yaml is a tenant configuration, not a provider's"],
        "{root}/conf-tenant.yaml",
    ),
    (
        "config-without-inventory",
        P(),
        ["{root}/conf-no-inventory.yaml: 'inventory' is not set"],
        "{root}/conf-no-inventory.yaml",
    ),
    (
        "inventory-broken-yaml",
        P(),
        ["{root}/inv-broken.yaml: not valid YAML", "line 4"],
        "{root}/conf-inv-broken.yaml",
    ),
    (
        "inventory-unknown-key",
        D("--yes", "--force", "--reason", "x"),
        ["{root}/inv-unknown-key.yaml: regions[r1].stamps[s1]: unknown key 'colour'"],
        "{root}/conf-inv-unknown-key.yaml",
    ),
    (
        "inventory-duplicate-appliance",
        ["fleet", "list"],
        ["{root}/inv-duplicate-id.yaml: regions[r2].stamps[s3].appliances[unit01]: duplicate"],
        "{root}/conf-inv-duplicate-id.yaml",
    ),
    (
        "inventory-subnet-outside-vnet",
        ["health", "--all"],
        [
            "{root}/inv-subnet-outside.yaml: tenants[t1].vnets[v1].subnets[hsm]: "
            "cidr 10.99.1.0/24 is outside vnet 10.10.0.0/16"
        ],
        "{root}/conf-inv-subnet-outside.yaml",
    ),
]


def test_the_corpus_is_big_enough() -> None:
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "fragments", "config"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_exits_2_and_changes_nothing(
    env: ProviderEnv,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    fragments: list[str],
    config: str,
) -> None:
    root = str(env.root)
    conf = config.format(root=root) if config else str(env.config)
    args = ["--config", conf, *(a.format(root=root) for a in argv), "--json"]
    before = env.snapshot()
    code, out, err = _run(capsys, args)
    assert code == 2, err
    for fragment in fragments:
        assert fragment.format(root=root) in err, err
    body = json.loads(out)  # exactly one JSON object on stdout, nothing else
    assert set(body) == {"error"} and body["error"]["exit_code"] == 2
    assert env.snapshot() == before


def test_config_from_the_environment_is_named_when_missing(
    env: ProviderEnv, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HSMCTL_CONFIG", str(env.root / "env-missing.yaml"))
    before = env.snapshot()
    code, _, err = _run(capsys, P())
    assert code == 2
    assert f"configuration file {env.root}/env-missing.yaml does not exist" in err
    assert env.snapshot() == before
