"""Configuration lookup: ``--config FILE`` > ``$HSMCTL_CONFIG`` > ``/etc/hsmctl/hsmctl.yaml``.

The file is YAML. Provider hosts name ``state_dir`` (and optionally ``database_url``,
``inventory``, ``provider_key``, ``monitor_key``, ``signing_key``, and the drivers
``fabric`` and ``out_of_band``, both ``lab`` by default); tenant hosts name ``state_dir``,
``identity`` and ``provider_public_key``. Unknown keys are refused so typos surface.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hsmctl.errors import ConfigError

DEFAULT_PATH = Path("/etc/hsmctl/hsmctl.yaml")
ENV_VAR = "HSMCTL_CONFIG"

_PATH_KEYS = (
    "state_dir",
    "identity",
    "provider_public_key",
    "inventory",
    "provider_key",
    "monitor_key",
    "lab_dir",
    "signing_key",
)
_KNOWN = {"role", "tenant", "database_url", "fabric", "out_of_band", *_PATH_KEYS}


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
    lab_dir: Path | None = None
    signing_key: Path | None = None
    database_url: str | None = None
    fabric: str = "lab"
    out_of_band: str = "lab"
    extra: dict[str, Any] = field(default_factory=dict)

    def require(self, name: str) -> Any:
        value = getattr(self, name)
        if value is None:
            where = self.source or "no configuration file"
            raise ConfigError(f"{where}: '{name}' is not set")
        return value


def resolve_path(explicit: str | None) -> Path | None:
    """Which file to read; None when no file exists anywhere in the lookup order."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return DEFAULT_PATH if DEFAULT_PATH.exists() else None


def load(explicit: str | None = None) -> Config:
    path = resolve_path(explicit)
    if path is None:
        return Config(source=None)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"configuration file {path} does not exist") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"configuration file {path}: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"configuration file {path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        raise ConfigError(f"configuration file {path}: unknown keys: {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _PATH_KEYS and value is not None:
            p = Path(str(value))
            values[key] = p if p.is_absolute() else (path.parent / p)
        else:
            values[key] = value
    return Config(source=path, **values)


def dump(values: dict[str, Any]) -> str:
    """Serialise a config mapping the way the lab writes it."""
    clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
    return yaml.safe_dump(clean, sort_keys=True)
