"""Configuration lookup: ``--config FILE`` > ``$HSMCTL_CONFIG`` > ``/etc/hsmctl/hsmctl.yaml``.

The file is YAML: one mapping, and every value is a non-empty string.

- ``role``: ``provider`` (the default) or ``tenant``.
- ``tenant``: the tenant's name, as in the inventory.
- paths, relative to the file's directory unless absolute: ``state_dir``, ``inventory``,
  ``provider_key``, ``monitor_key``, ``signing_key`` (provider hosts); ``state_dir``,
  ``identity``, ``provider_public_key`` (tenant hosts).
- ``database_url``: the provider's database (default: SQLite in ``state_dir``).
- ``fabric``, ``out_of_band``: the provider's drivers, ``lab`` by default.
- health alerts (provider hosts, docs/health.md): ``health_syslog`` (``udp://HOST:PORT``
  or ``tcp://HOST:PORT``, where alerts go), ``health_alert_polls`` and
  ``health_alert_window_minutes`` (positive integers: an alert is raised after that many
  bad polls within that window; 3 and 60 by default, like Azure's);
  ``health_retention_days`` (a positive integer, 30 by default: each poll deletes the
  stored polls older than that, never those the alert window counts).

Strict, like the inventory, because a typo must never silently become a default and a
traceback is not an answer: an unknown key, a key given twice (PyYAML would keep the last
one silently), a value of another type — a number, a boolean, a list, a mapping, a date,
or null where a string is expected (to leave a setting unset, leave its line out) — and
a file that is not valid UTF-8 YAML are each a :class:`ConfigError` (exit 2) naming the
file and the line.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hsmctl.errors import ConfigError, UsageError

DEFAULT_PATH = Path("/etc/hsmctl/hsmctl.yaml")
ENV_VAR = "HSMCTL_CONFIG"
MAX_BYTES = 1 << 20
"""A configuration is a few hundred bytes; a bigger file is a wrong ``--config``."""

_PATH_KEYS = (
    "state_dir",
    "identity",
    "provider_public_key",
    "inventory",
    "provider_key",
    "monitor_key",
    "signing_key",
)
_STRING_KEYS = ("database_url", "fabric", "out_of_band", "health_syslog")
_INT_KEYS = ("health_alert_polls", "health_alert_window_minutes", "health_retention_days")
_ROLES = ("provider", "tenant")
_KNOWN = {"role", "tenant", *_STRING_KEYS, *_PATH_KEYS, *_INT_KEYS}
# The inventory's name rule (hsmctl.inventory.load.NAME_RE): a tenant name that breaks it
# could never match a tenant of the inventory.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,62}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Config:
    source: Path | None
    role: str = "provider"
    tenant: str | None = None
    state_dir: Path | None = None
    identity: Path | None = None
    provider_public_key: Path | None = None
    inventory: Path | None = None
    provider_key: Path | None = None
    monitor_key: Path | None = None
    signing_key: Path | None = None
    database_url: str | None = None
    fabric: str = "lab"
    out_of_band: str = "lab"
    health_syslog: str | None = None
    health_alert_polls: int = 3
    health_alert_window_minutes: int = 60
    health_retention_days: int = 30

    def require(self, name: str) -> Any:
        value = getattr(self, name)
        if value is None:
            where = self.source or "no configuration file"
            raise ConfigError(f"{where}: '{name}' is not set")
        return value


def ensure_state_dir(config: Config) -> Path:
    """``state_dir``, made (0700) if missing. A path that cannot be a directory (a file is
    there, no permission) is the configuration's fault: exit 2 naming both."""
    path: Path = config.require("state_dir")
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"{config.source}: state_dir {path}: {exc.strerror or exc}") from exc
    return path


def resolve_path(explicit: str | None) -> Path | None:
    """Which file to read; None when no file exists anywhere in the lookup order."""
    if explicit is not None:
        if not explicit:
            raise ConfigError("--config: an empty file name")
        return Path(explicit)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    try:
        DEFAULT_PATH.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        pass  # there may be one we cannot read: load() says why, rather than ignoring it
    return DEFAULT_PATH


def load(explicit: str | None = None) -> Config:
    """Read and check the configuration (exit 2 with the file and line on any fault)."""
    path = resolve_path(explicit)
    if path is None:
        return Config(source=None)
    raw, lines = _parse(path, _read(path))
    return _build(path, raw, lines)


def load_for(explicit: str | None, role: str, hint: str) -> Config:
    """The configuration of ``role`` (``provider`` or ``tenant``): exit 2 if there is
    none (``hint`` says where one usually is) or if it is another role's."""
    config = load(explicit)
    if config.source is None:
        raise ConfigError(
            f"no configuration: pass --config, set HSMCTL_CONFIG or create "
            f"/etc/hsmctl/hsmctl.yaml ({hint})"
        )
    if config.role != role:
        who = "a tenant's" if role == "tenant" else f"a {role}'s"
        raise UsageError(f"{config.source} is a {config.role} configuration, not {who}")
    return config


def _read(path: Path) -> str:
    """The file's text. Opened without blocking (a FIFO must not hang a timer job) and
    checked to be a regular file of a sane size before anything is parsed."""
    where = f"configuration file {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise ConfigError(f"{where} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror or exc}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{where} is a directory, not a file")
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{where} is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_BYTES // 1024} KiB; not a configuration")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{where}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x})"
        ) from exc


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last silently)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[object, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            first = seen.get(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {first})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _parse(path: Path, text: str) -> tuple[object, dict[str, int]]:
    """The document, and the line of each top-level key (for messages about its value)."""
    where = f"configuration file {path}"
    loader: _StrictLoader | None = None
    try:
        loader = _StrictLoader(text)
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(f"{where}: {_yaml_problem(exc)}") from exc
    except yaml.reader.ReaderError as exc:
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(
            f"{where}: line {line}: not valid YAML: character #x{char:04x} is not allowed"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from exc
    finally:
        if loader is not None:
            loader.dispose()
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                lines.setdefault(str(key_node.value), key_node.start_mark.line + 1)
    return data, lines


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    """``line L, column C: not valid YAML: [CONTEXT on line L', ]PROBLEM`` from the
    error's marks, without PyYAML's multi-line snippet of the file."""
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = exc.problem or "malformed"
    if exc.context:
        context_line = f" on line {exc.context_mark.line + 1}" if exc.context_mark else ""
        problem = f"{exc.context}{context_line}, {problem}" if exc.problem else exc.context
    return f"{where}not valid YAML: {problem}"


def _kind(value: object) -> str:
    if value is None:
        return "null (to leave it unset, leave the line out)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number (quote it if it is meant as text)"
    if isinstance(value, datetime.date):
        return "a date (quote it if it is meant as text)"
    for kind, name in (
        (list, "a list"),
        (dict, "a mapping"),
        (bytes, "binary data"),
        (set, "a set"),
    ):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _build(path: Path, raw: object, lines: dict[str, int]) -> Config:
    where = f"configuration file {path}"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {_kind(raw)}")

    def at(key: str) -> str:
        return f"line {lines[key]}: " if key in lines else ""

    unknown = [k for k in raw if not (isinstance(k, str) and k in _KNOWN)]
    if unknown:
        names = ", ".join(
            (k if isinstance(k, str) else repr(k))
            + (f" (line {lines[str(k)]})" if str(k) in lines else "")
            for k in unknown
        )
        raise ConfigError(
            f"{where}: unknown keys: {names}; known keys: {', '.join(sorted(_KNOWN))}"
        )
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _INT_KEYS:
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                values[key] = value
            else:
                got = (
                    str(value)
                    if isinstance(value, int) and not isinstance(value, bool)
                    else "a string (leave out the quotes)"
                    if isinstance(value, str)
                    else _kind(value)
                )
                problems.append(f"{at(key)}{key}: expected a positive integer, got {got}")
        elif not isinstance(value, str):
            what = "a path" if key in _PATH_KEYS else "a string"
            problems.append(f"{at(key)}{key}: expected {what}, got {_kind(value)}")
        elif not value.strip():
            problems.append(f"{at(key)}{key}: must not be empty")
        elif _CONTROL.search(value):
            problems.append(f"{at(key)}{key}: contains a control character")
        elif key == "role" and value not in _ROLES:
            problems.append(f"{at(key)}role: {value!r} is neither 'provider' nor 'tenant'")
        elif key == "tenant" and not _NAME.fullmatch(value):
            problems.append(
                f"{at(key)}tenant: {value!r} is not a tenant name (a letter, then up to 62 "
                "letters, digits, '.', '_' or '-')"
            )
        elif key in _PATH_KEYS:
            p = Path(value)
            values[key] = p if p.is_absolute() else (path.parent / p)
        else:
            values[key] = value
    if len(problems) == 1:
        raise ConfigError(f"{where}: {problems[0]}", detail={"errors": problems})
    if problems:
        raise ConfigError(
            f"{len(problems)} problems in {where}:\n  " + "\n  ".join(problems),
            detail={"errors": problems},
        )
    return Config(source=path, **values)


def dump(values: dict[str, Any]) -> str:
    """Serialise a config mapping the way the lab writes it."""
    clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
    return yaml.safe_dump(clean, sort_keys=True)
