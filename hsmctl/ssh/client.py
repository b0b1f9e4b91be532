"""The one SSH transport every workflow uses to reach a device (paramiko underneath).

Why it is shaped this way:

* **Pinning only.** The server's key is checked by :class:`PinnedKeyPolicy` (:mod:`.auth`)
  against a :class:`~hsmctl.ssh.hostkeys.PinnedHostKeys` set right after key exchange,
  before any authentication request is sent; system/user known_hosts files are never read and
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
  does (:mod:`.channel`, the numbers in :mod:`.limits`); ``run()`` replies are capped at
  :data:`RUN_STDOUT_LIMIT`.
* **Errors translated in this package only** (``raise ... from exc``): the table is in
  :mod:`.errors`.
* **The socket is the caller's choice.** ``connect_socket(host, port, timeout)`` makes the
  TCP connection (paramiko's ``sock=``): a plain connect by default; the lab's
  :func:`hsmctl.lab.netns.socket_factory` makes it inside a network namespace, a test
  wraps it to inject faults. Nothing here knows of namespaces.

The package by concern: :mod:`.limits` (bounds and timeouts), :mod:`.errors` (the error
tree and the translation), :mod:`.auth` (pinning and the login sequence),
:mod:`.channel` (one bounded command), this module (the connection). Every name stays
importable from here and from :mod:`hsmctl.ssh`.

Closing a channel or a connection never raises. Messages carry host, command, status and
the tail of stderr; never stdin, never a password.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final

import paramiko
from paramiko.ssh_exception import IncompatiblePeer, SSHException

from hsmctl.errors import HsmctlError, UnreachableError, UsageError
from hsmctl.secret import Secret
from hsmctl.ssh import batch
from hsmctl.ssh.auth import KeyThenPassword, PinnedKeyPolicy
from hsmctl.ssh.channel import BoundedPacketizer, execute, stdin_payload
from hsmctl.ssh.errors import (
    DEVICE_ERRORS,
    DEVICE_EXIT_DENIED,
    DEVICE_EXIT_INTEGRITY,
    DEVICE_EXIT_UNAVAILABLE,
    DEVICE_EXIT_USAGE,
    NO_EXIT_STATUS,
    AuthenticationFailed,
    DeviceCommandFailed,
    DeviceDenied,
    DeviceIntegrityError,
    DeviceUnavailable,
    DeviceUsageError,
    OutputLimitExceeded,
    Result,
    SshProtocolError,
    device_error,
    hung_up_on_login,
    socket_reason,
    translate,
)
from hsmctl.ssh.hostkeys import SSH_PORT, PinnedHostKeys, PublicKey
from hsmctl.ssh.limits import (
    MAX_PACKET_SIZE,
    MAX_SSH_PACKET,
    READ_SIZE,
    RUN_STDOUT_LIMIT,
    STDERR_TAIL_BYTES,
    WINDOW_SIZE,
    Timeouts,
)

__all__ = [
    "DEVICE_ERRORS",
    "DEVICE_EXIT_DENIED",
    "DEVICE_EXIT_INTEGRITY",
    "DEVICE_EXIT_UNAVAILABLE",
    "DEVICE_EXIT_USAGE",
    "MAX_PACKET_SIZE",
    "MAX_SSH_PACKET",
    "NO_EXIT_STATUS",
    "READ_SIZE",
    "RUN_STDOUT_LIMIT",
    "SCAN_KEY_TYPES",
    "STDERR_TAIL_BYTES",
    "WINDOW_SIZE",
    "AuthenticationFailed",
    "DeviceCommandFailed",
    "DeviceConnection",
    "DeviceDenied",
    "DeviceIntegrityError",
    "DeviceUnavailable",
    "DeviceUsageError",
    "OutputLimitExceeded",
    "PinnedKeyPolicy",
    "Result",
    "SocketFactory",
    "SshProtocolError",
    "Timeouts",
    "device_error",
    "scan_host_keys",
    "tcp_connect",
]

log = logging.getLogger(__name__)

# AES-GCM first: an AEAD costs one pass per packet instead of cipher + HMAC.
_PREFERRED_CIPHERS: Final = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
# ECDH on NIST P-256 first (FIPS-approved; OpenSSL's constant-time code on both sides):
# OpenSSH computes curve25519 with its own portable reference code, and on the lab's
# appliances that is ~2-3 ms of the device's CPU per connection (user time 14.0 -> 12.1
# ms of a key-only login); curve25519 stays offered after it.
_PREFERRED_KEX: Final = ("ecdh-sha2-nistp256",)
SCAN_KEY_TYPES: Final = ("ssh-ed25519", "ecdsa-sha2-nistp256")
_DEFAULT_TIMEOUTS: Final = Timeouts()  # frozen, so one shared default is safe

SocketFactory = Callable[[str, int, float], socket.socket]
"""``(host, port, timeout) -> a connected TCP socket``; an OSError is the device unreachable."""


def tcp_connect(host: str, port: int, timeout: float) -> socket.socket:
    """The default :data:`SocketFactory`: a plain TCP connect from this host."""
    return socket.create_connection((host, port), timeout=timeout)


class DeviceConnection:
    """One authenticated SSH connection to one device interface.

    Lifecycle: **create** (no I/O; checks arguments) → :meth:`connect` (TCP, key
    exchange, host-key check against ``pinned``, then authentication) → :meth:`run` /
    :meth:`run_stream` any number of times, one channel per command → :meth:`close`.
    Also a context manager (``with DeviceConnection(...) as dev:`` connects and closes).
    After ``close`` it may be connected again. Use one connection from one thread.

    ``key`` is an OpenSSH private key file (or a loaded ``paramiko.PKey``); ``password``
    is for accounts that need key *and* password (``admin``), or alone where a device
    allows it. ``connect_socket`` makes the TCP connection (:data:`SocketFactory`; default
    :func:`tcp_connect`): the lab's makes it inside a network namespace, a test's wraps it.
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
        connect_socket: SocketFactory | None = None,
        timeouts: Timeouts = _DEFAULT_TIMEOUTS,
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
        self.connect_socket = connect_socket or tcp_connect
        self.timeouts = timeouts
        self._key = key
        self._key_passphrase = key_passphrase
        self._password = password
        self._client: paramiko.SSHClient | None = None
        self._server_key: PublicKey | None = None
        self._local_address: tuple[str, int] | None = None

    def __repr__(self) -> str:
        return f"<DeviceConnection {self.username}@{self.label}>"

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
        sock = _open_socket(self.host, self.port, self.connect_socket, self.timeouts.connect)
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
                auth_strategy=KeyThenPassword(self.username, pkey, self._password, self.label),
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
            error = translate(exc, f"{self.label} as {self.username}")
            if self._server_key is not None and hung_up_on_login(exc):
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

    def run_batch(
        self,
        requests: Sequence[tuple[str, Sequence[Secret | str]]],
        *,
        timeout: float | None = None,
    ) -> list[Result]:
        """Run device commands in order in one exec (``hsmsh -c batch``): each
        ``(command, stdin_lines)`` as :meth:`run` would, the device paying one channel,
        one shell and one log session for all (:mod:`hsmctl.ssh.batch`). The first that
        fails ends the batch and raises the exception :meth:`run` raises for it; the
        ones after it do not run. Returns every command's :class:`Result`. A device
        whose shell has no batch (exit 64 before any reply, its daemon naming the
        unknown command) gets the commands one by one instead."""
        data = batch.payload(requests)
        commands = [line for line, _ in requests]
        out = bytearray()
        limit = batch.max_stdout(len(requests))
        status, err = self._execute(batch.COMMAND, (), out.extend, timeout, limit, data)
        older = status == DEVICE_EXIT_USAGE and not out and not err.startswith("hsmsh: batch:")
        if older:  # a shell without batch: the daemon refused "batch" as a command
            return [self.run(line, lines, timeout=timeout) for line, lines in requests]
        results = batch.replies(self.label, commands, status, bytes(out), err)
        if not results[-1].ok:
            raise device_error(self.label, results[-1])
        return results

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
        """Transport with large windows, ECDH P-256 and GCM first, pinned key types asked
        for first (so a device with several host keys presents one we pinned), packets
        bounded."""
        t = paramiko.Transport(
            sock,
            default_window_size=WINDOW_SIZE,
            default_max_packet_size=MAX_PACKET_SIZE,
            disabled_algorithms=disabled_algorithms,
            packetizer_class=BoundedPacketizer,
        )
        options = t.get_security_options()
        options.ciphers = _prefer(options.ciphers, _PREFERRED_CIPHERS)
        options.kex = _prefer(options.kex, _PREFERRED_KEX)
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
        stdin: bytes | None = None,
    ) -> tuple[int, str]:
        """One command on a new channel (:func:`hsmctl.ssh.channel.execute`): its status
        and the tail of its stderr. ``stdin``: given whole (a batch) instead of lines."""
        payload = stdin if stdin is not None else stdin_payload(command, stdin_lines)
        transport = self._transport()
        return execute(
            transport, self.label, command, payload, on_stdout, self.timeouts, timeout, max_stdout
        )


def _prefer(available: Sequence[str], first: Sequence[str]) -> list[str]:
    head = [x for x in first if x in available]
    return head + [x for x in available if x not in head]


def scan_host_keys(
    host: str,
    port: int = SSH_PORT,
    *,
    key_types: Sequence[str] = SCAN_KEY_TYPES,
    connect_socket: SocketFactory | None = None,
    timeout: float = 10.0,
) -> list[PublicKey]:
    """UNTRUSTED: the host keys a server presents, one key exchange per type, no login.

    Like ``ssh-keyscan``: whoever answers at that address can present any key, so this is
    only for recording keys where the path is trusted by other means (manufacturing,
    the lab's factory record). Never use the result to authenticate a device you cannot
    otherwise vouch for. Types the server does not offer are left out. ``connect_socket``
    as for :class:`DeviceConnection`.
    """
    label = _label(host, port)
    keys: list[PublicKey] = []
    for key_type in key_types:
        sock = _open_socket(host, port, connect_socket or tcp_connect, timeout)
        transport: paramiko.Transport | None = None
        try:
            transport = paramiko.Transport(sock, packetizer_class=BoundedPacketizer)
            transport.get_security_options().key_types = [key_type]
            transport.banner_timeout = timeout
            transport.start_client(timeout=timeout)
            keys.append(PublicKey.from_blob(transport.get_remote_server_key().asbytes()))
        except IncompatiblePeer:
            log.debug("%s offers no %s host key", label, key_type)
        except Exception as exc:
            raise translate(exc, f"{label} (host key scan)") from exc
        finally:
            if transport is not None:
                with contextlib.suppress(Exception):
                    transport.close()
            sock.close()
    return keys


def _label(host: str, port: int) -> str:
    return host if port == SSH_PORT else f"{host}:{port}"


def _open_socket(
    host: str, port: int, connect_socket: SocketFactory, timeout: float
) -> socket.socket:
    """A connected TCP socket from ``connect_socket``, with TCP_NODELAY (small command and
    stdin packets go out at once) and SO_KEEPALIVE. Failures are UnreachableError."""
    try:
        sock = connect_socket(host, port, timeout)
    except HsmctlError:
        raise
    except OSError as exc:
        raise UnreachableError(f"{_label(host, port)}: {socket_reason(exc)}") from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError as exc:
        sock.close()
        raise UnreachableError(f"{_label(host, port)}: {socket_reason(exc)}") from exc
    return sock
