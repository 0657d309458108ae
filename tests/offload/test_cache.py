"""The answer cache (offload/cache.py): what is the same question, how long an answer is reused, and its bounds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from tests.support.offload_support import (
    FakeBackend,
    Reader,
    Start,
    fetch,
    files,
    get_reader,
    read_all,
    turn,
    wait_for,
)
from tftp_offload.offload.answers import Answer, InlineAnswer
from tftp_offload.offload.cache import AnswerCache
from tftp_offload.readers import FileReader
from tftp_offload.reference import GeneratedReader, pattern


@pytest_twisted.ensureDeferred
async def test_what_makes_lookups_different(pair: Start) -> None:
    """Client address, server address, server port, filename and mode each make a new lookup."""
    backend = FakeBackend({b"a": lambda: Reader(b"a"), b"b": lambda: Reader(b"b")})
    client, _ = pair(backend)
    await fetch(client, b"a")
    await fetch(client, b"a", remote_port=1)  # the client's port: same answer
    await fetch(client, b"a", options={"tsize": "0"})  # its options: same answer
    await fetch(client, b"a", remote="127.0.0.2")
    await fetch(client, b"a", local="127.0.0.3")
    await fetch(client, b"a", local_port=6969)
    await fetch(client, b"a", mode="netascii")
    await fetch(client, b"b")
    assert backend.count(b"a") == 5 and backend.count(b"b") == 1


@pytest.mark.parametrize("kind", ["inline", "fd", "stream", "stream-unsized"])
@pytest_twisted.ensureDeferred
async def test_uefi_probe_then_real_request_cost_one_lookup(pair: Start, tmp_path: Path, kind: str) -> None:
    """RRQ tsize=0 -> OACK (the server has read its first window) -> ERROR 8 -> RRQ again: one lookup."""
    f = files(tmp_path)
    make: Any = {"inline": lambda: Reader(b"grub.cfg body"),
                 "fd": lambda: FileReader(os.open(f["big"], os.O_RDONLY)),
                 "stream": lambda: GeneratedReader(3_000_000),
                 "stream-unsized": lambda: GeneratedReader(3_000_000, sized=False)}[kind]
    want = {"inline": b"grub.cfg body", "fd": f["big"].read_bytes()}.get(kind, pattern(0, 3_000_000))
    backend = FakeBackend({b"bootx64.efi": make})
    client, _ = pair(backend)
    probe = await get_reader(client, b"bootx64.efi", remote_port=1000, options={"tsize": "0", "blksize": "1468"})
    first = await maybeDeferred(probe.read, 16 * 1468)
    assert first == want[: 16 * 1468]
    probe.transfer_finished({"outcome": "client-error", "client": ("127.0.0.1", 1000), "bytes": 0, "duration": 0.01,
                             "blksize": 1468, "windowsize": 16, "retransmits": 0, "client_error": "8: tsize"})
    probe.finish()
    real = await get_reader(client, b"bootx64.efi", remote_port=1001, options={"blksize": "1468"})
    try:
        assert await read_all(real, 16 * 1468) == want
    finally:
        real.finish()
    assert backend.count(b"bootx64.efi") == 1
    await wait_for(lambda: len(backend.reports) == 1)
    assert backend.reports[0]["outcome"] == "client-error"
    assert backend.reports[0]["request_id"] >= 1


@pytest_twisted.ensureDeferred
async def test_answers_expire(pair: Start) -> None:
    backend = FakeBackend({b"a": lambda: Reader(b"a")})
    client, _ = pair(backend, cache_ttl=0.2)
    await fetch(client, b"a")
    await fetch(client, b"a")
    assert backend.count(b"a") == 1
    await turn(0.3)
    await fetch(client, b"a")
    assert backend.count(b"a") == 2


@pytest_twisted.ensureDeferred
async def test_max_age_zero_is_neither_reused_nor_shared(pair: Start) -> None:
    def once() -> Reader:
        reader = Reader(b"one-time token")
        reader.max_age = 0  # type: ignore[attr-defined]
        return reader

    backend = FakeBackend({b"token": once})
    client, _ = pair(backend)
    backend.hold()
    pending = [get_reader(client, b"token", remote_port=3000 + i) for i in range(3)]
    await wait_for(lambda: backend.held is not None and len(backend.held) == 1)
    backend.release()  # answers the first; the others were then asked again, one each
    await wait_for(lambda: backend.count(b"token") == 3)
    for d in pending:
        reader = await d
        reader.finish()
    await fetch(client, b"token")
    assert backend.count(b"token") == 4


class Held(InlineAnswer):
    """An inline answer that counts its releases."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.released = 0

    def release(self) -> None:
        self.released += 1


def key(name: bytes) -> Any:
    return ("192.0.2.1", 69, "192.0.2.9", name, "octet")


def test_cache_entries_expire_and_are_released() -> None:
    clock = Clock()
    cache = AnswerCache(clock)
    answer = Held(b"x")
    cache.put(key(b"a"), answer, 5.0, 7)
    assert cache.get(key(b"a")) == (answer, 7)
    clock.advance(4.9)
    assert cache.get(key(b"a")) is not None
    clock.advance(0.2)
    assert cache.get(key(b"a")) is None and answer.released == 1
    assert clock.getDelayedCalls() == []


def test_cache_bounds_drop_the_oldest_first() -> None:
    clock = Clock()
    cache = AnswerCache(clock, max_entries=2, max_bytes=10)
    answers: List[Answer] = [Held(b"1234"), Held(b"5678"), Held(b"9")]
    for i, answer in enumerate(answers):
        cache.put(key(bytes([65 + i])), answer, 5.0, i)
    assert len(cache) == 2 and cache.get(key(b"A")) is None and answers[0].released == 1  # type: ignore[attr-defined]
    cache.put(key(b"D"), Held(b"0123456"), 5.0, 3)  # 4 + 1 + 7 bytes > 10: B goes
    assert cache.get(key(b"B")) is None and cache.get(key(b"C")) is not None
    cache.clear()
    assert len(cache) == 0 and clock.getDelayedCalls() == []
