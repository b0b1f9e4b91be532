"""The inventory's two YAML loaders accept exactly the same documents (issue 15).

:func:`hsmctl.inventory.reader.parse_yaml` reads with libyaml's parser first and falls back
to PyYAML's pure-Python one (:func:`~hsmctl.inventory.reader.parse_yaml_slowly`) for
anything libyaml refuses. That is sound only if every document libyaml accepts, the
pure-Python loader accepts too, with the same data. Checked here on hostile text:
token soup of YAML's syntax, real inventories with random edits, and arbitrary
characters (controls, BOMs, lone surrogates, NEL); the result of the fast path must be
the slow path's, outcome and data, or error message, exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hsmctl.inventory import reader
from hsmctl.inventory.model import InventoryError

pytestmark = pytest.mark.unit

FILE = Path("inventory.yaml")

INVENTORY = """\
regions:
  - name: westeurope
    stamps:
      - name: stamp1
        spares: 2
        appliances:
          - id: hsm01
            mgmt_ip: 198.18.0.11
            mgmt_host_keys:
              - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGd3bG9va3NsaWtlYWtleWJ1dGlzbm90YXJlYWw=
          - id: hsm02
            mgmt_ip: "198.18.0.12"
tenants:
  - name: tenant1
    quota: 4
    identity: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGd3bG9va3NsaWtlYWtleWJ1dGlzbm90YXJlYWw=
    vnets: {vnet1: {subnets: [10.0.0.0/24, 10.0.1.0/24]}}
"""

# The same inventory in flow style: where the parsers' corner cases were found.
FLOW = yaml.safe_dump(yaml.safe_load(INVENTORY), default_flow_style=True, width=60)

TOKENS = [
    "a",
    "b",
    "key",
    "id",
    ":",
    ": ",
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\r",
    "- ",
    "-",
    "#",
    " # c",
    "&a ",
    "*a",
    "&b ",
    "*b",
    "!!str ",
    "!!int ",
    "!!map ",
    "!!set ",
    "!!omap ",
    "!!binary ",
    "!!python/object ",
    "!local ",
    "? ",
    "{",
    "}",
    "[",
    "]",
    ",",
    "'",
    "''",
    '"',
    '\\"',
    "\\x41",
    "\\u00e9",
    "\\",
    "|",
    "|-",
    ">",
    ">+",
    "|2",
    "<<: *a",
    "<<: ",
    "%YAML 1.1\n",
    "%TAG ! tag:x,2000:\n",
    "---",
    "--- ",
    "...",
    "0x1F",
    "0o17",
    "017",
    "1_000",
    "1e3",
    ".inf",
    "-.inf",
    ".nan",
    "~",
    "null",
    "yes",
    "No",
    "on",
    "2001-12-14",
    "2001-12-14t21:59:43.10-05:00",
    "=",
    "1.0",
    "+1",
    "0b101",
    "190:20:30",
    "é",
    "\u00a0",
    "\u0085",
    "\u2028",
    "\ufeff",
    "\x00",
    "\x07",
    "\x7f",
    "\x9f",
    "\ud800",
    "\U0001f600",
    "x" * 1100,
    "[" * 40,
    "{a: " * 30,
    "? a",
    ": b",
    "[a, b]",
    "{a: b}",
    ", ",
    "]]",
    "}}",
]


def outcome(parse: object, text: str) -> tuple[str, str]:
    """("ok", a faithful rendering of the data) or ("error", the message)."""
    assert callable(parse)
    try:
        data = parse(FILE, text)
    except InventoryError as exc:
        return ("error", str(exc))
    # repr keeps types apart (1 vs 1.0 vs True, str vs bytes) and renders NaN and
    # self-referencing aliases; equal constructions render equally.
    return ("ok", f"{type(data).__name__}:{data!r}")


def check(text: str) -> None:
    assert outcome(reader.parse_yaml, text) == outcome(reader.parse_yaml_slowly, text)


def test_the_fast_loader_is_there_and_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without libyaml both paths are the slow one and the rest proves nothing. An
    inventory is read by libyaml alone; text outside the fast path's subset by PyYAML."""
    assert reader._StrictCLoader is not None
    assert issubclass(reader._StrictCLoader, yaml.CSafeLoader)
    expected = reader.parse_yaml_slowly(FILE, INVENTORY)
    slow: list[str] = []
    real = reader.parse_yaml_slowly

    def spy(file: Path, text: str) -> object:
        slow.append(text)
        return real(file, text)

    monkeypatch.setattr(reader, "parse_yaml_slowly", spy)
    assert reader.parse_yaml(FILE, INVENTORY) == expected
    assert reader.parse_yaml(FILE, FLOW) == expected
    assert slow == []
    assert reader.parse_yaml(FILE, "a: !!str 1\n") == {"a": "1"}
    with pytest.raises(InventoryError, match="not valid YAML"):
        reader.parse_yaml(FILE, "a: [1\n")  # libyaml refuses it; PyYAML says why
    assert slow == ["a: !!str 1\n", "a: [1\n"]


@pytest.mark.parametrize(
    "text",
    [
        "a: 1\na: 2\n",  # duplicate key
        "{[1]: x}",  # unhashable key
        "a: &x [*x]\n",  # a list holding itself
        "&a {b: *a}",
        "? [a, b]\n: c\n",
        "a: !!python/object:os.system x\n",
        "- " * 3000 + "x",  # nested deeper than the constructor's recursion
        "[" * 3000,
        "a: 1\n---\nb: 2\n",  # two documents
        "\ufeffa: 1\n",
        "a: \x00\n",
        "a: \ud800\n",
        "a: 'it''s'\nb: \"\\x41\\u00e9\"\n",
        "base: &b {x: 1}\nderived: {<<: *b, x: 2}\n",
        "x" * 2000 + ": 1\n",  # a simple key longer than 1024
        "",
        "# only a comment\n",
    ],
)
def test_known_edges_agree(text: str) -> None:
    check(text)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=40).map("".join))
def test_token_soup_agrees(text: str) -> None:
    check(text)


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from([INVENTORY, FLOW]),
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=len(INVENTORY)),
            st.integers(min_value=0, max_value=8),
            st.sampled_from(TOKENS),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_edited_inventories_agree(text: str, edits: list[tuple[int, int, str]]) -> None:
    """A real inventory with random cuts and insertions: near-valid text, where the two
    parsers' corner cases are (found so far: ``!``, ``|#``, a tab, ``? `` in a flow
    sequence)."""
    for at, cut, token in edits:
        at = min(at, len(text))
        text = text[:at] + token + text[at + cut :]
    check(text)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_agrees(text: str) -> None:
    check(text)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=20,
    ),
    st.sampled_from([None, False, True]),
)
def test_dumped_data_agrees(data: object, flow: bool | None) -> None:
    check(yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True))
