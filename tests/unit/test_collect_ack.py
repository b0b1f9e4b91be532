"""``logs collect``'s acknowledgement (issue 15): after the archive is committed the
collector sends ``audit ack LAST_SEQ`` on the export's connection; whatever happens to the
ack, the verified collection stands and the report says what became of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from hsmctl.collect.collector import ApplianceReport, ack_command, acknowledge
from hsmctl.errors import UnreachableError
from hsmctl.ssh.errors import Result

pytestmark = pytest.mark.unit


@dataclass
class FakeConnection:
    """What :func:`acknowledge` uses of a DeviceConnection: ``connected`` and ``run``."""

    status: int = 0
    stderr: str = ""
    raises: Exception | None = None
    connected: bool = True
    sent: list[tuple[str, Any]] = field(default_factory=list)

    def run(self, command: str, *, check: bool = True, timeout: float | None = None) -> Result:
        assert check is False  # a refusal is reported, never raised
        self.sent.append((command, timeout))
        if self.raises is not None:
            raise self.raises
        return Result(command, self.status, "", self.stderr)


def test_the_ack_names_the_last_archived_record() -> None:
    conn = FakeConnection()
    assert acknowledge(conn, 4711, 30.0) == (4711, None)  # type: ignore[arg-type]
    assert conn.sent == [("audit ack 4711", 30.0)]
    assert ack_command(1) == "audit ack 1"
    with pytest.raises(ValueError):
        ack_command(0)


@pytest.mark.parametrize(
    ("conn", "left", "why"),
    [
        (FakeConnection(status=77, stderr="error: cannot acknowledge record 9\n"), 5.0,
         "device exit 77: error: cannot acknowledge record 9"),
        (FakeConnection(status=64, stderr="error: unknown command 'audit ack'\n"), 5.0,
         "unknown command"),  # firmware from before retention
        (FakeConnection(raises=UnreachableError("198.19.0.41: connection reset")), 5.0,
         "connection reset"),
        (FakeConnection(connected=False), 5.0, "connection is gone"),
        (FakeConnection(), 0.0, "no time left"),
        (None, 5.0, "connection is gone"),
    ],
)  # fmt: skip
def test_a_failed_ack_is_reported_not_raised(conn: Any, left: float, why: str) -> None:
    acked, error = acknowledge(conn, 12, left)
    assert acked is None and error is not None and why in error


def test_the_report_carries_the_ack_and_keeps_its_exit_code() -> None:
    ok = ApplianceReport("hsm41", 10, 120, True, acked_seq=120)
    failed = ApplianceReport("hsm42", 10, 120, True, ack_error="device exit 77: no")
    assert ok.as_dict()["acked_seq"] == 120 and "ack_error" not in ok.as_dict()
    assert failed.as_dict()["ack_error"] == "device exit 77: no" and failed.exit_code == 0
    plain = ApplianceReport("hsm43", 0, 120, True).as_dict()
    assert set(plain) == {"appliance", "new_records", "last_seq", "verified"}
