"""The appliance's per-command entry points start Python with ``-I -S`` (no site module:
~3 ms of every ``hsmsh`` start). That holds only while everything they import, lazily
too, is the standard library or /opt/hsmctl/lib: this runs each one's whole import
closure under the same flags, and reads the flags from the image script."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SCRIPT = ROOT / "vagrant" / "appliance-image.sh"

# Each -S entry's module and what it imports inside functions.
NO_SITE = {
    "hsmsh": ["hsmctl.appliance.shell"],
    "hsm-p11": ["hsmctl.appliance.p11entry", "hsmctl.appliance.protocol", "io"],
    "hsm-backoff": ["hsmctl.appliance.backoff"],
}

PROBE = """
import sys
sys.path.insert(0, {root!r})
import importlib
for name in {modules!r}:
    importlib.import_module(name)
foreign = sorted(
    m for m, mod in sys.modules.items()
    if "-packages" in (getattr(mod, "__file__", None) or "")
)
assert sys.flags.no_site == 1 and "site" not in sys.modules, "site was imported"
print(",".join(foreign))
"""


@pytest.mark.parametrize("entry", sorted(NO_SITE))
def test_the_entry_imports_nothing_from_site_packages(entry: str) -> None:
    code = PROBE.format(root=str(ROOT), modules=NO_SITE[entry])
    proc = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", "-c", code], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"{entry} needs site-packages: {proc.stdout}"


def test_the_image_script_gives_those_entries_no_site_and_the_daemons_site() -> None:
    text = IMAGE_SCRIPT.read_text()
    flags = dict(re.findall(r"\b(hsmsh|hsmd|hsm-boot|hsm-p11):hsmctl\.appliance\.\w+:(-\w+)", text))
    assert flags == {"hsmsh": "-IS", "hsm-p11": "-IS", "hsmd": "-I", "hsm-boot": "-I"}
    assert "exec /usr/bin/python3 -I -S -c 'import sys; " in text  # hsm-backoff
