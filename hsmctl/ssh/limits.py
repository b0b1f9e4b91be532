"""The bounds on what a device may send, in bytes and in seconds.

Everything a device sends is hostile: these numbers are what keeps a misbehaving or
impersonated device from holding our memory or our time (see :mod:`hsmctl.ssh.channel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

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
"""The longest reply :meth:`~hsmctl.ssh.client.DeviceConnection.run` keeps. Device replies
are small: the largest is ``audit show --last 10000``, about 4 MB. Bulk output goes through
:meth:`~hsmctl.ssh.client.DeviceConnection.run_stream`."""
STDERR_TAIL_BYTES: Final = 64 * 1024
"""stderr is kept as its last this many bytes: reports show its last lines, and a device
that writes stderr without end must not fill our memory."""


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
