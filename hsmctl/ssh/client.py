"""The one SSH transport every workflow uses to reach a device (paramiko underneath).

Why it is shaped this way:

* **Pinning only.** The server's key is checked by :class:`PinnedKeyPolicy` against a
  :class:`~hsmctl.ssh.hostkeys.PinnedHostKeys` set right after key exchange, before any
  authentication request is sent; system/user known_hosts files are never read and
  nothing is ever added. A device with an unpinned key is an identity violation (exit 3),
  not a prompt.
* **Explicit authentication.** No agent, no ``~/.ssh`` keys: the key (and, for ``admin``,
  the password) given, in that order. The data interface requires publickey *then*
  password for ``admin`` (``AuthenticationMethods publickey,password``); the key step
  returns "partial success" and the password completes it. Keyboard-interactive is never
  tried, so nothing can prompt on a terminal.
* **Secrets on stdin only.** :meth:`DeviceConnection.run` takes secrets as stdin lines;
  the command line is logged by the device and must never hold one.
* **Bounded.** Everything a device sends is bounded in time and memory, whatever it
  does: a deadline per command checked after every read (not only when nothing is
  waiting), an optional stall limit (no stdout for ``Timeouts.idle`` seconds), a timer
  on paramiko's exec request (it waits for the reply without a timeout), stderr kept as
  a tail of :data:`STDERR_TAIL_BYTES`, ``run()`` replies capped at
  :data:`RUN_STDOUT_LIMIT`, SSH packets capped at :data:`MAX_SSH_PACKET` and data
  beyond the channel window refused (paramiko checks neither).
* **Errors translated here and only here** (``raise ... from exc``)::

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

import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, Final

import paramiko
from paramiko.auth_strategy import AuthSource, AuthStrategy, SourceResult
from paramiko.buffered_pipe import BufferedPipe
from paramiko.packet import Packetizer
from paramiko.ssh_exception import AuthenticationException, IncompatiblePeer, SSHException

from hsmctl.errors import (
    CommandFailed,
    HostKeyMismatch,
    HsmctlError,
    IntegrityError,
    UnreachableError,
    UsageError,
)
from hsmctl.secret import Secret
from hsmctl.ssh.hostkeys import SSH_PORT, KeyFormatError, PinnedHostKeys, PublicKey

log = logging.getLogger(__name__)

# Device-shell exit statuses (hsmctl.appliance.protocol; repeated here so the client side
# never imports device firmware).
DEVICE_EXIT_USAGE: Final = 64
DEVICE_EXIT_INTEGRITY: Final = 65
DEVICE_EXIT_UNAVAILABLE: Final = 69
DEVICE_EXIT_DENIED: Final = 77
NO_EXIT_STATUS: Final = -1

# Large windows and packets so bulk output (``audit export``) is not throttled by window
# adjust round trips; paramiko's defaults (2 MiB / 32 KiB) cap throughput well below what
# the link and the cipher can do. The window also bounds how much a slow sink can make us
# buffer: paramiko holds up to a window, and a read of it is copied twice more. 16 MiB
# streams as fast as 64 MiB did (1 GiB over loopback: 320-520 MB/s into a null sink, both;
# into a 330 MB/s sink 175-260 MB/s against 120-190 MB/s) at a peak RSS of 125-155 MiB
# instead of 300-400 MiB.
WINDOW_SIZE: Final = 16 * 1024 * 1024
MAX_PACKET_SIZE: Final = 256 * 1024
READ_SIZE: Final = WINDOW_SIZE  # take all that arrived: a partial read copies the rest
MAX_SSH_PACKET: Final = 2 * MAX_PACKET_SIZE
"""The longest SSH packet accepted from a device. paramiko reads whatever length a packet
claims (up to 4 GiB) before checking its MAC; OpenSSH never sends more than 256 KiB, and
a channel packet may not exceed :data:`MAX_PACKET_SIZE`, so twice that leaves room for
headers, padding and MAC."""
RUN_STDOUT_LIMIT: Final = 16 * 1024 * 1024
"""The longest reply :meth:`DeviceConnection.run` keeps. Device replies are small: the
largest is ``audit show --last 10000``, about 4 MB. Bulk output goes through
:meth:`DeviceConnection.run_stream`."""
STDERR_TAIL_BYTES: Final = 64 * 1024
"""stderr is kept as its last this many bytes: reports show its last lines, and a device
that writes stderr without end must not fill our memory."""
# AES-GCM first: an AEAD costs one pass per packet instead of cipher + HMAC.
_PREFERRED_CIPHERS: Final = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
SCAN_KEY_TYPES: Final = ("ssh-ed25519", "ecdsa-sha2-nistp256")

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


# -- errors -----------------------------------------------------------------------------------


class AuthenticationFailed(HsmctlError):
    """The device refused our credentials, or wanted a factor we did not have (exit 1)."""


class SshProtocolError(HsmctlError):
    """An SSH-level failure that is neither reachability, identity nor authentication."""


class OutputLimitExceeded(IntegrityError):
    """The device sent more than a bound allows (exit 3): a reply longer than a command's
    replies can be, an SSH packet longer than any OpenSSH sends, data beyond the channel
    window. A device that behaves so is not behaving as the device we pinned."""


class _OversizedPacket(SSHException):
    """Raised in paramiko's transport thread by :class:`_BoundedPacketizer`; the transport
    saves it and the next call in our thread raises it."""

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


def _socket_reason(exc: BaseException) -> str:
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


def _translate(exc: BaseException, where: str) -> HsmctlError:
    """Map a paramiko/socket exception to our tree. ``where`` is ``host:port`` (+context)."""
    if isinstance(exc, HsmctlError):
        return exc
    if isinstance(exc, _OversizedPacket):
        return OutputLimitExceeded(f"{where}: the device sent {exc}")
    text = str(exc)
    if any(marker in text for marker in _UNREACHABLE_MESSAGES):
        return UnreachableError(f"{where}: timed out or connection lost ({text.strip()})")
    if isinstance(exc, AuthenticationException):
        return AuthenticationFailed(f"{where}: authentication failed ({text.strip()})")
    if isinstance(exc, EOFError):
        return UnreachableError(f"{where}: connection closed by the device")
    if isinstance(exc, OSError):
        return UnreachableError(f"{where}: {_socket_reason(exc)}")
    if isinstance(exc, SSHException):
        return SshProtocolError(f"{where}: SSH error: {text.strip() or type(exc).__name__}")
    return SshProtocolError(f"{where}: unexpected {type(exc).__name__}: {text.strip()}")


# -- host key pinning and authentication ------------------------------------------------------


class PinnedKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Accept the server only if the key it presented is pinned; otherwise raise.

    paramiko calls this after key exchange and before authentication, for every
    connection (we never give SSHClient a host key store of its own). ``on_key`` records
    the presented key so :meth:`DeviceConnection.host_key` can report it.
    """

    def __init__(
        self, pinned: PinnedHostKeys, label: str, on_key: Callable[[PublicKey], None]
    ) -> None:
        self.pinned = pinned
        self.label = label
        self.on_key = on_key

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        try:
            presented = PublicKey.from_blob(key.asbytes())
        except KeyFormatError as exc:
            raise HostKeyMismatch(f"{self.label}: the server sent a malformed host key") from exc
        self.pinned.verify(self.label, presented)
        self.on_key(presented)  # only a key that matched a pin is ever recorded


class _KeyThenPassword(AuthStrategy):
    """publickey, then password only if the server asks for it as a second factor.

    Overrides ``authenticate`` because paramiko's default strategy stops at the first
    "partial success" and would leave the ``admin`` login half done.
    """

    def __init__(
        self, username: str, pkey: paramiko.PKey | None, password: Secret | None, label: str
    ) -> None:
        super().__init__(ssh_config=paramiko.SSHConfig())
        self.username = username
        self.pkey = pkey
        self.password = password
        self.label = label

    def get_sources(self) -> Iterator[AuthSource]:
        return iter(())  # unused: authenticate() drives the sequence itself

    def authenticate(self, transport: paramiko.Transport) -> list[SourceResult]:
        who = f"{self.label}: authentication as {self.username}"
        if self.pkey is not None:
            remaining = transport.auth_publickey(self.username, self.pkey)
            if not remaining:
                return []
            if "password" not in remaining or self.password is None:
                raise AuthenticationFailed(
                    f"{who}: the key was accepted but the device also requires "
                    f"{' or '.join(remaining)}"
                    + (" and no password was given" if self.password is None else "")
                )
        elif self.password is None:
            raise UsageError(f"{who}: neither a key nor a password was given")
        assert self.password is not None
        remaining = transport.auth_password(self.username, self.password.reveal(), fallback=False)
        if remaining:
            raise AuthenticationFailed(f"{who}: the device wants more: {' or '.join(remaining)}")
        return []


# -- bounds on what a device sends --------------------------------------------------------------


class _BoundedPacketizer(Packetizer):
    """paramiko's packet reader, refusing a packet longer than :data:`MAX_SSH_PACKET`.

    paramiko reads as many bytes as a packet's length field claims (up to 4 GiB) into
    memory before it checks anything, the MAC included; before key exchange anyone
    answering at the address chooses it. ``read_all`` is where that length becomes a read:
    one comparison per packet. (``Transport(packetizer_class=...)``, paramiko 3.4+.)
    """

    def read_all(self, n: int, check_rekey: bool = False) -> bytes:
        if n > MAX_SSH_PACKET:
            raise _OversizedPacket(n)
        return super().read_all(n, check_rekey)


if TYPE_CHECKING:
    _BytesPipe = BufferedPipe[bytes]  # generic only in the type stubs
else:
    _BytesPipe = BufferedPipe


class _Inbox(_BytesPipe):
    """A channel's receive buffer (stdout or stderr) that drops data beyond the window.

    RFC 4254 §5.2: a peer may send only as much as the window we granted; paramiko grants
    more only as we read, so a compliant device never makes both buffers together hold more
    than the window. paramiko does not check: a device ignoring the window would make its
    transport thread buffer without bound while we verify. One length check a packet.
    """

    def __init__(self, flow: _FlowControl) -> None:
        super().__init__()
        self._flow = flow

    def feed(self, data: bytes) -> None:
        if self._flow.admits(len(data)):
            super().feed(data)


class _FlowControl:
    """Both receive buffers of one channel, installed before the command starts."""

    def __init__(self, chan: paramiko.Channel, window: int) -> None:
        self.window = window
        self.overrun = 0
        """Bytes the device sent beyond the window (dropped); non-zero is a violation."""
        self.stdout = _Inbox(self)
        self.stderr = _Inbox(self)
        chan.in_buffer = self.stdout
        chan.in_stderr_buffer = self.stderr

    def admits(self, size: int) -> bool:
        held = len(self.stdout) + len(self.stderr)
        if held + size <= self.window:
            return True
        self.overrun += size
        return False


class _Tail:
    """The last ``limit`` bytes of a stream (stderr), in memory bounded by twice that."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        if len(chunk) >= self.limit:  # one read can be the whole window: copy only its end
            self.dropped += len(self.data) + len(chunk) - self.limit
            self.data = bytearray(memoryview(chunk)[-self.limit :])
            return
        self.data += chunk
        if len(self.data) > 2 * self.limit:
            cut = len(self.data) - self.limit
            del self.data[:cut]
            self.dropped += cut

    def text(self) -> str:
        cut = max(0, len(self.data) - self.limit)
        dropped = self.dropped + cut
        body = bytes(self.data[cut:]).decode("utf-8", "replace")
        return f"[{dropped} earlier bytes of stderr dropped]\n{body}" if dropped else body


# -- the connection -------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeouts:
    """Seconds. ``auth`` is generous: devices hash passwords with yescrypt and slow down
    failed logins per source address (back-off), and that must not look like an outage."""

    connect: float = 10.0  # TCP connect and key exchange
    banner: float = 15.0
    auth: float = 30.0
    channel: float = 10.0
    command: float = 120.0  # default for run()/run_stream(); per call overridable
    keepalive: int = 15  # SSH keepalive interval, so idle NAT/conntrack entries survive
    idle: float | None = None
    """A command that sends no stdout for this long has stalled (exit 4). None: only the
    command's deadline applies (device commands such as key generation are silent until
    done); bulk transfers set it, so a stuck device is given up long before the deadline."""


class DeviceConnection:
    """One authenticated SSH connection to one device interface.

    Lifecycle: **create** (no I/O; checks arguments) → :meth:`connect` (TCP, key
    exchange, host-key check against ``pinned``, then authentication) → :meth:`run` /
    :meth:`run_stream` any number of times, one channel per command → :meth:`close`.
    Also a context manager (``with DeviceConnection(...) as dev:`` connects and closes).
    After ``close`` it may be connected again. Use one connection from one thread.

    ``key`` is an OpenSSH private key file (or a loaded ``paramiko.PKey``); ``password``
    is for accounts that need key *and* password (``admin``), or alone where a device
    allows it. ``netns`` opens the TCP socket inside that network namespace: a customer's
    host inside its tenant network, or a test.
    """

    def __init__(
        self,
        host: str,
        *,
        username: str,
        pinned: PinnedHostKeys,
        key: str | os.PathLike[str] | paramiko.PKey | None = None,
        key_passphrase: Secret | None = None,
        password: Secret | None = None,
        port: int = SSH_PORT,
        netns: str | None = None,
        timeouts: Timeouts = Timeouts(),  # frozen, so one shared default is safe
    ) -> None:
        if not pinned:
            raise UsageError(f"{host}: no pinned host keys; refusing to connect unverified")
        if key is None and password is None:
            raise UsageError(f"{host}: a key or a password is needed to log in as {username}")
        for name, value in (("password", password), ("key passphrase", key_passphrase)):
            if value is not None and not isinstance(value, Secret):
                raise UsageError(f"{host}: the {name} must be a Secret")
        self.host = host
        self.port = port
        self.username = username
        self.pinned = pinned
        self.netns = netns
        self.timeouts = timeouts
        self._key = key
        self._key_passphrase = key_passphrase
        self._password = password
        self._client: paramiko.SSHClient | None = None
        self._server_key: PublicKey | None = None
        self._local_address: tuple[str, int] | None = None

    def __repr__(self) -> str:
        where = f" netns={self.netns}" if self.netns else ""
        return f"<DeviceConnection {self.username}@{self.label}{where}>"

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def label(self) -> str:
        return _label(self.host, self.port)

    @property
    def connected(self) -> bool:
        t = self._client.get_transport() if self._client else None
        return t is not None and t.is_active() and t.is_authenticated()

    @property
    def local_address(self) -> tuple[str, int] | None:
        """Our end of the last TCP connection: find this session in the device's sshd log."""
        return self._local_address

    def connect(self) -> DeviceConnection:
        if self.connected:
            return self
        self.close()
        pkey = self._load_key()
        self._server_key = None
        sock = _open_socket(self.host, self.port, self.netns, self.timeouts.connect)
        name = sock.getsockname()
        self._local_address = (str(name[0]), int(name[1]))
        client = paramiko.SSHClient()  # its host key stores stay empty: pins only
        client.set_missing_host_key_policy(
            PinnedKeyPolicy(self.pinned, self.label, self._record_server_key)
        )
        try:
            client.connect(
                self.host,
                port=self.port,
                username=self.username,
                sock=sock,
                timeout=self.timeouts.connect,
                banner_timeout=self.timeouts.banner,
                auth_timeout=self.timeouts.auth,
                channel_timeout=self.timeouts.channel,
                allow_agent=False,
                look_for_keys=False,
                transport_factory=self._make_transport,
                auth_strategy=_KeyThenPassword(self.username, pkey, self._password, self.label),
            )
            transport = client.get_transport()
            if transport is None or not transport.is_authenticated():
                raise SshProtocolError(f"{self.label}: not authenticated after login")
            transport.set_keepalive(self.timeouts.keepalive)
        except Exception as exc:
            client.close()
            sock.close()
            if isinstance(exc, HsmctlError):
                raise
            error = _translate(exc, f"{self.label} as {self.username}")
            if self._server_key is not None and _hung_up_on_login(exc):
                # The pinned device answered, then hung up while judging our login: sshd
                # does that when PAM's account check refuses (a locked or expired
                # account) after a key was accepted. That is a refusal, not a network
                # fault. (Our own send failing, or a reset, is the network: exit 4.)
                raise AuthenticationFailed(
                    f"{self.label} as {self.username}: the device closed the connection "
                    "during authentication (account refused)"
                ) from exc
            raise error from exc
        except BaseException:
            client.close()
            sock.close()
            raise
        self._client = client
        log.debug(
            "connected to %s as %s (host key %s)", self.label, self.username, self._server_key
        )
        return self

    def close(self) -> None:
        """Close the connection. Never raises: closing a connection the network already
        dropped is not a new failure, and must not replace the one being reported."""
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:
                log.debug("%s: closing the connection: %r", self.label, exc)

    def cut_for_test(self) -> None:
        """Cut the TCP connection under the SSH session (fault-injection tests only):
        the next operation fails as if the network had dropped."""
        t = self._client.get_transport() if self._client else None
        if t is not None:
            sock = t.sock
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):  # already gone
                    sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> DeviceConnection:
        return self.connect()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def host_key(self) -> PublicKey:
        """The host key the device proved on the last connection attempt. It matched a pin,
        so it is known even if authentication then failed (the device is who we think, it
        just refused us); after a mismatch there is none."""
        if self._server_key is None:
            raise HsmctlError(f"{self.label}: no verified host key (not connected)")
        return self._server_key

    def host_key_fingerprint(self) -> str:
        return self.host_key().fingerprint

    # -- commands --------------------------------------------------------------------------

    def run(
        self,
        command: str,
        stdin_lines: Sequence[Secret | str] = (),
        *,
        timeout: float | None = None,
        check: bool = True,
        max_stdout: int = RUN_STDOUT_LIMIT,
    ) -> Result:
        """Run one device command; secrets go in ``stdin_lines`` (one per line, then EOF).

        With ``check`` (default) a non-zero status raises the matching
        :class:`DeviceCommandFailed` subclass; otherwise the :class:`Result` is returned.
        A reply longer than ``max_stdout`` bytes raises :class:`OutputLimitExceeded`.
        """
        out = bytearray()
        status, err = self._execute(command, stdin_lines, out.extend, timeout, max_stdout)
        result = Result(command, status, out.decode("utf-8", "replace"), err, len(out))
        if check and not result.ok:
            raise device_error(self.label, result)
        return result

    def run_stream(
        self,
        command: str,
        sink: BinaryIO,
        stdin_lines: Sequence[Secret | str] = (),
        *,
        timeout: float | None = None,
        check: bool = True,
        max_stdout: int | None = None,
    ) -> Result:
        """Like :meth:`run`, but stdout is written to ``sink`` as it arrives (bulk output:
        ``audit export``). The sink is not flushed or closed here; on failure it may hold
        partial output, so write to a temporary and commit only after success. Unbounded
        by default (the sink decides what it keeps); a sink that keeps everything in
        memory should pass ``max_stdout``."""
        count = 0

        def write(chunk: bytes) -> None:
            nonlocal count
            try:
                sink.write(chunk)
            except OSError as exc:  # local I/O (disk full...), not the network: say so
                raise HsmctlError(
                    f"{self.label}: writing the output of '{command}' failed: {exc.strerror or exc}"
                ) from exc
            count += len(chunk)

        status, err = self._execute(command, stdin_lines, write, timeout, max_stdout)
        result = Result(command, status, "", err, count)
        if check and not result.ok:
            raise device_error(self.label, result)
        return result

    # -- internals -------------------------------------------------------------------------

    def _record_server_key(self, key: PublicKey) -> None:
        self._server_key = key

    def _load_key(self) -> paramiko.PKey | None:
        if self._key is None or isinstance(self._key, paramiko.PKey):
            return self._key
        path = Path(self._key)
        passphrase = self._key_passphrase.reveal() if self._key_passphrase else None
        try:
            return paramiko.PKey.from_path(path, password=passphrase)
        except (OSError, SSHException, ValueError) as exc:
            # Deliberately not str(exc) for SSHException: it can quote the key file.
            reason = exc.strerror if isinstance(exc, OSError) else type(exc).__name__
            raise UsageError(f"cannot load the SSH private key {path}: {reason}") from exc

    def _make_transport(
        self,
        sock: paramiko.transport._SocketLike,
        /,
        *,
        gss_kex: bool = False,
        gss_deleg_creds: bool = True,
        disabled_algorithms: Mapping[str, Iterable[str]] | None = None,
    ) -> paramiko.Transport:
        """Transport with large windows, GCM first, pinned key types asked for first (so
        a device with several host keys presents one we pinned), packets bounded."""
        t = paramiko.Transport(
            sock,
            default_window_size=WINDOW_SIZE,
            default_max_packet_size=MAX_PACKET_SIZE,
            disabled_algorithms=disabled_algorithms,
            packetizer_class=_BoundedPacketizer,
        )
        options = t.get_security_options()
        options.ciphers = _prefer(options.ciphers, _PREFERRED_CIPHERS)
        options.key_types = _prefer(options.key_types, self.pinned.key_types())
        return t

    def _transport(self) -> paramiko.Transport:
        if self._client is None:
            raise HsmctlError(f"{self.label}: not connected (call connect() first)")
        t = self._client.get_transport()
        if t is None or not t.is_active():
            raise UnreachableError(f"{self.label}: the connection was lost")
        return t

    def _execute(
        self,
        command: str,
        stdin_lines: Sequence[Secret | str],
        on_stdout: Callable[[bytes], object],
        timeout: float | None,
        max_stdout: int | None,
    ) -> tuple[int, str]:
        """Open a channel, exec, feed stdin, pump stdout/stderr until EOF and exit status.
        Returns the status and the tail of stderr.

        The deadline is checked after every read, so a device that never stops talking
        is cut off as surely as one that stops; one clock read per read keeps it cheap.
        """
        if not isinstance(command, str):
            raise UsageError("a device command must be a str (secrets go on stdin)")
        payload = _stdin_payload(stdin_lines)
        limit = self.timeouts.command if timeout is None else timeout
        idle = self.timeouts.idle
        deadline = time.monotonic() + limit
        transport = self._transport()
        where = f"{self.label}: '{command}'"
        try:
            chan = transport.open_session(
                window_size=WINDOW_SIZE,
                max_packet_size=MAX_PACKET_SIZE,
                timeout=min(self.timeouts.channel, max(limit, 0.001)),
            )
        except Exception as exc:
            raise _translate(exc, where) from exc
        flow = _FlowControl(chan, WINDOW_SIZE)
        err = _Tail(STDERR_TAIL_BYTES)
        received = 0
        try:
            # Bounds sendall's wait for the device's window (paramiko waits forever).
            chan.settimeout(max(deadline - time.monotonic(), 0.001))
            _exec(chan, command, deadline, f"{where} timed out after {limit:g} s")
            try:
                if payload:
                    chan.sendall(payload)
                chan.shutdown_write()
            except OSError:
                # The command may have ended before reading stdin (e.g. refused as
                # invalid); its exit status below says what happened.
                log.debug("%s: stdin not fully delivered", where)
            last_output = time.monotonic()
            while True:
                got_stdout = got_stderr = False
                if chan.recv_ready():
                    data = chan.recv(READ_SIZE)
                    received += len(data)
                    if max_stdout is not None and received > max_stdout:
                        raise OutputLimitExceeded(
                            f"{where}: the device sent more than {max_stdout} bytes of "
                            "output, more than this command's replies can be"
                        )
                    on_stdout(data)
                    got_stdout = True
                if chan.recv_stderr_ready():
                    err.add(chan.recv_stderr(READ_SIZE))
                    got_stderr = True
                if flow.overrun:
                    raise OutputLimitExceeded(
                        f"{where}: the device sent {flow.overrun} bytes beyond the SSH "
                        f"channel window ({flow.window}); SSH flow control forbids it"
                    )
                now = time.monotonic()
                if now >= deadline:
                    raise UnreachableError(f"{where} timed out after {limit:g} s")
                if got_stdout:
                    last_output = now
                elif idle is not None and now - last_output >= idle:
                    raise UnreachableError(
                        f"{where} stalled: no output for {idle:g} s (after {received} bytes)"
                    )
                if got_stdout or got_stderr:
                    continue
                if chan.eof_received or chan.closed:
                    if not (chan.recv_ready() or chan.recv_stderr_ready()):
                        break
                    continue
                wait = deadline - now
                if idle is not None:
                    wait = min(wait, last_output + idle - now)
                select.select([chan], [], [], min(wait, 1.0))
            left = max(0.0, deadline - time.monotonic())
            if not chan.status_event.wait(left if idle is None else min(left, idle)):
                if idle is not None and idle < left:  # output ended, no status follows
                    raise UnreachableError(
                        f"{where} stalled: no exit status {idle:g} s after its output ended"
                    )
                raise UnreachableError(f"{where} timed out after {limit:g} s")
            status = chan.exit_status
            if status == NO_EXIT_STATUS:
                _raise_if_lost(transport, where)
            return status, err.text()
        except HsmctlError:
            raise
        except Exception as exc:
            error = _translate(exc, where)
            if isinstance(error, SshProtocolError) and _link_ended(transport):
                # paramiko's words for a link that ended cleanly (the device sent
                # DISCONNECT) while it waited, e.g. "Channel closed.": no error saved.
                raise UnreachableError(f"{where}: the connection was lost ({exc})") from exc
            raise error from exc
        finally:
            _close_channel(chan, where)


def _link_ended(transport: paramiko.Transport) -> bool:
    """Whether paramiko's thread ended (given a moment: it closes the channels, which
    wakes the waits, before it marks itself inactive)."""
    if transport.is_active():
        transport.join(0.1)
    return not transport.is_active()


def _raise_if_lost(transport: paramiko.Transport, where: str) -> None:
    """A channel that closed without an exit status: the command was killed by a signal
    (the link is up), or the link died. paramiko's thread saves why it died *before* it
    closes the channels, and marks itself inactive only after, so look at both (and give
    a dying thread a moment), or a lost link would pass for a killed command (exit 1)."""
    lost = transport.get_exception()
    if lost is None and transport.is_active():
        transport.join(0.1)  # a killed command: the thread lives on, this costs 0.1 s
        lost = transport.get_exception()
    if lost is not None:
        raise _translate(lost, where) from lost
    if not transport.is_active():
        raise UnreachableError(f"{where}: connection lost before the command finished")


def _exec(chan: paramiko.Channel, command: str, deadline: float, timed_out: str) -> None:
    """``chan.exec_command`` within the deadline.

    paramiko sends the request and then waits for the device's reply with no timeout: a
    device (or a dead link that sends no reset) that never answers would hold the caller
    forever. A timer closes the channel at the deadline, which ends that wait.
    """
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        _close_channel(chan, "exec timer")

    timer = threading.Timer(max(deadline - time.monotonic(), 0.0), expire)
    timer.daemon = True
    timer.start()
    try:
        chan.exec_command(command)
    except Exception as exc:
        if expired.is_set():
            raise UnreachableError(timed_out) from exc
        raise
    finally:
        timer.cancel()


def _close_channel(chan: paramiko.Channel, where: str) -> None:
    """Close a channel, never raising. paramiko sends CHANNEL_CLOSE if it thinks the link is
    up, and a link that died an instant before (before its reader thread noticed) makes
    that send raise a bare EOFError: from a ``finally`` it would replace the error being
    reported, or fail a command that had finished."""
    try:
        chan.close()
    except Exception as exc:
        log.debug("%s: closing the channel: %r", where, exc)


def _hung_up_on_login(exc: BaseException) -> bool:
    """Whether paramiko reports that the server closed the connection while we waited for
    its answer to an authentication request (a clean end or EOF in its thread)."""
    return isinstance(exc, AuthenticationException) and "transport shut down or saw EOF" in str(exc)


def _prefer(available: Sequence[str], first: Sequence[str]) -> list[str]:
    head = [x for x in first if x in available]
    return head + [x for x in available if x not in head]


def _stdin_payload(lines: Sequence[Secret | str]) -> bytes:
    """One value per line. A value holding a line break would smuggle in an extra line, so
    it is refused (without showing it)."""
    if isinstance(lines, str | bytes | Secret):
        raise UsageError("stdin_lines must be a sequence of lines, not a single value")
    parts: list[bytes] = []
    for index, line in enumerate(lines):
        text = line.reveal() if isinstance(line, Secret) else line
        if not isinstance(text, str):
            raise UsageError(f"stdin line {index}: must be a str or Secret")
        if any(ch in text for ch in "\n\r\0"):
            raise UsageError(f"stdin line {index}: contains a line break or NUL; refused")
        parts.append(text.encode("utf-8") + b"\n")
    return b"".join(parts)


def scan_host_keys(
    host: str,
    port: int = SSH_PORT,
    *,
    key_types: Sequence[str] = SCAN_KEY_TYPES,
    netns: str | None = None,
    timeout: float = 10.0,
) -> list[PublicKey]:
    """UNTRUSTED: the host keys a server presents, one key exchange per type, no login.

    Like ``ssh-keyscan``: whoever answers at that address can present any key, so this is
    only for recording keys where the path is trusted by other means (manufacturing,
    the lab's factory record). Never use the result to authenticate a device you cannot
    otherwise vouch for. Types the server does not offer are left out.
    """
    label = _label(host, port)
    keys: list[PublicKey] = []
    for key_type in key_types:
        sock = _open_socket(host, port, netns, timeout)
        transport: paramiko.Transport | None = None
        try:
            transport = paramiko.Transport(sock, packetizer_class=_BoundedPacketizer)
            transport.get_security_options().key_types = [key_type]
            transport.banner_timeout = timeout
            transport.start_client(timeout=timeout)
            keys.append(PublicKey.from_blob(transport.get_remote_server_key().asbytes()))
        except IncompatiblePeer:
            log.debug("%s offers no %s host key", label, key_type)
        except Exception as exc:
            raise _translate(exc, f"{label} (host key scan)") from exc
        finally:
            if transport is not None:
                with contextlib.suppress(Exception):
                    transport.close()
            sock.close()
    return keys


def _label(host: str, port: int) -> str:
    return host if port == SSH_PORT else f"{host}:{port}"


def _open_socket(host: str, port: int, netns: str | None, timeout: float) -> socket.socket:
    """A connected TCP socket with TCP_NODELAY (small command/stdin packets go out at once)
    and SO_KEEPALIVE; from inside ``netns`` if given. Failures are UnreachableError."""
    if netns is not None:
        from hsmctl.lab.netns import connect_in  # Linux namespaces; imported where needed

        sock = connect_in(netns, host, port, timeout=timeout)
    else:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise UnreachableError(f"{_label(host, port)}: {_socket_reason(exc)}") from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError as exc:
        sock.close()
        raise UnreachableError(f"{_label(host, port)}: {_socket_reason(exc)}") from exc
    return sock
