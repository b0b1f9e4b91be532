"""The appliance's init: personalise once, then run and supervise the device services.

Lifecycle: the lab starts it as PID 1 of the appliance's PID namespace (a Vagrant VM
runs it as a systemd service). On first boot it personalises the device from
``/etc/hsm/factory.json``; then it starts the device daemon (``hsmd``) and the two sshd
instances, restarts any that die, reaps orphans, and on SIGUSR1 (sent by the daemon
after ``network set`` or a host-key activation) reconciles the data-interface sshd with
the current address and keys. SIGTERM stops everything.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from hsmctl.appliance import paths

IDLE_WAIT = 1.0  # seconds between the supervisor's looks when no signal woke it
RESTART_DELAY = 1.0  # a service is started again at most once a second


def log(message: str) -> None:
    print(f"hsm-boot: {message}", file=sys.stderr, flush=True)


def _configure_mgmt(factory: dict[str, object]) -> None:
    mgmt = factory.get("mgmt")
    if not isinstance(mgmt, dict) or not mgmt.get("iface"):
        return
    iface, address = str(mgmt["iface"]), str(mgmt["address"])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=False)
    subprocess.run(["ip", "link", "set", iface, "up"], check=False)
    shown = subprocess.run(
        ["ip", "-o", "-4", "addr", "show", "dev", iface],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    if f" {address} " not in shown:
        subprocess.run(["ip", "addr", "add", address, "dev", iface], check=True)


def mgmt_address() -> str:
    device = json.loads(paths.DEVICE.read_text())
    return str(device["mgmt_ip"])


def data_address() -> str | None:
    try:
        network = json.loads(paths.NETWORK.read_text())
    except FileNotFoundError:
        return None
    address = network.get("address")
    return str(address).split("/")[0] if address else None


class Supervisor:
    def __init__(self) -> None:
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts: dict[str, float] = {}
        self.reconcile = False
        self.stopping = False

    def argv(self, name: str) -> list[str] | None:
        if name == "hsmd":
            return ["/usr/local/sbin/hsmd"]
        iface = name.removeprefix("sshd-")
        if iface == "mgmt":
            address: str | None = mgmt_address()
            config = paths.SSHD_MGMT_CONFIG
        else:
            address = data_address()
            config = paths.SSHD_DATA_CONFIG
        if address is None:
            return None
        return [
            "/usr/sbin/sshd",
            "-D",
            "-f",
            str(config),
            "-o",
            f"ListenAddress={address}",
            "-E",
            str(paths.SSHD_LOGS[iface]),
        ]

    def start(self, name: str) -> None:
        argv = self.argv(name)
        if argv is None:
            return
        self.children[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        self.restarts[name] = time.monotonic()

    def stop(self, name: str) -> None:
        proc = self.children.pop(name, None)
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def run(self) -> int:
        # Signals wake the loop at once (a child's end, a reconcile, a stop); otherwise it
        # looks every IDLE_WAIT seconds. It used to poll every 0.2 s, scanning /proc each
        # time: ~1.2 ms of CPU a second on every idle appliance (0.12 CPU-s/s for 100).
        wake, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, self._on_chld)
        signal.signal(signal.SIGUSR1, self._on_usr1)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        paths.RUN.mkdir(parents=True, exist_ok=True)
        paths.BOOT_PID.write_text(f"{os.getpid()}\n")
        self.start("hsmd")
        self._wait_for_socket()
        for name in ("sshd-mgmt", "sshd-data"):
            self.start(name)
        log("appliance up")
        while not self.stopping:
            self._reap()
            if self.reconcile:
                self.reconcile = False
                self.stop("sshd-data")
                self.start("sshd-data")
            timeout = IDLE_WAIT
            for name in ("hsmd", "sshd-mgmt", "sshd-data"):
                proc = self.children.get(name)
                if proc is not None and proc.poll() is not None:
                    del self.children[name]
                    log(f"{name} exited with {proc.returncode}; restarting")
                wanted = name not in self.children and (name != "sshd-data" or data_address())
                since = time.monotonic() - self.restarts.get(name, 0.0)
                if wanted and since > RESTART_DELAY:
                    self.start(name)
                elif wanted:  # look again when it may be started
                    timeout = min(timeout, RESTART_DELAY - since + 0.01)
            self._wait(wake, timeout)
        for name in list(self.children):
            self.stop(name)
        return 0

    def _wait_for_socket(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not paths.SOCKET.exists():
            time.sleep(0.05)

    def _reap(self) -> None:
        # PID 1 of the appliance adopts orphans; collect them, but never our own children
        # (Popen.poll does that).
        ours = {p.pid for p in self.children.values()}
        try:
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit() or int(entry.name) in ours:
                    continue
                try:
                    stat = Path(f"/proc/{entry.name}/stat").read_text()
                except OSError:
                    continue
                fields = stat.rsplit(")", 1)[1].split()
                if fields[0] == "Z" and int(fields[1]) == os.getpid():
                    os.waitpid(int(entry.name), os.WNOHANG)
        except OSError:
            pass

    def _wait(self, wake: int, timeout: float) -> None:
        """Until a signal arrives (its number is written to ``wake``) or ``timeout``."""
        if not self.stopping and not self.reconcile:
            select.select([wake], [], [], max(timeout, 0.0))
        with contextlib.suppress(BlockingIOError):
            while os.read(wake, 512):
                pass

    def _on_chld(self, signum: int, frame: object) -> None:
        """Nothing to do here: the loop (woken by the signal) reaps and restarts."""

    def _on_usr1(self, signum: int, frame: object) -> None:
        self.reconcile = True

    def _on_term(self, signum: int, frame: object) -> None:
        self.stopping = True


def restart_argv() -> list[str] | None:
    """The command line that starts this program afresh (``python3 -I hsm-boot``), or
    None when it was not started from a file (then it carries on in-process)."""
    script = sys.argv[0] if sys.argv else ""
    if not script or not Path(script).is_file() or not sys.executable:
        return None
    return [sys.executable, "-I", script]


def factory_from_cmdline(cmdline: str) -> dict[str, object] | None:
    """A VM's factory record: ``hsmctl.factory=`` (URL-safe base64 of its JSON) on the
    kernel command line, which the hypervisor sets (the lab writes the file instead)."""
    for word in cmdline.split():
        if word.startswith("hsmctl.factory="):
            blob = word.split("=", 1)[1]
            try:
                data = json.loads(base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4)))
            except (ValueError, binascii.Error):
                return None
            return data if isinstance(data, dict) else None
    return None


def main() -> int:
    os.umask(0o022)
    if not paths.FACTORY.exists():
        try:
            factory_record = factory_from_cmdline(Path("/proc/cmdline").read_text())
        except OSError:
            factory_record = None
        if factory_record is not None:
            from hsmctl.appliance.personalise import write_atomic

            write_atomic(paths.FACTORY, json.dumps(factory_record, indent=2) + "\n", 0o644)
    if not paths.DEVICE.exists():
        if not paths.FACTORY.exists():
            log(f"not personalised and no {paths.FACTORY}")
            return 1
        from hsmctl.appliance.personalise import personalise

        personalise(json.loads(paths.FACTORY.read_text()))
        # The supervisor lives as long as the appliance: it starts afresh (same pid, so
        # still the namespace's init; no child yet), without the token library, SoftHSM
        # and cryptography that personalising loaded: about 8 MB less per appliance
        # (docs/performance.md). The new process finds device.json and supervises.
        argv = restart_argv()
        if argv is not None:
            sys.stderr.flush()
            os.execv(argv[0], argv)  # noqa: S606 - our own interpreter and script
    factory = json.loads(paths.FACTORY.read_text()) if paths.FACTORY.exists() else {}
    _configure_mgmt(factory)
    return Supervisor().run()
