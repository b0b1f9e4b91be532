"""Health over time, the pure parts: the alert rule (polls in, transitions out), the
sensor judgement, the RFC 5424 alert message, the Prometheus text, the textfile write,
and what a poll of a customer who disabled monitoring reports."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hsmctl.appliance import sensors
from hsmctl.contract import OwnerState
from hsmctl.errors import UsageError
from hsmctl.provider import alerts as al
from hsmctl.provider import health as hl
from hsmctl.provider import metrics
from hsmctl.state.healthlog import AlertRow
from hsmctl.state.model import ApplianceState
from tests.fakes import hsm_info

pytestmark = pytest.mark.unit

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
ALL = frozenset({"psu1", "psu2", "unreachable"})
RULE = al.AlertRule(polls=3, window=timedelta(minutes=60))


def polls(*spec: tuple[int, set[str]]) -> list[al.Poll]:
    """(minutes after T0, problems) -> polls that observed every kind."""
    return [al.Poll(T0 + timedelta(minutes=m), frozenset(p), ALL) for m, p in spec]


def changes(
    history: list[al.Poll], active: frozenset[str] = frozenset(), rule: al.AlertRule = RULE
) -> list[tuple[str, str, int]]:
    return [(c.kind, c.transition.value, c.count) for c in al.decide(history, active, rule)]


# -- the rule --------------------------------------------------------------------------------


def test_one_bad_poll_raises_nothing_the_kth_within_the_window_raises() -> None:
    assert changes(polls((0, {"psu1"}))) == []
    assert changes(polls((0, {"psu1"}), (10, {"psu1"}))) == []
    assert changes(polls((0, {"psu1"}), (10, {"psu1"}), (20, {"psu1"}))) == [("psu1", "raised", 3)]


def test_bad_polls_need_not_be_consecutive_but_must_be_within_the_window() -> None:
    # good polls in between: still 3 within the hour
    assert changes(polls((0, {"psu1"}), (5, set()), (10, {"psu1"}), (30, {"psu1"}))) == [
        ("psu1", "raised", 3)
    ]
    # the first bad poll is older than the window: only 2 count
    assert changes(polls((0, {"psu1"}), (50, {"psu1"}), (61, {"psu1"}))) == []
    # exactly at the window's edge is outside ((now - window, now])
    assert changes(polls((0, {"psu1"}), (30, {"psu1"}), (60, {"psu1"}))) == []


def test_an_active_alert_is_not_raised_again_and_clears_on_a_good_poll() -> None:
    bad = polls((0, {"psu1"}), (10, {"psu1"}), (20, {"psu1"}), (30, {"psu1"}))
    assert changes(bad, frozenset({"psu1"})) == []
    recovered = [*bad, al.Poll(T0 + timedelta(minutes=40), frozenset(), ALL)]
    assert changes(recovered, frozenset({"psu1"})) == [("psu1", "cleared", 4)]


def test_a_kind_the_poll_could_not_see_neither_raises_nor_clears() -> None:
    blind = al.Poll(
        T0 + timedelta(minutes=30), frozenset({"unreachable"}), frozenset({"unreachable"})
    )
    history = [*polls((0, {"psu1"}), (10, {"psu1"}), (20, {"psu1"})), blind]
    assert changes(history, frozenset({"psu1"})) == []  # the sensors were not read: still failed


def test_kinds_are_independent_and_k_is_configurable() -> None:
    history = polls((0, {"psu1"}), (1, {"psu1", "psu2"}))
    assert changes(history, rule=al.AlertRule(polls=1)) == [
        ("psu1", "raised", 2),
        ("psu2", "raised", 1),
    ]
    assert changes(history, rule=al.AlertRule(polls=2)) == [("psu1", "raised", 2)]
    with pytest.raises(UsageError):
        al.AlertRule(polls=0)
    with pytest.raises(UsageError):
        al.AlertRule(window=timedelta(0))


# -- sensors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("faults", "problems"),
    [
        ((), set()),
        (("psu1",), {"psu1"}),
        (("psu2", "fan"), {"psu2", "fan"}),
        (("temp",), {"temperature"}),
        (("off",), {"power-off"}),
    ],
)
def test_sensor_readings_to_problems(faults: tuple[str, ...], problems: set[str]) -> None:
    assert hl.sensor_problems(sensors.readings(faults)) == problems


def test_the_register_file_parses_and_a_missing_one_is_healthy() -> None:
    assert sensors.parse(None)["faults"] == []
    assert sensors.parse('{"faults": ["psu2", "bogus"], "restore": []}')["psu"]["psu2"] == "failed"
    assert sensors.parse('{"faults": ["bogus"]}')["faults"] == []


# -- assessment: telemetry -------------------------------------------------------------------

L = hl.Login


def test_monitor_disabled_by_the_customer_is_no_telemetry_and_no_problem() -> None:
    p = hl.Probe("a1", hl.Attempt(L.REFUSED), hl.Attempt(L.REFUSED))
    a = hl.assess(p, ApplianceState.CUSTOMER_OWNED)
    assert a.telemetry == al.NO_TELEMETRY and a.problems == frozenset() and a.ok
    # every sensor kind counts as observed: an alert raised before the choice clears
    assert {"psu1", "temperature", "log-disk-high-water"} <= a.observed


def test_sensors_and_log_disk_make_problems() -> None:
    info = hsm_info(OwnerState.PROVISIONED)
    disk = hl.LogDisk(used_bytes=9, limit_bytes=10, high_water_bytes=8, warning=True)
    p = hl.Probe(
        "a1",
        hl.Attempt(L.OK, info, log_disk=disk),
        hl.Attempt(L.SKIPPED),
        sensors=sensors.readings(["psu2"]),
    )
    a = hl.assess(p, ApplianceState.PROVISIONED)
    assert a.telemetry == "ok"
    assert a.problems == {"psu2", "log-disk-high-water"}
    assert a.provider_key_accepted is info.provider_access  # from hsm show, no login


def test_a_spare_asked_with_the_provider_key_is_factory() -> None:
    p = hl.Probe("a1", hl.Attempt(L.SKIPPED), hl.Attempt(L.OK), sensors=sensors.readings(()))
    a = hl.assess(p, ApplianceState.AVAILABLE)
    assert a.owner_state is OwnerState.FACTORY and a.ok and a.provider_key_accepted is True


def test_unreachable_is_a_problem_and_sensors_unavailable() -> None:
    p = hl.Probe(
        "a1",
        hl.Attempt(L.UNREACHABLE, exit_code=4),
        hl.Attempt(L.UNREACHABLE, exit_code=4),
        sensors_error="no console",
    )
    a = hl.assess(p, ApplianceState.PROVISIONED)
    assert a.problems == {"unreachable"} and a.telemetry == "unavailable" and not a.ok


# -- syslog ----------------------------------------------------------------------------------

RFC5424 = re.compile(
    rb"<(\d{1,3})>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (\S+) (\S+) - (\S+) "
    rb"\[(\S+) ([^\]]*)\] \xef\xbb\xbf(.*)"
)


def test_alert_messages_are_rfc5424() -> None:
    for transition, pri in ((al.Transition.RAISED, b"132"), (al.Transition.CLEARED, b"133")):
        event = al.Event("hsm31", "psu1", transition, T0, 3, RULE)
        m = RFC5424.fullmatch(al.syslog_message(event))
        assert m, al.syslog_message(event)
        assert m.group(1) == pri and m.group(3) == b"hsm31" and m.group(4) == b"hsmctl-health"
        assert m.group(5) == f"alert-{transition.value}".encode()
        assert m.group(6) == b"hsmHealth@32473"
        assert (
            m.group(7)
            == (
                f'appliance="hsm31" kind="psu1" state="{transition.value}" polls="3" window="3600"'
            ).encode()
        )
        assert m.group(8).startswith(b"hsm31: power supply 1 failed")


# -- Prometheus ------------------------------------------------------------------------------


def _report() -> hl.HealthReport:
    ok = hl.assess(
        hl.Probe("hsm01", hl.Attempt(L.SKIPPED), hl.Attempt(L.OK), sensors=sensors.readings([])),
        ApplianceState.AVAILABLE,
    )
    bad = hl.assess(
        hl.Probe(
            "hsm02",
            hl.Attempt(L.OK, hsm_info(OwnerState.PROVISIONED)),
            hl.Attempt(L.SKIPPED),
            sensors=sensors.readings(["psu1"]),
        ),
        ApplianceState.PROVISIONED,
    )
    alert = AlertRow(7, "hsm02", "psu1", "hsm02: power supply 1 failed", T0)
    return hl.HealthReport(
        [
            hl.Row(ok, (), T0, "r1", "s1"),
            hl.Row(bad, (alert,), None, "r1", 's"2'),
        ],
        capacity={("r1", "s1", "available"): 1, ("r1", 's"2', "provisioned"): 1},
    )


def test_prometheus_exposition() -> None:
    text = metrics.render(_report())
    lines = text.splitlines()
    assert text.endswith("\n")
    for family in ("hsmctl_appliance_up", "hsmctl_appliance_alert", "hsmctl_fleet_appliances"):
        assert f"# TYPE {family} gauge" in lines
    assert 'hsmctl_appliance_up{appliance="hsm01",region="r1",stamp="s1"} 1' in lines
    assert 'hsmctl_appliance_alerts{appliance="hsm02",region="r1",stamp="s\\"2"} 1' in lines
    assert 'hsmctl_appliance_alert{appliance="hsm02",region="r1",stamp="s\\"2",kind="psu1"} 1' in (
        lines
    )
    assert 'hsmctl_appliance_psu_ok{appliance="hsm02",region="r1",stamp="s\\"2",psu="psu1"} 0' in (
        lines
    )
    last_ok = 'hsmctl_appliance_last_ok_timestamp_seconds{appliance="hsm01",region="r1",stamp="s1"}'
    assert f"{last_ok} {int(T0.timestamp())}" in lines
    assert 'hsmctl_fleet_appliances{region="r1",stamp="s1",state="available"} 1' in lines
    # every sample line: name{labels} value
    sample = re.compile(r'[a-z_]+\{([a-z_]+="(?:[^"\\]|\\.)*",?)+\} -?[0-9.]+')
    for line in lines:
        assert line.startswith("# ") or sample.fullmatch(line), line
    # each family's HELP and TYPE once, before its samples
    names = [line.split()[2] for line in lines if line.startswith("# TYPE")]
    assert len(names) == len(set(names))


def test_textfile_is_written_whole_with_mode_0644(tmp_path: Path) -> None:
    path = tmp_path / "hsmctl.prom"
    path.write_text("old\n")
    metrics.write_textfile(path, "new\n")
    assert path.read_text() == "new\n" and path.stat().st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["hsmctl.prom"]  # no temporary left behind
    with pytest.raises(UsageError, match=r"\*\.prom"):
        metrics.write_textfile(tmp_path / "hsmctl.txt", "x")


# -- the monitor's hsm show, with and without the retention report ----------------------------

HSM_SHOW = {
    "audit_key_id": "e77c1a1758251bf7cb4bea63e5741de368eef0e05fcc64ee6379fdb48c55e62f",
    "co_pin_set": False,
    "firmware": "7.8.4-hsmctl",
    "id": "hsm31",
    "initialised": False,
    "label": "",
    "model": "hsmctl-softhsm2",
    "monitor": "enabled",
    "objects": 0,
    "owner_state": "provisioned",
    "policy": "fips",
    "provider_access": True,
    "serial": "LAB000031",
}  # recorded from hsm31 (lab), monitor enabled as after provisioning


def test_monitor_view_tolerates_firmware_without_log_disk() -> None:
    import json

    view = hl.MONITOR_VIEW.process(json.dumps(HSM_SHOW), "hsm31")
    assert view.info.owner_state is OwnerState.PROVISIONED and view.log_disk is None
    disk = {"used_bytes": 900, "limit_bytes": 1000, "high_water_bytes": 800,
            "segments": 3, "acked_seq": 10, "warning": True}  # fmt: skip
    view = hl.MONITOR_VIEW.process(json.dumps({**HSM_SHOW, "log_disk": disk}), "hsm31")
    assert view.log_disk == hl.LogDisk(900, 1000, 800, True)
    quiet = {**disk, "warning": False}
    view = hl.MONITOR_VIEW.process(json.dumps({**HSM_SHOW, "log_disk": quiet}), "hsm31")
    assert view.log_disk is not None and view.log_disk.warning is False
