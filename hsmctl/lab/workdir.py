"""The lab's directory and its record: ``lab.json`` says what ``lab up`` made, so
``lab down`` can always undo a partial lab."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hsmctl import config as config_mod
from hsmctl import privatefiles
from hsmctl.errors import ConflictError, UsageError

DEFAULT_LAB_DIR = Path("/var/lib/hsmctl-lab")
LAB_DIR = Path(os.environ.get("HSMCTL_LAB_DIR", str(DEFAULT_LAB_DIR)))
# Both overridable so that a second lab (say the VM tier's) can be brought up beside the
# one in the default places while developing; users and CI use the defaults.
HOST_CONFIG = Path(os.environ.get("HSMCTL_LAB_HOST_CONFIG", str(config_mod.DEFAULT_PATH)))
NETNS_ETC = Path("/etc/netns")
MARKER = "# written by hsmctl lab up; removed by hsmctl lab down\n"


def require_root() -> None:
    if os.geteuid() != 0:
        raise UsageError("the lab needs root (it creates network namespaces and routes)")


def state_path() -> Path:
    return LAB_DIR / "lab.json"


def load_state() -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(state_path().read_text())
    except FileNotFoundError:
        return None
    return data


def save_state(state: dict[str, Any]) -> None:
    LAB_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = json.dumps(state, indent=2, sort_keys=True) + "\n"
    privatefiles.write_atomic(state_path(), text.encode())


def up_state() -> dict[str, Any]:
    """The record of the lab that is up; ``ConflictError`` if none is."""
    state = load_state()
    if state is None or state.get("phase") != "up":
        raise ConflictError("no lab is up (run 'hsmctl lab up')")
    return state


def foreign_host_config() -> bool:
    """A host config the lab did not write (and so must not touch) is there."""
    return HOST_CONFIG.exists() and not HOST_CONFIG.read_text().startswith(MARKER)


def appliance_dir(ident: str) -> Path:
    return LAB_DIR / "appliances" / ident


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    privatefiles.write_atomic(path, text.encode(), mode=mode)
