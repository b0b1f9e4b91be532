"""The pinned set of host keys a device must match, and known_hosts files.

The keys themselves and their fingerprints are :mod:`hsmctl.sshkeys` (re-exported here).
Pure: no network, no paramiko. A device is trusted only if the key it presents is in a
:class:`PinnedHostKeys` set, built from the provider's inventory (full keys), from a
hand-off bundle (``SHA256:`` fingerprints: that is all a bundle carries) or from a
known_hosts file. There is deliberately no "trust on first use" anywhere in here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from hsmctl.errors import HostKeyMismatch
from hsmctl.sshkeys import (
    FINGERPRINT_PREFIX,
    KeyFormatError,
    PublicKey,
    fingerprint,
    normalize_fingerprint,
)

__all__ = [
    "SSH_PORT",
    "KeyFormatError",
    "KnownHostsEntry",
    "PinnedHostKeys",
    "PublicKey",
    "fingerprint",
    "host_name",
    "known_hosts_line",
    "normalize_fingerprint",
    "parse_known_hosts",
]

SSH_PORT = 22
_MARKERS = ("@cert-authority", "@revoked")


# -- known_hosts ----------------------------------------------------------------------------


def host_name(host: str, port: int = SSH_PORT) -> str:
    """The name known_hosts uses for ``host:port``: bare for 22, ``[host]:port`` otherwise."""
    return host if port == SSH_PORT else f"[{host}]:{port}"


def _wildcard(pattern: str, name: str) -> bool:
    """OpenSSH's host pattern match: ``*`` and ``?`` only (``[`` is literal: ``[h]:port``)."""
    regex = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.fullmatch(regex, name, flags=re.IGNORECASE | re.DOTALL) is not None


def _hashed_match(entry: str, name: str) -> bool:
    """``|1|SALT|HASH``: HMAC-SHA1 of the name keyed with the salt (``HashKnownHosts``)."""
    parts = entry.split("|")
    if len(parts) != 4 or parts[1] != "1":
        return False
    try:
        salt = base64.b64decode(parts[2], validate=True)
        expected = base64.b64decode(parts[3], validate=True)
    except binascii.Error:
        return False
    mac = hmac.new(salt, name.encode("utf-8"), hashlib.sha1).digest()
    return hmac.compare_digest(mac, expected)


@dataclass(frozen=True)
class KnownHostsEntry:
    """One known_hosts line: optional marker, host patterns, key."""

    patterns: tuple[str, ...]
    key: PublicKey
    marker: str | None = None

    def matches(self, host: str, port: int = SSH_PORT) -> bool:
        """True if this line names ``host:port`` (OpenSSH rules: a negated match wins)."""
        name = host_name(host, port).lower()
        if len(self.patterns) == 1 and self.patterns[0].startswith("|"):
            return _hashed_match(self.patterns[0], name)
        positive = False
        for pattern in self.patterns:
            negated = pattern.startswith("!")
            if _wildcard(pattern[1:] if negated else pattern, name):
                if negated:
                    return False
                positive = True
        return positive


def parse_known_hosts(text: str) -> list[KnownHostsEntry]:
    """Every entry of a known_hosts file; a malformed line is an error, not skipped,
    because a pin file that silently loses a line could silently lose a pin."""
    entries: list[KnownHostsEntry] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        marker: str | None = None
        if line.startswith("@"):
            head, _, line = line.partition(" ")
            if head not in _MARKERS:
                raise KeyFormatError(f"known_hosts line {number}: unknown marker {head[:40]!r}")
            marker = head
            line = line.strip()
        hosts, _, rest = line.partition(" ")
        if not hosts or not rest.strip():
            raise KeyFormatError(f"known_hosts line {number}: expected HOSTS TYPE KEY")
        try:
            key = PublicKey.parse(rest)
        except KeyFormatError as exc:
            raise KeyFormatError(f"known_hosts line {number}: {exc.message}") from exc
        entries.append(KnownHostsEntry(tuple(hosts.split(",")), key, marker))
    return entries


def known_hosts_line(host: str, key: PublicKey, port: int = SSH_PORT) -> str:
    """A known_hosts line pinning ``key`` for ``host:port`` (unhashed: pins are not secret,
    and operators must be able to read which device a line is for)."""
    return f"{host_name(host, port)} {key.key_type} {key.base64}"


# -- the pinned set ---------------------------------------------------------------------------


class PinnedHostKeys:
    """The host keys one device may present: full keys and/or bare SHA256 fingerprints.

    Immutable. A key matches if its blob equals a pinned key, or its fingerprint equals a
    pinned fingerprint, and it is not revoked. An empty set matches nothing, so forgetting
    to load pins fails closed.

    Full keys also tell the client which key types to ask for first; bare fingerprints
    cannot, so a fingerprint-only set should cover every host key type the device serves
    (hand-off bundles carry all of them), or the device may present an unpinned type.
    """

    __slots__ = ("_fingerprints", "_keys", "_revoked")

    def __init__(
        self,
        keys: Iterable[PublicKey] = (),
        fingerprints: Iterable[str] = (),
        revoked: Iterable[str] = (),
    ) -> None:
        self._keys: tuple[PublicKey, ...] = tuple(dict.fromkeys(keys))
        self._fingerprints = frozenset(normalize_fingerprint(f) for f in fingerprints)
        self._revoked = frozenset(normalize_fingerprint(f) for f in revoked)

    @classmethod
    def of(cls, *items: str | PublicKey) -> PinnedHostKeys:
        """Pins from key lines, ``PublicKey`` objects and ``SHA256:`` fingerprints, mixed."""
        keys: list[PublicKey] = []
        fps: list[str] = []
        for item in items:
            if isinstance(item, PublicKey):
                keys.append(item)
            elif item.strip().startswith(FINGERPRINT_PREFIX):
                fps.append(item)
            else:
                keys.append(PublicKey.parse(item))
        return cls(keys, fps)

    @classmethod
    def from_known_hosts(cls, text: str, host: str, port: int = SSH_PORT) -> PinnedHostKeys:
        """The pins known_hosts ``text`` holds for ``host:port``. ``@revoked`` lines revoke
        a key for every host; ``@cert-authority`` lines are ignored (we pin keys, not CAs)."""
        keys: list[PublicKey] = []
        revoked: list[str] = []
        for entry in parse_known_hosts(text):
            if entry.marker == "@revoked":
                revoked.append(entry.key.fingerprint)
            elif entry.marker is None and entry.matches(host, port):
                keys.append(entry.key)
        return cls(keys, revoked=revoked)

    def matches(self, key: PublicKey) -> bool:
        fp = key.fingerprint
        if fp in self._revoked:
            return False
        return key in self._keys or fp in self._fingerprints

    def verify(self, host: str, key: PublicKey) -> None:
        """Return if ``key`` is pinned; otherwise raise :class:`HostKeyMismatch` (exit 3)."""
        if self.matches(key):
            return
        revoked = key.fingerprint in self._revoked
        pinned = self.fingerprints()
        why = "is revoked" if revoked else "is not pinned"
        raise HostKeyMismatch(
            f"{host}: host key {key} {why}"
            + (f" (pinned: {', '.join(pinned)})" if pinned else " (no keys pinned)"),
            detail={"host": host, "presented": key.fingerprint, "pinned": pinned},
        )

    def fingerprints(self) -> list[str]:
        """Every pinned fingerprint, sorted (for messages and receipts)."""
        return sorted({k.fingerprint for k in self._keys} | self._fingerprints)

    def key_types(self) -> tuple[str, ...]:
        """Types of the fully pinned keys, in pin order: ask the server for these first, so
        a device holding several host keys presents one we can check."""
        return tuple(dict.fromkeys(k.key_type for k in self._keys))

    @property
    def keys(self) -> tuple[PublicKey, ...]:
        return self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self.fingerprints())

    def __len__(self) -> int:
        return len(self.fingerprints())

    def __bool__(self) -> bool:
        return bool(self._keys or self._fingerprints)

    def __repr__(self) -> str:
        return f"PinnedHostKeys({self.fingerprints()!r})"
