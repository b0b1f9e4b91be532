"""Reading inventory YAML strictly: a loader that refuses duplicate keys, and typed field
readers that report a wrong value (file, entry, what is wrong) and read it as ``None``, so
one run lists every problem."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hsmctl.inventory.model import Declared, InventoryError
from hsmctl.sshkeys import KeyFormatError, PublicKey

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,62}$")


# -- YAML that refuses duplicate keys ----------------------------------------------------
#
# Two loaders, one grammar. libyaml's parser (``CSafeLoader``) reads a 100-appliance
# inventory in ~5 ms, PyYAML's pure-Python one in ~40-50 ms (every fleet command reads
# the inventory before it contacts a device). Both feed the same Python resolver and
# constructors, so a document both parse gives the same data. The fast one is tried
# first; whatever it refuses is read again by the pure-Python one, which gives the
# message (or accepts it: the set of documents accepted is exactly the pure-Python
# loader's; tests/unit/test_inventory_yaml.py checks both directions on hostile input).


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last silently)."""


def _mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    # Also the libyaml loader's: CSafeLoader has the same constructor methods.
    loader.flatten_mapping(node)
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)

_StrictCLoader: type[Any] | None = None
if getattr(yaml, "__with_libyaml__", False):
    _StrictCLoader = type("_StrictCLoader", (yaml.CSafeLoader,), {})
    _StrictCLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)

_CONSTRUCTOR_ERRORS = (RecursionError, ValueError, TypeError, OverflowError, LookupError)
"""Besides ``yaml.YAMLError``, what reading a hostile document raises (nesting too deep,
``!!int ''``, a bad date): either loader's, so the fast one's fall back and the slow
one's are exit 2."""


def _load(loader_class: type[Any], text: str) -> object:
    loader = loader_class(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


_FAST_TEXT = re.compile(r"[\n\r -~]*")
_SLOW_ONLY = re.compile(r"[!&*%|>?]")
"""What the fast path is given: printable ASCII without tabs, tags, anchors, aliases,
directives, block scalars or complex keys (``!``, ``&``, ``*``, ``%``, ``|``, ``>``,
``?``), where the two parsers were found to differ: an empty node tagged ``!`` is ``''``
to libyaml and ``None`` to PyYAML; ``0<TAB>``, ``|#`` and ``[a? b]`` are accepted by
libyaml and refused by PyYAML. Inventories use none of them; any document that does is
read by the pure-Python loader alone."""


def parse_yaml(file: Path, text: str) -> object:
    if _StrictCLoader is not None and _FAST_TEXT.fullmatch(text) and not _SLOW_ONLY.search(text):
        try:
            return _load(_StrictCLoader, text)
        except (yaml.YAMLError, *_CONSTRUCTOR_ERRORS):
            pass  # the pure-Python loader decides, and says why
    return parse_yaml_slowly(file, text)


def parse_yaml_slowly(file: Path, text: str) -> object:
    """The pure-Python loader alone: the reference :func:`parse_yaml` is held to."""
    loader: _StrictLoader | None = None
    try:
        loader = _StrictLoader(text)  # its reader refuses unprintable characters here
        loader.name = str(file)
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise InventoryError(f"{file}: not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise InventoryError(f"{file}: not valid YAML: nested too deeply") from exc
    except _CONSTRUCTOR_ERRORS as exc:
        raise InventoryError(f"{file}: not valid YAML: {type(exc).__name__}: {exc}") from exc
    finally:
        if loader is not None:
            loader.dispose()


# -- field readers that collect problems -------------------------------------------------


def type_name(value: object) -> str:
    if value is None:
        return "nothing (null)"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


@dataclass
class Problems:
    items: list[str]

    def add(self, origin: Declared | tuple[Path, str], message: str) -> None:
        file, entry = (origin.file, origin.entry) if isinstance(origin, Declared) else origin
        self.items.append(f"{file}: {entry}: {message}" if entry else f"{file}: {message}")


class Reader:
    """Typed access to one file's raw YAML; a wrong value is reported and read as None."""

    def __init__(self, file: Path, problems: Problems) -> None:
        self.file = file
        self.problems = problems

    def error(self, entry: str, message: str) -> None:
        self.problems.add((self.file, entry), message)

    def fields(
        self, entry: str, value: object, spec: tuple[set[str], set[str]]
    ) -> dict[str, Any] | None:
        required, optional = spec
        if not isinstance(value, dict):
            self.error(entry, f"expected a mapping, got {type_name(value)}")
            return None
        allowed = required | optional
        for key in value:
            if key not in allowed:
                self.error(
                    entry,
                    f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))})",
                )
        for key in sorted(required - set(value)):
            self.error(entry, f"missing key {key!r}")
        return {k: v for k, v in value.items() if k in allowed}

    def items(self, entry: str, m: dict[str, Any], key: str, ident: str) -> list[tuple[str, Any]]:
        """A list under ``key``, each item labelled by its name (or index if it has none)."""
        value = m.get(key)
        if key not in m:
            return []
        if not isinstance(value, list):
            self.error(entry, f"{key}: expected a list, got {type_name(value)}")
            return []
        out = []
        prefix = f"{entry}.{key}" if entry else key
        for index, item in enumerate(value):
            label = item.get(ident) if isinstance(item, dict) else None
            if not (isinstance(label, str) and NAME_RE.match(label)):
                label = str(index)
            out.append((f"{prefix}[{label}]", item))
        return out

    def string(self, entry: str, m: dict[str, Any], key: str) -> str | None:
        if key not in m:
            return None
        value = m[key]
        if not isinstance(value, str):
            hint = " (quote it)" if isinstance(value, int | float | bool) else ""
            self.error(entry, f"{key}: expected a string, got {type_name(value)}{hint}")
            return None
        if not value.strip():
            self.error(entry, f"{key}: must not be empty")
            return None
        return value

    def name(self, entry: str, m: dict[str, Any], key: str = "name") -> str | None:
        value = self.string(entry, m, key)
        if value is not None and not NAME_RE.match(value):
            self.error(
                entry,
                f"{key}: {value!r} is not a valid name (a letter, then up to 62 letters, "
                "digits, '.', '_' or '-')",
            )
            return None
        return value

    def boolean(self, entry: str, m: dict[str, Any], key: str) -> bool | None:
        if key not in m:
            return None
        value = m[key]
        if not isinstance(value, bool):
            self.error(entry, f"{key}: expected true or false, got {type_name(value)}")
            return None
        return value

    def integer(self, entry: str, m: dict[str, Any], key: str, minimum: int) -> int | None:
        if key not in m:
            return None
        value = m[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(entry, f"{key}: expected an integer, got {type_name(value)}")
            return None
        if value < minimum:
            self.error(entry, f"{key}: must be at least {minimum}, got {value}")
            return None
        return value

    def network(self, entry: str, m: dict[str, Any], key: str) -> ipaddress.IPv4Network | None:
        text = self.string(entry, m, key)
        if text is None:
            return None
        if "/" not in text:
            self.error(entry, f"{key}: {text!r} has no prefix length (write it as A.B.C.D/N)")
            return None
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            self.error(entry, f"{key}: {text!r} is not an IPv4 network")
            return None
        if not isinstance(net, ipaddress.IPv4Network):
            self.error(entry, f"{key}: {text!r} is IPv6; only IPv4 is supported")
            return None
        if str(net) != text.strip():
            self.error(entry, f"{key}: {text!r} has host bits set; did you mean {net}?")
            return None
        return net

    def address(self, entry: str, m: dict[str, Any], key: str) -> ipaddress.IPv4Address | None:
        text = self.string(entry, m, key)
        if text is None:
            return None
        try:
            ip = ipaddress.ip_address(text.strip())
        except ValueError:
            self.error(entry, f"{key}: {text!r} is not an IPv4 address")
            return None
        if not isinstance(ip, ipaddress.IPv4Address):
            self.error(entry, f"{key}: {text!r} is IPv6; only IPv4 is supported")
            return None
        return ip

    def key(
        self, entry: str, m: dict[str, Any], key: str, allowed: frozenset[str]
    ) -> PublicKey | None:
        text = self.string(entry, m, key)
        return None if text is None else self.key_text(entry, key, text, allowed)

    def key_text(
        self, entry: str, label: str, text: str, allowed: frozenset[str]
    ) -> PublicKey | None:
        try:
            return PublicKey.parse(text, allowed)
        except KeyFormatError as exc:
            self.error(entry, f"{label}: {exc.message}")
            return None
