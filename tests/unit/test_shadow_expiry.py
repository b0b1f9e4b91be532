"""``accounts.shadow_expiry`` (read by every ``hsm show``) against ``chage -l`` itself,
run on the same /etc/shadow text in a root of its own (``chage --root``): wherever it
answers, chage shows "never" exactly when it says "never", on the entries the device
writes (``usermod --expiredate ''`` / ``1``) and on hostile ones (bad numbers, field
counts, duplicates, a missing entry: there it leaves the answer to chage)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hsmctl.appliance import accounts

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(os.geteuid() != 0, reason="chage --root needs chroot(2): root only"),
]

PASSWD = "root:x:0:0:root:/root:/bin/sh\nmonitor:x:998:998::/var/lib/hsm/home/monitor:/bin/sh\n"


def chage_never(root: Path, shadow: str, user: str = "monitor") -> bool | None:
    """chage's "Account expires" is "never" (True), a date (False), absent (None)."""
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc" / "passwd").write_text(PASSWD)
    path = root / "etc" / "shadow"
    path.write_text(shadow)
    path.chmod(0o600)
    proc = subprocess.run(["chage", "--root", str(root), "-l", user], capture_output=True,
                          text=True, check=False, env={"LC_ALL": "C"}, timeout=30)  # fmt: skip
    for line in proc.stdout.splitlines():
        if line.startswith("Account expires"):
            return line.split(":", 1)[1].strip() == "never"
    return None


ROOT_LINE = "root:*:19000:0:99999:7:::\n"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("monitor:*:20000:0:99999:7:::", "never"),  # usermod --expiredate ''
        ("monitor:*:20000:0:99999:7::1:", "date"),  # usermod --expiredate 1 (locked)
        ("monitor:$y$j9T$abc$def:20000:0:99999:7::0:", "date"),
        ("monitor:*:20000:::::30000:", "date"),  # a future date is not "never"
        ("monitor:!*:::::::", "never"),
    ],
)
def test_the_entries_the_device_writes(tmp_path: Path, entry: str, expected: str) -> None:
    shadow = ROOT_LINE + entry + "\n"
    assert accounts.shadow_expiry(shadow, "monitor") == expected
    assert chage_never(tmp_path, shadow) is (expected == "never")


@pytest.mark.parametrize(
    "shadow",
    [
        ROOT_LINE,  # no entry: chage shows "never"
        ROOT_LINE + "monitor:*:20000:0:99999:7::x:\n",  # chage drops the entry: "never"
        ROOT_LINE + "monitor:*:20000:0:99999:7::-1:\n",
        ROOT_LINE + "monitor:*:20000:0:99999:7::1\n",  # 8 fields
        ROOT_LINE + "monitor:*:20000:0:99999:7::1::\n",  # 10 fields
        ROOT_LINE + "monitor:*:x:0:99999:7::1:\n",  # another field unreadable
        ROOT_LINE + "monitor:*:20000:0:99999:7::1:\nmonitor:*:20000:0:99999:7:::\n",
    ],
)
def test_anything_unusual_is_left_to_chage(tmp_path: Path, shadow: str) -> None:
    assert accounts.shadow_expiry(shadow, "monitor") is None
    assert chage_never(tmp_path, shadow) is not None  # chage still answers something


WELL = st.one_of(st.just(""), st.integers(0, 10**9 - 1).map(str))
HOSTILE = st.sampled_from(["-1", "+1", " 1", "1 ", "0x10", "1e3", "99999999999999999999", "x",
                           "\t", "\u0663", "1234567890"])  # fmt: skip


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    fields=st.lists(WELL, min_size=7, max_size=7),
    hostile=st.none() | st.tuples(st.integers(0, 6), HOSTILE),
    count=st.sampled_from([7, 7, 7, 6, 8, 3]),
    password=st.sampled_from(["*", "!", "", "$y$j9T$a$b", "!*"]),
    before=st.sampled_from(["", ROOT_LINE, "monitorx:*:1:::::1:\n", "monito:*:1::::::\n"]),
    twice=st.booleans(),
)
def test_wherever_it_answers_chage_agrees(
    tmp_path: Path,
    fields: list[str],
    hostile: tuple[int, str] | None,
    count: int,
    password: str,
    before: str,
    twice: bool,
) -> None:
    if hostile is not None:
        fields[hostile[0]] = hostile[1]
    fields = [*fields, "1"][:count]
    entry = ":".join(["monitor", password, *fields]) + "\n"
    shadow = before + entry + (entry if twice else "")
    mine = accounts.shadow_expiry(shadow, "monitor")
    event(f"{mine or 'left to chage'}")
    if mine is not None:  # (chage itself hangs on some entries it is left: not asked)
        assert chage_never(tmp_path, shadow) is (mine == "never"), shadow
