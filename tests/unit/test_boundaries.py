"""The code's layering, checked: the firmware imports nothing but the firmware file list
(it is all the device has), and no module of hsmctl imports one that imports it back."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hsmctl.lab.firmware import FIRMWARE_FILES

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "hsmctl"
# What the appliance image installs besides the standard library (vagrant/appliance-image.sh).
FIRMWARE_THIRD_PARTY = {"cryptography", "PyKCS11"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[str]:
    """Every module ``path`` imports at run time (not under ``if TYPE_CHECKING``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def walk(nodes: list[ast.stmt]) -> Iterator[str]:
        for node in nodes:
            if isinstance(node, ast.If):
                test = node.test
                type_only = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
                )
                yield from walk(node.orelse if type_only else node.body + node.orelse)
            elif isinstance(node, ast.Import):
                yield from (a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    mod = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    mod = node.module or ""
                # ``from pkg import submodule`` depends on the submodule, not on pkg's
                # __init__ (which Python runs first for any submodule anyway).
                subs = [f"{mod}.{a.name}" for a in node.names]
                yield from subs
                if not all(s in MODULES for s in subs):
                    yield mod
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                yield from walk(node.body)
            elif isinstance(node, ast.Try | ast.With):
                for block in ("body", "handlers", "orelse", "finalbody"):
                    for item in getattr(node, block, []):
                        yield from walk(
                            item.body if isinstance(item, ast.ExceptHandler) else [item]
                        )

    yield from walk(ast.parse(path.read_text()).body)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def graph() -> dict[str, set[str]]:
    """Module -> the hsmctl modules it imports, ancestors' ``__init__`` aside (a package's
    own submodules may use what it re-exports; that is not a layering cycle)."""
    return {
        n: {m for m in imports(p) if m in MODULES and m != n and not n.startswith(f"{m}.")}
        for n, p in MODULES.items()
    }


def firmware_modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] in FIRMWARE_FILES]


@pytest.mark.parametrize("path", firmware_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_firmware_imports_only_the_firmware(path: Path) -> None:
    for mod in imports(path):
        top = mod.split(".")[0]
        if top == "hsmctl":
            parts = mod.split(".")
            if len(parts) == 1:
                continue
            inside = parts[1] in FIRMWARE_FILES or f"{parts[1]}.py" in FIRMWARE_FILES
            # ``from hsmctl import x`` names a module or a package attribute: x must be there.
            assert inside, f"{path.relative_to(PACKAGE)} imports {mod}: not on the device"
        else:
            allowed = top in sys.stdlib_module_names or top in FIRMWARE_THIRD_PARTY
            assert allowed, f"{path.relative_to(PACKAGE)} imports {mod}: not in the image"


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles() -> None:
    assert find_cycles(graph()) == []


def test_the_checker_sees_imports_and_cycles() -> None:
    """Not vacuous: the daemon's import of its handlers is seen, and a cycle is found."""
    assert "hsmctl.appliance.handlers" in graph()["hsmctl.appliance.daemon"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
