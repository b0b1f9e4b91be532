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


# Debian 12's /etc/pam.d/sshd session lines (openssh-server 9.2p1), as in the image.
DEBIAN_PAM_SSHD = """\
@include common-auth
account    required     pam_nologin.so
@include common-account
session [success=ok ignore=ignore module_unknown=ignore default=bad]        pam_selinux.so close
session    required     pam_loginuid.so
session    optional     pam_keyinit.so force revoke
@include common-session
session    optional     pam_motd.so  motd=/run/motd.dynamic
session    optional     pam_motd.so noupdate
session    optional     pam_mail.so standard noenv # [1]
session    required     pam_limits.so
session    required     pam_env.so # [1]
session    required     pam_env.so user_readenv=1 envfile=/etc/default/locale
session [success=ok ignore=ignore module_unknown=ignore default=bad]        pam_selinux.so open
@include common-password
"""


def test_image_script_drops_motd_and_mail_from_sshds_pam_stack(tmp_path: Path) -> None:
    """No pam_motd (five processes in every SSH session, and Debian's uname shown to
    whoever logged in) and no pam_mail; every other line stays. Runs the script's own
    PAM lines on a copy of Debian's file."""
    text = (REPO / "vagrant" / "appliance-image.sh").read_text()
    all_lines = text.splitlines()
    first = next(i for i, line in enumerate(all_lines) if "/etc/pam.d/sshd" in line)
    last = next(i for i in range(first, len(all_lines)) if all_lines[i] == "fi")
    lines = all_lines[first : last + 1]  # the PAM block, through the back-off hook's "fi"
    pam = tmp_path / "sshd"
    pam.write_text(DEBIAN_PAM_SSHD)
    script = "\n".join(line.replace("/etc/pam.d/sshd", str(pam)) for line in lines)
    script = script.replace("/usr/local/sbin/hsm-backoff", "HOOK")
    subprocess.run(["bash", "-euc", script], check=True, timeout=60)
    got = pam.read_text().splitlines()
    assert not [line for line in got if "pam_motd" in line or "pam_mail" in line]
    kept = [
        line
        for line in DEBIAN_PAM_SSHD.splitlines()
        if "pam_motd" not in line and "pam_mail" not in line
    ]
    assert [line for line in got if "HOOK" not in line] == [
        line.replace("required     pam_loginuid", "optional     pam_loginuid") for line in kept
    ]
