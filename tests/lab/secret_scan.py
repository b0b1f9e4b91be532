"""Looking for secrets where they must not be: in any process's arguments or environment
while a workload runs (:class:`ProcSampler`), and in files (:func:`grep_files`). Shared by
the firmware and the takeover tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path


class ProcSampler:
    """Samples the arguments and environment of every process on the host (the lab's
    appliances included: their PID namespaces are children of the host's) while commands
    run. The sampling runs in its own process, so it neither holds this one's GIL nor
    ever holds a secret itself; it hands back every distinct blob it saw when stopped.

    Lifecycle: ``start()``, run the workload, ``stop()`` (returns the blobs), ``hits()``.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        self.blobs: dict[str, str] = {}
        self.samples = 0

    def start(self) -> ProcSampler:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.lab.secret_scan", "sample", str(self.out)],
            cwd=Path(__file__).resolve().parents[2],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self.out.with_suffix(".ready").exists():
            if time.monotonic() > deadline:
                raise AssertionError("the process sampler did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        data = json.loads(self.out.read_text())
        self.samples = int(data["samples"])
        self.blobs = dict(data["blobs"])

    def hits(self, needles: Iterable[str]) -> list[str]:
        return [
            f"{where}: {blob[:160]!r}"
            for blob, where in self.blobs.items()
            for needle in needles
            if needle in blob
        ]

    def saw(self, fragment: str) -> bool:
        return any(fragment in blob for blob in self.blobs)


def _sample(out: Path) -> None:
    """The sampler process: scan /proc until SIGTERM, then write what it saw (0600)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    me = str(os.getpid())
    seen: dict[str, str] = {}
    samples = 0
    out.with_suffix(".ready").touch()
    while not stop.is_set():
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or entry.name == me:
                continue
            for what in ("cmdline", "environ"):
                try:
                    with open(f"/proc/{entry.name}/{what}", "rb") as fh:
                        data = fh.read().replace(b"\0", b" ").decode("latin-1")
                except OSError:
                    continue
                if data and data not in seen:
                    seen[data] = f"/proc/{entry.name}/{what}"
        samples += 1
        stop.wait(0.004)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"samples": samples, "blobs": seen}, fh)


def files_under(root: Path, skip: Sequence[str] = ()) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if str(rel / d) not in skip]
        for name in filenames:
            path = Path(dirpath) / name
            if any(str(rel / name).startswith(s) for s in skip):
                continue
            if path.is_file() and not path.is_symlink():
                yield path


def grep_files(paths: Iterable[Path], needles: Iterable[str]) -> list[str]:
    wanted = [n.encode() for n in needles]
    found = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        found += [f"{path}: {n.decode()[:3]}…" for n in wanted if n in data]  # not the secret
    return found


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "sample":
        _sample(Path(sys.argv[2]))
