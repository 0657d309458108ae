"""The responder's streams (offload/serving.py): chunks served in order, bad requests refused, idle streams
closed, readers released."""

from __future__ import annotations

import os
from typing import Any, Awaitable, Callable, Tuple

import pytest
import pytest_twisted
from twisted.protocols import amp

from tests.support.offload_support import (
    FakeBackend,
    Reader,
    pull,
    request,
    wait_for,
)
from tftp_offload import errors
from tftp_offload.offload import commands
from tftp_offload.offload.commands import CHUNK_MAX, INLINE_MAX

Start = Callable[..., Awaitable[Tuple[Any, amp.AMP]]]


@pytest_twisted.ensureDeferred
async def test_chunks_in_flight_are_served_in_order(serve: Start) -> None:
    content = os.urandom(INLINE_MAX * 8)
    backend = FakeBackend({b"big": lambda: Reader(content, deferred=True)})
    _, client = await serve(backend)
    answer = await request(client, b"big")
    offset = len(answer["data"])
    calls = []
    for i in range(6):  # six at once, as the server's read-ahead sends them
        calls.append(client.callRemote(commands.ReadChunk, stream_id=answer["stream_id"],
                                       offset=offset + i * 30_000, length=30_000))
    got = [await d for d in calls]
    assert b"".join(g["data"] for g in got) == content[offset : offset + 6 * 30_000]


@pytest_twisted.ensureDeferred
async def test_bad_chunk_requests_are_refused_without_harm(serve: Start) -> None:
    content = os.urandom(INLINE_MAX * 3)
    backend = FakeBackend({b"big": lambda: Reader(content)})
    _, client = await serve(backend)
    answer = await request(client, b"big")
    sid, offset = answer["stream_id"], len(answer["data"])
    with pytest.raises(commands.BadRequest):
        await client.callRemote(commands.ReadChunk, stream_id=sid, offset=offset + 1, length=10)
    with pytest.raises(commands.BadRequest):
        await client.callRemote(commands.ReadChunk, stream_id=sid, offset=offset, length=CHUNK_MAX + 1)
    with pytest.raises(commands.StreamGone):
        await client.callRemote(commands.ReadChunk, stream_id=sid + 100, offset=0, length=10)
    got = await client.callRemote(commands.ReadChunk, stream_id=sid, offset=offset, length=10)
    assert got["data"] == content[offset : offset + 10]


@pytest_twisted.ensureDeferred
async def test_failing_stream_read_is_an_error_not_a_hangup(serve: Start) -> None:
    content = os.urandom(INLINE_MAX * 3)
    backend = FakeBackend({b"big": lambda: Reader(content, fail_at=INLINE_MAX * 2)})
    _, client = await serve(backend)
    answer = await request(client, b"big")
    with pytest.raises(errors.BackendError, match="Error reading"):
        await pull(client, answer)
    assert backend.readers[0].finished == 1
    assert (await client.callRemote(commands.Hello, version=1, capabilities=[]))["version"] == 1


@pytest_twisted.ensureDeferred
async def test_idle_streams_are_closed(serve: Start) -> None:
    backend = FakeBackend({b"big": lambda: Reader(os.urandom(INLINE_MAX * 3))})
    _, client = await serve(backend, idle_timeout=0.2)
    answer = await request(client, b"big")
    await wait_for(lambda: backend.readers[0].finished == 1, timeout=3)
    with pytest.raises(commands.StreamGone):
        await client.callRemote(commands.ReadChunk, stream_id=answer["stream_id"], offset=INLINE_MAX + 1, length=10)


@pytest_twisted.ensureDeferred
async def test_close_and_disconnect_release_streams(serve: Start) -> None:
    backend = FakeBackend({b"big": lambda: Reader(os.urandom(INLINE_MAX * 3))})
    service, client = await serve(backend)
    first = await request(client, b"big")
    await request(client, b"big")
    client.callRemote(commands.CloseStream, stream_id=first["stream_id"])
    client.callRemote(commands.CloseStream, stream_id=9999)  # unknown: ignored
    await wait_for(lambda: backend.readers[0].finished == 1)
    assert backend.readers[1].finished == 0
    client.transport.loseConnection()
    await wait_for(lambda: backend.readers[1].finished == 1)
    assert not any(c.streams for c in service.factory.connections)


@pytest_twisted.ensureDeferred
async def test_stream_limit(serve: Start) -> None:
    backend = FakeBackend({b"big": lambda: Reader(os.urandom(INLINE_MAX * 3))})
    _, client = await serve(backend, max_streams=1)
    await request(client, b"big")
    with pytest.raises(errors.BackendError, match="too many open streams"):
        await request(client, b"big")
    assert backend.readers[1].finished == 1
