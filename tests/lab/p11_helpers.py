"""What the application-access tests share (issue 11): an appliance taken over for
applications, a non-root application user on this host holding only kits, pkcs11-tool
fed its PIN on a terminal, python-pkcs11 scripts, and the ``openssl`` command line as
the verifier.

Every application command runs as the application's user in a tenant's client
namespace with a clean environment (``env -i``): nothing of this host's PKCS#11 setup
but p11-kit's. The PIN reaches pkcs11-tool through a pty when it asks (never ``--pin``,
which ``ps`` shows) and python-pkcs11 from an owner-only file.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import utils

from tests.conftest import HSMCTL
from tests.lab.takeover_helpers import Rig, audit_records, console, escrowed, takeover_cli

PROXY = "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so"
CLIENT_SO = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
PYTHON = str(Path(HSMCTL).with_name("python"))


class Sampler:
    """Every process's argv and environment, read from /proc every 20 ms, looking for
    ``needle``."""

    def __init__(self, needle: bytes) -> None:
        self.needle = needle
        self.hits: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = str(os.getpid())
        while not self._stop.is_set():
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit() or entry.name == me:
                    continue
                for what in ("cmdline", "environ"):
                    try:
                        with open(f"/proc/{entry.name}/{what}", "rb") as f:
                            data = f.read()
                    except OSError:
                        continue
                    if self.needle in data:
                        cmd = data.replace(b"\0", b" ")[:200].decode(errors="replace")
                        self.hits.append(f"{entry.name} {what}: {cmd}")
            self.samples += 1
            self._stop.wait(0.02)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def on_a_terminal(
    argv: list[str], pin: str | None, cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` on a pty and type ``pin`` when it prompts for a PIN. ``stdout`` is
    what the terminal showed; ``stderr`` stays separate."""
    master, slave = os.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=subprocess.PIPE, cwd=cwd)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    sent = pin is None
    err = b""
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the terminal's last holder closed it
                    break
                if not chunk:
                    break
                out += chunk
                if not sent and pin is not None and b"PIN:" in out:
                    time.sleep(0.05)  # getpass flushes input queued before its prompt
                    os.write(master, pin.encode() + b"\n")
                    sent = True
            elif proc.poll() is not None:
                break
        assert proc.stderr is not None
        err = proc.stderr.read()
        proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.stderr is not None:
            proc.stderr.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@dataclass
class AppHost:
    """The tenant's application host: an appliance taken over with ``hsmctl takeover``,
    its token label and user PIN (escrowed by the takeover), and a non-root user
    (``user``, home ``home``) holding the kits."""

    rig: Rig
    conf: Path
    label: str
    pin: str
    home: Path
    user: str

    @property
    def pin_file(self) -> Path:
        return self.home / "pin"

    def kit(self, name: str) -> Path:
        return self.home / f"kit-{name}"

    def hsmctl(
        self, *args: str, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[bytes]:
        """``hsmctl`` as the customer (root, the tenant's client namespace)."""
        argv = ["ip", "netns", "exec", self.rig.netns, HSMCTL, "--config", str(self.conf),
                *args]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
        if check:
            assert proc.returncode == 0, proc.stderr.decode()
        return proc

    def register(self, name: str, role: str = "crypto-officer") -> dict[str, Any]:
        """``hsmctl client register``; the kit then belongs to the application's user."""
        out = self.hsmctl("client", "register", self.rig.appliance, "--name", name,
                          "--role", role, "--output", str(self.kit(name)), "--json")  # fmt: skip
        self.chown()
        return dict(json.loads(out.stdout))

    def use(self, name: str) -> None:
        """Install ``name``'s module file where p11-kit reads it for the application's
        user (one client's module at a time)."""
        modules = self.home / ".config" / "pkcs11" / "modules"
        shutil.rmtree(modules, ignore_errors=True)
        modules.mkdir(parents=True)
        shutil.copy(self.kit(name) / f"{name}.module", modules)
        self.chown()

    def remote(self, name: str) -> str:
        """The kit's ``remote:`` command (for P11_KIT_SERVER_ADDRESS)."""
        from hsmctl.clients.kit import remote_line

        return remote_line((self.kit(name) / f"{name}.module").read_text())

    def argv(self, *argv: str, env: dict[str, str] | None = None,
             netns: str | None = None) -> list[str]:  # fmt: skip
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        return ["ip", "netns", "exec", netns or self.rig.netns, "runuser", "-u", self.user,
                "--", "env", "-i", f"HOME={self.home}", "PATH=/usr/bin:/bin", "LANG=C.UTF-8",
                *extra, *argv]  # fmt: skip

    def run(
        self, *argv: str, env: dict[str, str] | None = None, netns: str | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
        return subprocess.run(self.argv(*argv, env=env, netns=netns), capture_output=True,
                              timeout=timeout, check=False, cwd=self.home)  # fmt: skip

    def python(self, script: str, *args: str, env: dict[str, str] | None = None,
               timeout: float = 300) -> Any:  # fmt: skip
        """A python-pkcs11 script in its own process; its last stdout line is JSON."""
        proc = self.run(PYTHON, "-c", script, *args, env=env, timeout=timeout)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        return json.loads(proc.stdout.decode().strip().splitlines()[-1])

    def tool(self, *args: str, login: bool = True, timeout: float = 120
             ) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
        """pkcs11-tool through the proxy, selecting the token by its label; with
        ``login`` the PIN is typed when it asks."""
        argv = self.argv("pkcs11-tool", "--module", PROXY, "--token-label", self.label,
                         *(("--login",) if login else ()), *args)  # fmt: skip
        return on_a_terminal(argv, self.pin if login else None, self.home, timeout)

    def work(self, name: str) -> Path:
        """A path in the application's work directory (created, owned by the user)."""
        path = self.home / "work" / name
        if not path.parent.is_dir():
            path.parent.mkdir()
            shutil.chown(path.parent, self.user, self.user)
        return path

    def chown(self) -> None:
        subprocess.run(["chown", "-R", f"{self.user}:", str(self.home)], check=True)

    def records(self, after: int = 0) -> list[dict[str, Any]]:
        return [r for r in audit_records(self.rig.appliance) if r["seq"] > after]

    def last_seq(self) -> int:
        return int(audit_records(self.rig.appliance)[-1]["seq"])


@contextmanager
def app_host(lab: dict[str, Any], appliance: str, tenant: str, base: Path,
             user: str) -> Iterator[AppHost]:  # fmt: skip
    """Provision ``appliance`` to ``tenant``, take it over with ``hsmctl takeover``, and
    make ``user`` (a fresh non-root account) with the PIN in an owner-only file."""
    rig = Rig(lab, appliance, tenant, base).provision()
    conf = rig.tenant_conf(base)
    proc = takeover_cli(rig.netns, conf, rig.handoff)
    assert proc.returncode == 0, proc.stderr.decode()
    pin = escrowed(conf, rig.appliance, "co-pin")
    assert pin is not None
    shown = json.loads(console(rig.appliance, "hsmsh", "-c", "hsm show").stdout)
    home = Path("/home") / user
    subprocess.run(["userdel", "-r", user], capture_output=True, check=False)
    subprocess.run(["useradd", "--create-home", "--home-dir", str(home), user], check=True)
    try:
        host = AppHost(rig, conf, str(shown["label"]), pin, home, user)
        host.pin_file.write_text(pin)
        host.pin_file.chmod(0o600)
        host.chown()
        yield host
    finally:
        subprocess.run(["userdel", "-r", user], capture_output=True, check=False)


# -- the openssl command line as the verifier ------------------------------------------------


def raw_ecdsa_to_der(sig: bytes) -> bytes:
    """PKCS#11's ECDSA signature (r || s) as the DER SEQUENCE OpenSSL reads."""
    half = len(sig) // 2
    return utils.encode_dss_signature(int.from_bytes(sig[:half]), int.from_bytes(sig[half:]))


def openssl_verify_all(pub_der: Path, rows: list[tuple[bytes, bytes]], kind: str) -> int:
    """How many of ``rows`` (message, signature) the ``openssl`` command verifies against
    the DER public key: ``ecdsa`` rows are (SHA-256 digest, raw r||s signature) and
    ``ecdsa-der`` rows the same with a DER signature, checked with ``pkeyutl -verify``
    over the digest; ``rsa`` rows are (data, PKCS#1 v1.5
    SHA-256 signature), checked with ``dgst -sha256 -verify`` over the data. One shell
    runs every check (about 3 ms each)."""
    with tempfile.TemporaryDirectory(prefix="verify-") as tmp:
        d = Path(tmp)
        for i, (message, sig) in enumerate(rows):
            (d / f"{i}.in").write_bytes(message)
            (d / f"{i}.sig").write_bytes(raw_ecdsa_to_der(sig) if kind == "ecdsa" else sig)
        if kind.startswith("ecdsa"):
            check = (f'openssl pkeyutl -verify -pubin -keyform DER -inkey "{pub_der}" '
                     '-in "$i.in" -sigfile "$i.sig"')  # fmt: skip
        else:
            check = (f'openssl dgst -sha256 -verify "{pub_der}" -keyform DER '
                     '-signature "$i.sig" "$i.in"')  # fmt: skip
        script = (f'cd "{d}"; n=0; i=0; while [ "$i" -lt {len(rows)} ]; do '
                  f'if {check} >/dev/null 2>&1; then n=$((n+1)); fi; i=$((i+1)); done; '
                  'echo "$n"')  # fmt: skip
        proc = subprocess.run(["sh", "-c", script], capture_output=True, timeout=600,
                              check=True)  # fmt: skip
        return int(proc.stdout.decode().strip())
