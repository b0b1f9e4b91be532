"""A device's activity log stood in for by bytes, for the collector and archive tests:
append records like hsmd (real chains, signed with SoftwareSigner), export them like
``audit export``; and ``collect``, what the collector does around the SSH transport."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from hsmctl import auditlog
from hsmctl.auditlog import Head
from hsmctl.collect.archive import Archive, Cursor
from hsmctl.collect.collector import (
    ingest,
    trust_roots,
)
from hsmctl.collect.pipeline import (
    DEFAULT_LIMITS,
    Limits,
    TrustState,
    VerifyPool,
)

DEVICE = "hsm-test"
T0 = 1_700_000_000


class Device:
    """A device log in memory: append records like hsmd, export like ``audit export``."""

    def __init__(self, signer: auditlog.SoftwareSigner) -> None:
        self.signer = signer
        self.lines: list[bytes] = []
        self.head: Head | None = None
        self.exports: list[int] = []

    def _add(self, record: dict[str, Any]) -> None:
        self.lines.append(auditlog.record_line(record))
        self.head = Head.of(record)

    def _time(self) -> str:
        return f"2026-11-29T20:{len(self.lines) // 60 % 60:02d}:{len(self.lines) % 60:02d}Z"

    def events(self, n: int, size: int = 0) -> None:
        for _ in range(n):
            self._add(
                auditlog.make_record(
                    self.head,
                    time=self._time(),
                    actor="admin",
                    role="admin",
                    source="198.19.0.4",
                    event="command",
                    outcome="ok",
                    detail={"command": "hsm show", "pad": "x" * size},
                )
            )

    def checkpoint(self) -> None:
        assert self.head is not None
        self._add(
            auditlog.make_checkpoint(self.head, self.signer, device=DEVICE, time=self._time())
        )

    def rotate(self, new: auditlog.SoftwareSigner) -> None:
        assert self.head is not None
        self._add(
            auditlog.make_key_rotation(
                self.head, self.signer, new, device=DEVICE, time=self._time()
            )
        )
        self.signer = new

    def session(self, n: int = 4, size: int = 0) -> None:
        self.events(n, size)
        self.checkpoint()

    def data(self, after: int = 0) -> bytes:
        return b"".join(self.lines[after:])

    def stream(self, *, checkpoint: bool = True, piece: int = 1000) -> Callable[..., None]:
        """The export: records after ``after``, a fresh checkpoint first (like hsmd)."""

        def export(after: int, sink: BinaryIO) -> None:
            self.exports.append(after)
            if checkpoint:
                self.checkpoint()
            data = self.data(after)
            for i in range(0, len(data), piece):
                sink.write(data[i : i + piece])

        return export


def trust(*signers: auditlog.SoftwareSigner) -> TrustState:
    return TrustState({s.key_id: s.public_key_pem for s in signers})


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "lock"}


def archived(archive: Archive) -> bytes:
    return b"".join(archive.blocks(archive.cursor()))


def collect(
    archive: Archive,
    stream: Callable[..., None],
    t: TrustState,
    pool: VerifyPool | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Cursor:
    """What ``collect()`` does around the SSH transport."""
    with archive.lock(exclusive=True):
        before = archive.recover()
        return ingest(
            archive, before, trust_roots(t.trusted, (), before), stream, pool, limits=limits
        )
