"""SSH to devices: the one transport (:mod:`.client`) and host-key pinning (:mod:`.hostkeys`).

The transport by concern: :mod:`.limits`, :mod:`.errors`, :mod:`.auth`, :mod:`.channel`,
:mod:`.client`; every name below is importable from here and from :mod:`.client`.

Only this package imports paramiko or translates its errors; everything else talks to a
device through :class:`DeviceConnection`.
"""

from hsmctl.ssh.client import (
    DEVICE_ERRORS,
    AuthenticationFailed,
    DeviceCommandFailed,
    DeviceConnection,
    DeviceDenied,
    DeviceIntegrityError,
    DeviceUnavailable,
    DeviceUsageError,
    OutputLimitExceeded,
    PinnedKeyPolicy,
    Result,
    SocketFactory,
    SshProtocolError,
    Timeouts,
    device_error,
    scan_host_keys,
    tcp_connect,
)
from hsmctl.ssh.hostkeys import (
    KeyFormatError,
    KnownHostsEntry,
    PinnedHostKeys,
    PublicKey,
    fingerprint,
    known_hosts_line,
    normalize_fingerprint,
    parse_known_hosts,
)

__all__ = [
    "DEVICE_ERRORS",
    "AuthenticationFailed",
    "DeviceCommandFailed",
    "DeviceConnection",
    "DeviceDenied",
    "DeviceIntegrityError",
    "DeviceUnavailable",
    "DeviceUsageError",
    "KeyFormatError",
    "KnownHostsEntry",
    "OutputLimitExceeded",
    "PinnedHostKeys",
    "PinnedKeyPolicy",
    "PublicKey",
    "Result",
    "SocketFactory",
    "SshProtocolError",
    "Timeouts",
    "device_error",
    "fingerprint",
    "known_hosts_line",
    "normalize_fingerprint",
    "parse_known_hosts",
    "scan_host_keys",
    "tcp_connect",
]
