"""Health over time against the lab (issue 15, item 1 acceptance).

Appliances: APPLIANCE_SETS["health"] (hsm31..hsm34) only, each test with a provider
configuration and state store of its own. Faults are injected with the real
``hsmctl lab fault`` (the appliance's own sensor module on its console) and read by
``hsmctl health`` out of band; alerts go to a UDP syslog receiver on 127.0.0.1 that the
test owns. Every test clears its faults and returns its appliances to the factory state.

* PSU fault: one bad poll raises nothing; the K-th within the window raises ``psu1``
  (JSON, Prometheus textfile, a syslog "raised"); after the fault is cleared the next poll
  clears it (syslog "cleared", ``last_ok`` moves on).
* ``off``: the appliance stops answering (unreachable, out-of-band power off); ``clear``
  brings it back.
* A customer who disabled ``monitor`` at takeover: "no telemetry (customer choice)" and
  no alert, even with a failed power supply and K=1.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hsmctl.lab.rig import Rig, factory_reset, takeover_cli
from tests.conftest import APPLIANCE_SETS, ensure_lab, hsmctl, provider_config

pytestmark = pytest.mark.lab

PSU, OFF, OWNED = APPLIANCE_SETS["health"][:3]
NO_TELEMETRY = "no telemetry (customer choice)"


@pytest.fixture(scope="module")
def lab(_lab_session: None) -> dict[str, Any]:
    return ensure_lab()


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(30)
    yield sock
    sock.close()


def fault(appliance: str, kind: str) -> None:
    proc = hsmctl("lab", "fault", appliance, kind, "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["fault"] == kind


def poll(conf: Path, *args: str) -> tuple[int, dict[str, Any]]:
    proc = hsmctl("--config", str(conf), "health", *args, "--json")
    text = proc.stdout.decode()
    body = json.loads(text)
    assert text.strip() == json.dumps(body)  # one JSON object, nothing else
    if proc.returncode:
        body = body["error"]
    rows = {r["id"]: r for r in body["appliances"]}
    return proc.returncode, rows


def received(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting now (the sender exited after sending: they are queued)."""
    out = [sock.recv(65535)]
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(65535))
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)
        sock.settimeout(30)
    return out


def nothing_received(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(65535)
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)
        sock.settimeout(30)
    return False


def test_psu_fault_alerts_after_k_polls_and_clears(
    lab: dict[str, Any], tmp_path: Path, receiver: socket.socket
) -> None:
    conf = provider_config(tmp_path / "p", [PSU])
    settings = yaml.safe_load(conf.read_text())
    port = receiver.getsockname()[1]
    settings.update(health_syslog=f"udp://127.0.0.1:{port}", health_alert_polls=3)
    conf.write_text(yaml.safe_dump(settings))
    factory_reset(PSU)
    textfile = tmp_path / "hsmctl.prom"
    try:
        code, rows = poll(conf, PSU)
        assert code == 0 and rows[PSU]["problems"] == [] and rows[PSU]["alerts"] == []
        assert rows[PSU]["telemetry"] == "ok" and rows[PSU]["last_ok"]
        first_ok = rows[PSU]["last_ok"]
        assert set(rows[PSU]) >= {"id", "state", "reachable", "alerts", "last_ok"}

        fault(PSU, "psu1")
        for n in (1, 2):
            code, rows = poll(conf, PSU, "--alert-window", "60")
            assert code == 0
            assert rows[PSU]["problems"] == ["psu1"], n
            assert rows[PSU]["alerts"] == [], f"an alert after {n} bad poll(s)"
            assert rows[PSU]["last_ok"] == first_ok
        assert nothing_received(receiver)

        code, rows = poll(conf, PSU, "--textfile", str(textfile))
        assert code == 0
        (alert,) = rows[PSU]["alerts"]
        assert alert["kind"] == "psu1" and alert["cleared_at"] is None
        (msg,) = received(receiver)
        assert msg.startswith(b"<132>1 ")  # local0.warning, RFC 5424 version 1
        assert f" {PSU} hsmctl-health - alert-raised [hsmHealth@32473 ".encode() in msg
        assert b'kind="psu1" state="raised" polls="3" window="3600"' in msg
        prom = textfile.read_text()
        assert f'hsmctl_appliance_alert{{appliance="{PSU}",region="lab",' in prom
        assert 'kind="psu1"} 1' in prom
        assert textfile.stat().st_mode & 0o777 == 0o644

        code, rows = poll(conf, PSU)  # still failed: the alert stays, nothing is re-sent
        assert len(rows[PSU]["alerts"]) == 1 and nothing_received(receiver)

        fault(PSU, "clear")
        code, rows = poll(conf, PSU)
        assert code == 0 and rows[PSU]["alerts"] == [] and rows[PSU]["problems"] == []
        assert rows[PSU]["last_ok"] > first_ok
        (msg,) = received(receiver)
        assert b"alert-cleared" in msg and b'state="cleared"' in msg
        assert msg.startswith(b"<133>1 ")  # local0.notice
    finally:
        fault(PSU, "clear")


def test_off_is_unreachable_and_clear_restores(lab: dict[str, Any], tmp_path: Path) -> None:
    conf = provider_config(tmp_path / "p", [OFF])
    factory_reset(OFF)
    try:
        fault(OFF, "off")
        code, rows = poll(conf, OFF, "--alert-polls", "1")
        assert code == 4
        row = rows[OFF]
        assert row["reachable"] is False
        assert {"unreachable", "power-off"} <= set(row["problems"])
        assert {a["kind"] for a in row["alerts"]} >= {"unreachable", "power-off"}
    finally:
        fault(OFF, "clear")
    code, rows = poll(conf, OFF, "--alert-polls", "1")
    assert code == 0 and rows[OFF]["reachable"] is True and rows[OFF]["alerts"] == []


def test_monitor_disabled_by_the_customer_is_no_telemetry(
    lab: dict[str, Any], tmp_path: Path
) -> None:
    rig = Rig(lab, OWNED, "tenant1", tmp_path / "rig")
    try:
        rig.provision()
        code, rows = poll(rig.provider_conf, OWNED)
        assert code == 0 and rows[OWNED]["monitor"] == "ok"
        assert rows[OWNED]["telemetry"] == "ok"

        done = takeover_cli(rig.netns, rig.tenant_conf(tmp_path / "tenant"), rig.handoff)
        assert done.returncode == 0, done.stderr.decode()
        fault(OWNED, "psu1")
        for _ in range(2):
            code, rows = poll(rig.provider_conf, OWNED, "--alert-polls", "1")
            row = rows[OWNED]
            assert code == 0
            assert row["telemetry"] == NO_TELEMETRY
            assert row["monitor"] == "refused" and row["state"] == "customer-owned"
            assert row["alerts"] == [] and row["problems"] == [] and row["sensors"] is None
    finally:
        fault(OWNED, "clear")
        factory_reset(OWNED)
