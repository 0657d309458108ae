"""Lookups in flight (offload/questions.py): identical ones share one call; each caller waits within its
own deadline."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import maybeDeferred

from tests.support.offload_support import (
    WINDOW,
    FakeBackend,
    Reader,
    Start,
    ephemeral,
    fetch,
    files,
    get_reader,
    wait_for,
)
from tftp_offload import errors
from tftp_offload.readers import FileReader, PathReader
from tftp_offload.reference import pattern


@pytest.mark.parametrize("kind", ["inline", "fd", "path", "ephemeral"])
@pytest_twisted.ensureDeferred
async def test_identical_lookups_in_flight_cost_one_call(pair: Start, tmp_path: Path, kind: str) -> None:
    f = files(tmp_path)
    make = {
        "inline": lambda: Reader(b"shared config"),
        "fd": lambda: FileReader(os.open(f["big"], os.O_RDONLY)),
        "path": lambda: PathReader(str(f["path"])),
        "ephemeral": ephemeral(tmp_path),
    }[kind]
    want = {"inline": b"shared config", "fd": f["big"].read_bytes(), "path": f["path"].read_bytes(),
            "ephemeral": pattern(0, 100_000)}[kind]
    backend = FakeBackend({b"file": make})
    client, _ = pair(backend)
    backend.hold()
    # 20 RRQs from one client address (different ports, different options) while the backend thinks.
    pending = [get_reader(client, b"file", remote_port=5000 + i, options={"blksize": str(512 + i)})
               for i in range(20)]
    await wait_for(lambda: backend.held is not None and len(backend.held) == 1)
    backend.release()
    readers = [await d for d in pending]
    # Each reader is its own: read them interleaved, a window at a time.
    got = [b""] * 20
    for offset in range(0, len(want) + 1, WINDOW):
        for i, reader in enumerate(readers):
            if len(got[i]) == offset:
                got[i] += await maybeDeferred(reader.read, WINDOW)
    for reader in readers:
        reader.finish()
    assert got == [want] * 20
    assert backend.count(b"file") == 1
    assert client.stats["coalesced"] == 19


@pytest_twisted.ensureDeferred
async def test_slow_backend_times_out_then_its_answer_serves_the_retry(pair: Start) -> None:
    backend = FakeBackend({b"f": lambda: Reader(b"late but good")})
    client, _ = pair(backend, timeout=0.3)
    backend.hold()
    started = time.monotonic()
    with pytest.raises(errors.BackendError, match=r"^Backend did not answer in time$"):
        await get_reader(client, b"f")
    assert 0.25 < time.monotonic() - started < 1.5
    backend.release()
    await wait_for(lambda: client.stats["answers"] == 1)
    assert await fetch(client, b"f") == b"late but good"  # the ROM's retry: from the cache
    assert backend.count(b"f") == 1
