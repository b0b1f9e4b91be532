"""A channel's receive buffer holds the packets as they came (``channel.Packets``): it must
behave exactly as paramiko's array-backed BufferedPipe does for every read and length."""

from __future__ import annotations

import random
import threading
from typing import Any, cast

import pytest
from paramiko.buffered_pipe import BufferedPipe

from hsmctl.ssh import channel

pytestmark = pytest.mark.unit


class _Chan:
    in_buffer: Any = None
    in_stderr_buffer: Any = None


def test_reads_and_lengths_match_paramikos_buffer() -> None:
    rng = random.Random(15)
    for _ in range(200):
        flow = channel.FlowControl(_Chan(), 1 << 20)  # type: ignore[arg-type]
        ours, reference = flow.stdout, cast(Any, BufferedPipe())  # typed for str in the stubs
        for _ in range(rng.randrange(1, 30)):
            if rng.random() < 0.6:
                data = rng.randbytes(rng.choice([0, 1, 7, 100, 4096]))
                ours.feed(data)
                reference.feed(data)
            else:
                n = rng.choice([1, 3, 50, 5000, 1 << 20])
                if len(reference):
                    assert ours.read(n, 0) == reference.read(n, 0)
            assert len(ours) == len(reference)
            assert ours.read_ready() == reference.read_ready()
        assert ours.empty() == reference.empty()
        assert len(ours) == 0


def test_a_read_of_one_packet_is_that_packet_and_the_window_still_counts() -> None:
    flow = channel.FlowControl(_Chan(), 10)  # type: ignore[arg-type]
    packet = b"0123456789"
    flow.stdout.feed(packet)
    flow.stdout.feed(b"x")  # beyond the window: dropped, counted
    assert flow.overrun == 1
    assert flow.stdout.read(100) is packet  # no copy for a single packet
    flow.stdout.feed(b"abc")
    flow.stdout.feed(b"defg")
    assert flow.stdout.read(5) == b"abcde"
    assert len(flow.stdout) == 2
    assert flow.stdout.read(5) == b"fg"


def test_a_reader_waiting_is_woken_and_close_ends_it() -> None:
    flow = channel.FlowControl(_Chan(), 1000)  # type: ignore[arg-type]
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend([flow.stdout.read(10, 10.0)]))
    reader.start()
    flow.stdout.feed(b"hello")
    reader.join(10)
    assert got == [b"hello"]
    flow.stdout.close()
    assert flow.stdout.read(10, 1.0) == b""


def test_only_a_leading_slice_can_be_dropped() -> None:
    packets = channel.Packets()
    packets.frombytes(b"abc")
    with pytest.raises(TypeError):
        del packets[1:2]
    del packets[:1]
    assert packets.take() == b"bc" and len(packets) == 2
    del packets[:]
    assert packets.take() == b"" and len(packets) == 0
