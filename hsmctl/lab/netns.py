"""Thin helpers over iproute2 and Linux namespaces for the lab.

``ip`` is run as a subprocess (never through a shell); a failure becomes
:class:`~hsmctl.errors.CommandFailed` carrying the command and its output.
:func:`connect_in` opens a TCP connection from inside a network namespace (setns in a
short-lived thread: the socket keeps the namespace it was made in) so host-side code can
talk to addresses only reachable there; :func:`socket_factory` hands it to the SSH
transport (``DeviceConnection(connect_socket=...)``, paramiko's ``sock=``).
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hsmctl.errors import CommandFailed, UnreachableError

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000


def run(*argv: str, check: bool = True, input: str | None = None) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, input=input, check=False)
    if check and proc.returncode != 0:
        raise CommandFailed(
            f"{argv[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}",
            argv=argv,
            status=proc.returncode,
            output=proc.stdout + proc.stderr,
        )
    return proc.stdout


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    if netns is None:
        return run("ip", *args, check=check)
    return run("ip", "-n", netns, *args, check=check)


def ip_json(*args: str, netns: str | None = None) -> list[dict[str, Any]]:
    out = ip("-j", *args, netns=netns)
    data = json.loads(out) if out.strip() else []
    return data if isinstance(data, list) else []


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def list_netns(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def sysctl(netns: str, **values: str) -> None:
    args = [f"{k.replace('__', '.')}={v}" for k, v in values.items()]
    run("ip", "netns", "exec", netns, "sysctl", "-q", "-w", *args)


def add(name: str) -> None:
    """A new namespace with lo up, IPv6 off and no routes."""
    if not exists(name):
        ip("netns", "add", name)
    sysctl(
        name,
        net__ipv6__conf__all__disable_ipv6="1",
        net__ipv6__conf__default__disable_ipv6="1",
    )
    ip("link", "set", "lo", "up", netns=name)


def pids(name: str) -> list[int]:
    out = ip("netns", "pids", name, check=False)
    return [int(x) for x in out.split()]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6", use_errno=True)


def connect_in(netns: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection made from inside ``netns``."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
            try:
                if _libc().setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
            sock = socket.create_connection((host, port), timeout=timeout)
            result["sock"] = sock
        except OSError as exc:
            result["error"] = exc

    thread = threading.Thread(target=target, name=f"setns-{netns}")
    thread.start()
    thread.join()
    if "error" in result:
        raise UnreachableError(
            f"{host}:{port} from namespace {netns}: {result['error']}"
        ) from result["error"]
    sock: socket.socket = result["sock"]
    return sock


def socket_factory(netns: str) -> Callable[[str, int, float], socket.socket]:
    """A ``connect_socket`` for :class:`hsmctl.ssh.DeviceConnection` and
    :func:`hsmctl.ssh.scan_host_keys` that connects from inside ``netns``."""

    def connect(host: str, port: int, timeout: float) -> socket.socket:
        return connect_in(netns, host, port, timeout=timeout)

    return connect
