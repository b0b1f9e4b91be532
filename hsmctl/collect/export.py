"""Export archived records: JSON lines or RFC 5424 syslog, to a stream, a file, or a syslog
receiver over TCP (RFC 6587 octet counting) or UDP (RFC 5426).

Only what the archive committed is exported, so every record was verified before it got
there. A syslog message carries the record three ways: the header (time, appliance as
HOSTNAME, event as MSGID, severity from the outcome), one SD element with the chain
fields, and the record's canonical JSON as MSG, so a SIEM can re-verify the chain::

    <110>1 2026-11-29T20:19:01.123456Z hsm15 hsm-audit - login [hsmAudit@32473 seq="7"
    actor="admin" role="admin" source="198.19.0.4" outcome="ok" hash="..." prev="..."]
    BOM{"actor":"admin",...}

``32473`` is the private enterprise number RFC 5612 reserves for documentation; set
``SD_ID`` to your organisation's own. Facility 13 (log audit); severity: ok 6
(informational), failed 5 (notice), denied 4 (warning), error 3 (error).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlsplit

from hsmctl.collect.appliances import archive_of, taken_over
from hsmctl.collect.archive import Archive, Cursor
from hsmctl.errors import HsmctlError, UnreachableError, UsageError
from hsmctl.privatefiles import fsync_dir

FACILITY_LOG_AUDIT = 13
APP_NAME = "hsm-audit"
SD_ID = "hsmAudit@32473"
BOM = "\ufeff".encode()
SEVERITY = {"ok": 6, "failed": 5, "denied": 4, "error": 3}
UDP_MAX = 65507
"""The largest UDP payload over IPv4; a longer message is cut (RFC 5426 §3.2)."""

_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z")
_SD_FIELDS = ("seq", "actor", "role", "source", "outcome", "hash", "prev")


class Format(StrEnum):
    JSONL = "jsonl"
    SYSLOG = "syslog"


# -- RFC 5424 ----------------------------------------------------------------------------------


def _printusascii(text: str, limit: int) -> str:
    """Header fields allow only PRINTUSASCII (33..126); NILVALUE when empty."""
    clean = "".join(c if 33 <= ord(c) <= 126 else "_" for c in text)[:limit]
    return clean or "-"


def _sd_value(value: object) -> str:
    text = str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _timestamp(value: object) -> str:
    m = _TIME.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        return "-"
    frac = (m.group(2) or "")[:7]  # TIME-SECFRAC is at most 6 digits
    return f"{m.group(1)}{frac}Z"


def syslog_message(line: bytes, hostname: str, *, facility: int = FACILITY_LOG_AUDIT) -> bytes:
    """One RFC 5424 message (no framing) for one archived record line."""
    body = line.rstrip(b"\n")
    record: dict[str, Any] = json.loads(body)
    severity = SEVERITY.get(str(record.get("outcome")), 5)
    params = " ".join(f'{name}="{_sd_value(record.get(name, ""))}"' for name in _SD_FIELDS)
    header = (
        f"<{facility * 8 + severity}>1 {_timestamp(record.get('time'))} "
        f"{_printusascii(hostname, 255)} {APP_NAME} - "
        f"{_printusascii(str(record.get('event', '')), 32)} [{SD_ID} {params}] "
    )
    return header.encode("utf-8") + BOM + body


def octet_counted(message: bytes) -> bytes:
    """RFC 6587 §3.4.1 framing for TCP: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


# -- destinations ------------------------------------------------------------------------------


class Destination(Protocol):
    def send(self, message: bytes) -> None: ...

    def close(self) -> None: ...

    def describe(self) -> str: ...


class StreamDestination:
    """One message per line on a binary stream (stdout)."""

    def __init__(self, stream: BinaryIO, name: str = "stdout") -> None:
        self.stream = stream
        self.name = name

    def send(self, message: bytes) -> None:
        try:
            self.stream.write(message + b"\n")
        except BrokenPipeError as exc:  # e.g. `| head`: the reader is gone
            raise HsmctlError(f"{self.name} was closed by its reader") from exc

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.stream.flush()

    def describe(self) -> str:
        return self.name


class FileDestination:
    """A file, written whole or not at all: a temporary beside it, fsynced, renamed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror}") from exc
        self.fh = os.fdopen(fd, "wb", buffering=1024 * 1024)
        self.ok = False

    def send(self, message: bytes) -> None:
        self.fh.write(message + b"\n")

    def commit(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        self.ok = True

    def close(self) -> None:
        if not self.ok:
            self.fh.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)

    def describe(self) -> str:
        return str(self.path)


class SyslogDestination:
    """A syslog receiver: ``tcp://HOST:PORT`` (octet counting) or ``udp://HOST:PORT``."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("tcp", "udp") or not parts.hostname:
            raise UsageError(f"--syslog {url!r}: expected tcp://HOST:PORT or udp://HOST:PORT")
        try:
            port = parts.port or 514
        except ValueError as exc:
            raise UsageError(f"--syslog {url!r}: {exc}") from exc
        self.url = url
        self.proto = parts.scheme
        self.address = (parts.hostname, port)
        kind = socket.SOCK_STREAM if self.proto == "tcp" else socket.SOCK_DGRAM
        try:
            info = socket.getaddrinfo(parts.hostname, port, type=kind)[0]
        except OSError as exc:
            raise UnreachableError(f"syslog receiver {url}: {exc.strerror or exc}") from exc
        self.sock = socket.socket(info[0], kind)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(info[4])
        except OSError as exc:
            self.sock.close()
            raise UnreachableError(f"syslog receiver {url}: {exc.strerror or exc}") from exc
        self._buf = bytearray()

    def send(self, message: bytes) -> None:
        try:
            if self.proto == "udp":
                self.sock.send(message[:UDP_MAX])
                return
            self._buf += octet_counted(message)
            if len(self._buf) >= 256 * 1024:
                self._flush()
        except OSError as exc:
            raise UnreachableError(f"syslog receiver {self.url}: {exc.strerror or exc}") from exc

    def _flush(self) -> None:
        self.sock.sendall(self._buf)
        self._buf.clear()

    def close(self) -> None:
        try:
            if self.proto == "tcp":
                self._flush()
                self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise UnreachableError(f"syslog receiver {self.url}: {exc.strerror or exc}") from exc
        finally:
            self.sock.close()

    def describe(self) -> str:
        return self.url


# -- the export ---------------------------------------------------------------------------------


@dataclass
class ExportResult:
    appliance: str
    records: int
    first_seq: int | None
    last_seq: int | None
    format: Format
    destination: str
    retired: Mapping[str, Any] | None = None
    """Asked for records the device had deleted before this tenancy (the archive starts
    at the base the takeover proved): which, and by whose acknowledgement."""

    def as_dict(self) -> dict[str, Any]:
        out = {
            "appliance": self.appliance,
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "format": self.format.value,
            "destination": self.destination,
        }
        if self.retired is not None:
            out["retired"] = dict(self.retired)
        return out


def archived_lines(archive: Archive, cursor: Cursor, after: int) -> Iterator[bytes]:
    for block in archive.blocks(cursor, after):
        lines = block.split(b"\n")
        lines.pop()  # blocks end with a newline
        yield from lines


def export(
    archive: Archive,
    cursor: Cursor,
    destination: Destination,
    *,
    after: int = 0,
    fmt: Format = Format.JSONL,
) -> ExportResult:
    """Send every archived record after ``after`` to ``destination`` (not closed here)."""
    if after < 0:
        raise UsageError("--after must be 0 or more")
    count, first, last = 0, None, None
    # An archive that starts after a base (records the device deleted before this
    # tenancy) holds nothing before it.
    after = max(after, cursor.base.seq if cursor.base is not None else 0)
    for line in archived_lines(archive, cursor, after):
        if fmt is Format.SYSLOG:
            destination.send(syslog_message(line, archive.appliance))
        else:
            destination.send(line)
        count += 1
        if first is None:
            first = after + 1
    if count:
        last = after + count
    return ExportResult(archive.appliance, count, first, last, fmt, destination.describe())


def export_appliance(
    state: Path,
    appliance: str,
    *,
    after: int = 0,
    fmt: Format = Format.JSONL,
    output: Path | None = None,
    syslog: str | None = None,
    wait: float = 60.0,
) -> ExportResult:
    """``logs export``: the archive of an appliance taken over from ``state``, read under
    its shared lock (waiting up to ``wait`` s for a collection to finish), to ``output``
    (whole or not at all), a ``syslog`` receiver, or stdout."""
    st = taken_over(state, appliance)
    archive = archive_of(st)
    with archive.lock(exclusive=False, wait=wait):
        cursor = archive.cursor()
        with open_destination(output, syslog) as dest:
            result = export(archive, cursor, dest, after=after, fmt=fmt)
    if cursor.base is not None and after < cursor.base.seq:
        result.retired = dict((st.load_pins().log_base or {}).get("retired") or {}) or {
            "first_seq": 1,
            "last_seq": cursor.base.seq,
        }
    return result


class open_destination:
    """Context manager: the destination for ``--output``/``--syslog``/stdout."""

    def __init__(self, output: Path | None, syslog: str | None) -> None:
        if output is not None and syslog is not None:
            raise UsageError("give --output or --syslog, not both")
        self.dest: Destination
        if syslog is not None:
            self.dest = SyslogDestination(syslog)
        elif output is not None:
            self.dest = FileDestination(output)
        else:
            self.dest = StreamDestination(sys.stdout.buffer)

    def __enter__(self) -> Destination:
        return self.dest

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None and isinstance(self.dest, FileDestination):
            self.dest.commit()
        self.dest.close()
