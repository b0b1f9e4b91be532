"""Static checks that CI runs with the tests: the Vagrantfile validates, the shell
scripts pass shellcheck, the lab's golden-image cache key follows the image script."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hsmctl.lab import image

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def test_vagrantfile_validates() -> None:
    if shutil.which("vagrant") is None:
        pytest.fail("vagrant is not installed (scripts/install-deps.sh installs it)")
    proc = subprocess.run(
        ["vagrant", "validate", "--ignore-provider"],
        cwd=REPO / "vagrant",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validated successfully" in proc.stdout


@pytest.mark.parametrize(
    "script",
    [
        "vagrant/appliance-image.sh",
        "scripts/install-deps.sh",
        "scripts/demo.sh",
        ".ci/run",
        "hsmctl/lab/boot.sh",
    ],
)
def test_shellcheck(script: str) -> None:
    proc = subprocess.run(
        ["shellcheck", str(REPO / script)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout


def test_image_key_follows_the_script(tmp_path: Path) -> None:
    a = tmp_path / "a.sh"
    a.write_text("#!/bin/sh\necho one\n")
    b = tmp_path / "b.sh"
    b.write_text("#!/bin/sh\necho two\n")
    assert image.image_key(a) != image.image_key(b)
    assert image.image_key(a) == image.image_key(a)


def test_image_script_makes_factory_state() -> None:
    text = (REPO / "vagrant" / "appliance-image.sh").read_text()
    # per-device material is never baked into the shared image
    assert "rm -f /etc/ssh/ssh_host_*" in text
    assert "usermod --expiredate 1 monitor" in text and "usermod --expiredate 1 audit" in text
    assert "PermitRootLogin no" in text and "LogLevel VERBOSE" in text
