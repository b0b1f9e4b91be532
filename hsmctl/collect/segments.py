"""An archive's segments: the typed entry the cursor lists (:class:`Segment`, with
``as_dict``/``from_dict``), their names, and their files (opened whichever codec wrote
them, truncated to the committed length, compressed to zstd).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import zstandard

COMPRESSED = ".zst"
"""The suffix of a segment compressed now; ``.gz`` segments (older archives) are read."""
CODECS = (".zst", ".gz")


@dataclass(frozen=True)
class Segment:
    name: str
    first_seq: int
    records: int
    bytes: int
    """Uncompressed length: for the active segment, how much of the file is archived."""
    compressed: bool = False

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.records - 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "records": self.records,
            "bytes": self.bytes,
            "compressed": self.compressed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Segment:
        seg = cls(
            str(d["name"]),
            int(d["first_seq"]),
            int(d["records"]),
            int(d["bytes"]),
            bool(d["compressed"]),
        )
        expected = segment_name(seg.first_seq, False)
        names = [expected + c for c in CODECS] if seg.compressed else [expected]
        if seg.name not in names or seg.last_seq != int(d["last_seq"]) or seg.records < 1:
            raise ValueError(f"inconsistent segment entry {dict(d)}")
        return seg


def segment_name(first_seq: int, compressed: bool) -> str:
    return f"seg-{first_seq:012d}.jsonl" + (COMPRESSED if compressed else "")


def open_segment(path: Path, seg: Segment) -> BinaryIO:
    """The segment's uncompressed bytes (zstd, gzip of older archives, or plain)."""
    if seg.name.endswith(".gz"):
        return cast(BinaryIO, gzip.open(path, "rb"))
    if seg.compressed:
        return cast(BinaryIO, zstandard.open(path, "rb"))
    return open(path, "rb")


def truncate_segment(path: Path, size: int) -> None:
    """Cut the active segment back to its committed length, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


COMPRESS_IO = 4 * 1024 * 1024
"""Bytes read (and at most written) per step of :func:`compress_segment`. zstd releases
the GIL only while it compresses, and takes it back for every read and write: with its
default 128 KiB steps a 64 MiB segment waits for it ~500 times while the collecting and
SSH threads run Python (measured: 70 ms alone, 550 ms beside a thread running Python;
with 8 MiB steps 200 ms, as beside a thread that holds no GIL). The output is the same
bytes either way."""


def compress_segment(src: Path, dst: Path, level: int) -> None:
    """Compress ``src`` to ``dst`` (zstd, with a checksum and the content size) via a
    temporary file, fsynced before the rename (the directory is fsynced by the commit
    that names ``dst``)."""
    with open(src, "rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        _write_compressed(iter(lambda: fin.read(COMPRESS_IO), b""), size, dst, level)


def compress_pieces(pieces: Sequence[bytes | memoryview], size: int, dst: Path, level: int) -> None:
    """Compress a closed segment held in memory (``pieces``, ``size`` bytes in all) to
    ``dst`` as :func:`compress_segment` compresses its file: the same frame. The pieces
    go to zstd as they are, each a step in which it holds no GIL."""
    if sum(len(p) for p in pieces) != size:
        raise ValueError("the pieces do not add up to the segment's size")
    _write_compressed(pieces, size, dst, level)


def _write_compressed(
    pieces: Iterable[bytes | memoryview], size: int, dst: Path, level: int
) -> None:
    """One zstd frame (``level``, a checksum, the content ``size``) of ``pieces`` in
    ``dst``, via a temporary file fsynced before the rename (the directory is fsynced by
    the commit that names ``dst``). The frame does not depend on how the bytes are cut."""
    tmp = dst.with_name(dst.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
        with (
            os.fdopen(os.dup(fd), "wb") as raw,
            compressor.stream_writer(raw, size=size, write_size=COMPRESS_IO) as out,
        ):
            for piece in pieces:
                out.write(piece)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dst)


def create_segment(path: Path) -> int:
    """A new plain segment file (0600, replacing any), open for writing."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)


def write_all(fd: int, pieces: Iterable[bytes | memoryview]) -> None:
    """Write every piece whole (``os.write`` may write less than asked)."""
    for piece in pieces:
        view = memoryview(piece)
        while view:
            view = view[os.write(fd, view) :]


def write_pieces(path: Path, pieces: Sequence[bytes | memoryview]) -> None:
    """Write a segment held in memory to its plain file (not fsynced: the caller fsyncs
    before anything names it)."""
    fd = create_segment(path)
    try:
        write_all(fd, pieces)
    finally:
        os.close(fd)
