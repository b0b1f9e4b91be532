"""Who we let answer and how we prove who we are: host-key pinning and the login sequence.

Pinning only: the server's key is checked against a
:class:`~hsmctl.ssh.hostkeys.PinnedHostKeys` set right after key exchange, before any
authentication request is sent. Explicit authentication: the key, then the password only
if the device asks for it as a second factor; never the agent, ``~/.ssh`` or
keyboard-interactive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import paramiko
from paramiko.auth_strategy import AuthSource, AuthStrategy, SourceResult

from hsmctl.errors import HostKeyMismatch, UsageError
from hsmctl.secret import Secret
from hsmctl.ssh.errors import AuthenticationFailed
from hsmctl.ssh.hostkeys import KeyFormatError, PinnedHostKeys, PublicKey


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


class KeyThenPassword(AuthStrategy):
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
