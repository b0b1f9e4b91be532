"""What the CLI prints (issue 13, item 5): aligned tables for ids of 3 to 40 characters,
``fleet show`` without Python reprs, one JSON object per command on success and on
each error class, the stable ``provision --json`` shapes and the ``request_id`` in its
errors, the usage printed once, appliance-id completion, and SQLite without psycopg.

No lab: a SQLite store and an inventory in tmp_path (tests/provider_env.py). Where a
case needs a device (a provisioning run, an integrity failure) the library function the
command calls is replaced; everything the CLI does around it is real.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from hsmctl import config as config_mod
from hsmctl.cli import clients as clients_cli
from hsmctl.cli import health as health_cli
from hsmctl.cli import logs as logs_cli
from hsmctl.cli import provider as provider_cli
from hsmctl.cli.main import main
from hsmctl.cli.render import Col, key_values, table
from hsmctl.errors import CommandFailed, HsmctlError, IntegrityError, UnreachableError
from hsmctl.inventory import check_placement, load_inventory
from hsmctl.state.model import ApplianceState
from tests.provider_env import ProviderEnv, make_env

pytestmark = pytest.mark.unit

HSMCTL = str(Path(sys.executable).with_name("hsmctl"))
ALLOCATED = "unit01"
LENGTHS = range(3, 41)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> ProviderEnv:
    e = make_env(tmp_path_factory.mktemp("output"))
    inv = load_inventory(e.inventory)
    with e.store() as store:
        (alloc,) = store.allocate("r-output", check_placement(inv, "t1", "v1", "hsm"))
        assert alloc.appliance == ALLOCATED
        store.set_state(ALLOCATED, ApplianceState.PROVISIONED)
    return e


@pytest.fixture(autouse=True)
def _no_config_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config_mod.ENV_VAR, raising=False)


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_object(out: str) -> dict[str, Any]:
    assert out.endswith("\n") and out.count("\n") == 1, f"not one JSON line: {out!r}"
    body = json.loads(out)
    assert isinstance(body, dict)
    return body


# -- tables ---------------------------------------------------------------------------------


def _ident(n: int) -> str:
    return ("hsm-" + "x" * 40)[:n] if n > 4 else "h" * n


def _spans(line: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", line)]


def assert_aligned(text: str, fields: int) -> list[list[str]]:
    """Every row has one field under each header, starting where the header starts (or,
    for a right-aligned column, ending where it ends), separated by two or more blanks;
    nothing trailing, nothing a pipe would choke on. Returns the split rows."""
    lines = text.split("\n")
    headers = _spans(lines[0])
    assert len(headers) == fields, lines[0]
    rows = []
    for line in lines:
        assert line == line.rstrip() and line.isprintable(), repr(line)
        assert not set(line) & set("│─┃━┏┓└┘├┤┼╭╮╰╯"), line
        spans = _spans(line)
        assert len(spans) == fields, line
        for (start, end), (h_start, h_end) in zip(spans, headers, strict=True):
            assert start == h_start or end == h_end, (line, lines[0])
        assert all(b[0] - a[1] >= 2 for a, b in itertools.pairwise(spans)), line
        rows.append(line.split())
    return rows


@pytest.mark.parametrize("width", ["20", "80", "300"])
def test_fleet_list_is_aligned_for_ids_of_3_to_40(
    monkeypatch: pytest.MonkeyPatch, width: str
) -> None:
    """The terminal's width changes nothing: a row is never wrapped or cut."""
    monkeypatch.setenv("COLUMNS", width)
    appliances = [
        {
            "id": _ident(n),
            "stamp": f"s{n % 3}",
            "state": "customer-owned" if n % 2 else "available",
            "tenant": f"tenant{n}" if n % 2 else None,
            "ip": f"198.18.{n}.{n + 4}" if n % 2 else None,
        }
        for n in LENGTHS
    ]
    text = provider_cli._fleet_text({"appliances": appliances})
    rows = assert_aligned(text, 5)
    assert rows[0] == ["ID", "STAMP", "STATE", "TENANT", "IP"]
    assert [r[0] for r in rows[1:]] == [_ident(n) for n in LENGTHS]
    assert rows[2][3:] == ["-", "-"]  # a missing value is "-": awk's $5 is always the ip


def test_every_table_command_is_aligned_for_ids_of_3_to_40() -> None:
    health = {
        "appliances": [
            {
                "appliance": _ident(n),
                "reachable": n % 2 == 0,
                "owner_state": None if n % 2 else "factory",
                "provider_key_accepted": [True, False, None][n % 3],
                "monitor": "ok",
                "state": "provisioned",
            }
            for n in LENGTHS
        ]
    }
    assert_aligned(health_cli._health_text(health), 8)
    collected = {
        "appliances": [
            {"appliance": _ident(n), "new_records": n * 977, "last_seq": n**4, "verified": True}
            for n in LENGTHS
        ]
    }
    rows = assert_aligned(logs_cli._collected_text(collected), 4)
    assert rows[-1] == [_ident(40), str(40 * 977), str(40**4), "yes"]
    clients = {
        "clients": [
            {"name": _ident(n), "role": "crypto-user", "fingerprint": "SHA256:abc",
             "registered": "2024-01-01T00:00:00Z"}
            for n in LENGTHS
        ]
    }  # fmt: skip
    assert_aligned(clients_cli._clients_text(clients), 4)
    keys = {
        "keys": [
            {"label": _ident(n), "id": "0a" * (n // 4 + 1), "type": "rsa", "size": 2048,
             "local": True, "extractable": False, "sensitive": True}
            for n in LENGTHS
        ]
    }  # fmt: skip
    assert_aligned(clients_cli._keys_text(keys), 7)


def test_right_aligned_numbers_end_in_one_column() -> None:
    text = table(["ID", Col("COUNT", "right")], [["a", 1], ["bbb", 12345]])
    lines = text.split("\n")
    assert len({len(line) for line in lines}) == 1, lines


def test_cells_are_text_never_markup_or_escapes() -> None:
    text = table(["ID", "NOTE"], [["[bold]x[/bold]", "\x1b[31mred\x07"], ["a", "b"]])
    assert "[bold]x[/bold]" in text and "\x1b" not in text and "\\x1b[31mred\\x07" in text
    assert_aligned(text, 2)


# -- fleet show -----------------------------------------------------------------------------


def test_fleet_show_is_readable(env: ProviderEnv, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, ["--config", str(env.config), "fleet", "show", ALLOCATED])
    assert code == 0, err
    for repr_ in ("None", "{", "}", "[", "]", "'", "True", "False"):
        assert repr_ not in out, (repr_, out)
    lines = out.rstrip("\n").split("\n")
    values = dict(line.split(None, 1) for line in lines if len(line.split(None, 1)) == 2)
    assert values["id"] == ALLOCATED and values["state"] == "provisioned"
    assert values["request_id"] == "r-output" and values["failure_reason"] == "-"
    assert "allocation" in lines
    # the record's values start in one column, nested keys indented under their parent
    record = lines[: lines.index("allocation")]
    assert len({len(line) - len(line.split(None, 1)[1]) for line in record}) == 1, record
    assert any(line.startswith("  request_id") for line in lines)


def test_fleet_show_of_an_unallocated_appliance(
    env: ProviderEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, ["--config", str(env.config), "fleet", "show", "unit04"])
    assert code == 0 and "None" not in out
    assert [line.split() for line in out.splitlines() if line.startswith("allocation")] == [
        ["allocation", "-"]
    ]


def test_fleet_show_json_is_one_object(
    env: ProviderEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, ["--config", str(env.config), "fleet", "show", ALLOCATED, "--json"])
    body = one_object(out)
    assert code == 0 and body["id"] == ALLOCATED and body["allocation"]["request_id"] == "r-output"
    assert {"id", "stamp", "state", "tenant", "ip", "host_keys", "journal"} <= set(body)


def test_key_values_renders_nesting_without_reprs() -> None:
    text = key_values({"a": None, "b": {"c": ["x", "y"], "d": {}}, "e": True, "f": []})
    assert text.split("\n") == [
        "a    -",
        "b",
        "  c  x",
        "     y",
        "  d  -",
        "e    yes",
        "f    -",
    ]


# -- one JSON object on success and on each error class ------------------------------------


def _fake_provision(monkeypatch: pytest.MonkeyPatch, outcome: Any) -> list[dict[str, Any]]:
    from hsmctl.provider import provisioning

    calls: list[dict[str, Any]] = []

    def fake(config_path: str | None, **kwargs: Any) -> Any:
        calls.append(kwargs)
        kwargs["progress"].step("unit02: verify: ok")
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome(kwargs["count"])

    monkeypatch.setattr(provisioning, "provision", fake)
    return calls


def _outcome(count: int, failed: dict[str, HsmctlError] | None = None) -> Any:
    from hsmctl.provider.provisioning import Provisioned, ProvisionOutcome

    done = [Provisioned(f"unit0{i + 2}", f"10.10.1.{i + 5}", f"/h/{i}.json") for i in range(count)]
    return ProvisionOutcome(done, failed or {})


PROVISION = ["provision", "--tenant", "t1", "--vnet", "v1", "--subnet", "hsm"]


@pytest.mark.parametrize(
    ("extra", "listed"),
    [([], False), (["--count", "1"], True), (["--count", "2"], True)],
    ids=["no-count", "count-1", "count-2"],
)
def test_provision_json_shape_depends_on_the_flag_not_the_number(
    env: ProviderEnv,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    listed: bool,
) -> None:
    _fake_provision(monkeypatch, _outcome)
    code, out, _ = run(capsys, ["--config", str(env.config), *PROVISION, *extra, "--json"])
    body = one_object(out)
    assert code == 0
    item = {"appliance", "ip", "handoff"}
    if listed:
        assert set(body) == {"appliances"} and all(set(i) == item for i in body["appliances"])
        assert len(body["appliances"]) == int(extra[1])
    else:
        assert set(body) == item


@pytest.mark.parametrize(
    ("raised", "code"),
    [
        (lambda: CommandFailed("ansible-runner: provision.yml failed (rc 1)", status=1), 1),
        (lambda: UnreachableError("unit02: unreachable"), 4),
        (lambda: IntegrityError("unit02: host key mismatch"), 3),
    ],
    ids=["failed", "unreachable", "integrity"],
)
@pytest.mark.parametrize("given", [None, "req-42"], ids=["generated-id", "given-id"])
def test_a_provisioning_error_names_its_request(
    env: ProviderEnv,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    raised: Callable[[], HsmctlError],
    code: int,
    given: str | None,
) -> None:
    calls = _fake_provision(monkeypatch, raised())
    extra = [] if given is None else ["--request-id", given]
    got, out, err = run(capsys, ["--config", str(env.config), *PROVISION, *extra, "--json"])
    error = one_object(out)["error"]
    rid = calls[0]["request_id"]
    assert got == code == error["exit_code"]
    assert error["request_id"] == rid and (given is None or rid == given)
    assert f"rerun with --request-id {rid} to resume" in error["message"]
    assert f"--request-id {rid}" in err


def test_a_failed_appliance_names_its_request(
    env: ProviderEnv, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    failed = {"unit03": UnreachableError("unit03: Verify the appliance: unreachable")}
    calls = _fake_provision(monkeypatch, lambda count: _outcome(1, failed))
    argv = ["--config", str(env.config), *PROVISION, "--count", "2", "--json"]
    code, out, _ = run(capsys, argv)
    error = one_object(out)["error"]
    assert code == 4 and error["request_id"] == calls[0]["request_id"]
    assert [a["appliance"] for a in error["appliances"]] == ["unit02"]
    assert set(error["failed"]) == {"unit03"}


@pytest.mark.parametrize(
    ("extra", "code"),
    [(["--count", "5"], 5), (["--ip", "10.99.0.1"], 2), (["--request-id", "bad id!"], 2)],
    ids=["no-capacity", "ip-outside", "bad-request-id"],
)
def test_provisioning_refusals_name_the_request_too(
    env: ProviderEnv, capsys: pytest.CaptureFixture[str], extra: list[str], code: int
) -> None:
    """No fake: the refusals come before any device is touched, and change nothing."""
    before = env.snapshot()
    got, out, _ = run(capsys, ["--config", str(env.config), *PROVISION, *extra, "--json"])
    error = one_object(out)["error"]
    assert got == code == error["exit_code"] and error["request_id"]
    assert "to resume" not in error["message"]  # nothing was started
    assert env.snapshot() == before


def test_success_is_one_json_object_per_command(
    env: ProviderEnv, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    tenant = tmp_path / "tenant.yaml"
    tenant.write_text(
        yaml.safe_dump(
            {
                "role": "tenant",
                "tenant": "t1",
                "state_dir": str(tmp_path / "state"),
                "identity": str(env.identities["t1"]),
                "provider_public_key": str(tmp_path / "unused.pem"),
            }
        )
    )
    cases = [
        (env.config, ["fleet", "list"], {"appliances"}),
        (env.config, ["fleet", "show", ALLOCATED], {"id", "allocation", "journal"}),
        (tenant, ["release", ALLOCATED], {"appliance", "release"}),
        (tenant, ["logs", "collect", "--all"], {"appliances"}),
    ]
    for conf, argv, keys in cases:
        code, out, err = run(capsys, ["--config", str(conf), *argv, "--json"])
        assert code == 0, err
        assert keys <= set(one_object(out)), argv


# -- usage and completion -------------------------------------------------------------------


@pytest.mark.parametrize("argv", [[], ["fleet"], ["logs"]], ids=["none", "fleet", "logs"])
def test_no_arguments_print_the_usage_once(argv: list[str]) -> None:
    proc = subprocess.run([HSMCTL, *argv], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("Usage:") == 1, proc.stderr
    assert "error:" not in proc.stderr and "Commands:" in proc.stderr


def _complete(words: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != config_mod.ENV_VAR}
    environ.update(env or {})
    environ.update(
        _HSMCTL_COMPLETE="bash_complete",
        COMP_WORDS=words,
        COMP_CWORD=str(len(words.split()) - (0 if words.endswith(" ") else 1)),
    )
    return subprocess.run([HSMCTL], capture_output=True, text=True, env=environ, check=False)


def test_completion_of_provider_appliance_ids(env: ProviderEnv) -> None:
    for words in (
        f"hsmctl --config {env.config} fleet show ",
        f"hsmctl --config {env.config} deprovision ",
        f"hsmctl --config {env.config} health ",
    ):
        proc = _complete(words)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert proc.stdout.split() == [f"plain,unit0{i}" for i in range(1, 5)], words
    proc = _complete(f"hsmctl --config {env.config} fleet show unit0", {})
    assert len(proc.stdout.split()) == 4
    assert _complete("hsmctl fleet show unit03", {"HSMCTL_CONFIG": str(env.config)}).stdout == (
        "plain,unit03\n"
    )


def test_completion_never_writes_the_store(env: ProviderEnv, tmp_path: Path) -> None:
    """A provider config whose store does not exist yet: no completions, no database."""
    conf = env.write_config("completion-empty.yaml", state_dir=str(tmp_path / "nothing"))
    proc = _complete(f"hsmctl --config {conf} fleet show ")
    assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr == ""
    assert not (tmp_path / "nothing").exists()


def test_completion_with_postgresql_reads_the_fleet_file(env: ProviderEnv) -> None:
    """No Tab key waits on a database server: the inventory names the fleet."""
    conf = env.write_config(
        "completion-pg.yaml", database_url="postgresql://u@192.0.2.1:5432/nowhere"
    )
    proc = _complete(f"hsmctl --config {conf} deprovision unit0")
    assert proc.stdout.split() == [f"plain,unit0{i}" for i in range(1, 5)], proc.stderr


def test_completion_of_tenant_appliance_ids(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for ident in ("hsm01", "hsm02"):
        (state / "appliances" / ident).mkdir(parents=True)
        (state / "appliances" / ident / "pins.json").write_text("{}")
    (state / "appliances" / "not-taken-over").mkdir()
    conf = tmp_path / "tenant.yaml"
    conf.write_text(f"role: tenant\nstate_dir: {state}\n")
    for words in ("logs verify ", "logs collect --appliance ", "client list ", "key list "):
        proc = _complete(f"hsmctl --config {conf} {words}")
        assert proc.stdout.split() == ["plain,hsm01", "plain,hsm02"], (words, proc.stderr)


@pytest.mark.parametrize(
    "config_text", ["role: provider\nrole: tenant\n", "state_dir: 5\n", "{{{"], ids=str
)
def test_completion_with_a_broken_config_is_silent(tmp_path: Path, config_text: str) -> None:
    conf = tmp_path / "broken.yaml"
    conf.write_text(config_text)
    proc = _complete(f"hsmctl --config {conf} fleet show ")
    assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, "", "")
    proc = _complete(f"hsmctl --config {tmp_path}/missing.yaml logs verify ")
    assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, "", "")


# -- the configuration: duplicate keys and wrong types name the file and line ----------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("role: provider\nstate_dir: /a\nstate_dir: /b\n", "line 3, column 1: not valid YAML: "
         "duplicate key 'state_dir' (first on line 2)"),
        ("role: provider\ninventory: 7\n", "line 2: inventory: expected a path, got a number"),
        ("role: provider\nstate_dri: /a\n", "unknown keys: state_dri (line 2)"),
    ],
    ids=["duplicate", "type", "unknown"],
)  # fmt: skip
def test_config_errors_exit_2_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, fragment: str
) -> None:
    conf = tmp_path / "hsmctl.yaml"
    conf.write_text(text)
    code, out, _ = run(capsys, ["--config", str(conf), "fleet", "list", "--json"])
    error = one_object(out)["error"]
    assert code == 2 == error["exit_code"]
    assert error["message"] == f"configuration file {conf}: {fragment}" or error[
        "message"
    ].startswith(f"configuration file {conf}: {fragment}")


# -- SQLite without psycopg -----------------------------------------------------------------

_WITHOUT_PSYCOPG = """
import sys
class NoPsycopg:
    def find_spec(self, name, path=None, target=None):
        if name == "psycopg" or name.startswith("psycopg."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoPsycopg())
from hsmctl.cli.main import main
code = main(sys.argv[1:])
assert not any(m.startswith("psycopg") for m in sys.modules), "psycopg was imported"
sys.exit(code)
"""


def test_sqlite_needs_no_psycopg(env: ProviderEnv) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_PSYCOPG, "--config", str(env.config), "fleet", "list",
         "--json"],
        capture_output=True, text=True, check=False, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert {a["id"] for a in one_object(proc.stdout)["appliances"]} >= {ALLOCATED}


def test_postgresql_without_psycopg_names_the_extra(env: ProviderEnv) -> None:
    conf = env.write_config("pg-no-driver.yaml", database_url="postgresql://u:pw@192.0.2.1/db")
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_PSYCOPG, "--config", str(conf), "fleet", "list", "--json"],
        capture_output=True, text=True, check=False, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    message = one_object(proc.stdout)["error"]["message"]
    assert "pip install 'hsmctl[postgres]'" in message and "pw" not in message
