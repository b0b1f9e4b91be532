"""The fleet's health and capacity in the Prometheus text exposition format (0.0.4), for
``hsmctl health --format prometheus`` and node_exporter's textfile collector
(``--textfile PATH``, written whole or not at all).

Gauges, one sample per appliance (labels ``appliance``, ``region``, ``stamp``) unless
said otherwise::

    hsmctl_appliance_up                 1 if it answered on the management network
    hsmctl_appliance_telemetry          1 sensors read, 0 unavailable or customer choice
    hsmctl_appliance_alerts             active alerts
    hsmctl_appliance_alert              1 per active alert (label ``kind``)
    hsmctl_appliance_last_ok_timestamp_seconds   the last poll that found nothing wrong
    hsmctl_appliance_temperature_celsius, hsmctl_appliance_psu_ok{psu},
    hsmctl_appliance_fan_rpm{fan}       out-of-band sensor readings (when read)
    hsmctl_fleet_appliances{region,stamp,state}  appliances per state in the store
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from hsmctl.errors import UsageError
from hsmctl.privatefiles import fsync_dir
from hsmctl.provider.health import HealthReport

HELP = {
    "hsmctl_appliance_up": "1 if the appliance answered on the management network.",
    "hsmctl_appliance_telemetry": "1 if its out-of-band sensors were read in the poll.",
    "hsmctl_appliance_alerts": "Active health alerts of the appliance.",
    "hsmctl_appliance_alert": "1 for each active health alert, by kind.",
    "hsmctl_appliance_last_ok_timestamp_seconds": "Time of the last poll that found nothing wrong.",
    "hsmctl_appliance_temperature_celsius": "Temperature read out of band.",
    "hsmctl_appliance_psu_ok": "1 if the power supply reports ok.",
    "hsmctl_appliance_fan_rpm": "Fan speed read out of band.",
    "hsmctl_fleet_appliances": "Appliances in the state store, by region, stamp and state.",
}


def _label(value: object) -> str:
    text = str(value)
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample(name: str, labels: Mapping[str, object], value: float) -> str:
    inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
    number = repr(float(value)) if not float(value).is_integer() else str(int(value))
    return f"{name}{{{inner}}} {number}"


def render(report: HealthReport) -> str:
    """The exposition text of one health report (pure)."""
    samples: dict[str, list[str]] = {name: [] for name in HELP}
    for row in report.rows:
        a = row.assessment
        base = {"appliance": a.appliance, "region": row.region or "", "stamp": row.stamp or ""}
        samples["hsmctl_appliance_up"].append(_sample("hsmctl_appliance_up", base, a.reachable))
        samples["hsmctl_appliance_telemetry"].append(
            _sample("hsmctl_appliance_telemetry", base, a.telemetry == "ok")
        )
        samples["hsmctl_appliance_alerts"].append(
            _sample("hsmctl_appliance_alerts", base, len(row.alerts))
        )
        for alert in row.alerts:
            samples["hsmctl_appliance_alert"].append(
                _sample("hsmctl_appliance_alert", {**base, "kind": alert.kind}, 1)
            )
        if row.last_ok is not None:
            samples["hsmctl_appliance_last_ok_timestamp_seconds"].append(
                _sample(
                    "hsmctl_appliance_last_ok_timestamp_seconds", base, int(row.last_ok.timestamp())
                )
            )
        s = a.sensors
        if s is not None:
            temp = s.get("temperature_c")
            if isinstance(temp, int | float):
                samples["hsmctl_appliance_temperature_celsius"].append(
                    _sample("hsmctl_appliance_temperature_celsius", base, temp)
                )
            for psu, state in sorted((s.get("psu") or {}).items()):
                samples["hsmctl_appliance_psu_ok"].append(
                    _sample("hsmctl_appliance_psu_ok", {**base, "psu": psu}, state == "ok")
                )
            for fan, rpm in sorted((s.get("fans") or {}).items()):
                if isinstance(rpm, int | float):
                    samples["hsmctl_appliance_fan_rpm"].append(
                        _sample("hsmctl_appliance_fan_rpm", {**base, "fan": fan}, rpm)
                    )
    for (region, stamp, state), count in sorted(report.capacity.items()):
        samples["hsmctl_fleet_appliances"].append(
            _sample(
                "hsmctl_fleet_appliances",
                {"region": region, "stamp": stamp, "state": state},
                count,
            )
        )
    return "".join(_family(name, lines) for name, lines in samples.items() if lines)


def _family(name: str, lines: Iterable[str]) -> str:
    body = "".join(line + "\n" for line in lines)
    return f"# HELP {name} {HELP[name]}\n# TYPE {name} gauge\n{body}"


def write_textfile(path: Path, text: str) -> None:
    """Atomically replace ``path`` (node_exporter reads ``*.prom`` files whole): a
    temporary beside it, fsynced, renamed, 0644 so the exporter's user can read it."""
    if path.suffix != ".prom":
        raise UsageError(f"--textfile {path}: node_exporter reads only *.prom files")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise UsageError(f"--textfile {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
