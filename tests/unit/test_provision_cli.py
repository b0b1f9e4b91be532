"""Bad input to the provider commands (issue 4): a table of cases, each must exit 2 with a
message naming the file and entry where there is one, print exactly one JSON object on
stdout with --json, and leave the state store exactly as it was (``Store.snapshot``).

No lab: a SQLite store and an inventory in tmp_path (tests/provider_env.py), whose
appliances have loopback management addresses and no working drivers, so a case that
wrongly got past validation could not reach a device. Also here: the other refusals of
``deprovision`` (exit 3 and 5, store unchanged) and the pure decisions of deprovisioning
and health.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from hsmctl.cli.main import main
from hsmctl.contract import OwnerState
from hsmctl.device import HsmInfo, Switch
from hsmctl.handoff import make_release, write_document
from hsmctl.inventory import check_placement, load_inventory
from hsmctl.provider import deprovision as dep
from hsmctl.provider import health as hl
from hsmctl.state.model import ApplianceState, Operation, StepStatus
from hsmctl.state.records import JournalEntry
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


# -- the other refusals of deprovision: nothing changes either ---------------------------------


def test_release_signed_by_another_tenant_is_an_integrity_error(
    env: ProviderEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    path = env.root / "release-by-t2.json"
    write_document(path, make_release(ALLOCATED, "t1", env.identities["t2"]))
    before = env.snapshot()
    code, _, err = _run(capsys, ["--config", str(env.config), *D("--yes", "--release", str(path))])
    assert code == 3, err
    assert "expected" in err and str(path) in err
    assert env.snapshot() == before


def test_release_from_before_the_allocation_is_a_replay(
    env: ProviderEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    with env.store() as store:
        request = store.get_request("r-existing")
    assert request is not None
    old = request.created_at - timedelta(hours=1)
    path = env.root / "release-old.json"
    write_document(path, make_release(ALLOCATED, "t1", env.identities["t1"], now=old))
    before = env.snapshot()
    code, _, err = _run(capsys, ["--config", str(env.config), *D("--yes", "--release", str(path))])
    assert code == 3, err
    assert "a replayed release" in err
    assert env.snapshot() == before


def test_an_available_appliance_is_not_deprovisioned(
    env: ProviderEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    before = env.snapshot()
    argv = [
        "--config",
        str(env.config),
        *D("--yes", "--force", "--reason", "x", appliance="unit03"),
    ]
    code, _, err = _run(capsys, argv)
    assert code == 5, err
    assert "unit03 is available: nothing to deprovision" in err
    assert env.snapshot() == before


# -- pure decisions ------------------------------------------------------------------------------


def _entry(n: int, step: str, status: StepStatus, **detail: Any) -> JournalEntry:
    return JournalEntry(
        n, datetime.now(UTC), "a1", None, Operation.DEPROVISION, step, status, dict(detail)
    )


def test_runs_resume_where_the_journal_stops() -> None:
    ok = StepStatus.OK
    entries = [
        _entry(1, "authorize", ok, run="r1", authorization={"kind": "force"}),
        _entry(2, "snapshot", ok, run="r1", audit_key_id="k1"),
        _entry(3, "done", ok, run="r1"),
        _entry(4, "authorize", ok, run="r2", authorization={"kind": "release"}),
        _entry(5, "snapshot", ok, run="r2", audit_key_id="k2"),
        _entry(6, "zeroize", StepStatus.STARTED, run="r2"),
    ]
    run = dep.unfinished_run(entries)
    assert run is not None and run.run_id == "r2"
    assert run.authorization == {"kind": "release"}
    assert dep.pending(run)[0] is dep.Step.ZEROIZE
    assert dep.unfinished_run(entries[:3]) is None


def test_reset_record_and_checks() -> None:
    tail = [
        json.dumps({"event": "command", "outcome": "ok", "detail": {"command": "hsm show"}}),
        "not json",
        json.dumps(
            {
                "seq": 9,
                "hash": "h",
                "time": "t",
                "event": "result",
                "outcome": "ok",
                "detail": {
                    "command": "sysconf factory-reset",
                    "old_key_id": "k1",
                    "new_key_id": "k2",
                },
            }
        ),
    ]
    record = dep.find_reset_record(tail)
    assert record is not None and record["seq"] == 9 and record["new_audit_key_id"] == "k2"
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAj8cS8Flrb58gO9RO5hbk+jX3YFgjMFekG4fkhx/Xe9"
    hsm = _info(OwnerState.FACTORY, monitor=Switch.DISABLED)
    checks = dep.zeroization_checks(
        before={"audit_key_id": "k1", "data_host_keys": ["SHA256:old"]},
        hsm=hsm,
        data_host_keys=[key],
        audit_key_id="k2",
        pinned_data=["SHA256:pinned"],
        reset_record=record,
    )
    assert all(checks.values()), checks
    stale = dep.zeroization_checks(
        before={"audit_key_id": "k2", "data_host_keys": dep.fingerprints([key])},
        hsm=dataclasses.replace(hsm, initialised=True),
        data_host_keys=[key],
        audit_key_id="k2",
        pinned_data=[],
        reset_record=None,
    )
    assert {k for k, v in stale.items() if not v} == {
        "token_not_initialised",
        "data_host_keys_new",
        "audit_key_new",
        "reset_in_device_log",
    }


L = hl.Login


def _info(owner: OwnerState, monitor: Switch = Switch.ENABLED) -> HsmInfo:
    """``hsm show`` as the firmware answers it (tests/unit/data/device/hsm-show.json)."""
    return HsmInfo(
        id="a1",
        model="hsmctl-softhsm2",
        firmware="7.8.4-hsmctl",
        initialised=False,
        owner_state=owner,
        provider_access=owner is not OwnerState.CUSTOMER_OWNED,
        monitor=monitor,
        objects=0,
    )


@pytest.mark.parametrize(
    ("monitor", "provider", "state", "expect"),
    [
        # after a takeover: monitor disabled, provider key refused -> customer-owned
        (
            hl.Attempt(L.REFUSED),
            hl.Attempt(L.REFUSED),
            ApplianceState.PROVISIONED,
            (True, OwnerState.CUSTOMER_OWNED, False, ApplianceState.CUSTOMER_OWNED, 0),
        ),
        # provisioned, monitor answering
        (
            hl.Attempt(L.OK, _info(OwnerState.PROVISIONED)),
            hl.Attempt(L.OK, _info(OwnerState.PROVISIONED)),
            ApplianceState.PROVISIONED,
            (True, OwnerState.PROVISIONED, True, None, 0),
        ),
        # kept monitor, device says customer-owned
        (
            hl.Attempt(L.OK, _info(OwnerState.CUSTOMER_OWNED)),
            hl.Attempt(L.REFUSED),
            ApplianceState.PROVISIONED,
            (True, OwnerState.CUSTOMER_OWNED, False, ApplianceState.CUSTOMER_OWNED, 0),
        ),
        (
            hl.Attempt(L.UNREACHABLE, exit_code=4),
            hl.Attempt(L.UNREACHABLE, exit_code=4),
            ApplianceState.CUSTOMER_OWNED,
            (False, None, None, None, 4),
        ),
        (
            hl.Attempt(L.HOST_KEY_MISMATCH, exit_code=3),
            hl.Attempt(L.HOST_KEY_MISMATCH, exit_code=3),
            ApplianceState.AVAILABLE,
            (True, None, None, None, 3),
        ),
    ],
)
def test_health_assessment(
    monitor: hl.Attempt, provider: hl.Attempt, state: ApplianceState, expect: tuple[Any, ...]
) -> None:
    a = hl.assess(hl.Probe("a1", monitor, provider), state)
    assert (a.reachable, a.owner_state, a.provider_key_accepted, a.new_state, a.exit_code) == expect


def test_health_exit_code_is_the_most_severe(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    with env.store() as store:
        inv = load_inventory(env.inventory)
        store.allocate("r1", check_placement(inv, "t1", "v1", "hsm"))
        store.set_state("unit01", ApplianceState.PROVISIONED)
    outcomes = {
        "unit01": (L.REFUSED, L.REFUSED),
        "unit02": (L.UNREACHABLE, L.UNREACHABLE),
        "unit03": (L.OK, L.OK),
        "unit04": (L.OK, L.OK),
    }

    def prober(ctx: Any, appliance: str) -> hl.Probe:
        m, p = outcomes[appliance]
        info = _info(OwnerState.FACTORY)
        code = 4 if m is L.UNREACHABLE else 0
        return hl.Probe(
            appliance,
            hl.Attempt(m, info if m is L.OK else None, exit_code=code),
            hl.Attempt(p, info if p is L.OK else None, exit_code=code),
        )

    before = env.snapshot()
    report = hl.health(str(env.config), None, prober=prober)
    assert report.exit_code == 4
    rows = {r["appliance"]: r for r in report.as_dict()["appliances"]}
    assert rows["unit01"]["state"] == "customer-owned"
    assert rows["unit02"]["reachable"] is False
    with env.store() as store:
        assert store.get_appliance("unit01").state == ApplianceState.CUSTOMER_OWNED
    assert env.snapshot() != before


# -- deprovisioning's journal: a failed step, then a resume that needs no new authority -----


def _recorded(command: str, state: str = "") -> dict[str, Any]:
    """A reply recorded from the firmware (tests/unit/data/device/)."""
    name = command.replace(" ", "-") + (f".{state}" if state else "") + ".json"
    case = json.loads((Path(__file__).parent / "data" / "device" / name).read_text())
    reply: dict[str, Any] = json.loads(case["output"])
    return reply


class FakeConsole:
    """Stands in for the out-of-band path (the lab test uses the real one): a device
    that answers like the firmware and whose console fails once on demand."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import ed25519
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        def key() -> str:
            pub = ed25519.Ed25519PrivateKey.generate().public_key()
            return pub.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()

        self.keys = [key(), key()]
        self.reset = False
        self.resets = 0
        self.fail_next_hsm_show = True

    def run(self, appliance: str, line: str, stdin: bytes | None = None) -> Any:
        from hsmctl.provider.drivers import ConsoleResult

        n = 1 if self.reset else 0
        out: Any
        if line == "sysconf factory-reset":
            self.reset, self.resets = True, self.resets + 1
            out = "factory reset done"
        elif line == "hsm show":
            if self.fail_next_hsm_show:
                self.fail_next_hsm_show = False
                return ConsoleResult(1, "", "console: no answer")
            out = _recorded("hsm show", "customer-owned") | {"id": appliance}
            if self.reset:
                out = _recorded("hsm show") | {"id": appliance, "audit_key_id": f"k{n}"}
        elif line == "audit key show":
            out = _recorded("audit key show") | {"key_id": f"k{n}"}
        elif line == "sysconf hostkey show":
            out = _recorded("sysconf hostkey show") | {"active_keys": [self.keys[n]]}
        elif line.startswith("audit show"):
            rec = {
                "seq": 7,
                "hash": "h7",
                "time": "t",
                "event": "result",
                "outcome": "ok",
                "detail": {
                    "command": "sysconf factory-reset",
                    "old_key_id": "k0",
                    "new_key_id": "k1",
                },
            }
            out = "\n".join([json.dumps(rec)] if self.reset else [])
        else:
            return ConsoleResult(64, "", f"unexpected {line}")
        return ConsoleResult(0, out if isinstance(out, str) else json.dumps(out), "")


class FakeFabric:
    def __init__(self) -> None:
        self.detached: list[str] = []

    def attach(self, appliance: str, tenant: str, vnet: str, subnet: str) -> None:
        raise AssertionError("deprovisioning never attaches")

    def detach(self, appliance: str) -> None:
        self.detached.append(appliance)


def test_deprovision_resumes_a_failed_run_without_new_authority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = make_env(tmp_path)
    with env.store() as store:
        inv = load_inventory(env.inventory)
        store.allocate("r1", check_placement(inv, "t1", "v1", "hsm"))
        store.set_state("unit01", ApplianceState.PROVISIONED)
        store.set_state("unit01", ApplianceState.CUSTOMER_OWNED)
    device, fabric = FakeConsole(), FakeFabric()
    monkeypatch.setattr(dep, "out_of_band_for", lambda kind: device)
    monkeypatch.setattr(dep, "fabric_for", lambda kind: fabric)
    monkeypatch.setattr(dep._Executor, "_provider_logs_in", lambda self: True)
    release = env.root / "release.json"
    write_document(release, make_release("unit01", "t1", env.identities["t1"], reason="done"))
    conf = ["--config", str(env.config)]

    code, _, err = _run(
        capsys, [*conf, "deprovision", "unit01", "--yes", "--release", str(release)]
    )
    assert code == 1 and "verify" in err and "console: no answer" in err
    with env.store() as store:
        rec = store.get_appliance("unit01")
    assert rec.state == ApplianceState.FAILED
    assert (rec.failure_reason or "").startswith("deprovision: verify:")

    code, out, err = _run(capsys, [*conf, "deprovision", "unit01", "--yes", "--json"])
    assert code == 0, err
    assert json.loads(out) == {"appliance": "unit01", "state": "available"}
    assert "resuming deprovisioning run" in err and "done: snapshot, zeroize" in err
    assert device.resets == 1 and fabric.detached == ["unit01"]
    with env.store() as store:
        assert store.get_appliance("unit01").state == ApplianceState.AVAILABLE
        assert store.allocations() == []
        entries = store.journal(appliance="unit01", operation=Operation.DEPROVISION)
        (data_key,) = store.host_keys("unit01", "data")  # type: ignore[arg-type]
    ok = [e.step for e in entries if e.status == StepStatus.OK]
    assert ok == ["authorize", *[s.value for s in dep.STEPS], "done"]
    (record,) = [e.detail for e in entries if e.step == "zeroization" and e.status == StepStatus.OK]
    assert record["authorization"]["kind"] == "release"
    assert record["authorization"]["reason"] == "done"
    assert record["device_record"]["seq"] == 7
    assert record["before"]["audit_key_id"] == "k0" and record["after"]["audit_key_id"] == "k1"
    assert data_key.key_line.split()[:2] == device.keys[1].split()[:2]  # re-pinned
    # Finished: a third call has nothing to do (wrong state, exit 5).
    code, _, err = _run(capsys, [*conf, "deprovision", "unit01", "--yes"])
    assert code == 5 and "unit01 is available: nothing to deprovision" in err
