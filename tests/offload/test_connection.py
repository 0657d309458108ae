"""The connection to the backend (offload/connection.py): absent, restarting, found again."""

from __future__ import annotations

import os
import time
from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet.error import ConnectionDone

from tests.support.offload_support import (
    FakeBackend,
    Reader,
    Start,
    fetch,
    get_reader,
    read_all,
    turn,
    wait_for,
)
from tftp_offload import errors
from tftp_offload.offload.client import AMPBackend
from tftp_offload.offload.service import offload_service


@pytest_twisted.ensureDeferred
async def test_no_backend_is_unavailable_within_the_timeout(sock_dir: str) -> None:
    client = AMPBackend(os.path.join(sock_dir, "nobody.sock"), timeout=0.3)
    client.startService()
    try:
        started = time.monotonic()
        with pytest.raises(errors.BackendError, match=r"^Backend unavailable$"):
            await get_reader(client, b"f")
        assert time.monotonic() - started < 1.5
        assert "No such file" in client.unavailable_reason() or "connect" in client.unavailable_reason()
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_backend_restart(pair: Start, sock_dir: str) -> None:
    """A lookup cut off by the restart is asked again on the new connection; once the backend is
    back, requests are served again and the reconnect is counted (tftp_backend_up 1 -> 0 -> 1)."""
    path = os.path.join(sock_dir, "b.sock")
    first = FakeBackend({b"f": lambda: Reader(b"one"), b"g": lambda: Reader(b"never served")})
    client, service = pair(first, path=path, timeout=3.0)
    assert await fetch(client, b"f") == b"one"
    assert client.connected and client.stats["connections"] == 1
    # The backend holds a lookup, then goes away in the middle of it.
    first.hold()
    cut_off = get_reader(client, b"g", remote="127.0.0.2")
    await wait_for(lambda: (first.held is not None and len(first.held) == 1) or first.count(b"g") == 1)
    await service.stopService()
    await wait_for(lambda: not client.connected)  # tftp_backend_up 0
    await turn(0.2)
    second = FakeBackend({b"f": lambda: Reader(b"two"), b"g": lambda: Reader(b"gee")})
    new_service = offload_service(second, path)
    new_service.startService()
    try:
        reader = await cut_off
        assert await read_all(reader) == b"gee"
        reader.finish()
        await wait_for(lambda: client.connected)
        assert await fetch(client, b"f", remote="127.0.0.3") == b"two"
        assert client.stats["resent"] >= 1
        assert client.connected and client.stats["connections"] == 2  # one reconnect
    finally:
        await new_service.stopService()
    first.release()


def test_received_descriptors_no_answer_claimed_are_closed_with_the_connection() -> None:
    """Descriptors come in before the box that names them; one that no answer took (a box never
    decoded, an answer refused) is closed when the connection ends, a claimed one is the answer's."""
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    from tftp_offload.offload.connection import ClientFactory

    lost: List[Any] = []
    factory = ClientFactory("/nonexistent.sock", lambda p, s: None, lambda r: None, lambda p, r: lost.append(p))
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    unclaimed_r, unclaimed_w = os.pipe()
    claimed_r, claimed_w = os.pipe()
    try:
        for fd in (unclaimed_r, claimed_r):
            protocol.fileDescriptorReceived(fd)
        protocol.claim(claimed_r)
        protocol.connectionLost(Failure(ConnectionDone()))
        assert lost == [protocol] and protocol.gone
        with pytest.raises(OSError):
            os.fstat(unclaimed_r)
        os.fstat(claimed_r)  # still open: the answer that claimed it closes it
    finally:
        for fd in (unclaimed_w, claimed_r, claimed_w):
            os.close(fd)
