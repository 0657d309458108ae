"""Backend faults end to end: a real UDP client, the server, and a backend that misbehaves.

Through AMP, a test-only responder (`Faulty`) does on purpose what a broken backend does: hangs,
dies mid-request, answers garbage, oversized or nonsensical values, answers after our timeout,
names a file that has vanished, passes a descriptor that is not a regular file. Through legacy,
the rackd stand-in does the same in its format. For each: the client gets a clear ERROR within the
timeout, nothing leaks (sessions, descriptors counted in /proc/self/fd, ephemeral files), and the
server serves again as soon as the backend behaves.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import deferLater
from twisted.protocols import amp

from tests.support import legacy_responder
from tests.support.inprocess import Serving, download, get_reactor, serve  # noqa: F401  (fixture)
from tests.support.offload_support import open_fds, short_dir, turn, wait_for
from tftp_offload import errors
from tftp_offload.config import lookup_timeout_for
from tftp_offload.offload import commands
from tftp_offload.offload.client import AMPBackend
from tftp_offload.offload.legacy import LegacyBackend

TIMEOUT = 1.0
OK = b"served again\n"


class Faulty(amp.AMP):
    """An offload backend that misbehaves as the filename says (first path component)."""

    def __init__(self, eph_dir: Path, held: List[int]) -> None:
        super().__init__()
        self.eph_dir = eph_dir
        self.held = held

    @commands.Hello.responder
    def hello(self, version: int, capabilities: List[str], min_version: Optional[int] = None,
              software: Optional[str] = None) -> Dict[str, Any]:
        return {"version": 1, "capabilities": list(commands.CAPABILITIES), "software": "faulty"}

    @commands.ReadRequest.responder
    def read_request(self, request_id: int, local_ip: str, local_port: int, remote_ip: str, remote_port: int,
                     filename: bytes, mode: str, options: Any) -> Any:
        kind = filename.split(b"/")[0].decode()
        transport: Any = self.transport
        if kind == "ok":
            return {"kind": "inline", "data": OK, "size": len(OK)}
        if kind == "hang":
            return Deferred()
        if kind == "die":
            transport.abortConnection()
            return Deferred()
        if kind == "garbage":
            transport.write(b"\x00\x04junk\x00\x05\xff\xfe\xfd\xfc\xfb\x00\x00" * 3 + os.urandom(64))
            return Deferred()
        if kind == "long-key":  # a key longer than AMP's 255 bytes
            transport.write(b"\x01\x00" + b"k" * 256 + b"\x00\x01x\x00\x00")
            return Deferred()
        if kind == "bad-kind":
            return {"kind": "telepathy"}
        if kind == "no-data":  # inline without its data
            return {"kind": "inline"}
        if kind == "negative-size":
            return {"kind": "stream", "stream_id": 3, "data": b"abc", "size": -5}
        if kind == "long-chunk":  # a stream whose chunks are longer than asked
            return {"kind": "stream", "stream_id": 7, "data": b"", "size": 10_000_000}
        if kind == "vanished":
            path = self.eph_dir / "vanished.bin"
            path.write_bytes(b"gone")
            path.unlink()
            return {"kind": "path", "path": os.fsencode(path), "size": 4}
        if kind == "vanished-eph":
            return {"kind": "ephemeral", "path": os.fsencode(self.eph_dir / "never-written"), "size": 4}
        if kind in ("pipe", "directory-fd"):
            if kind == "pipe":
                read_end, write_end = os.pipe()
                os.write(write_end, b"not a file")
                os.close(write_end)
            else:
                read_end = os.open(self.eph_dir, os.O_RDONLY | os.O_DIRECTORY)
            self.held.append(read_end)  # closed by the test once sent
            return {"kind": "fd", "fd": read_end, "size": 10}
        if kind == "late-eph":
            path = self.eph_dir / f"late-{request_id}"
            path.write_bytes(b"late" * 1000)
            return deferLater(get_reactor(), TIMEOUT + 0.5,
                              lambda: {"kind": "ephemeral", "path": os.fsencode(path), "size": 4000})
        if kind == "late-fd":
            fd = os.open(__file__, os.O_RDONLY)
            self.held.append(fd)
            return deferLater(get_reactor(), TIMEOUT + 0.5, lambda: {"kind": "fd", "fd": fd, "size": 100_000})
        raise errors.FileNotFound("File not found")

    @commands.ReadChunk.responder
    def read_chunk(self, stream_id: int, offset: int, length: int) -> Dict[str, Any]:
        return {"data": b"y" * (length + 100), "eof": False}

    @commands.TransferFinished.responder
    def transfer_finished(self, **report: Any) -> Dict[str, Any]:
        return {}

    @commands.CloseStream.responder
    def close_stream(self, stream_id: int) -> Dict[str, Any]:
        return {}


class FaultyFactory(ServerFactory):
    noisy = False

    def __init__(self, eph_dir: Path) -> None:
        self.eph_dir = eph_dir
        self.held: List[int] = []

    def buildProtocol(self, addr: Any) -> Faulty:
        return Faulty(self.eph_dir, self.held)


AMP_FAULTS = [
    # (filename, TFTP code, message)
    ("hang/x", 0, "Backend did not answer in time"),
    ("die/x", 0, None),
    ("garbage/x", 0, None),
    ("long-key/x", 0, None),
    ("bad-kind/x", 0, "Backend sent an invalid answer"),
    ("no-data/x", 0, "Backend sent an invalid answer"),
    ("negative-size/x", 0, "Backend sent an invalid answer"),
    ("long-chunk/x", 0, None),
    ("vanished/x", 1, "File not found"),
    ("vanished-eph/x", 1, "File not found"),
    ("pipe/x", 0, "Backend passed a descriptor that is not a regular file"),
    ("directory-fd/x", 0, "Backend passed a descriptor that is not a regular file"),
    ("late-eph/x", 0, "Backend did not answer in time"),
    ("late-fd/x", 0, "Backend did not answer in time"),
]


@pytest.fixture
def faulty() -> Iterator[Tuple[str, FaultyFactory, Path]]:
    sockets = short_dir("tfb-")
    eph = Path(tempfile.mkdtemp(prefix="tfb-eph-", dir="/tmp"))
    factory = FaultyFactory(eph)
    path = os.path.join(sockets, "faulty.sock")
    port = get_reactor().listenUNIX(path, factory)
    yield path, factory, eph
    pytest_twisted.blockon(port.stopListening())
    for fd in factory.held:
        with contextlib.suppress(OSError):
            os.close(fd)
    shutil.rmtree(sockets, ignore_errors=True)
    shutil.rmtree(eph, ignore_errors=True)


async def fetch(serve: Serving, service: Any, name: bytes) -> Tuple[Any, float]:
    peer = serve.peer()
    started = time.monotonic()
    got = await download(peer, ("127.0.0.1", int(service.ports[0].getHost().port)), name, timeout=TIMEOUT + 3)
    took = time.monotonic() - started
    await peer.transport.stopListening()
    serve.peers.remove(peer)
    return got, took


@pytest_twisted.ensureDeferred
async def test_amp_backend_faults(serve: Serving, faulty: Tuple[str, FaultyFactory, Path]) -> None:
    path, factory, eph = faulty
    backend = AMPBackend(path, timeout=TIMEOUT, cache_ttl=0)
    backend.startService()
    try:
        service = serve(backend, lookup_timeout=lookup_timeout_for(TIMEOUT))
        got, _ = await fetch(serve, service, b"ok/warm-up")
        assert got.complete and got.data == OK
        await turn(0.2)
        before = open_fds()
        for name, code, message in AMP_FAULTS:
            got, took = await fetch(serve, service, name.encode())
            assert got.error is not None and got.error[0] == code, (name, got.error)
            if message is not None:
                assert got.error[1] == message, (name, got.error)
            assert "/" not in got.error[1] and "Traceback" not in got.error[1], (name, got.error)
            assert took < TIMEOUT + 0.7, (name, took)
            await serve.settled(service)
            # The server serves again once the backend behaves (it reconnects after a fault that cut it off).
            await wait_for(lambda: backend.connected, 5.0)
            again, took = await fetch(serve, service, b"ok/" + name.encode())
            assert again.complete and again.data == OK, (name, again.error)
        await turn(TIMEOUT + 0.7)  # the late answers have come and been cleaned up
        for fd in factory.held:  # the backend's own copies of passed descriptors
            os.close(fd)
        factory.held.clear()
        await wait_for(lambda: open_fds() <= before, 3.0)
        assert os.listdir(eph) == [], "an ephemeral file was left behind"
        assert not service.server.sessions
    finally:
        await backend.stopService()


LEGACY_FAULTS = [
    ("hang/x", 0, "Backend did not answer in time"),
    ("die/x", 0, "Backend sent an invalid answer"),
    ("malformed/oversized", 0, "Backend sent an invalid answer"),
    ("malformed/trailing", 0, "Backend sent an invalid answer"),
    ("malformed/utf8", 0, "Backend sent an invalid answer"),
    ("vanish/x", 1, "File not found"),
    ("slow/1.5/eph/100/late", 0, "Backend did not answer in time"),
    ("slow/1.5/x", 0, "Backend did not answer in time"),
    ("error/0/Insecure path: b'/srv/tftp/../etc' is not a child of b'/srv/tftp'", 2, "Access violation"),
]


@pytest_twisted.ensureDeferred
async def test_legacy_backend_faults(serve: Serving) -> None:
    base = Path(short_dir("tfb-"))
    root, eph = base / "root", base / "eph"
    root.mkdir()
    eph.mkdir()
    (root / "ok").write_bytes(OK)
    os.mkfifo(root / "fifo")
    _state, port = legacy_responder.listen(get_reactor(), str(base / "rackd.sock"), root, eph)
    backend = LegacyBackend(str(base / "rackd.sock"), timeout=TIMEOUT, late_grace=2.0)
    try:
        service = serve(backend, lookup_timeout=lookup_timeout_for(TIMEOUT))
        before = open_fds()
        for name, code, message in [*LEGACY_FAULTS, ("fifo", 2, "Access violation: not a regular file")]:
            got, took = await fetch(serve, service, name.encode())
            assert got.error == (code, message), (name, got.error)
            assert took < TIMEOUT + 0.7, (name, took)
            again, _ = await fetch(serve, service, b"ok")
            assert again.complete and again.data == OK, (name, again.error)
        await wait_for(lambda: not backend.lookups, TIMEOUT + 3.0)
        await wait_for(lambda: open_fds() <= before, 3.0)
        assert os.listdir(eph) == [], "an ephemeral file was left behind"
        await serve.settled(service)
    finally:
        await port.stopListening()
        shutil.rmtree(base, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_amp_stop_waits_for_answers_in_flight(faulty: Tuple[str, FaultyFactory, Path]) -> None:
    """Stopping while the backend still makes an ephemeral file: the stop waits for the answer (at most the
    timeout), so the file is deleted; the caller was told "Server shutting down" at once."""
    from tests.support.offload_support import get_reader

    path, _, eph = faulty
    backend = AMPBackend(path, timeout=TIMEOUT + 1.0, cache_ttl=0)
    backend.startService()
    await wait_for(lambda: backend.connected, 5.0)
    pending = get_reader(backend, b"late-eph/at-stop")
    await wait_for(lambda: os.listdir(eph) != [], 2.0)  # the backend has written it, its answer is on its way
    stopping = backend.stopService()
    with pytest.raises(Exception, match="Server shutting down"):
        await pending
    assert not stopping.called
    await stopping
    assert os.listdir(eph) == []
