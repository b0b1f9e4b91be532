"""Export of archived records: RFC 5424 formatting, JSON lines, and delivery to real
syslog receivers on loopback (TCP with RFC 6587 octet counting, UDP), to files and to
stdout through the CLI."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hsmctl import auditlog
from hsmctl.cli.main import main
from hsmctl.collect.archive import Archive
from hsmctl.collect.export import (
    BOM,
    Format,
    SyslogDestination,
    export,
    octet_counted,
    syslog_message,
)
from hsmctl.errors import UnreachableError, UsageError
from tests.unit.logdevice import Device, collect, trust

pytestmark = pytest.mark.unit

# RFC 5424 §6, enough of the ABNF to take a message apart.
HEADER = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>[\x21-\x7e]{1,255}) (?P<app>[\x21-\x7e]{1,48}) "
    rb"(?P<proc>[\x21-\x7e]{1,128}) (?P<msgid>[\x21-\x7e]{1,32}) "
)
TIMESTAMP = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)|-")


def parse_sd(data: bytes) -> tuple[str, dict[str, str], bytes]:
    """One SD-ELEMENT with its escapes (RFC 5424 §6.3.3); returns id, params, the rest."""
    assert data[:1] == b"["
    text = data.decode("utf-8")
    i = 1
    sd_id = ""
    while text[i] not in " ]":
        sd_id += text[i]
        i += 1
    params: dict[str, str] = {}
    while text[i] == " ":
        i += 1
        name = ""
        while text[i] != "=":
            assert text[i] not in ' ]"'
            name += text[i]
            i += 1
        assert text[i + 1] == '"'
        i += 2
        value = ""
        while text[i] != '"':
            if text[i] == "\\" and text[i + 1] in '"\\]':
                i += 1
            else:
                assert text[i] != "]", "unescaped ] in a PARAM-VALUE"
            value += text[i]
            i += 1
        params[name] = value
        i += 1
    assert text[i] == "]"
    return sd_id, params, text[i + 1 :].encode("utf-8")


def parse(message: bytes) -> dict[str, Any]:
    m = HEADER.match(message)
    assert m, message[:120]
    assert TIMESTAMP.fullmatch(m["ts"]), m["ts"]
    sd_id, params, rest = parse_sd(message[m.end() :])
    assert rest.startswith(b" " + BOM)
    return {
        "pri": int(m["pri"]),
        "ts": m["ts"].decode(),
        "host": m["host"].decode(),
        "app": m["app"].decode(),
        "msgid": m["msgid"].decode(),
        "sd_id": sd_id,
        "params": params,
        "msg": rest[1 + len(BOM) :],
    }


def line(**over: Any) -> bytes:
    record = auditlog.make_record(
        None,
        time="2026-11-29T20:01:02.123456789Z",
        actor=over.pop("actor", "admin"),
        role="admin",
        source="198.19.0.4",
        event=over.pop("event", "command"),
        outcome=over.pop("outcome", "ok"),
        detail={"command": "hsm show"},
    )
    return auditlog.record_line(record)


# -- formatting ----------------------------------------------------------------------------------


def test_a_message_follows_rfc5424_and_carries_the_record() -> None:
    raw = line()
    msg = parse(syslog_message(raw, "hsm15"))
    assert msg["pri"] == 13 * 8 + 6  # log audit, informational
    assert msg["ts"] == "2026-11-29T20:01:02.123456Z"  # at most 6 fractional digits
    assert (msg["host"], msg["app"], msg["msgid"]) == ("hsm15", "hsm-audit", "command")
    assert msg["sd_id"] == "hsmAudit@32473"
    record = json.loads(raw)
    assert msg["params"] == {
        "seq": "1",
        "actor": "admin",
        "role": "admin",
        "source": "198.19.0.4",
        "outcome": "ok",
        "hash": record["hash"],
        "prev": record["prev"],
    }
    assert msg["msg"] == raw.rstrip(b"\n")  # the canonical line: a SIEM can re-verify
    assert b"\n" not in syslog_message(raw, "hsm15")


@pytest.mark.parametrize(
    "outcome, severity", [("ok", 6), ("failed", 5), ("denied", 4), ("error", 3)]
)
def test_severity_follows_the_outcome(outcome: str, severity: int) -> None:
    assert parse(syslog_message(line(outcome=outcome), "h"))["pri"] == 13 * 8 + severity


def test_header_and_sd_escaping() -> None:
    raw = line(actor='ev"il] \\ ünï', event="a b\tc" + "x" * 40)
    msg = parse(syslog_message(raw, "host name"))
    assert msg["params"]["actor"] == 'ev"il] \\ ünï'
    assert msg["msgid"] == ("a_b_c" + "x" * 40)[:32]
    assert msg["host"] == "host_name"


def test_octet_counting() -> None:
    assert octet_counted(b"<14>1 - - - - - -") == b"17 <14>1 - - - - - -"
    assert octet_counted("é".encode()) == b"2 \xc3\xa9"  # octets, not characters


# -- delivery ------------------------------------------------------------------------------------


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Archive, Device]:
    dev = Device(auditlog.SoftwareSigner.generate())
    where = tmp_path / "state" / "appliances" / "hsm15" / "archive"
    a = Archive(where, "hsm15", segment_bytes=5000)
    for _ in range(6):  # several collections: several segments, compressed ones among them
        for _ in range(5):
            dev.session(4, size=20)
        collect(a, dev.stream(), trust(dev.signer))
    assert any(s.compressed for s in a.cursor().segments)
    return a, dev


def tcp_receiver() -> tuple[int, list[bytes], threading.Thread]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    frames: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        data = b""
        with conn:
            while chunk := conn.recv(65536):
                data += chunk
        server.close()
        while data:  # MSG-LEN SP SYSLOG-MSG
            space = data.index(b" ")
            n = int(data[:space])
            frames.append(data[space + 1 : space + 1 + n])
            data = data[space + 1 + n :]

    t = threading.Thread(target=serve)
    t.start()
    return server.getsockname()[1], frames, t


def test_export_to_a_tcp_receiver(archive: tuple[Archive, Device]) -> None:
    a, dev = archive
    port, frames, t = tcp_receiver()
    dest = SyslogDestination(f"tcp://127.0.0.1:{port}")
    result = export(a, a.cursor(), dest, after=40, fmt=Format.SYSLOG)
    dest.close()
    t.join(10)
    assert result.records == len(dev.lines) - 40
    assert (result.first_seq, result.last_seq) == (41, len(dev.lines))
    assert [parse(f)["msg"] + b"\n" for f in frames] == dev.lines[40:]
    assert [int(parse(f)["params"]["seq"]) for f in frames] == list(range(41, len(dev.lines) + 1))


def test_export_to_a_udp_receiver(archive: tuple[Archive, Device]) -> None:
    a, dev = archive
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    server.settimeout(5)
    port = server.getsockname()[1]
    dest = SyslogDestination(f"udp://127.0.0.1:{port}")
    result = export(a, a.cursor(), dest, after=100, fmt=Format.SYSLOG)
    dest.close()
    got = [server.recv(65536) for _ in range(result.records)]
    server.close()
    assert [parse(g)["msg"] + b"\n" for g in got] == dev.lines[100:]


def test_no_receiver_is_exit_4() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(UnreachableError) as err:
            SyslogDestination(f"tcp://127.0.0.1:{port}")
    assert err.value.exit_code == 4


@pytest.mark.parametrize("url", ["syslog://h:1", "tcp://:514", "udp://h:notaport"])
def test_bad_urls_are_usage_errors(url: str) -> None:
    with pytest.raises(UsageError):
        SyslogDestination(url)


# -- through the CLI -----------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path, archive: tuple[Archive, Device]) -> Iterator[Path]:
    _, dev = archive
    app = tmp_path / "state" / "appliances" / "hsm15"
    (app / "pins.json").write_text(
        json.dumps({"audit_keys": {dev.signer.key_id: dev.signer.public_key_pem}})
    )
    path = tmp_path / "tenant.yaml"
    path.write_text(yaml.safe_dump({"role": "tenant", "state_dir": str(tmp_path / "state")}))
    yield path


def test_cli_export_jsonl_to_stdout_and_file(
    config: Path,
    archive: tuple[Archive, Device],
    tmp_path: Path,
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    _, dev = archive
    assert main(["--config", str(config), "logs", "export", "hsm15", "--after", "7"]) == 0
    assert capfdbinary.readouterr().out == b"".join(dev.lines[7:])
    out = tmp_path / "out.jsonl"
    argv = ["--config", str(config), "logs", "export", "hsm15", "--output", str(out), "--json"]
    assert main(argv) == 0
    summary = json.loads(capfdbinary.readouterr().out)
    assert summary["records"] == len(dev.lines) and summary["destination"] == str(out)
    assert out.read_bytes() == b"".join(dev.lines)
    assert out.stat().st_mode & 0o077 == 0


def test_cli_export_syslog_over_tcp(
    config: Path, archive: tuple[Archive, Device], capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    _, dev = archive
    port, frames, t = tcp_receiver()
    argv = ["--config", str(config), "logs", "export", "hsm15", "--format", "syslog"]
    assert main([*argv, "--syslog", f"tcp://127.0.0.1:{port}", "--json"]) == 0
    t.join(10)
    assert json.loads(capfdbinary.readouterr().out)["records"] == len(dev.lines)
    assert [parse(f)["msg"] + b"\n" for f in frames] == dev.lines
    assert {parse(f)["host"] for f in frames} == {"hsm15"}


def test_cli_export_refuses_json_on_stdout(config: Path) -> None:
    assert main(["--config", str(config), "logs", "export", "hsm15", "--json"]) == 2


def test_cli_verify(config: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    assert main(["--config", str(config), "logs", "verify", "hsm15", "--json"]) == 0
    out = json.loads(capfdbinary.readouterr().out)
    assert out["verified"] is True and out["segments"] > 1, out


# -- scheduling files ------------------------------------------------------------------------------

# The systemd units, sysusers.d, tmpfiles.d, cron and logrotate files: test_deploy.py.
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_the_collect_playbook_parses() -> None:
    import subprocess
    import sys

    playbook = DEPLOY.parent / "playbooks" / "collect_logs.yml"
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), "--syntax-check",
         "-i", "localhost,", str(playbook)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
