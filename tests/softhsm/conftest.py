"""Shared by the SoftHSM tier: the key-policy module, built once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "hsmctl" / "appliance" / "p11" / "build.sh"
HEADER = Path("/usr/include/p11-kit-1/p11-kit/pkcs11.h")
OPENSSL_HEADER = Path("/usr/include/openssl/rsa.h")  # policy.c decodes OAEP with libcrypto


@pytest.fixture(scope="session")
def policy_so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [
        name
        for name, ok in (
            ("gcc", shutil.which("gcc")),
            ("libp11-kit-dev", HEADER.exists()),
            ("libssl-dev", OPENSSL_HEADER.exists()),
        )
        if not ok
    ]
    if missing:
        reason = f"cannot build the policy module: {', '.join(missing)} not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI installs it: scripts/install-deps.sh)")
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("p11policy") / "hsm-policy.so"
    subprocess.run(["bash", str(BUILD), str(out)], check=True)
    return out
