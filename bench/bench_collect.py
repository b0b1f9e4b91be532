"""Log collection throughput: verified collection against raw copies of the same bytes.

What runs (all in one run, in interleaved rounds, each the median of ``--runs``; the
target is verified collection >= 0.5 x the exec-channel copy):

* **verified collection** — ``hsmctl.collect.Collector`` exactly as ``hsmctl logs
  collect`` runs it: SSH (paramiko, pinned host key) as the collector key, ``audit export
  --after 0`` streamed, verified in chunks, archived in segments (rotated,
  zstd-compressed in the background), fsynced, cursor written; with ``--workers``
  processes and with none (verification in the collecting thread). The target's ratio
  uses the one ``logs collect`` runs by default (``pipeline.default_workers``: in-thread
  when the compiled byte scan is built);
* **exec-channel copy** — the same connection class, the same forced command, the same
  bytes, written to a file and fsynced, nothing verified: the *same-transport* raw copy
  the target is set against (the appliance's sshd has no sftp subsystem, so the export
  is an exec channel);
* **paramiko SFTP** — a plain ``paramiko.SSHClient``, ``SFTPFile.prefetch()`` read in
  32 KiB pieces (its fastest form here), file fsynced;
* **OpenSSH scp** — ``scp`` (9.2: the SFTP protocol) of the same file;
* **sha256** — ``hashlib.sha256`` over the same bytes from the page cache.

The device is stood in for by a private OpenSSH sshd on 127.0.0.1 (its own mount
namespace, so nothing on the host changes), with ``sftp`` enabled and the collector's
key forced to a script answering ``audit export --after N`` with the log file from record
N+1 (``tail``) — the device streams its file the same way. The log is a valid chain made
with :class:`~hsmctl.auditlog.SoftwareSigner` (the appliance's audit key is
non-extractable): device-like sessions, a checkpoint every ``--every`` records, one key
rotation half-way (the collector pins only the first key, as a customer pins the
bundle's). It is cached in ``--workdir`` between runs.

Usage: ``python -m bench collect [--records N] [--every N] [--runs N] [--workdir DIR]
[--timeline]``
(root: the sshd runs in a private mount namespace).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from hsmctl import auditlog
from hsmctl.auditlog import blockscan
from hsmctl.collect.collector import CollectOptions, Collector
from hsmctl.collect.pipeline import default_workers

SCAN_KIND = "compiled (hsmctl.auditlog._scan)" if blockscan.SCAN is not None else "Python"
"""Which byte scan the verified collection ran (the C one unless it was not built)."""

DEVICE = "bench"
SESSION: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("login", "audit", {"interface": "data", "method": "publickey", "reason": "accepted"}),
    ("session-start", "audit", {"interactive": False, "interface": "data"}),
    ("command", "admin", {"command": "hsm show", "rule": "granted"}),
    ("result", "admin", {"command": "hsm show", "exit": 0}),
    ("session-end", "admin", {}),
)


@dataclass(frozen=True)
class Row:
    name: str
    records: int
    nbytes: int
    seconds: float
    cpu: float
    """This process's CPU seconds plus its reaped children's (workers, scp), median: the
    client side's cost, which a busy machine does not inflate the way it does wall time."""
    own_cpu: float = 0.0
    """Of ``cpu``, this process's alone (receiving, archiving; not the workers)."""
    device_cpu: float = 0.0
    """The stand-in device's: its sshd and the session processes it reaped (encryption,
    ``tail``), the same for every row that moves the same bytes."""

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e6


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _own_cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def _process_cpu(pid: int) -> float:
    """A process's CPU seconds with those of the children it has reaped (0 if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    # utime stime cutime cstime: fields 14-17 of proc(5); here from field 3 on
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _device_cpu(pid: int) -> float:
    """The sshd's CPU with its finished sessions', once every session has been reaped
    (a closed connection's processes end a moment after the client returns)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if not children.read_text().split():
                break
        except OSError:
            break
        time.sleep(0.01)
    return _process_cpu(pid)


def median_run(
    fn: Callable[[], object], runs: int, before: Callable[[], object] | None = None
) -> tuple[float, float]:
    """Median wall time and median CPU time of ``runs`` runs."""
    times, cpus = [], []
    for _ in range(runs):
        if before is not None:
            before()
        cpu, start = _cpu(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        cpus.append(_cpu() - cpu)
    return statistics.median(times), statistics.median(cpus)


# -- the synthetic device log ------------------------------------------------------------------


def generate(path: Path, count: int, every: int) -> dict[str, str]:
    """Write a valid log of ``count`` records; return the key to pin {key_id: PEM}."""
    first, second = auditlog.SoftwareSigner.generate(), auditlog.SoftwareSigner.generate()
    signer = first
    t0 = datetime(2026, 11, 29, tzinfo=UTC)
    head: auditlog.Head | None = None
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb", buffering=1 << 20) as out:
        for i in range(1, count + 1):
            when = auditlog.rfc3339(t0 + timedelta(milliseconds=i))
            if head is not None and i == count // 2:
                record = auditlog.make_key_rotation(head, first, second, device=DEVICE, time=when)
                signer = second
            elif head is not None and (i % every == 0 or i == count):
                record = auditlog.make_checkpoint(head, signer, device=DEVICE, time=when)
            else:
                event, role, detail = SESSION[i % len(SESSION)]
                record = auditlog.make_record(
                    head,
                    time=when,
                    actor=role,
                    role=role,
                    source="198.19.0.4",
                    event=event,
                    outcome="ok",
                    detail={**detail, "session": f"{i // len(SESSION):08x}"},
                )
            out.write(auditlog.record_line(record))
            head = auditlog.Head.of(record)
    os.replace(tmp, path)
    return {first.key_id: first.public_key_pem}


def cached_log(workdir: Path, count: int, every: int) -> tuple[Path, dict[str, str]]:
    path = workdir / f"device-{count}-{every}.jsonl"
    keys = path.with_suffix(".keys.json")
    if not (path.exists() and keys.exists()):
        print(f"generating {count:,} records (a checkpoint every {every}) ...", flush=True)
        start = time.perf_counter()
        pinned = generate(path, count, every)
        keys.write_text(json.dumps(pinned))
        print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    return path, dict(json.loads(keys.read_text()))


# -- a private sshd on loopback ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
    )
    return path.with_suffix(".pub").read_text().strip()


@dataclass
class Sshd:
    port: int
    host_key: str  # "ssh-ed25519 AAAA..."
    collector_key: Path  # forced to the export script
    raw_key: Path  # unrestricted: sftp, scp, exec
    known_hosts: Path
    pid: int = 0  # the sshd (its sessions' CPU is counted in it once they end)


@contextlib.contextmanager
def private_sshd(workdir: Path, log: Path) -> Iterator[Sshd]:
    d = Path(tempfile.mkdtemp(prefix="sshd-", dir=workdir))
    host = _keygen(d / "host_key")
    collector = _keygen(d / "collector_key")
    raw = _keygen(d / "raw_key")
    export = d / "export.sh"
    export.write_text(
        "#!/bin/sh\n"
        "# Stands in for the device's 'audit export --after N': the log from record N+1.\n"
        'case "$SSH_ORIGINAL_COMMAND" in\n'
        '  "audit export --after "*) n=${SSH_ORIGINAL_COMMAND#audit export --after }\n'
        f'    exec tail -n +$((n + 1)) "{log}" ;;\n'
        '  *) echo "denied" >&2; exit 77 ;;\n'
        "esac\n"
    )
    export.chmod(0o755)
    (d / "authorized_keys").write_text(
        f'command="{export}",no-pty,no-port-forwarding {collector}\n{raw}\n'
    )
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"PidFile {d / 'sshd.pid'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nSubsystem sftp internal-sftp\n"
    )
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host}\n")
    # The collector logs in as "audit", like on a device: an alias of root in a copy of
    # /etc bind-mounted only inside sshd's mount namespace. The whole directory: a file
    # bind-mounted over /etc/passwd is dropped from the namespace as soon as anything on
    # the host replaces /etc/passwd (useradd renames a new file over it; the lab's tests
    # do), and sshd then refused every later login ("Invalid user audit").
    etc = d / "etc"
    shutil.copytree("/etc", etc, symlinks=True, ignore_dangling_symlinks=True)
    with open(etc / "passwd", "a") as f:
        f.write("audit:x:0:0:bench collector:/root:/bin/sh\n")
    with open(etc / "shadow", "a") as f:
        f.write("audit:*:20000:0:99999:7:::\n")
    # A private mount namespace with its own /run: sshd needs /run/sshd, and the host's
    # /run and /etc stay untouched.
    proc = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'mount --bind "{etc}" /etc'
            " && mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd && "
            f'exec /usr/sbin/sshd -D -f "{d}/sshd_config" -E "{d}/sshd.log"',
        ]
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {(d / 'sshd.log').read_text()}")
            time.sleep(0.05)
        yield Sshd(
            port,
            " ".join(host.split()[:2]),
            d / "collector_key",
            d / "raw_key",
            d / "known_hosts",
            proc.pid,  # unshare and sh exec sshd: the same process
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


# -- the measurements --------------------------------------------------------------------------


def customer_state(workdir: Path, sshd: Sshd, pinned: dict[str, str]) -> Path:
    """A customer state directory as a takeover leaves it, for the appliance ``bench``."""
    state = workdir / "state"
    app = state / "appliances" / DEVICE
    (app / "secrets").mkdir(parents=True, exist_ok=True, mode=0o700)
    (app / "pins.json").write_text(
        json.dumps(
            {
                "data_ip": "127.0.0.1",
                "data_port": sshd.port,
                "data_host_keys": [sshd.host_key],
                "audit_keys": pinned,
                "audit_account_key": "bench",
                "retired": [],
            }
        )
    )
    key = app / "secrets" / "audit-collector-key"
    shutil.copyfile(sshd.collector_key, key)
    key.chmod(0o600)
    return state


def verified_collection(state: Path, workers: int) -> None:
    report = Collector(state, CollectOptions(workers=workers)).run([DEVICE])
    outcome = report.appliances[0]
    if outcome.error is not None:
        raise SystemExit(f"collection failed: {outcome.error}")


def exec_copy(sshd: Sshd, dest: Path) -> None:
    from hsmctl.ssh import DeviceConnection, PinnedHostKeys

    with (
        DeviceConnection(
            "127.0.0.1",
            port=sshd.port,
            username="audit",
            pinned=PinnedHostKeys.of(sshd.host_key),
            key=sshd.collector_key,
        ) as conn,
        open(dest, "wb") as out,
    ):
        conn.run_stream("audit export --after 0", out, timeout=3600)
        out.flush()
        os.fsync(out.fileno())


def sftp_copy(sshd: Sshd, src: Path, dest: Path) -> None:
    import paramiko

    client = paramiko.SSHClient()
    client.load_host_keys(str(sshd.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        "127.0.0.1",
        port=sshd.port,
        username="root",
        key_filename=str(sshd.raw_key),
        allow_agent=False,
        look_for_keys=False,
    )
    try:
        sftp = client.open_sftp()
        with sftp.open(str(src), "rb") as fin, open(dest, "wb") as out:
            fin.prefetch()
            # 32 KiB reads, paramiko's request size: measured fastest here (110 MB/s against
            # 75 MB/s with 1 MiB reads; bounded max_concurrent_requests stalled to 4 MB/s).
            while block := fin.read(32768):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
    finally:
        client.close()


def scp_copy(sshd: Sshd, src: Path, dest: Path) -> None:
    subprocess.run(
        [
            "scp",
            "-q",
            "-i",
            str(sshd.raw_key),
            "-P",
            str(sshd.port),
            "-o",
            f"UserKnownHostsFile={sshd.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            f"root@127.0.0.1:{src}",
            str(dest),
        ],
        check=True,
    )
    with open(dest, "rb+") as fh:
        os.fsync(fh.fileno())


def sha256_file(path: Path) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)


def _same(a: Path, b: Path) -> None:
    if a.stat().st_size != b.stat().st_size:
        raise SystemExit(f"copy {b} differs from {a}")


def table(rows: Sequence[Row]) -> str:
    out = [
        f"{'benchmark':40} {'records':>9} {'median s':>9} {'records/s':>11} {'MB/s':>7} "
        f"{'client CPU s':>12} {'of it own':>9} {'device CPU s':>12}"
    ]
    for r in rows:
        out.append(
            f"{r.name:40} {r.records:>9} {r.seconds:>9.2f} {r.rate:>11,.0f} "
            f"{r.mb_per_s:>7.1f} {r.cpu:>12.2f} {r.own_cpu:>9.2f} {r.device_cpu:>12.2f}"
        )
    return "\n".join(out)


@dataclass
class _Span:
    wall: float = 0.0
    cpu: float = 0.0
    calls: int = 0


def timeline(state: Path, sshd: Sshd) -> str:
    """One verified collection (in-thread, the default) with timing hooks: where each
    thread's time went, in wall and CPU seconds (``time.thread_time``), and how often the
    collecting thread found the whole channel window buffered (the device then waits for
    it). The hooks cost a little; the numbers are for finding the parts that do not
    overlap, not for the ratio."""
    import threading

    import paramiko

    import hsmctl.collect.archive as archive_mod
    import hsmctl.collect.collector as collector_mod
    import hsmctl.collect.pipeline as pipeline_mod
    import hsmctl.ssh.channel as channel_mod
    from hsmctl.ssh.limits import WINDOW_SIZE

    spans: dict[str, _Span] = {}
    lock = threading.Lock()
    full_reads = reads = 0

    def add(name: str, wall: float, cpu: float) -> None:
        with lock:
            s = spans.setdefault(name, _Span())
            s.wall, s.cpu, s.calls = s.wall + wall, s.cpu + cpu, s.calls + 1

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any, **k: Any) -> Any:
            w, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                add(name, time.perf_counter() - w, time.thread_time() - c)

        return run

    class Select:
        @staticmethod
        def select(*a: Any) -> Any:
            return timed("collecting: waiting for data (select)", select_mod.select)(*a)

    import select as select_mod

    real_recv, real_run = paramiko.Channel.recv, paramiko.Transport.run

    def recv(chan: paramiko.Channel, n: int) -> bytes:
        nonlocal reads, full_reads
        reads += 1
        full_reads += len(chan.in_buffer) >= WINDOW_SIZE * 0.9
        return cast(bytes, timed("collecting: channel reads", real_recv)(chan, n))

    hooks: list[tuple[Any, str, Any]] = [
        (paramiko.Channel, "recv", recv),
        (paramiko.Transport, "run", timed("SSH transport thread (all)", real_run)),
        (channel_mod, "select", Select),
        (
            pipeline_mod,
            "verify_chunk",
            timed("collecting: verify chunks", pipeline_mod.verify_chunk),
        ),
        (
            archive_mod.Appender,
            "append",
            timed("collecting: archive appends", archive_mod.Appender.append),
        ),
        (
            archive_mod.Appender,
            "commit",
            timed(
                "collecting: commit (fsync, last compression, cursor)", archive_mod.Appender.commit
            ),
        ),
        (
            archive_mod,
            "compress_segment",
            timed("compression thread (a closed segment's file)", archive_mod.compress_segment),
        ),
        (
            archive_mod,
            "compress_pieces",
            timed("compression thread (a closed segment held)", archive_mod.compress_pieces),
        ),
        (collector_mod, "collect", timed("collecting thread (all)", collector_mod.collect)),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in hooks]
    try:
        for owner, name, value in hooks:
            setattr(owner, name, value)
        archive = state / "appliances" / DEVICE / "archive"
        shutil.rmtree(archive, ignore_errors=True)
        device = _device_cpu(sshd.pid)
        start = time.perf_counter()
        verified_collection(state, 0)
        wall = time.perf_counter() - start
        device = _device_cpu(sshd.pid) - device
        shutil.rmtree(archive, ignore_errors=True)
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
    lines = [f"timeline of one verified collection (in-thread): {wall:.2f} s wall"]
    lines += [
        f"  {name:56} {s.wall:6.2f} s wall {s.cpu:6.2f} CPU-s {s.calls:6} calls"
        for name, s in sorted(spans.items())
    ]
    lines.append(f"  {'device (sshd and its sessions)':56} {'':13} {device:6.2f} CPU-s")
    lines.append(
        f"  reads that found the channel window ({WINDOW_SIZE >> 20} MiB) full, the device "
        f"waiting: {full_reads} of {reads}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench collect", description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=1000, help="a checkpoint every N records")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hsmctl-bench-collect"
    )
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="instead: one verified collection with timing hooks, each thread's wall and CPU",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench collect: needs root (a private sshd in its own mount namespace)")
        return 2
    if args.runs < 1 or args.records < 10 or args.every < 2:
        parser.error("--runs >= 1, --records >= 10, --every >= 2")
    args.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log, pinned = cached_log(args.workdir, args.records, args.every)
    n, size = args.records, log.stat().st_size
    copy = args.workdir / "copy.jsonl"
    rows: list[Row] = []
    load_before = os.getloadavg()[0]
    if args.timeline:
        with private_sshd(args.workdir, log) as sshd:
            state = customer_state(args.workdir, sshd, pinned)
            verified_collection(state, 0)  # warm: imports, page cache
            print(timeline(state, sshd))
        return 0
    with private_sshd(args.workdir, log) as sshd:
        state = customer_state(args.workdir, sshd, pinned)
        archive = state / "appliances" / DEVICE / "archive"

        def fresh() -> None:
            shutil.rmtree(archive, ignore_errors=True)

        def rm_copy() -> None:
            copy.unlink(missing_ok=True)

        def copied(fn: Callable[[], object]) -> Callable[[], object]:
            def run() -> None:
                fn()
                _same(log, copy)

            return run

        plan: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
            (
                f"verified collection ({args.workers} workers)",
                lambda: verified_collection(state, args.workers),
                fresh,
            ),
            ("verified collection (in-thread)", lambda: verified_collection(state, 0), fresh),
            ("exec-channel copy (same transport)", copied(lambda: exec_copy(sshd, copy)), rm_copy),
            ("paramiko SFTP + prefetch", copied(lambda: sftp_copy(sshd, log, copy)), rm_copy),
            ("OpenSSH scp", copied(lambda: scp_copy(sshd, log, copy)), rm_copy),
            ("sha256 (page cache)", lambda: sha256_file(log), lambda: None),
        ]
        # Interleaved rounds (each round runs every measurement once): a change in the
        # machine's load during the run falls on all of them alike, not on one row.
        times: list[list[float]] = [[] for _ in plan]
        cpus: list[list[float]] = [[] for _ in plan]
        owns: list[list[float]] = [[] for _ in plan]
        devices: list[list[float]] = [[] for _ in plan]
        for round_ in range(args.runs):
            for i, (name, fn, before) in enumerate(plan):
                own, device = _own_cpu(), _device_cpu(sshd.pid)
                wall, cpu = median_run(fn, 1, before)
                owns[i].append(_own_cpu() - own)
                devices[i].append(_device_cpu(sshd.pid) - device)
                times[i].append(wall)
                cpus[i].append(cpu)
                print(f"  round {round_ + 1}: {name}: {wall:.2f} s", file=sys.stderr, flush=True)
        rows = [
            Row(
                name,
                n,
                size,
                statistics.median(times[i]),
                statistics.median(cpus[i]),
                statistics.median(owns[i]),
                statistics.median(devices[i]),
            )
            for i, (name, _, _) in enumerate(plan)
        ]
        rm_copy()
        fresh()
    pooled, in_thread, exec_raw, sftp, scp, sha = rows
    # The target is for what ``hsmctl logs collect`` does by default (in-thread when the
    # compiled scan is built: hsmctl.collect.pipeline.default_workers).
    verified = in_thread if default_workers() == 0 else pooled
    print(
        f"{n:,} records, {size / 1e6:.0f} MB, a checkpoint every {args.every}; "
        f"median of {args.runs} interleaved rounds; {os.cpu_count()} CPUs; load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after; byte scan: {SCAN_KIND}; "
        f"verified = the default, {verified.name}"
    )
    print(table(rows))
    ratios: dict[str, Any] = {
        "verified/exec_copy": verified.rate / exec_raw.rate,
        "verified/sftp": verified.rate / sftp.rate,
        "verified/scp": verified.rate / scp.rate,
        "verified/sha256": verified.rate / sha.rate,
    }
    print("ratios: " + "   ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))
    target = ratios["verified/exec_copy"] >= 0.5
    print(
        "target (verified >= 0.5 x the same-connection exec-channel copy): "
        f"{'met' if target else 'NOT met'} ({ratios['verified/exec_copy']:.2f}); "
        f"vs paramiko SFTP {ratios['verified/sftp']:.2f}"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "records": n,
                    "bytes": size,
                    "every": args.every,
                    "runs": args.runs,
                    "scan": "compiled" if blockscan.SCAN is not None else "python",
                    "verified": verified.name,
                    "rows": [
                        {
                            "name": r.name,
                            "seconds": r.seconds,
                            "records_per_s": r.rate,
                            "mb_per_s": r.mb_per_s,
                            "client_cpu_s": r.cpu,
                            "client_own_cpu_s": r.own_cpu,
                            "device_cpu_s": r.device_cpu,
                        }
                        for r in rows
                    ],
                    "ratios": ratios,
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
