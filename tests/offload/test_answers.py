"""Answers on the server's side (offload/answers.py): every kind gives the right bytes and a reader of its
own; nothing is left behind."""

from __future__ import annotations

import os
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
    inner,
    open_fds,
    read_all,
    turn,
    wait_for,
)
from tftp_offload import errors
from tftp_offload.offload import answers
from tftp_offload.readers import BytesReader, FileReader, PathReader
from tftp_offload.reference import GeneratedReader, pattern


@pytest_twisted.ensureDeferred
async def test_every_answer_kind(pair: Start, tmp_path: Path) -> None:
    f = files(tmp_path)
    eph_dir = tmp_path / "eph"
    eph_dir.mkdir()
    backend = FakeBackend({
        b"inline": lambda: Reader(b"config for you\n"),
        b"fd": lambda: FileReader(os.open(f["big"], os.O_RDONLY)),
        b"path": lambda: PathReader(str(f["path"])),
        b"ephemeral": ephemeral(eph_dir),
        b"stream": lambda: GeneratedReader(5_000_000),
        b"unsized": lambda: GeneratedReader(300_000, sized=False),
    })
    client, _ = pair(backend)
    cases = [
        (b"inline", b"config for you\n", BytesReader, 15),
        (b"fd", f["big"].read_bytes(), FileReader, 300_000),
        (b"path", f["path"].read_bytes(), FileReader, 200_000),
        (b"ephemeral", pattern(0, 100_000), FileReader, 100_000),
        (b"stream", pattern(0, 5_000_000), answers.StreamReader, 5_000_000),
        (b"unsized", pattern(0, 300_000), answers.StreamReader, None),
    ]
    for name, want, kind, size in cases:
        reader = await get_reader(client, name)
        assert isinstance(inner(reader), kind), name
        assert reader.kind == ("stream" if name == b"unsized" else name.decode()), name  # for metrics
        assert reader.size == size, name
        if name == b"ephemeral":
            assert not list(eph_dir.iterdir()), "an ephemeral file is unlinked as soon as it is opened"
        try:
            assert await read_all(reader, WINDOW) == want, name
        finally:
            reader.finish()
    assert client.stats["lookups"] == len(cases)


@pytest_twisted.ensureDeferred
async def test_late_answers_nobody_takes_are_cleaned_up(pair: Start, tmp_path: Path) -> None:
    f = files(tmp_path)
    backend = FakeBackend({b"eph": ephemeral(tmp_path, 200_000),
                           b"fd": lambda: FileReader(os.open(f["big"], os.O_RDONLY)),
                           b"stream": lambda: GeneratedReader(1_000_000)})
    client, service = pair(backend, timeout=0.2, cache_ttl=0)
    await fetch(client, b"fd")  # connection and everything else warmed up
    before = open_fds()
    backend.hold()
    for name in (b"eph", b"fd", b"stream"):
        with pytest.raises(errors.BackendError):
            await get_reader(client, name)
    backend.release()
    await wait_for(lambda: client.stats["answers"] == 4)
    await wait_for(lambda: open_fds() <= before)
    assert not list(tmp_path.glob("eph-*")), "a late ephemeral answer must still be deleted"
    connection = next(iter(service.factory.connections))
    await wait_for(lambda: not connection.streams)


@pytest_twisted.ensureDeferred
async def test_many_transfers_leak_nothing(pair: Start, tmp_path: Path) -> None:
    f = files(tmp_path)
    backend = FakeBackend({b"eph": ephemeral(tmp_path, 70_000),
                           b"fd": lambda: FileReader(os.open(f["big"], os.O_RDONLY)),
                           b"stream": lambda: GeneratedReader(200_000)})
    client, _ = pair(backend, cache_ttl=0.05)
    await fetch(client, b"fd")
    await turn(0.1)
    before = open_fds()
    for i in range(100):
        name = (b"eph", b"fd", b"stream")[i % 3]
        reader = await get_reader(client, name, remote=f"127.0.0.{1 + i % 5}")
        if i % 2:
            await maybeDeferred(reader.read, 1468)  # aborted after the first block
        else:
            await read_all(reader, WINDOW)
        reader.finish()
    await turn(0.2)  # every cached answer has expired
    await wait_for(lambda: open_fds() == before)
    assert not list(tmp_path.glob("eph-*"))
