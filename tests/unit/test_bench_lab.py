"""bench lab's pure parts: which part of an appliance a process is, smaps_rollup parsed,
medians over samples (the numbers docs/performance.md quotes)."""

from __future__ import annotations

import pytest

from bench.bench_lab import Appliance, read_rollup, role_of, summarise

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("cmdline", "role"),
    [
        ("unshare --mount --uts --pid --fork --propagation private /x/boot.sh", "launcher"),
        ("/usr/bin/python3 -I /usr/local/sbin/hsm-boot", "hsm-boot"),
        ("/usr/bin/python3 -I /usr/local/sbin/hsmd", "hsmd"),
        ("/usr/bin/python3 -m hsmctl.appliance.tokencli --fork-server", "token-forks"),
        ("sshd: /usr/sbin/sshd -D -f /etc/hsm/sshd_mgmt_config -o ListenAddress=x", "sshd-mgmt"),
        ("/usr/sbin/sshd -D -f /etc/hsm/sshd_data_config -o ListenAddress=y", "sshd-data"),
        ("sshd: admin@notty", "other"),
    ],
)
def test_role_of(cmdline: str, role: str) -> None:
    assert role_of(cmdline) == role


def test_read_rollup() -> None:
    text = (
        "55d0-7ffd ---p 00000000 00:00 0    [rollup]\n"
        "Rss:               28488 kB\nPss:               14089 kB\n"
        "Private_Dirty:     14024 kB\n"
    )
    assert read_rollup(text) == {"Rss": 28488, "Pss": 14089, "Private_Dirty": 14024}


def test_summarise_medians_and_per_appliance_boot() -> None:
    def appliance(ident: str, boot: float, hsmd: int) -> Appliance:
        return Appliance(ident, {"hsm-boot": 1024, "hsmd": hsmd}, private_kb=2048, boot_s=boot)

    samples = [
        [appliance("hsm01", 1.0, 2048), appliance("hsm02", 3.0, 4096)],
        [appliance("hsm01", 1.0, 2048), appliance("hsm02", 3.0, 4096)],
    ]
    out = summarise(samples, {"up_seconds": 10.0})
    assert out["appliances"] == 2
    assert out["pss_mb_per_appliance"] == 4.0  # median of 3 MB and 5 MB
    assert out["pss_mb_by_role"]["hsmd"] == 3.0
    assert out["pss_mb_all_appliances"] == 8.0
    assert (out["boot_s_median"], out["boot_s_max"]) == (2.0, 3.0)
    assert out["lab_up_seconds_per_appliance"] == 5.0
