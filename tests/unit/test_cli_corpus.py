"""CLI input corpus (issue 10, defect 6): no input, from a user, a configuration file or
a device, produces a traceback.

Every case ends in exit 2 (input) or 3 (integrity), with exactly one JSON object on
stdout under ``--json`` and nothing else there, the same message on stderr with its
control characters made visible (never a raw escape sequence), and no ``Traceback``.

Most cases call :func:`hsmctl.cli.main.main` in the test process (the whole CLI, a few
milliseconds each); a handful run the installed ``hsmctl`` entry point, because a
traceback printed by the interpreter itself can only be seen there. No lab, no root
needed: the provider side is tests/provider_env.py (SQLite, loopback addresses, drivers
no one answers to), and the one device-side failure is injected where the SSH
transport would be, since no device runs here.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from rich.console import Console

from hsmctl import config as config_mod
from hsmctl.cli import output
from hsmctl.cli.main import main
from hsmctl.cli.output import plain
from hsmctl.cli.progress import CliProgress
from hsmctl.collect import collector
from hsmctl.errors import CommandFailed, HsmctlError, IntegrityError, UsageError
from hsmctl.inventory import check_placement, load_inventory
from hsmctl.state.model import ApplianceState
from tests.provider_env import ProviderEnv, make_env

pytestmark = pytest.mark.unit

HSMCTL = str(Path(sys.executable).with_name("hsmctl"))

# What rich would read as markup, and what a terminal would obey.
MARKUP = ["[/oops]", "[bold]", "[link=x]", "\x1b[31m", "["]
MARKUP_IDS = ["close-tag", "open-tag", "link", "escape-sequence", "bracket"]

ALLOCATED = "unit01"  # allocated to t1 and provisioned, so deprovision reads --release


# -- the environment -------------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    provider: ProviderEnv
    tenant_conf: Path
    tenant_state: Path
    root: Path

    def tenant(self, name: str, **change: object) -> Path:
        conf = yaml.safe_load(self.tenant_conf.read_text())
        conf.update(change)
        path = self.root / name
        path.write_text(yaml.safe_dump(conf))
        return path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("corpus")
    provider = make_env(root / "provider")
    inv = load_inventory(provider.inventory)
    with provider.store() as store:
        (alloc,) = store.allocate("r-corpus", check_placement(inv, "t1", "v1", "hsm"))
        assert alloc.appliance == ALLOCATED
        store.set_state(ALLOCATED, ApplianceState.PROVISIONED)
    state = root / "tenant-state"
    tenant_conf = root / "tenant.yaml"
    tenant_conf.write_text(
        yaml.safe_dump(
            {
                "role": "tenant",
                "tenant": "t1",
                "state_dir": str(state),
                "identity": str(provider.identities["t1"]),
                "provider_public_key": str(root / "provider-signing.pub.pem"),
            }
        )
    )
    (root / "handoff.json").write_text("{}")
    # An appliance "taken over" from here as far as the collector's --all can tell: pins
    # with a data address and keys, but no collector key anywhere.
    pins = state / "appliances" / "hsm01" / "pins.json"
    pins.parent.mkdir(parents=True, mode=0o700)
    pins.write_text(
        json.dumps(
            {
                "data_ip": "127.0.0.1",
                "data_host_keys": ["ssh-ed25519 AAAA"],
                "audit_keys": {"k1": "-----BEGIN PUBLIC KEY-----"},
                "audit_account_key": "ssh-ed25519 AAAA",
            }
        )
    )
    return Env(provider, tenant_conf, state, root)


@pytest.fixture(autouse=True)
def _no_config_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config_mod.ENV_VAR, raising=False)


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def check_failure(code: int, out: str, err: str, expected: int | tuple[int, ...]) -> str:
    """The contract of a refused input; returns the error message."""
    allowed = expected if isinstance(expected, tuple) else (expected,)
    assert code in allowed, err
    assert "Traceback" not in err
    assert "\x1b" not in err, "a raw escape sequence reached the terminal"
    assert out.endswith("\n") and out.count("\n") == 1, f"not one JSON line: {out!r}"
    body = json.loads(out)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert body["error"]["exit_code"] == code
    message = body["error"]["message"]
    assert isinstance(message, str)
    assert f"hsmctl: error: {plain(message)}" in err, err
    return message


# -- 1. the configuration model: every key, every wrong type ----------------------------------

KEYS = [f.name for f in dataclasses.fields(config_mod.Config) if f.name != "source"]
PATH_KEYS = set(config_mod._PATH_KEYS)

# (id, YAML text of the value, what the message says it got)
WRONG_TYPES = [
    ("int", "42", "got a number"),
    ("float", "1.5", "got a number"),
    ("bool", "true", "got a boolean"),
    ("list", "[a, b]", "got a list"),
    ("dict", "{a: b}", "got a mapping"),
    ("null", "null", "got null"),
    ("empty-value", "", "got null"),
    ("date", "2024-01-01", "got a date"),
    ("binary", "!!binary aGk=", "got binary data"),
    ("empty-string", '""', "must not be empty"),
    ("blank-string", '"  "', "must not be empty"),
    ("control-char", '"a\\x1b[31mb"', "contains a control character"),
    ("nul", '"a\\0b"', "contains a control character"),
]

# Every command that reads the configuration; the cases take turns, so each of them is
# seen refusing a bad file.
COMMANDS = [
    ["fleet", "list"],
    ["fleet", "show", ALLOCATED],
    ["provision", "--tenant", "t1", "--vnet", "v1", "--subnet", "hsm"],
    ["deprovision", ALLOCATED, "--yes", "--force", "--reason", "corpus"],
    ["health"],
    ["takeover", "--handoff", "handoff.json"],
    ["takeover", "verify", "receipt.json"],
    ["release", ALLOCATED],
    ["logs", "collect", "--all"],
    ["logs", "verify", "hsm01"],
    ["logs", "export", "hsm01", "--output", "out.jsonl"],
]

INT_KEYS = set(config_mod._INT_KEYS)
TYPE_CASES = [(key, *wrong) for key in KEYS if key not in INT_KEYS for wrong in WRONG_TYPES]
# Integer settings (health_alert_*): a positive integer, nothing else.
INT_WRONG = [
    ("zero", "0", "got 0"),
    ("negative", "-3", "got -3"),
    ("float", "1.5", "got a number"),
    ("bool", "true", "got a boolean"),
    ("string", '"3"', "got a string"),
    ("null", "null", "got null"),
    ("list", "[3]", "got a list"),
    ("date", "2024-01-01", "got a date"),
]
TYPE_CASES += [(key, *wrong) for key in sorted(INT_KEYS) for wrong in INT_WRONG]


def test_the_model_is_what_the_lab_writes() -> None:
    """Keys the lab and the tests write must all be known (hsmctl/lab/configs.py)."""
    lab = {"role", "state_dir", "inventory", "provider_key", "monitor_key", "signing_key"}
    lab |= {"fabric", "out_of_band", "tenant", "identity", "provider_public_key"}
    assert lab <= set(KEYS)
    assert set(KEYS) == config_mod._KNOWN


@pytest.mark.parametrize(
    ("key", "value", "got"),
    [c[0:1] + c[2:] for c in TYPE_CASES],
    ids=[f"{c[0]}-{c[1]}" for c in TYPE_CASES],
)
def test_every_key_refuses_every_wrong_type(
    env: Env, capsys: pytest.CaptureFixture[str], key: str, value: str, got: str
) -> None:
    conf = env.root / f"type-{key}.yaml"
    head = "# written by the corpus\n" + ("" if key == "role" else "role: provider\n")
    conf.write_text(f"{head}{key}: {value}\n")
    command = COMMANDS[KEYS.index(key) % len(COMMANDS)]
    code, out, err = run(capsys, ["--config", str(conf), *command, "--json"])
    message = check_failure(code, out, err, 2)
    line = head.count("\n") + 1
    assert message.startswith(f"configuration file {conf}: line {line}: {key}: "), message
    assert got in message
    if got.startswith("got") and key in PATH_KEYS:
        assert "expected a path" in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("role: admin\n", "line 1: role: 'admin' is neither 'provider' nor 'tenant'"),
        ("role: Tenant\n", "line 1: role: 'Tenant' is neither"),
        ("role: tenant\ntenant: two words\n", "line 2: tenant: 'two words' is not a tenant name"),
        ("role: tenant\ntenant: '[/oops]'\n", "line 2: tenant: '[/oops]' is not a tenant name"),
        ("role: tenant\ntenant: '-t1'\n", "line 2: tenant: '-t1' is not a tenant name"),
    ],
    ids=["role-unknown", "role-case", "tenant-space", "tenant-markup", "tenant-dash"],
)
def test_values_of_the_right_type_but_wrong(
    env: Env, capsys: pytest.CaptureFixture[str], text: str, fragment: str
) -> None:
    conf = env.root / "wrong-value.yaml"
    conf.write_text(text)
    code, out, err = run(capsys, ["--config", str(conf), "release", ALLOCATED, "--json"])
    message = check_failure(code, out, err, 2)
    assert message.startswith(f"configuration file {conf}: {fragment}"), message


def test_several_problems_are_reported_at_once(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = env.root / "several.yaml"
    conf.write_text("role: provider\nstate_dir: 5\ninventory: [a]\ndatabase_url: null\n")
    code, out, err = run(capsys, ["--config", str(conf), "fleet", "list", "--json"])
    message = check_failure(code, out, err, 2)
    assert message.startswith(f"3 problems in configuration file {conf}:")
    for fragment in ("line 2: state_dir:", "line 3: inventory:", "line 4: database_url:"):
        assert fragment in message
    assert len(json.loads(out)["error"]["errors"]) == 3


# -- 2. YAML that is not a configuration ---------------------------------------------------------

DEEP = "state_dir: " + "[" * 5000 + "]" * 5000 + "\n"

# (id, file content, fragment of the message after "configuration file PATH: ")
YAML_CASES: list[tuple[str, str | bytes, str]] = [
    (
        "duplicate-key",
        "role: provider\nstate_dir: /a\ninventory: /i\nstate_dir: /b\n",
        "line 4, column 1: not valid YAML: duplicate key 'state_dir' (first on line 2)",
    ),
    (
        "duplicate-key-flow",
        "{state_dir: /a, state_dir: /b}\n",
        "line 1, column 17: not valid YAML: duplicate key 'state_dir' (first on line 1)",
    ),
    (
        "duplicate-unknown-key",
        "colour: red\ncolour: blue\n",
        "line 2, column 1: not valid YAML: duplicate key 'colour' (first on line 1)",
    ),
    (
        "duplicate-key-nested",
        "state_dir: {a: 1,\n  a: 2}\n",
        "line 2, column 3: not valid YAML: duplicate key 'a' (first on line 1)",
    ),
    (
        "duplicate-after-merge",
        "base: &b {state_dir: /a}\n",
        "unknown keys: base (line 1)",
    ),
    (
        "unclosed-flow",
        "role: provider\nstate_dir: [/a,\n",
        "line 3, column 1: not valid YAML: while parsing a flow node on line 3, expected the "
        "node content, but found '<stream end>'",
    ),
    (
        "tab-indent",
        "role: provider\n\tstate_dir: /a\n",
        "line 2, column 1: not valid YAML: while scanning for the next token, found "
        "character '\\t' that cannot start any token",
    ),
    (
        "bad-indent",
        "state_dir: /a\n  inventory: /b\n",
        "line 2, column 12: not valid YAML: mapping values are not allowed here",
    ),
    (
        "undefined-alias",
        "state_dir: *nowhere\n",
        "line 1, column 12: not valid YAML: found undefined alias 'nowhere'",
    ),
    (
        "python-tag",
        "state_dir: !!python/object/apply:os.system [id]\n",
        "line 1, column 12: not valid YAML: could not determine a constructor for the tag",
    ),
    (
        "two-documents",
        "state_dir: /a\n---\nstate_dir: /b\n",
        "line 2, column 1: not valid YAML: expected a single document in the stream on line 1, "
        "but found another document",
    ),
    ("unhashable-key", "? [a, b]\n: c\n", "line 1, column 3: not valid YAML: a mapping key"),
    ("nul-byte", "role: provider\nstate_dir: /a\x00\n", "line 2: not valid YAML: character #x0000"),
    ("not-utf8", b"role: provider\nstate_dir: /caf\xe9\n", "line 2: not UTF-8 text (byte 0xe9)"),
    ("nested-too-deeply", DEEP, "not valid YAML: nested too deeply"),
    ("top-level-list", "- state_dir\n- /a\n", "expected a mapping of settings, got a list"),
    ("top-level-text", "just some text\n", "expected a mapping of settings, got str"),
    ("top-level-number", "42\n", "expected a mapping of settings, got a number"),
    ("unknown-key", "role: provider\nstate_dri: /a\n", "unknown keys: state_dri (line 2)"),
    ("non-string-keys", "1: a\nnull: b\n", "unknown keys: 1 (line 1), None"),
    ("one-is-true", "1: a\ntrue: b\n", "line 2, column 1: not valid YAML: duplicate key True"),
    ("markup-key", "'[/oops]': a\n", "unknown keys: [/oops] (line 1)"),
]


@pytest.mark.parametrize(
    ("content", "fragment"), [c[1:] for c in YAML_CASES], ids=[c[0] for c in YAML_CASES]
)
def test_yaml_that_is_not_a_configuration(
    env: Env, capsys: pytest.CaptureFixture[str], content: str | bytes, fragment: str
) -> None:
    conf = env.root / "bad.yaml"
    if isinstance(content, bytes):
        conf.write_bytes(content)
    else:
        conf.write_text(content)
    code, out, err = run(capsys, ["--config", str(conf), "logs", "collect", "--all", "--json"])
    message = check_failure(code, out, err, 2)
    assert message.startswith(f"configuration file {conf}: {fragment}"), message


def test_a_byte_order_mark_is_fine(env: Env) -> None:
    conf = env.root / "bom.yaml"
    conf.write_bytes(b"\xef\xbb\xbfrole: tenant\nstate_dir: s\n")
    assert config_mod.load(str(conf)).state_dir == env.root / "s"


# -- 3. files that are not configuration files --------------------------------------------------


@pytest.fixture
def odd_files(tmp_path: Path) -> Iterator[Path]:
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "big.yaml").write_text("# padding\n" * 200_000)
    (tmp_path / "state-file").write_text("not a directory\n")
    os.symlink(tmp_path / "nowhere.yaml", tmp_path / "dangling.yaml")
    yield tmp_path


FILE_CASES: list[tuple[str, list[str], str]] = [
    ("missing", ["--config", "{d}/missing.yaml"], "configuration file {d}/missing.yaml does not"),
    ("dangling-link", ["--config", "{d}/dangling.yaml"], "configuration file {d}/dangling.yaml "),
    ("directory", ["--config", "{d}/dir.yaml"], "configuration file {d}/dir.yaml is a directory"),
    ("fifo", ["--config", "{d}/fifo.yaml"], "configuration file {d}/fifo.yaml is not a regular"),
    ("device", ["--config", "/dev/null"], "configuration file /dev/null is not a regular file"),
    ("too-big", ["--config", "{d}/big.yaml"], "configuration file {d}/big.yaml: larger than"),
    ("empty-name", ["--config", ""], "--config: an empty file name"),
    ("under-a-file", ["--config", "{d}/state-file/x.yaml"], "Not a directory"),
    ("markup-name", ["--config", "{d}/[/oops].yaml"], "configuration file {d}/[/oops].yaml"),
]


@pytest.mark.parametrize(
    ("args", "fragment"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES]
)
def test_files_that_are_not_configuration_files(
    odd_files: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    argv = [a.format(d=odd_files) for a in args] + ["fleet", "list", "--json"]
    code, out, err = run(capsys, argv)
    message = check_failure(code, out, err, 2)
    assert fragment.format(d=odd_files) in message


def test_hsmctl_config_naming_a_directory(
    odd_files: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(config_mod.ENV_VAR, str(odd_files / "dir.yaml"))
    code, out, err = run(capsys, ["logs", "verify", "hsm01", "--json"])
    assert "is a directory" in check_failure(code, out, err, 2)


@pytest.mark.parametrize("side", ["provider", "tenant"])
def test_state_dir_that_cannot_be_a_directory(
    env: Env, odd_files: Path, capsys: pytest.CaptureFixture[str], side: str
) -> None:
    blocked = odd_files / "state-file"
    if side == "provider":
        conf = env.provider.write_config("conf-state-file.yaml", state_dir=str(blocked))
        argv = ["--config", str(conf), "fleet", "list", "--json"]
    else:
        conf = env.tenant("tenant-state-file.yaml", state_dir=str(blocked))
        argv = ["--config", str(conf), "release", ALLOCATED, "--json"]
    code, out, err = run(capsys, argv)
    message = check_failure(code, out, err, 2)
    assert message == f"{conf}: state_dir {blocked}: File exists"


# -- 4. markup in every string a user controls ------------------------------------------------

# (id, argv after --config CONF with {m} for the string, config: provider or tenant)
SLOTS: list[tuple[str, list[str], str]] = [
    ("tenant", ["provision", "--tenant", "{m}", "--vnet", "v1", "--subnet", "hsm"], "p"),
    ("vnet", ["provision", "--tenant", "t1", "--vnet", "{m}", "--subnet", "hsm"], "p"),
    ("subnet", ["provision", "--tenant", "t1", "--vnet", "v1", "--subnet", "{m}"], "p"),
    ("ip", ["provision", "--tenant", "t1", "--vnet", "v1", "--subnet", "hsm", "--ip", "{m}"], "p"),
    (
        "stamp",
        ["provision", "--tenant", "t1", "--vnet", "v1", "--subnet", "hsm", "--stamp", "{m}"],
        "p",
    ),
    (
        "request-id",
        ["provision", "--tenant", "t1", "--vnet", "v1", "--subnet", "hsm", "--request-id", "{m}"],
        "p",
    ),
    (
        "count",
        ["provision", "--tenant", "t1", "--vnet", "v1", "--subnet", "hsm", "--count", "{m}"],
        "p",
    ),
    ("fleet-show-id", ["fleet", "show", "{m}"], "p"),
    ("deprovision-id", ["deprovision", "{m}", "--yes", "--force", "--reason", "{m}"], "p"),
    ("release-file", ["deprovision", ALLOCATED, "--yes", "--release", "{d}/{m}"], "p"),
    ("health-id", ["health", "{m}"], "p"),
    ("subcommand", ["{m}"], "p"),
    ("fleet-subcommand", ["fleet", "{m}"], "p"),
    ("extra-argument", ["fleet", "list", "{m}"], "p"),
    ("unknown-option", ["fleet", "list", "--{m}"], "p"),
    ("release-id", ["release", "{m}"], "t"),
    ("release-identity", ["release", ALLOCATED, "--identity", "{d}/{m}"], "t"),
    ("handoff", ["takeover", "--handoff", "{d}/{m}"], "t"),
    ("takeover-identity", ["takeover", "--handoff", "{d}/handoff.json", "--identity", "{m}"], "t"),
    (
        "password-file",
        ["takeover", "--handoff", "{d}/handoff.json", "--new-password-file", "{d}/{m}"],
        "t",
    ),
    ("so-pin-file", ["takeover", "--handoff", "{d}/handoff.json", "--so-pin-file", "{m}"], "t"),
    ("co-pin-file", ["takeover", "--handoff", "{d}/handoff.json", "--co-pin-file", "{m}"], "t"),
    ("receipt", ["takeover", "verify", "{d}/{m}"], "t"),
    ("collect-id", ["logs", "collect", "--appliance", "{m}"], "t"),
    ("key-dir", ["logs", "collect", "--all", "--key-dir", "{d}/{m}"], "t"),
    ("verify-id", ["logs", "verify", "{m}"], "t"),
    ("export-id", ["logs", "export", "{m}", "--output", "{d}/out"], "t"),
    ("export-after", ["logs", "export", "hsm01", "--after", "{m}", "--output", "{d}/out"], "t"),
    ("export-format", ["logs", "export", "hsm01", "--format", "{m}", "--output", "{d}/out"], "t"),
    ("config-path", ["--config", "{d}/{m}.yaml", "fleet", "list"], ""),
]

MARKUP_CASES = [(*slot, m) for slot in SLOTS for m in MARKUP]


@pytest.mark.parametrize(
    ("argv", "conf", "text"),
    [c[1:] for c in MARKUP_CASES],
    ids=[f"{c[0]}-{MARKUP_IDS[MARKUP.index(c[3])]}" for c in MARKUP_CASES],
)
def test_markup_in_user_strings(
    env: Env, capsys: pytest.CaptureFixture[str], argv: list[str], conf: str, text: str
) -> None:
    config = {"p": ["--config", str(env.provider.config)], "t": ["--config", str(env.tenant_conf)]}
    args = [a.format(m=text, d=env.root) for a in argv]
    before = env.provider.snapshot()
    code, out, err = run(capsys, [*config.get(conf, []), *args, "--json"])
    message = check_failure(code, out, err, 2)
    if text in message and text.isprintable():
        assert text in err  # shown as written, not swallowed as a style
    assert env.provider.snapshot() == before


@pytest.mark.parametrize("text", MARKUP, ids=MARKUP_IDS)
def test_markup_in_configuration_values(
    env: Env, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    """Paths and names from the file reach messages as written, never as markup."""
    printable = text.isprintable()
    # (configuration, command, whether the message quotes the value: a database URL may
    # hold a password, so its message never does)
    cases: list[tuple[Path, list[str], bool]] = [
        (
            env.provider.write_config("conf-markup-inv.yaml", inventory=f"{text}/inv.yaml"),
            ["fleet", "list"],
            True,
        ),
        (
            env.tenant("tenant-markup-id.yaml", identity=f"{text}-identity"),
            ["release", ALLOCATED],
            True,
        ),
        (
            env.provider.write_config("conf-markup-db.yaml", database_url=f"{text}://u:pw@h/db"),
            ["fleet", "list"],
            False,
        ),
        (env.tenant("tenant-markup-name.yaml", tenant=text), ["release", ALLOCATED], True),
        (env.tenant("tenant-markup-role.yaml", role=text), ["release", ALLOCATED], True),
    ]
    for conf, argv, quoted in cases:
        code, out, err = run(capsys, ["--config", str(conf), *argv, "--json"])
        message = check_failure(code, out, err, 2)
        assert "pw" not in message
        if not printable:
            assert "control character" in message
        elif quoted:
            assert text in err, err
    # A valid value with markup in it is a value like any other.
    odd = env.provider.write_config("conf-markup-ok.yaml", fabric=text, out_of_band=text)
    if printable:
        loaded = config_mod.load(str(odd))
        assert (loaded.fabric, loaded.out_of_band) == (text, text)
        code, out, err = run(capsys, ["--config", str(odd), "fleet", "list", "--json"])
        assert code == 0 and json.loads(out)["appliances"], err


# -- 5. device text: the error report and the progress lines -----------------------------------


def _device_errors(text: str) -> list[HsmctlError]:
    return [
        IntegrityError(f"hsm01: record 7: the device says {text} and {text}x[/]"),
        UsageError(f"hsm01: {text}"),
        CommandFailed(
            f"hsm01: audit export failed {text}",
            argv=["audit", "export"],
            status=1,
            output=f"line one\n{text} line two [red]\n\x07\x1b]0;title\x07",
        ),
    ]


@pytest.mark.parametrize("text", MARKUP, ids=MARKUP_IDS)
def test_error_report_prints_device_text_verbatim(
    capsys: pytest.CaptureFixture[str], text: str
) -> None:
    for exc in _device_errors(text):
        output.error(str(exc))
        _, err = capsys.readouterr()
        assert err == f"hsmctl: error: {plain(str(exc))}\n"
        assert "\x1b" not in err and "\x07" not in err
        if text.isprintable():
            assert text in err


@pytest.mark.parametrize("text", MARKUP, ids=MARKUP_IDS)
def test_progress_prints_device_text_verbatim_in_a_pipe(
    capsys: pytest.CaptureFixture[str], text: str
) -> None:
    progress = CliProgress()
    progress.tty = False
    message = f"hsm01: {text} [dim]x[/dim] :warning: \x1b]8;;http://x\x1b\\ \udcff"
    progress.step(message)
    progress.advance(1, 2, message)
    _, err = capsys.readouterr()
    assert "\x1b" not in err and "\udcff" not in err
    assert err == f"- {plain(message)}\n- [1/2] {plain(message)}\n"
    assert ":warning:" in err  # no emoji substitution either


def _live_console(width: int = 400) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=width, color_system=None), buffer


def _last_frame(out: str) -> list[str]:
    """The live display's final state: what stays on the operator's screen."""
    frame = out.rsplit("\x1b[2K", 1)[-1]
    return [line.rstrip() for line in frame.replace("\x1b[?25h", "").splitlines() if line]


@pytest.mark.parametrize("text", MARKUP, ids=MARKUP_IDS)
def test_progress_prints_device_text_verbatim_on_a_terminal(text: str) -> None:
    """rich draws the live lines; the device's text is text in them, never markup, an
    emoji code or an escape sequence of its own (rich's cursor moves are CSI only)."""
    console, buffer = _live_console()
    message = f"hsm01: {text} [dim]x[/dim] :warning: \x1b]8;;http://x\x1b\\ \udcff"
    with CliProgress(console=console) as progress:
        assert progress.tty
        progress.step(message)
        progress.advance(1, 2, message)
    out = buffer.getvalue()
    assert "\x1b]" not in out and "\x1b\\" not in out and "\udcff" not in out
    step_line, bar_line = _last_frame(out)
    assert plain(message.removeprefix("hsm01: ")) in step_line
    assert step_line.split()[1] == "hsm01:"
    assert plain(message) in bar_line and "1/2" in bar_line
    assert ":warning:" in out


def test_progress_on_a_terminal_is_one_live_line_per_appliance() -> None:
    """Steps of one appliance replace each other on its line; a line per appliance
    (ids of 3 to 40 characters, aligned), one for messages about no appliance."""
    console, buffer = _live_console(width=160)
    ids = ["abc", "hsm01", "a" * 40]
    with CliProgress(console=console) as progress:
        progress.step("request r1: 3 appliances")
        for step in ("verify", "attach", "network"):
            for ident in ids:
                progress.step(f"{ident}: {step}: ok")
    lines = _last_frame(buffer.getvalue())
    assert len(lines) == 1 + len(ids), lines
    assert "request r1: 3 appliances" in lines[0]
    for ident, line in zip(ids, lines[1:], strict=True):
        assert line.split()[1] == f"{ident}:" and "network: ok" in line
        assert "verify" not in line and "attach" not in line
    starts = {line.index("network: ok") for line in lines[1:]}
    assert len(starts) == 1, lines  # the step column is aligned whatever the id's length


def test_progress_on_a_terminal_is_cut_to_the_width_never_wrapped() -> None:
    console, buffer = _live_console(width=60)
    with CliProgress(console=console) as progress:
        progress.step("hsm01: " + "a long step " * 20)
        progress.step("b" * 40 + ": " + "another long step " * 10)
    lines = _last_frame(buffer.getvalue())
    assert len(lines) == 2 and all(len(line) <= 60 for line in lines), lines
    assert lines[0].startswith("hsm01:") and lines[1].startswith("bbbb"), lines


def test_progress_in_a_pipe_has_no_control_characters(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """stderr not a terminal (a pipe, a file, journald): plain lines, one per message,
    printable but for the newline."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    with CliProgress() as progress:
        assert not progress.tty
        for ident in ("abc", "hsm01"):
            progress.step(f"{ident}: verify: ok")
        progress.advance(1, 2, "appliance abc up")
        progress.step("hsm01: \x1b[2Kdevice\x07 text\r")
    _, err = capsys.readouterr()
    assert err.splitlines() == [
        "- abc: verify: ok",
        "- hsm01: verify: ok",
        "- [1/2] appliance abc up",
        "- hsm01: \\x1b[2Kdevice\\x07 text\\x0d",
    ]
    assert all(c == "\n" or c.isprintable() for c in err), repr(err)


def test_progress_stays_quiet_under_json(capsys: pytest.CaptureFixture[str]) -> None:
    with CliProgress(quiet=True) as progress:
        progress.step("hsm01: verify")
        progress.advance(1, 1, "x")
    assert capsys.readouterr() == ("", "")


def test_progress_survives_a_closed_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    class Closed:
        def write(self, _: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

        def isatty(self) -> bool:
            return False

    monkeypatch.setattr(sys, "stderr", Closed())
    monkeypatch.setattr(output._err, "quiet", False)  # it goes quiet for good: undo after
    for tty in (True, False):
        with CliProgress() as progress:
            progress.tty = tty
            progress.step("hsm01: collected")
            progress.advance(1, 1, "hsm01")


# What rich's live display writes on a terminal: cursor hide/show, erase line, cursor up.
RICH_CONTROLS = re.compile(r"\x1b\[(?:\?25[lh]|2K|\d*A)")


def _terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr claims to be a terminal: the progress lines go through rich."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "human"])
@pytest.mark.parametrize("text", MARKUP, ids=MARKUP_IDS)
def test_collect_all_reports_a_device_error_with_markup(
    env: Env,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    as_json: bool,
) -> None:
    """The issue's case: `logs collect --all` on a terminal, a device whose answer holds
    markup. The SSH transport is where the device would answer; the collector's own
    error handling, the report, the progress line and the exit code are real."""
    device_said = f"hsm01: record 12: hash mismatch; device detail: {text}"

    def transport(target: collector.Target, *_: Any) -> collector.ApplianceReport:
        raise IntegrityError(device_said)

    monkeypatch.setattr(collector, "collect", transport)
    monkeypatch.setattr(collector, "collector_key", lambda st, key_dir: env.root / "key")
    _terminal(monkeypatch)
    argv = ["--config", str(env.tenant_conf), "logs", "collect", "--all", "--workers", "0"]
    code, out, err = run(capsys, argv + (["--json"] if as_json else []))
    if as_json:
        check_failure(code, out, err, 3)
        report = json.loads(out)["error"]["appliances"]
        assert [a["error"]["message"] for a in report] == [device_said]
    else:
        assert code == 3 and out == "" and "Traceback" not in err
        # On a terminal rich moves the cursor (CSI sequences of its own); nothing else.
        screen = RICH_CONTROLS.sub("", err)
        assert "\x1b" not in screen, err
        # The report in full; the progress line (rich's, cut to the width) before it.
        progress, report = screen.split("hsmctl: error: ")
        assert report.endswith(f": {plain(device_said)}\n"), err
        assert "hsm01:" in progress and plain(device_said)[7:40] in progress, err


def test_collect_all_reports_a_user_path_with_markup_on_a_terminal(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No fake at all: the collector's refusal names the --key-dir it looked in."""
    _terminal(monkeypatch)
    key_dir = env.root / "[/oops]"
    argv = ["--config", str(env.tenant_conf), "logs", "collect", "--all", "--key-dir"]
    code, out, err = run(capsys, [*argv, str(key_dir)])
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"hsm01: no collector key (looked for {key_dir}/collector-key_hsm01" in err


@pytest.mark.parametrize("text", MARKUP, ids=MARKUP_IDS)
def test_a_device_error_through_the_top_level_handler(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    from hsmctl.provider import health

    def probe(*_: Any, **__: Any) -> Any:
        raise IntegrityError(f"hsm01: host key mismatch; the device sent {text}")

    monkeypatch.setattr(health, "health", probe)
    code, out, err = run(capsys, ["--config", str(env.provider.config), "health", "--json"])
    assert text in check_failure(code, out, err, 3)


def test_an_unexpected_exception_is_one_json_object_and_exit_1(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from hsmctl.provider import context

    def broken(*_: Any) -> Any:
        raise RuntimeError("[/oops] \x1b[31m a bug")

    monkeypatch.setattr(context, "open_context", broken)
    code, out, err = run(capsys, ["--config", str(env.provider.config), "fleet", "list", "--json"])
    message = check_failure(code, out, err, 1)
    assert message == "internal error: RuntimeError: [/oops] \x1b[31m a bug"


# -- 6. the real entry point: what only a process shows ----------------------------------------


def _hsmctl(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != config_mod.ENV_VAR}
    return subprocess.run(
        [HSMCTL, *args], capture_output=True, text=True, env=env, user=user, check=False
    )


@pytest.fixture(scope="module")
def world_readable_dir() -> Iterator[Path]:
    """A directory anyone may enter (pytest's own are 0700): an unreadable file in it is
    unreadable because of its own mode, not its parent's."""
    with tempfile.TemporaryDirectory(prefix="hsmctl-corpus-") as d:
        os.chmod(d, 0o755)
        yield Path(d)


def _write(d: Path, name: str, text: str, mode: int = 0o644) -> str:
    path = d / name
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


PROCESS_CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    (
        "wrong-type",
        lambda d: ["--config", _write(d, "t.yaml", "database_url: 5\n"), "fleet", "list"],
        "line 1: database_url: expected a string, got a number",
    ),
    (
        "state-dir-int",
        lambda d: ["--config", _write(d, "s.yaml", "state_dir: 42\n"), "logs", "verify", "x"],
        "line 1: state_dir: expected a path, got a number",
    ),
    (
        "duplicate-key",
        lambda d: ["--config", _write(d, "d.yaml", "role: tenant\nrole: provider\n"), "health"],
        "line 2, column 1: not valid YAML: duplicate key 'role' (first on line 1)",
    ),
    (
        "bad-yaml",
        lambda d: ["--config", _write(d, "b.yaml", "a: [\n"), "logs", "collect", "--all"],
        "line 2, column 1: not valid YAML",
    ),
    ("missing", lambda d: ["--config", str(d / "nope.yaml"), "fleet", "list"], "does not exist"),
    ("directory", lambda d: ["--config", str(d), "release", "x"], "is a directory"),
    (
        "unreadable",
        lambda d: ["--config", _write(d, "u.yaml", "role: tenant\n", 0), "logs", "verify", "x"],
        "u.yaml: Permission denied",
    ),
    (
        "markup-everywhere",
        lambda d: [
            "--config",
            _write(d, "m.yaml", "role: tenant\ntenant: '[/oops]'\n"),
            "release",
            "[bold]",
        ],
        "line 2: tenant: '[/oops]' is not a tenant name",
    ),
]


@pytest.mark.parametrize(
    ("make", "fragment"), [c[1:] for c in PROCESS_CASES], ids=[c[0] for c in PROCESS_CASES]
)
def test_the_entry_point(
    world_readable_dir: Path, make: Callable[[Path], list[str]], fragment: str
) -> None:
    args = make(world_readable_dir)
    # root reads every file; the unreadable case then runs as nobody, as a user would.
    user = 65534 if "u.yaml" in " ".join(args) and os.geteuid() == 0 else None
    proc = _hsmctl(*args, "--json", user=user)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    body = json.loads(proc.stdout)
    assert proc.stdout.count("\n") == 1 and set(body) == {"error"}
    assert fragment in body["error"]["message"]
    assert proc.stderr.startswith(f"hsmctl: error: {plain(body['error']['message'])}")


@pytest.fixture
def bad_ssh_peer() -> Iterator[int]:
    """A listener at a "device" address that answers with an SSH banner and then a key
    exchange no client can accept, with markup and an escape sequence in it."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                junk = b"[/oops]\x1b[31m[bold]" * 4
                conn.sendall(b"SSH-2.0-device\r\n" + b"\x00\x00\x00\x0c\x0a\x14" + junk)
                done.wait(0.3)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    done.set()
    thread.join()
    server.close()


def test_a_device_speaking_bad_ssh_is_no_traceback(
    world_readable_dir: Path, bad_ssh_peer: int
) -> None:
    """paramiko logs a traceback when the peer breaks the protocol; with no logging set
    up, Python printed it on stderr. The process matters here: under pytest the logging
    plugin's handlers would hide it."""
    d = world_readable_dir / "bad-peer"
    key = ed25519.Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    pins = d / "state" / "appliances" / "hsm01" / "pins.json"
    pins.parent.mkdir(parents=True)
    pins.write_text(
        json.dumps(
            {
                "data_ip": "127.0.0.1",
                "data_port": bad_ssh_peer,
                "data_host_keys": [public],
                "audit_keys": {"k1": "unused: the exchange fails first"},
                "audit_account_key": public,
            }
        )
    )
    (d / "keys").mkdir()
    private = key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())
    (d / "keys" / "hsm01").write_bytes(private)
    os.chmod(d / "keys" / "hsm01", 0o600)
    conf = _write(d, "tenant.yaml", f"role: tenant\nstate_dir: {d / 'state'}\n")
    proc = _hsmctl(
        "--config", conf, "logs", "collect", "--appliance", "hsm01", "--key-dir", str(d / "keys"),
        "--json",
    )  # fmt: skip
    assert "Traceback" not in proc.stderr and "\x1b" not in proc.stderr, proc.stderr
    body = json.loads(proc.stdout)
    assert proc.stdout.count("\n") == 1 and set(body) == {"error"}
    assert proc.returncode == body["error"]["exit_code"] != 0
    assert "SSH" in body["error"]["message"]
    assert proc.stderr == f"hsmctl: error: {plain(body['error']['message'])}\n"


def test_a_closed_stdout_is_no_traceback() -> None:
    """`hsmctl ... | head -1`: the reader left before hsmctl wrote."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [HSMCTL, "--version"], stdout=write, stderr=subprocess.PIPE, text=True, check=False
        )
    finally:
        os.close(write)
    assert proc.returncode == 1
    assert proc.stderr == ""


def test_the_corpus_is_big_enough() -> None:
    assert len(TYPE_CASES) >= len(KEYS) * 10
    assert len(MARKUP_CASES) >= 100
    assert len({c[0] for c in YAML_CASES}) == len(YAML_CASES) >= 20
