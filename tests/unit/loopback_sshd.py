"""A private OpenSSH sshd on 127.0.0.1 playing a hostile device, and peak-memory runs.

The sshd runs as root inside its own mount namespace (``unshare --mount``), where
``/run`` is a private tmpfs and ``/etc`` an overlay whose ``passwd`` and ``shadow`` name
one throwaway account (``audit``, the collector's login): nothing on the host changes.
Every login runs ``ForceCommand /run/hostile/dispatch``, which sends ``audit export
--after N`` to the script the test installed with :meth:`Sshd.serve` and runs anything
else with ``sh -c`` (transport tests send shell commands).

:func:`measured` runs Python code in a child process and reports the child's own peak
RSS: the bound is on the process that did the work, not on the test runner.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
USER = "audit"
UID = 64998
ROOT_REASON = "needs root: runs its own sshd in a private mount namespace"

DISPATCH = """#!/bin/sh
case "$SSH_ORIGINAL_COMMAND" in
  "audit export --after "*) exec /run/hostile/export "${SSH_ORIGINAL_COMMAND##* }" ;;
esac
exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"
"""


def needs_root() -> pytest.MarkDecorator:
    return pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Sshd:
    port: int
    dir: Path
    key: Path
    """The client's private key (OpenSSH format)."""
    host_key: str
    """The host's public key line, to pin."""
    proc: subprocess.Popen[bytes]

    @property
    def hostile(self) -> Path:
        """Seen as ``/run/hostile`` inside the sshd's namespace."""
        return self.dir / "hostile"

    def serve(self, script: str) -> None:
        """What ``audit export --after N`` runs from now on (``$1`` is N)."""
        path = self.hostile / "export"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(script)
        tmp.chmod(0o755)
        os.replace(tmp, path)

    def put(self, name: str, data: bytes) -> str:
        """A file the device's scripts can read; returns its path inside the namespace."""
        path = self.hostile / name
        path.write_bytes(data)
        path.chmod(0o644)
        return f"/run/hostile/{name}"

    def connect_args(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port, "key": str(self.key), "pin": self.host_key}

    def log(self) -> str:
        return (self.dir / "sshd.log").read_text(errors="replace")


def start(directory: Path, *, account_expired: bool = False) -> Sshd:
    """Start the sshd (root only; the caller skips otherwise). ``account_expired``: the
    account expired long ago and sshd asks PAM (``UsePAM yes``, the host's PAM stack), as
    the appliance's sshd does for a disabled account."""
    if not Path("/usr/sbin/sshd").exists() or shutil.which("unshare") is None:
        pytest.fail("openssh-server and util-linux (unshare) are required")
    d = directory
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    for name in ("host_ed25519", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(d / name)],
            check=True,
        )
    (d / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        "sshd:x:102:65534::/run/sshd:/usr/sbin/nologin\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        f"{USER}:x:{UID}:65534:hostile device test:/:/bin/sh\n"
    )
    expires = "1" if account_expired else ""
    (d / "shadow").write_text(f"{USER}:*:19000:0:99999:7::{expires}:\n")
    (d / "shadow").chmod(0o600)
    hostile = d / "hostile"
    hostile.mkdir(mode=0o755)
    hostile.chmod(0o755)
    (hostile / "authorized_keys").write_text((d / "client.pub").read_text())
    (hostile / "authorized_keys").chmod(0o644)
    (hostile / "dispatch").write_text(DISPATCH)
    (hostile / "dispatch").chmod(0o755)
    port = _free_port()
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1:{port}\n"
        f"HostKey {d / 'host_ed25519'}\n"
        f"PidFile none\nLogLevel VERBOSE\nUsePAM {'yes' if account_expired else 'no'}\n"
        "StrictModes no\n"
        "AuthorizedKeysFile /run/hostile/authorized_keys\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        f"AllowUsers {USER}\nPermitRootLogin no\nDisableForwarding yes\n"
        "ForceCommand /run/hostile/dispatch\n"
        "MaxSessions 32\nMaxStartups 64\nPrintMotd no\n"
    )
    # /etc is an overlay whose upper layer (on the private /run) holds the account files:
    # a file bind-mounted over /etc/passwd would be lost the moment anything on the host
    # replaced /etc/passwd by rename (useradd, chpasswd), and sshd would then find no
    # such user ("Invalid user audit").
    script = (
        "mount -t tmpfs -o mode=755 tmpfs /run && "
        "mkdir -m 755 /run/sshd /run/hostile /run/etc /run/etc-work && "
        f"cp {d}/passwd {d}/shadow /run/etc/ && chmod 600 /run/etc/shadow && "
        "mount -t overlay overlay -o lowerdir=/etc,upperdir=/run/etc,workdir=/run/etc-work /etc && "
        f"mount --bind {hostile} /run/hostile && "
        f"exec /usr/sbin/sshd -D -e -f {d}/sshd_config"
    )
    with (d / "sshd.log").open("wb") as log_fh:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_proc(proc)
                pytest.fail(f"loopback sshd did not start: {(d / 'sshd.log').read_text()}")
            time.sleep(0.05)
    return Sshd(port, d, d / "client", (d / "host_ed25519.pub").read_text().strip(), proc)


def stop_proc(proc: subprocess.Popen[bytes]) -> None:
    """End the sshd and the sessions it started (its own process group)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    server = start(tmp_path_factory.mktemp("hostile-sshd"))
    try:
        yield server
    finally:
        stop_proc(server.proc)


# -- peak memory of a child process ------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    status: int
    result: dict[str, Any]
    stderr: str
    peak_mib: float
    seconds: float


_PEAK = """
import atexit, os

def _report_peak():
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["HSMCTL_TEST_PEAK_FILE"], "w") as out:
        out.write(peak)

atexit.register(_report_peak)
"""


def measured(code: str, *, timeout: float = 300.0) -> Measured:
    """Run ``code`` in a fresh Python; it prints one JSON object as its last stdout line.
    Returns that object, the exit status and the child's peak RSS: its ``VmHWM`` at exit,
    which counts only since the exec (``ru_maxrss`` from ``wait4`` also counts the test
    runner's image the child was forked from, 100 MiB and more late in a run; it is the
    fallback for a child that did not exit normally). A child past ``timeout`` is killed."""
    peak_fd, peak_path = _tempfile("peak")
    os.close(peak_fd)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HSMCTL_TEST_PEAK_FILE": peak_path}
    with open(os.devnull, "rb") as devnull:
        out_fd, out_path = _tempfile("out")
        err_fd, err_path = _tempfile("err")
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-c", _PEAK + code],
            stdin=devnull,
            stdout=out_fd,
            stderr=err_fd,
            env=env,
            cwd=REPO,
        )
        os.close(out_fd)
        os.close(err_fd)
    killer = threading.Timer(timeout, lambda: _kill(proc.pid))
    killer.start()
    try:
        _, wait_status, usage = os.wait4(proc.pid, 0)
    finally:
        killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(wait_status)  # reaped here, not by Popen
    seconds = time.monotonic() - started
    out = Path(out_path).read_text(errors="replace")
    err = Path(err_path).read_text(errors="replace")
    peak_kib = Path(peak_path).read_text().strip()
    for path in (out_path, err_path, peak_path):
        os.unlink(path)
    peak_mib = int(peak_kib) / 1024 if peak_kib else usage.ru_maxrss / 1024
    lines = out.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {"unparsed": lines[-1]}
    return Measured(proc.returncode, result, err, peak_mib, seconds)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _tempfile(what: str) -> tuple[int, str]:
    import tempfile

    fd, path = tempfile.mkstemp(prefix=f"measured-{what}-")
    return fd, path
