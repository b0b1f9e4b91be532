"""Activity-log throughput: the device's appends and the collector's verification.

* append: :class:`hsmctl.appliance.logwriter.ActivityLog` as the daemon runs it (one
  record per call, written and fsynced before it returns) on a temp file;
* verify: :func:`hsmctl.auditlog.verify_lines` over a generated log (a SoftwareSigner
  checkpoint every ``--every`` records), all in memory.

Each is set against raw ``hashlib.sha256`` over exactly the same bytes (one digest per
record line) in the same run, and the append also against a raw ``write`` + ``fsync`` of
the same lines, which is what bounds it on a real disk. Times are the median of
``--runs`` runs. Usage: ``python -m bench auditlog [--appends N] [--records N] ...``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hsmctl import auditlog
from hsmctl.appliance.logwriter import ActivityLog

DEVICE = "bench-hsm"
DETAIL = {"command": "audit export --after 1200", "rule": "granted", "exit": 0}


@dataclass(frozen=True)
class Row:
    name: str
    records: int
    nbytes: int
    seconds: float  # median

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e6


def median_time(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sha256_each(lines: Sequence[bytes]) -> None:
    sha = hashlib.sha256
    for line in lines:
        sha(line).digest()


def filesystem_of(path: Path) -> str:
    best, kind = "", "?"
    with open("/proc/self/mounts") as fh:
        for entry in fh:
            fields = entry.split()
            mount, fstype = fields[1], fields[2]
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    return f"{kind} at {best}"


# --- append ------------------------------------------------------------------------------


def append_run(directory: Path, count: int) -> tuple[float, list[bytes]]:
    """One run on a fresh file: seconds for ``count`` appends, and the lines written."""
    path = Path(tempfile.mkdtemp(dir=directory)) / "audit.jsonl"
    log = ActivityLog(path)
    try:
        start = time.perf_counter()
        for _ in range(count):
            log.append(
                actor="admin",
                role="admin",
                source="198.19.0.4",
                event="command",
                outcome="ok",
                detail=DETAIL,
            )
        elapsed = time.perf_counter() - start
    finally:
        log.close()
    lines = path.read_bytes().splitlines(keepends=True)
    path.unlink()
    path.parent.rmdir()
    return elapsed, lines


def write_fsync_each(directory: Path, lines: Sequence[bytes]) -> None:
    fd, name = tempfile.mkstemp(dir=directory)
    try:
        for line in lines:
            os.write(fd, line)
            os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(name)


def bench_append(directory: Path, count: int, runs: int) -> list[Row]:
    results = [append_run(directory, count) for _ in range(runs)]
    lines = results[0][1]
    nbytes = sum(map(len, lines))
    return [
        Row(
            "append (ActivityLog, fsync/record)",
            count,
            nbytes,
            statistics.median(t for t, _ in results),
        ),
        Row(
            "  raw write+fsync, same lines",
            count,
            nbytes,
            median_time(lambda: write_fsync_each(directory, lines), runs),
        ),
        Row(
            "  raw sha256, same lines", count, nbytes, median_time(lambda: sha256_each(lines), runs)
        ),
    ]


# --- verify ------------------------------------------------------------------------------


def generate(count: int, every: int, signer: auditlog.SoftwareSigner) -> list[bytes]:
    """A valid log of ``count`` records, every ``every``-th a signed checkpoint."""
    lines: list[bytes] = []
    head: auditlog.Head | None = None
    t0 = datetime(2026, 11, 29, tzinfo=UTC)
    for i in range(1, count + 1):
        when = auditlog.rfc3339(t0 + timedelta(milliseconds=i))
        if head is not None and i % every == 0:
            record = auditlog.make_checkpoint(head, signer, device=DEVICE, time=when)
        else:
            record = auditlog.make_record(
                head,
                time=when,
                actor="admin",
                role="admin",
                source="198.19.0.4",
                event="command",
                outcome="ok",
                detail=DETAIL,
            )
        lines.append(auditlog.record_line(record))
        head = auditlog.Head.of(record)
    return lines


def bench_verify(count: int, every: int, runs: int) -> list[Row]:
    signer = auditlog.SoftwareSigner.generate()
    lines = generate(count, every, signer)
    keys = {signer.key_id: signer.public_key_pem}
    nbytes = sum(map(len, lines))

    def verify() -> None:
        report = auditlog.verify_lines(lines, keys, device=DEVICE)
        if not report.ok or report.records != count:
            raise AssertionError(f"the generated log does not verify: {report.violations}")

    return [
        Row(f"verify_lines (checkpoint every {every})", count, nbytes, median_time(verify, runs)),
        Row(
            "  raw sha256, same lines", count, nbytes, median_time(lambda: sha256_each(lines), runs)
        ),
    ]


# --- report ------------------------------------------------------------------------------


def table(rows: Sequence[Row]) -> str:
    out = [f"{'benchmark':40} {'records':>8} {'median s':>9} {'records/s':>12} {'MB/s':>8}"]
    for r in rows:
        out.append(
            f"{r.name:40} {r.records:>8} {r.seconds:>9.3f} {r.rate:>12,.0f} {r.mb_per_s:>8.1f}"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench auditlog", description=__doc__)
    parser.add_argument("--appends", type=int, default=2000, help="records per append run")
    parser.add_argument("--records", type=int, default=200_000, help="records to verify")
    parser.add_argument("--every", type=int, default=1000, help="a checkpoint every N records")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where the append benchmark writes (its filesystem matters)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.appends < 1 or args.records < 2 or args.every < 2:
        parser.error("--runs, --appends must be >= 1; --records, --every >= 2")

    append_rows = bench_append(args.dir, args.appends, args.runs)
    verify_rows = bench_verify(args.records, args.every, args.runs)
    print(f"append on {filesystem_of(args.dir.resolve())}; median of {args.runs} runs")
    print(table([*append_rows, *verify_rows]))
    append, disk, sha_a = append_rows
    verify, sha_v = verify_rows
    print(
        f"ratios: append / raw sha256 = 1 : {sha_a.rate / append.rate:,.0f}   "
        f"append / raw write+fsync = {append.rate / disk.rate:.2f}   "
        f"verify / raw sha256 = 1 : {sha_v.rate / verify.rate:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
