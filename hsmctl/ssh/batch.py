"""Several device commands in one exec (``hsmsh -c batch``, see :mod:`hsmctl.appliance.shell`).

A device command on a channel of its own costs the device a session channel, a shell
process and a log session (~15 ms of its CPU); a batch pays them once. What goes over the
channel, both pure here: :func:`payload` (stdin: one JSON request a line, a command's
secrets inside its request, never on a command line) and :func:`replies` (stdout: one
JSON reply a line per command run, in order, up to the first that failed). A reply that
does not fit that shape is the device's integrity failure (exit 3), as any malformed
reply is: nothing of it is trusted.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence

from hsmctl.errors import IntegrityError, UsageError
from hsmctl.secret import Secret
from hsmctl.ssh.errors import Result

COMMAND = "batch"
MAX_COMMANDS = 16  # the shell's MAX_BATCH
MAX_INPUT = 256 * 1024  # the shell's MAX_BATCH_INPUT
MAX_OUTPUT = 1 << 20  # the shell's MAX_BATCH_OUTPUT, one command's output

Request = tuple[str, Sequence[Secret | str]]


def payload(requests: Sequence[Request]) -> bytes:
    """The batch's stdin. UsageError (showing no secret) for what the shell would refuse."""
    if not 1 <= len(requests) <= MAX_COMMANDS:
        raise UsageError(f"a batch holds 1 to {MAX_COMMANDS} device commands")
    lines = []
    for index, (line, secrets) in enumerate(requests):
        if not isinstance(line, str) or isinstance(secrets, str | bytes | Secret):
            raise UsageError(f"batch request {index}: a command (str) and a list of secrets")
        values = []
        for value in secrets:
            text = value.reveal() if isinstance(value, Secret) else value
            if not isinstance(text, str):
                raise UsageError(f"batch request {index}: a secret must be a str or Secret")
            values.append(text)
        lines.append(json.dumps({"line": line, "secrets": values}) + "\n")
    data = "".join(lines).encode("utf-8")
    if len(data) > MAX_INPUT:
        raise UsageError(f"a batch's requests exceed {MAX_INPUT} bytes")
    return data


def max_stdout(count: int) -> int:
    """The most stdout a batch of ``count`` commands can honestly produce."""
    return count * (4 * MAX_OUTPUT // 3 + 4 + 64 * 1024)


def replies(label: str, commands: Sequence[str], status: int, out: bytes, err: str) -> list[Result]:
    """The results of the commands that ran, in order, up to the first that failed (a
    batch refused before its first command: that command's failure, with the shell's
    stderr); IntegrityError if the device's reply is not a batch's (a wrong shape, more
    replies than commands, statuses that contradict each other)."""

    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"{label}: malformed reply to a batch of device commands: {why}")

    results: list[Result] = []
    lines = out.split(b"\n")
    if lines[-1]:
        raise bad("the last reply is not a whole line")
    for raw in lines[:-1]:
        if len(results) == len(commands):
            raise bad("more replies than commands")
        try:
            reply = json.loads(raw)
        except ValueError as exc:
            raise bad("a reply is not JSON") from exc
        if not isinstance(reply, dict) or set(reply) != {"exit", "stdout", "stderr"}:
            raise bad('a reply is not {"exit", "stdout", "stderr"}')
        code, body, text = reply["exit"], reply["stdout"], reply["stderr"]
        if type(code) is not int or not (isinstance(body, str) and isinstance(text, str)):
            raise bad("a reply's fields have the wrong types")
        try:
            data = base64.b64decode(body.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error) as exc:
            raise bad("a reply's stdout is not base64") from exc
        if len(data) > MAX_OUTPUT:
            raise bad(f"a reply's stdout is over {MAX_OUTPUT} bytes")
        command = commands[len(results)]
        results.append(Result(command, code, data.decode("utf-8", "replace"), text, len(data)))
        if code != 0:
            break
    if len(results) != len(lines) - 1:
        raise bad("a reply after a command that failed")
    if not results:
        if status == 0:
            raise bad("no reply, and status 0")
        # Refused before the first command (the session denied, the daemon down, the
        # batch not understood): that command's failure, as if it had run alone.
        return [Result(commands[0], status, "", err, 0)]
    last = results[-1].status
    if last != status or (last == 0 and len(results) != len(commands)):
        raise bad(f"the batch's status {status} contradicts its replies")
    return results
