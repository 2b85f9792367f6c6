"""The hand-off's short polls before sleeping (docs/leases.md): a forwarder polls for its answer
(`Channel.poll_briefly`), the listener for the next requests after it submitted some; whatever
the poll finds or misses, the message read is the same."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from shard_sql.handoff import ANSWER_SPIN, Channel, frame
from shard_sql.handoff_tcp import SealedChannel

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="MSG_DONTWAIT: polls on Linux only"
)


@pytest.fixture
def pair() -> Iterator[tuple[Channel, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = Channel(ours)
    channel.wait_at_most(5.0)
    yield channel, theirs
    ours.close()
    theirs.close()


def test_an_answer_there_is_taken_by_the_poll(pair: tuple[Channel, socket.socket]) -> None:
    channel, theirs = pair
    theirs.sendall(frame(b"one") + frame(b"two"))
    channel.poll_briefly(ANSWER_SPIN)
    assert channel.has_more()
    assert channel.receive() == b"one"
    assert channel.receive() == b"two"


def test_an_answer_after_the_poll_is_waited_for(pair: tuple[Channel, socket.socket]) -> None:
    channel, theirs = pair
    late = threading.Timer(0.05, lambda: theirs.sendall(frame(b"late")))
    late.start()
    t0 = time.monotonic()
    channel.poll_briefly(0.001)  # gives up long before the answer
    assert not channel.has_more() and time.monotonic() - t0 < 0.04
    assert channel.receive() == b"late"
    late.join()


def test_half_an_answer_in_the_poll_is_completed_by_the_receive(
    pair: tuple[Channel, socket.socket],
) -> None:
    channel, theirs = pair
    whole = frame(b"x" * 1000)
    theirs.sendall(whole[:10])
    channel.poll_briefly(ANSWER_SPIN)
    threading.Timer(0.02, lambda: theirs.sendall(whole[10:])).start()
    assert channel.receive() == b"x" * 1000


def test_the_end_met_by_the_poll_is_the_end(pair: tuple[Channel, socket.socket]) -> None:
    channel, theirs = pair
    theirs.close()
    channel.poll_briefly(ANSWER_SPIN)
    assert channel.receive() is None


def test_a_network_channel_does_not_poll() -> None:
    assert Channel.ANSWER_SPIN > 0 and SealedChannel.ANSWER_SPIN == 0
