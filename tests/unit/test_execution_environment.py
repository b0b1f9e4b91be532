"""execution-environment.yml (ansible-builder v3): ``ansible-builder create`` makes the
build context with the hsmctl wheel and the hsmctl.fleet collection in it and a
Containerfile that installs both. Building the image needs quay.io, which this machine
cannot reach; the context is what can be proven here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hsmctl.runner.adapter import COLLECTION
from tests.checkout_copy import REPO, copy_checkout

pytestmark = pytest.mark.unit

BIN = Path(sys.executable).parent


def test_ansible_builder_create_makes_the_build_context(tmp_path: Path) -> None:
    definition = yaml.safe_load((REPO / "execution-environment.yml").read_text())
    assert definition["version"] == 3
    src = copy_checkout(tmp_path / "src")
    env = {**os.environ, "HOME": str(tmp_path), "ANSIBLE_CONFIG": str(tmp_path / "e.cfg")}
    (tmp_path / "e.cfg").write_text("")
    dist = src / "dist"
    subprocess.run([str(BIN / "pip"), "wheel", "-q", "--no-deps", "-w", str(dist), str(src)],
                   check=True, env=env, capture_output=True, timeout=600)  # fmt: skip
    subprocess.run([str(BIN / "ansible-galaxy"), "collection", "build", str(COLLECTION),
                    "--output-path", str(dist)],
                   check=True, env=env, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = dist.glob("hsmctl-*.whl")
    (collection,) = dist.glob("hsmctl-fleet-*.tar.gz")
    context = tmp_path / "context"
    proc = subprocess.run(
        [str(BIN / "ansible-builder"), "create", "-f", str(src / "execution-environment.yml"),
         "--context", str(context), "--output-filename", "Containerfile"],
        cwd=src, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    build = context / "_build"
    assert (build / "hsmctl" / wheel.name).read_bytes() == wheel.read_bytes()
    assert (build / "hsmctl" / collection.name).read_bytes() == collection.read_bytes()
    containerfile = (context / "Containerfile").read_text()
    assert "quay.io/centos/centos:stream9" in containerfile
    assert "/tmp/hsmctl/hsmctl-*.whl" in containerfile
    assert "ansible-galaxy collection install /tmp/hsmctl/hsmctl-fleet-*.tar.gz" in containerfile
    # hsmctl's own ranges of ansible-core and ansible-runner (pyproject.toml).
    assert 'ANSIBLE_INSTALL_REFS="ansible-core>=2.19,<2.20 ansible-runner>=2.4,<2.5"' in (
        containerfile
    )
    shutil.rmtree(src)
