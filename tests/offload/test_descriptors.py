"""SentDescriptors (offload/descriptors.py): a passed descriptor is closed on the transport's drain, never before.

On a fake clock and Twisted's StringTransport (a consumer that records its producer), plus a real
UNIX connection for the one thing the module relies on: a pull producer is resumed once the
transport has written out what it was given, the descriptor with it.
"""

from __future__ import annotations

import os
from typing import Any, List

import pytest_twisted
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from tests.support.offload_support import wait_for
from tftp_offload.offload.descriptors import SentDescriptors


def pipe_fd() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_held_until_the_drain_then_closed_and_unregistered() -> None:
    transport, clock, stuck = StringTransport(), Clock(), []
    sent = SentDescriptors(transport, clock, lambda: stuck.append(1), give_up=30)
    first, second = pipe_fd(), pipe_fd()
    sent.hold(first)
    assert transport.producer is sent and transport.streaming is False
    assert is_open(first), "registering resumes a pull producer at once: that is no drain"
    sent.hold(second)
    assert len(sent) == 2 and is_open(second)
    sent.resumeProducing()  # the transport wrote out everything
    assert not is_open(first) and not is_open(second)
    assert transport.producer is None, "unregistered, so that loseConnection can complete"
    assert len(sent) == 0 and clock.getDelayedCalls() == [] and not stuck


def test_a_transport_that_never_drains_is_given_up_on() -> None:
    transport, clock, stuck = StringTransport(), Clock(), []
    sent = SentDescriptors(transport, clock, lambda: stuck.append(1), give_up=30)
    fd = pipe_fd()
    sent.hold(fd)
    clock.advance(29.9)
    assert not stuck and is_open(fd)
    clock.advance(0.2)
    assert stuck == [1] and is_open(fd), "never closed while it may still be queued"
    sent.stopProducing()  # the connection is dropped: now it goes
    assert not is_open(fd)
    sent.close_all()  # idempotent: nothing is closed twice


@pytest_twisted.ensureDeferred
async def test_a_real_transport_resumes_its_pull_producer_once_the_descriptor_is_out(tmp_path: Any) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint, connectProtocol
    from twisted.internet.interfaces import IFileDescriptorReceiver
    from twisted.internet.protocol import Factory, Protocol
    from zope.interface import implementer

    @implementer(IFileDescriptorReceiver)
    class Receiver(Protocol):
        def __init__(self) -> None:
            self.fds: List[int] = []

        def fileDescriptorReceived(self, descriptor: int) -> None:
            self.fds.append(descriptor)

    senders: List[Protocol] = []

    class Senders(Factory):
        def buildProtocol(self, addr: Any) -> Protocol:
            senders.append(Protocol())
            return senders[-1]

    path = os.path.join(str(tmp_path), "d.sock")
    port = await UNIXServerEndpoint(reactor, path).listen(Senders())
    receiver = await connectProtocol(UNIXClientEndpoint(reactor, path), Receiver())
    try:
        await wait_for(lambda: bool(senders) and senders[0].transport is not None)
        transport: Any = senders[0].transport
        stuck: List[int] = []
        sent = SentDescriptors(transport, reactor, lambda: stuck.append(1))
        passed = tmp_path / "passed"
        passed.write_bytes(b"passed")
        fd = os.open(passed, os.O_RDONLY)
        sent.hold(fd)
        transport.sendFileDescriptor(fd)
        transport.write(b"x")
        assert is_open(fd)
        await wait_for(lambda: len(sent) == 0)  # drained: closed here (the number may be reused at once)...
        await wait_for(lambda: bool(receiver.fds))  # ...and the peer has its own copy of the file
        assert os.pread(receiver.fds[0], 100, 0) == b"passed"
        os.close(receiver.fds[0])
        assert not stuck
        transport.loseConnection()  # unregistered: the close completes
        await wait_for(lambda: transport.disconnected)
    finally:
        if receiver.transport is not None:
            receiver.transport.loseConnection()
        await port.stopListening()
