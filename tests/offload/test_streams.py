"""Stream answers on the server's side (offload/streams.py): one per caller, read ahead within bounds,
failing cleanly."""

from __future__ import annotations

import hashlib

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList, ensureDeferred, maybeDeferred

from tests.support.offload_support import (
    WINDOW,
    FakeBackend,
    Reader,
    Start,
    get_reader,
    inner,
    read_all,
    turn,
    wait_for,
)
from tftp_offload import errors
from tftp_offload.offload import streams
from tftp_offload.offload.commands import CHUNK_MAX
from tftp_offload.reference import GeneratedReader, pattern


@pytest_twisted.ensureDeferred
async def test_concurrent_streams_get_one_each(pair: Start) -> None:
    backend = FakeBackend({b"big": lambda: GeneratedReader(2_000_000)})
    client, _ = pair(backend)
    backend.hold()
    pending = [get_reader(client, b"big", remote_port=4000 + i) for i in range(5)]
    await wait_for(lambda: backend.held is not None and len(backend.held) == 1)
    backend.release()
    readers = [await d for d in pending]
    assert backend.count(b"big") == 5
    contents = await DeferredList([ensureDeferred(read_all(r, WINDOW)) for r in readers])
    for reader in readers:
        reader.finish()
    assert [c for _, c in contents] == [pattern(0, 2_000_000)] * 5


@pytest_twisted.ensureDeferred
async def test_stream_read_ahead_is_bounded(pair: Start) -> None:
    """A 40 MiB stream read a window at a time: never more than about two windows (plus the kept head
    and the chunks in flight) in memory, and every byte right."""
    size = 40 << 20
    backend = FakeBackend({b"big": lambda: GeneratedReader(size)})
    client, _ = pair(backend)
    reader = await get_reader(client, b"big")
    source = inner(reader).source
    digest = hashlib.sha256()
    peak = 0
    total = 0
    for _ in range(size // WINDOW + 2):
        chunk = await maybeDeferred(reader.read, WINDOW)
        digest.update(chunk)
        total += len(chunk)
        peak = max(peak, len(source.data) + CHUNK_MAX * source.in_flight)
        if len(chunk) < WINDOW:
            break
    reader.finish()
    assert total == size
    assert digest.digest() == hashlib.sha256(pattern(0, size)).digest()
    bound = streams.RETAIN_MAX + 2 * WINDOW + streams.CHUNKS_IN_FLIGHT * CHUNK_MAX
    assert peak <= bound, (peak, bound)


@pytest_twisted.ensureDeferred
async def test_stream_fails_cleanly_when_the_backend_goes(pair: Start) -> None:
    backend = FakeBackend({b"big": lambda: GeneratedReader(10_000_000)})
    client, service = pair(backend)
    reader = await get_reader(client, b"big")
    await maybeDeferred(reader.read, WINDOW)
    await service.stopService()
    with pytest.raises(errors.BackendError, match="connection"):
        for _ in range(200):
            await maybeDeferred(reader.read, WINDOW)
    reader.finish()


@pytest_twisted.ensureDeferred
async def test_stop_waits_for_stream_readers(pair: Start) -> None:
    backend = FakeBackend({b"big": lambda: GeneratedReader(5_000_000), b"small": lambda: Reader(b"s")})
    client, _ = pair(backend)
    reader = await get_reader(client, b"big")
    await maybeDeferred(reader.read, WINDOW)
    stopped = client.stopService()
    await turn(0.1)
    assert not stopped.called, "a transfer still pulls its stream: the connection must stay"
    assert await maybeDeferred(reader.read, WINDOW) == pattern(WINDOW, WINDOW)
    with pytest.raises(errors.BackendError):
        await get_reader(client, b"small")  # but no new lookups
    reader.finish()
    await stopped
