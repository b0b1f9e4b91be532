"""An archive's commit point as a typed record: :class:`Cursor` (``cursor.json``), with
the :class:`~.segments.Segment` entries it lists (see :mod:`.archive` for the layout and
the commit).

``as_dict``/``from_dict`` read and write the exact format of ``cursor.json``;
``from_dict`` refuses an entry that does not add up (names, seq ranges, the head).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hsmctl.auditlog import GENESIS_HEAD, Head
from hsmctl.collect.segments import Segment

FORMAT = "hsmctl-archive/1"


@dataclass(frozen=True)
class Cursor:
    """The committed state of an archive. The head is always a verified checkpoint."""

    appliance: str
    seq: int = 0
    hash: str = GENESIS_HEAD.hash
    prev: str = GENESIS_HEAD.hash
    device: str | None = None
    trusted_keys: Mapping[str, str] = field(default_factory=dict)
    retired_keys: tuple[str, ...] = ()
    segments: tuple[Segment, ...] = ()
    updated_at: str | None = None
    base: Head | None = None
    """Set when the device had deleted records 1..``base.seq`` (acknowledged by an earlier
    owner) before this archive began: the archive starts after it, linked to
    ``base.hash`` (the takeover proved it: ``pins.log_base``)."""

    @property
    def head(self) -> Head:
        return Head(self.seq, self.hash)

    @property
    def records(self) -> int:
        return sum(s.records for s in self.segments)

    def as_dict(self) -> dict[str, Any]:
        base = {} if self.base is None else {"base": self.base.as_dict()}
        return base | {
            "format": FORMAT,
            "appliance": self.appliance,
            "seq": self.seq,
            "hash": self.hash,
            "prev": self.prev,
            "device": self.device,
            "trusted_keys": dict(self.trusted_keys),
            "retired_keys": list(self.retired_keys),
            "segments": [s.as_dict() for s in self.segments],
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Cursor:
        if d.get("format") != FORMAT:
            raise ValueError(f"unknown format {d.get('format')!r}")
        segments = tuple(Segment.from_dict(s) for s in d["segments"])
        cursor = cls(
            appliance=str(d["appliance"]),
            seq=int(d["seq"]),
            hash=str(d["hash"]),
            prev=str(d["prev"]),
            device=None if d.get("device") is None else str(d["device"]),
            trusted_keys={str(k): str(v) for k, v in dict(d["trusted_keys"]).items()},
            retired_keys=tuple(str(k) for k in d["retired_keys"]),
            segments=segments,
            updated_at=d.get("updated_at"),
            base=_base(d.get("base")),
        )
        expected = 1 if cursor.base is None else cursor.base.seq + 1
        for s in segments:
            if s.first_seq != expected:
                raise ValueError(f"segment {s.name} starts at {s.first_seq}, expected {expected}")
            expected = s.last_seq + 1
        if expected - 1 != cursor.seq:
            raise ValueError(f"segments end at {expected - 1} but the head is {cursor.seq}")
        return cursor


def _base(d: Any) -> Head | None:
    if d is None:
        return None
    seq, digest = d["seq"], d["hash"]
    if type(seq) is not int or seq < 1 or type(digest) is not str:
        raise ValueError("base: seq must be a positive integer and hash a string")
    return Head(seq, digest)
