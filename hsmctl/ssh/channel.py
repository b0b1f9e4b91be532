"""One device command on one SSH channel, bounded in time and memory whatever the device does.

A deadline per command checked after every read (not only when nothing is waiting), an
optional stall limit (no stdout for ``Timeouts.idle`` seconds), a timer on paramiko's exec
request (it waits for the reply without a timeout), stderr kept as a tail of
:data:`~hsmctl.ssh.limits.STDERR_TAIL_BYTES`, SSH packets capped at
:data:`~hsmctl.ssh.limits.MAX_SSH_PACKET` and data beyond the channel window refused
(paramiko checks neither). Closing a channel never raises.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import paramiko
from paramiko.buffered_pipe import BufferedPipe
from paramiko.packet import Packetizer

from hsmctl.errors import HsmctlError, UnreachableError, UsageError
from hsmctl.secret import Secret
from hsmctl.ssh.errors import (
    NO_EXIT_STATUS,
    OutputLimitExceeded,
    OversizedPacket,
    SshProtocolError,
    translate,
)
from hsmctl.ssh.limits import (
    MAX_PACKET_SIZE,
    MAX_SSH_PACKET,
    READ_SIZE,
    STDERR_TAIL_BYTES,
    WINDOW_SIZE,
    Timeouts,
)

log = logging.getLogger(__name__)


class BoundedPacketizer(Packetizer):
    """paramiko's packet reader, refusing a packet longer than :data:`MAX_SSH_PACKET`.

    paramiko reads as many bytes as a packet's length field claims (up to 4 GiB) into
    memory before it checks anything, the MAC included; before key exchange anyone
    answering at the address chooses it. ``read_all`` is where that length becomes a read:
    one comparison per packet. (``Transport(packetizer_class=...)``, paramiko 3.4+.)
    """

    def read_all(self, n: int, check_rekey: bool = False) -> bytes:
        if n > MAX_SSH_PACKET:
            raise OversizedPacket(n)
        return super().read_all(n, check_rekey)


if TYPE_CHECKING:
    _BytesPipe = BufferedPipe[bytes]  # generic only in the type stubs
else:
    _BytesPipe = BufferedPipe


class Packets:
    """What a channel's receive buffer holds: the packets' bytes as they arrived, in order.

    paramiko's buffer is an ``array`` that copies every packet in (on its transport
    thread, holding the GIL) and out again at each read; here a packet is kept as the
    ``bytes`` it came in and a read joins them (one copy, none for a single packet). The
    operations paramiko's :class:`BufferedPipe` uses on its ``_buffer``: ``len``,
    ``frombytes``, ``del buf[:n]``, and reads through :meth:`take`.
    """

    __slots__ = ("_items", "_size")

    def __init__(self) -> None:
        self._items: deque[bytes] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def frombytes(self, data: bytes) -> None:
        if data:
            self._items.append(bytes(data))
            self._size += len(data)

    def take(self, limit: int | None = None) -> bytes:
        """The first ``limit`` bytes (all if None), left in place."""
        if limit is None or limit >= self._size:
            return b"".join(self._items)
        parts: list[bytes] = []
        need = limit
        for item in self._items:
            if len(item) >= need:
                parts.append(item[:need])
                break
            parts.append(item)
            need -= len(item)
        return b"".join(parts)

    def __delitem__(self, where: slice) -> None:
        if not isinstance(where, slice) or where.start is not None or where.step is not None:
            raise TypeError("only a leading slice can be dropped")
        drop = self._size if where.stop is None else min(max(where.stop, 0), self._size)
        self._size -= drop
        items = self._items
        while drop:
            first = items[0]
            if len(first) > drop:
                items[0] = first[drop:]
                break
            items.popleft()
            drop -= len(first)


class Inbox(_BytesPipe):
    """A channel's receive buffer (stdout or stderr) that drops data beyond the window.

    RFC 4254 §5.2: a peer may send only as much as the window we granted; paramiko grants
    more only as we read, so a compliant device never makes both buffers together hold more
    than the window. paramiko does not check: a device ignoring the window would make its
    transport thread buffer without bound while we verify. One length check a packet.
    Packets are held as they came (:class:`Packets`), not copied into an array.
    """

    def __init__(self, flow: FlowControl) -> None:
        super().__init__()
        self._flow = flow
        self._buffer: Packets = Packets()

    def _buffer_frombytes(self, data: bytes) -> None:
        self._buffer.frombytes(data)

    def _buffer_tobytes(self, limit: int | None = None) -> bytes:
        return self._buffer.take(limit)

    def feed(self, data: bytes) -> None:
        if self._flow.admits(len(data)):
            super().feed(data)


class FlowControl:
    """Both receive buffers of one channel, installed before the command starts."""

    def __init__(self, chan: paramiko.Channel, window: int) -> None:
        self.window = window
        self.overrun = 0
        """Bytes the device sent beyond the window (dropped); non-zero is a violation."""
        self.stdout = Inbox(self)
        self.stderr = Inbox(self)
        chan.in_buffer = self.stdout
        chan.in_stderr_buffer = self.stderr

    def admits(self, size: int) -> bool:
        held = len(self.stdout) + len(self.stderr)
        if held + size <= self.window:
            return True
        self.overrun += size
        return False


class Tail:
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


def execute(
    transport: paramiko.Transport,
    label: str,
    command: str,
    payload: bytes,
    on_stdout: Callable[[bytes], object],
    timeouts: Timeouts,
    timeout: float | None,
    max_stdout: int | None,
) -> tuple[int, str]:
    """Open a channel, exec, feed stdin, pump stdout/stderr until EOF and exit status.
    Returns the status and the tail of stderr. ``payload`` is stdin (:func:`stdin_payload`).

    The deadline is checked after every read, so a device that never stops talking
    is cut off as surely as one that stops; one clock read per read keeps it cheap.
    """
    limit = timeouts.command if timeout is None else timeout
    idle = timeouts.idle
    deadline = time.monotonic() + limit
    where = f"{label}: '{command}'"
    try:
        chan = transport.open_session(
            window_size=WINDOW_SIZE,
            max_packet_size=MAX_PACKET_SIZE,
            timeout=min(timeouts.channel, max(limit, 0.001)),
        )
    except Exception as exc:
        raise translate(exc, where) from exc
    flow = FlowControl(chan, WINDOW_SIZE)
    err = Tail(STDERR_TAIL_BYTES)
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
        error = translate(exc, where)
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
        raise translate(lost, where) from lost
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


def stdin_payload(command: str, lines: Sequence[Secret | str]) -> bytes:
    """The command checked, and its stdin: one value per line. A value holding a line
    break would smuggle in an extra line, so it is refused (without showing it)."""
    if not isinstance(command, str):
        raise UsageError("a device command must be a str (secrets go on stdin)")
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
