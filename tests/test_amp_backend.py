"""The server's AMP backend against the responder, in one process over a real UNIX socket.

Covers what the server relies on: every answer kind gives the right bytes, identical lookups share
one backend call, answers are reused for a while, each caller gets a reader of its own, streams are
read ahead within bounds, and a slow, absent or restarting backend gives clear errors and recovers.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList, ensureDeferred, maybeDeferred

from tests.support.offload_support import FakeBackend, Reader, get_reader, open_fds, read_all, sock_dir, turn, wait_for  # noqa: F401
from tftp_offload import errors
from tftp_offload.offload import answers, streams
from tftp_offload.offload.client import AMPBackend
from tftp_offload.offload.commands import CHUNK_MAX
from tftp_offload.offload.service import offload_service
from tftp_offload.readers import BytesReader, FileReader, PathReader
from tftp_offload.reference import GeneratedReader, pattern

Start = Callable[..., Tuple[AMPBackend, Any]]
WINDOW = 64 * 1468


@pytest.fixture
def pair(sock_dir: str) -> Iterator[Start]:
    """start(backend, responder_options={}, **amp_options) -> (AMPBackend, responder service), both running."""
    from twisted.internet import reactor

    started: List[Any] = []

    def start(backend: Any, responder_options: Dict[str, Any] = {}, path: str = "", **options: Any  # noqa: B006
              ) -> Tuple[AMPBackend, Any]:
        path = path or os.path.join(sock_dir, "b.sock")
        service = offload_service(backend, path, **responder_options)
        service.startService()
        client = AMPBackend(path, **{"timeout": 2.0, **options})
        client.startService()
        started.extend([client, service])
        return client, service

    yield start
    for service in started:
        if service.running:
            d = maybeDeferred(service.stopService)
            d.addTimeout(10, reactor)
            pytest_twisted.blockon(d)


async def fetch(client: AMPBackend, name: bytes, size: int = WINDOW, **where: Any) -> bytes:
    reader = await get_reader(client, name, **where)
    try:
        return await read_all(reader, size)
    finally:
        reader.finish()


def inner(reader: Any) -> Any:
    return reader.reader


def files(tmp_path: Path) -> Dict[str, Path]:
    out = {}
    for name, size in [("big", 300_000), ("path", 200_000), ("small", 1000)]:
        out[name] = tmp_path / name
        out[name].write_bytes(os.urandom(size))
    return out


def ephemeral(tmp_path: Path, size: int = 100_000) -> Callable[[], PathReader]:
    counter = [0]

    def make() -> PathReader:
        counter[0] += 1
        path = tmp_path / f"eph-{counter[0]}"
        path.write_bytes(pattern(0, size))
        return PathReader(str(path), ephemeral=True)

    return make


# ------------------------------------------------------------------------ answer kinds --


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
async def test_backend_errors_reach_the_caller(pair: Start) -> None:
    backend = FakeBackend({b"missing": errors.FileNotFound("Not on this rack"),
                           b"no": errors.AccessViolation("Not for you"),
                           b"crash": RuntimeError("/secret/path")})
    client, _ = pair(backend)
    with pytest.raises(errors.FileNotFound, match="Not on this rack"):
        await get_reader(client, b"missing")
    with pytest.raises(errors.AccessViolation, match="Not for you"):
        await get_reader(client, b"no")
    with pytest.raises(errors.BackendError, match=r"^Internal server error$"):
        await get_reader(client, b"crash")
    # Errors are not cached: asking again asks again.
    with pytest.raises(errors.FileNotFound):
        await get_reader(client, b"missing")
    assert backend.count(b"missing") == 2


@pytest_twisted.ensureDeferred
async def test_absurd_filename_is_refused_without_losing_the_connection(pair: Start) -> None:
    client, _ = pair(FakeBackend({b"ok": lambda: Reader(b"ok")}))
    with pytest.raises(errors.BackendError):
        await get_reader(client, b"x" * 70_000)  # over AMP's 65,535-byte value limit
    assert await fetch(client, b"ok") == b"ok"


# ------------------------------------------------------------------ sharing and caching --


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


# ---------------------------------------------------------------- slow, gone, restarting --


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
