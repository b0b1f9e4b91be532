"""The transport's errors, and the one place paramiko's and the socket's become ours.

Errors are translated here and only here (``raise ... from exc``)::

  socket connect refused / timeout / no route / EINVAL (blackhole),
  banner, negotiation, auth or channel timeout, connection lost
  (EOFError or a socket error raised in our thread, or saved by
  paramiko's transport thread and raised by the next call: key
  exchange, auth, open_session, exec_command, stdin, EOF, recv's
  window adjust, a channel closed without exit status; or a clean
  DISCONNECT while paramiko waited), a command after the link
  died, the command's deadline or stall limit                    -> UnreachableError (4)
  presented host key not pinned                                  -> HostKeyMismatch (3)
  more than a bound allows (run() reply, SSH packet, channel
  window)                                                        -> OutputLimitExceeded (3)
  key or password refused, second factor missing, the device
  hanging up while it judges the login (PAM account refused)     -> AuthenticationFailed (1)
  any other SSH protocol failure                                 -> SshProtocolError (1)
  a device command that exits non-zero (hsmsh statuses, sysexits.h):
    64 usage        -> DeviceUsageError (2)     the device parsed nothing, changed nothing
    65 integrity    -> DeviceIntegrityError (3) e.g. ``audit verify`` found a broken chain
    69 unavailable  -> DeviceUnavailable (4)    the device daemon is down; retry later
    77 denied       -> DeviceDenied (1)         see below
    anything else   -> DeviceCommandFailed (1)

A device denial (77) is exit 1, not 5: the transport cannot tell *why* the role table
refused (wrong state such as "customer-owned", or a command the role never has), and 1
ranks above 5 when several appliances are summarised, so it never under-reports. A
workflow that knows a denial means "wrong state" raises ConflictError (5) itself.

Closing a channel or a connection never raises: on a link that died an instant before,
paramiko's CHANNEL_CLOSE send raises a bare EOFError, which from a ``finally`` replaced
the error being reported (and reached the CLI as click's "aborted", exit 1).

Messages carry host, command, status and the tail of stderr; never stdin, never a password.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from paramiko.ssh_exception import AuthenticationException, SSHException

from hsmctl.errors import (
    CommandFailed,
    HsmctlError,
    IntegrityError,
    UnreachableError,
    UsageError,
)
from hsmctl.ssh.limits import MAX_SSH_PACKET

# Device-shell exit statuses (hsmctl.appliance.protocol; repeated here so the client side
# never imports device firmware).
DEVICE_EXIT_USAGE: Final = 64
DEVICE_EXIT_INTEGRITY: Final = 65
DEVICE_EXIT_UNAVAILABLE: Final = 69
DEVICE_EXIT_DENIED: Final = 77
NO_EXIT_STATUS: Final = -1

# paramiko reports these as plain SSHException; they are timeouts or a dropped link.
_UNREACHABLE_MESSAGES: Final = (
    "Error reading SSH protocol banner",
    "No existing session",  # start_client gave up waiting (negotiation timeout)
    "Timeout opening channel",
    "Key-exchange timed out",
    "SSH session not active",
    "Authentication timeout",
    "transport shut down or saw EOF",
    "Unable to open channel",  # the link ended (no error saved: a clean disconnect) meanwhile
)


class AuthenticationFailed(HsmctlError):
    """The device refused our credentials, or wanted a factor we did not have (exit 1)."""


class SshProtocolError(HsmctlError):
    """An SSH-level failure that is neither reachability, identity nor authentication."""


class OutputLimitExceeded(IntegrityError):
    """The device sent more than a bound allows (exit 3): a reply longer than a command's
    replies can be, an SSH packet longer than any OpenSSH sends, data beyond the channel
    window. A device that behaves so is not behaving as the device we pinned."""


class OversizedPacket(SSHException):
    """Raised in paramiko's transport thread by
    :class:`~hsmctl.ssh.channel.BoundedPacketizer`; the transport saves it and the next
    call in our thread raises it."""

    def __init__(self, size: int) -> None:
        super().__init__(f"an SSH packet of {size} bytes (more than {MAX_SSH_PACKET})")
        self.size = size


@dataclass(frozen=True)
class Result:
    """What a device command did. ``stdin`` is deliberately not kept.

    ``status`` is :data:`NO_EXIT_STATUS` (-1) if the session ended without one (killed by
    a signal). For :meth:`DeviceConnection.run_stream`, ``stdout`` is empty and
    ``stdout_bytes`` counts what went to the sink.
    """

    command: str
    status: int
    stdout: str
    stderr: str
    stdout_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 0


class DeviceCommandFailed(CommandFailed):
    """A device command exited non-zero; holds the :class:`Result` (and host) for reports.

    ``str()`` is the message plus the last lines of the device's stderr.
    """

    meaning = "failed"

    def __init__(self, host: str, result: Result) -> None:
        status = "no exit status" if result.status == NO_EXIT_STATUS else f"exit {result.status}"
        super().__init__(
            f"{host}: device command '{result.command}' {self.meaning} ({status})",
            argv=(result.command,),
            status=result.status,
            output=result.stderr,
        )
        self.host = host
        self.result = result
        self.detail["host"] = host


class DeviceDenied(DeviceCommandFailed):
    """The device's role table refused the command (status 77). Exit 1; see module doc."""

    meaning = "was denied by the device"


class DeviceUsageError(DeviceCommandFailed, UsageError):
    """The device's grammar refused the command line (status 64): nothing changed (exit 2)."""

    exit_code = 2
    meaning = "was refused as invalid by the device"


class DeviceIntegrityError(DeviceCommandFailed, IntegrityError):
    """The device reports an integrity failure, e.g. of its own log (status 65, exit 3)."""

    exit_code = 3
    meaning = "reported an integrity failure"


class DeviceUnavailable(DeviceCommandFailed, UnreachableError):
    """The device's daemon did not answer (status 69): reachable host, service down (exit 4)."""

    exit_code = 4
    meaning = "could not reach the device service"


DEVICE_ERRORS: Final[Mapping[int, type[DeviceCommandFailed]]] = {
    DEVICE_EXIT_USAGE: DeviceUsageError,
    DEVICE_EXIT_INTEGRITY: DeviceIntegrityError,
    DEVICE_EXIT_UNAVAILABLE: DeviceUnavailable,
    DEVICE_EXIT_DENIED: DeviceDenied,
}


def device_error(host: str, result: Result) -> DeviceCommandFailed:
    """The exception for a non-zero device status (for callers that ran with check=False)."""
    return DEVICE_ERRORS.get(result.status, DeviceCommandFailed)(host, result)


# -- translation ----------------------------------------------------------------------------


def socket_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the address ({exc.strerror})"
    if isinstance(exc, OSError) and exc.errno is not None:
        reasons = {
            errno.ECONNREFUSED: "connection refused",
            errno.ETIMEDOUT: "timed out",
            errno.EHOSTUNREACH: "host unreachable",
            errno.ENETUNREACH: "network unreachable",
            errno.EINVAL: "no usable route (the address is blackholed)",
            errno.ECONNRESET: "connection reset by the device",
            errno.EPIPE: "connection closed by the device",
        }
        return reasons.get(exc.errno, exc.strerror or str(exc))
    return str(exc) or type(exc).__name__


def translate(exc: BaseException, where: str) -> HsmctlError:
    """Map a paramiko/socket exception to our tree. ``where`` is ``host:port`` (+context)."""
    if isinstance(exc, HsmctlError):
        return exc
    if isinstance(exc, OversizedPacket):
        return OutputLimitExceeded(f"{where}: the device sent {exc}")
    text = str(exc)
    if any(marker in text for marker in _UNREACHABLE_MESSAGES):
        return UnreachableError(f"{where}: timed out or connection lost ({text.strip()})")
    if isinstance(exc, AuthenticationException):
        return AuthenticationFailed(f"{where}: authentication failed ({text.strip()})")
    if isinstance(exc, EOFError):
        return UnreachableError(f"{where}: connection closed by the device")
    if isinstance(exc, OSError):
        return UnreachableError(f"{where}: {socket_reason(exc)}")
    if isinstance(exc, SSHException):
        return SshProtocolError(f"{where}: SSH error: {text.strip() or type(exc).__name__}")
    return SshProtocolError(f"{where}: unexpected {type(exc).__name__}: {text.strip()}")


def hung_up_on_login(exc: BaseException) -> bool:
    """Whether paramiko reports that the server closed the connection while we waited for
    its answer to an authentication request (a clean end or EOF in its thread)."""
    return isinstance(exc, AuthenticationException) and "transport shut down or saw EOF" in str(exc)
