"""The VM tier's out-of-band path: a root command in the appliance through the QEMU guest
agent on its virtio-serial channel — the hypervisor's way in, like a BMC's serial
console: no account on the device and no network.

``virsh`` reads its commands from stdin here, never from argv: what a command is given
on its stdin (a PIN for ``hsm init`` on the console, say) travels base64-encoded inside
the agent's request and must not show in ``/proc/*/cmdline``.
"""

from __future__ import annotations

import base64
import binascii
import json
import subprocess
import time
from typing import Any

from hsmctl.errors import CommandFailed, IntegrityError, UnreachableError
from hsmctl.lab.vm.host import URI

# qemu-ga caps captured output at 16 MiB per stream; base64 and JSON around it.
MAX_REPLY = 48 << 20
ENV = (
    "PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
    "SOFTHSM2_CONF=/etc/softhsm/softhsm2.conf",
    "LANG=C.UTF-8",
    "HSM_CONSOLE=1",
)


def _agent(domain: str, request: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    # One virsh shell line: the JSON in single quotes, where virsh takes every character
    # literally; a quote inside (only ever inside a JSON string) as its JSON escape.
    text = json.dumps(request, separators=(",", ":")).replace("'", "\\u0027")
    line = f"qemu-agent-command {domain} '{text}'\n"
    argv = ["virsh", "-q", "-c", URI]
    try:
        proc = subprocess.run(
            argv, input=line, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise UnreachableError(f"{domain}: the guest agent did not answer") from exc
    # virsh in shell mode echoes its prompt and the command: the reply is the JSON line.
    replies = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not replies:
        raise UnreachableError(
            f"{domain}: the guest agent is not reachable: {proc.stderr.strip()[-300:]}"
        )
    return parse_reply(domain, replies[-1])


def parse_reply(domain: str, text: str) -> dict[str, Any]:
    """The guest agent's reply: bytes from the device, so malformed is an integrity
    failure (exit 3) and an error reply a failed command, named without echoing it."""
    if len(text) > MAX_REPLY:
        raise IntegrityError(f"{domain}: the guest agent's reply is over {MAX_REPLY} bytes")
    try:
        reply = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"{domain}: the guest agent's reply is not JSON") from exc
    if not isinstance(reply, dict):
        raise IntegrityError(f"{domain}: the guest agent's reply is not a JSON object")
    if "return" not in reply:
        error = reply.get("error")
        desc = error.get("desc") if isinstance(error, dict) else None
        what = str(desc)[:200] if isinstance(desc, str) else "no reason given"
        raise CommandFailed(f"{domain}: guest agent error: {what}", argv=["virsh"], status=1)
    return reply


def exec_result(domain: str, status: object) -> tuple[int, bytes, bytes]:
    """Exit status, stdout and stderr of a finished ``guest-exec`` (device bytes)."""
    try:
        if not isinstance(status, dict):
            raise TypeError("not an object")
        out = base64.b64decode(status.get("out-data", ""), validate=True)
        err = base64.b64decode(status.get("err-data", ""), validate=True)
        code = status.get("exitcode")
        if code is None:
            code = 128 + int(status.get("signal", 0))
        if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 255 + 128:
            raise TypeError("exit status out of range")
    except (TypeError, ValueError, binascii.Error) as exc:
        raise IntegrityError(f"{domain}: malformed guest-exec result ({exc})") from exc
    return code, out, err


def ping(domain: str) -> bool:
    try:
        _agent(domain, {"execute": "guest-ping"}, timeout=10)
    except (UnreachableError, CommandFailed, IntegrityError):
        return False
    return True


def run(
    domain: str, argv: list[str], *, input: bytes | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` as root in the guest; its status, stdout and stderr."""
    args: dict[str, Any] = {
        "path": "/usr/bin/env",
        "arg": ["-i", *ENV, *argv],
        "capture-output": True,
    }
    if input:
        args["input-data"] = base64.b64encode(input).decode()
    started = _agent(domain, {"execute": "guest-exec", "arguments": args})
    pid = started["return"].get("pid") if isinstance(started["return"], dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise IntegrityError(f"{domain}: guest-exec gave no process id")
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        status = _agent(domain, {"execute": "guest-exec-status", "arguments": {"pid": pid}})[
            "return"
        ]
        if not isinstance(status, dict) or status.get("exited"):
            break
        if time.monotonic() > deadline:
            raise UnreachableError(f"{domain}: console command did not finish in {timeout:.0f}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.25)
    code, out, err = exec_result(domain, status)
    return subprocess.CompletedProcess(argv, code, out, err)
