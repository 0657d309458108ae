"""In-process helpers for the Twisted driver's tests: a non-blocking client, recording backends.

The server under test (`TFTPOffloadService`) and the client (`Peer`, a
`DatagramProtocol`) share the reactor pytest-twisted runs, and talk over real
UDP sockets on loopback. Packets are built and parsed with `tftp_client`'s
struct-only helpers, so a codec bug in the server cannot hide behind the same
bug here.

Nothing here imports the reactor at module level (see conftest.py): it is
fetched when a test runs, after pytest-twisted has installed the one chosen
with `--reactor`.
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Set, Tuple

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.python import context
from zope.interface import implementer

from tests.support import tftp_client as wire
from tftp_offload.errors import FileNotFound
from tftp_offload.interfaces import IBackend, IReader
from tftp_offload.mux import TransferSockets
from tftp_offload.service import TFTPOffloadService

Address = Tuple[str, int]

WAIT = 3.0
"""Seconds any single wait for a datagram may take before the test fails."""

QUIET = 0.15
"""Seconds of silence taken to mean "no answer is coming"."""


def get_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def sleep(seconds: float) -> "Deferred[None]":
    return deferLater(get_reactor(), seconds, lambda: None)


async def until(predicate: Callable[[], Any], timeout: float = WAIT, what: str = "condition") -> None:
    """Let the reactor run until `predicate()` holds; fail after `timeout` seconds."""
    reactor = get_reactor()
    end = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await sleep(0.005)


# ---------------------------------------------------------------- the client --


def opcode(datagram: bytes) -> int:
    return wire.opcode_of(datagram)


def block_of(datagram: bytes) -> int:
    return int(struct.unpack("!H", datagram[2:4])[0])


def data_packet(block: int, payload: bytes) -> bytes:
    return struct.pack("!HH", wire.DATA, block) + payload


class Peer(DatagramProtocol):
    """A client socket: what it receives is queued, with who sent it, for `recv()`."""

    noisy = False

    def __init__(self) -> None:
        self.received: List[Tuple[bytes, Address]] = []
        self._queue: Deque[Tuple[bytes, Address]] = collections.deque()
        self._waiter: Optional[Deferred] = None

    @property
    def address(self) -> Address:
        host = self.transport.getHost()
        return (host.host, host.port)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        item = (datagram, (addr[0], addr[1]))
        self.received.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(item)
        else:
            self._queue.append(item)

    def send(self, datagram: bytes, addr: Address) -> None:
        self.transport.write(datagram, addr)

    async def recv(self, timeout: float = WAIT) -> Tuple[bytes, Address]:
        """The next datagram and its sender; fails the test after `timeout` seconds."""
        if self._queue:
            return self._queue.popleft()

        def cancel(d: Deferred) -> None:
            if self._waiter is d:
                self._waiter = None

        waiter = self._waiter = Deferred(cancel)
        waiter.addTimeout(timeout, get_reactor())
        return await waiter  # type: ignore[no-any-return]

    async def silence(self, seconds: float = QUIET) -> None:
        """Assert that nothing arrives for `seconds`."""
        await sleep(seconds)
        assert not self._queue, f"unexpected datagrams: {list(self._queue)}"

    def drop_queued(self) -> List[Tuple[bytes, Address]]:
        items = list(self._queue)
        self._queue.clear()
        return items


@dataclass
class Download:
    data: bytes = b""
    oack: Optional[Dict[str, str]] = None
    error: Optional[Tuple[int, str]] = None
    complete: bool = False
    tid: Optional[Address] = None
    sources: Set[Address] = field(default_factory=set)
    unexpected: int = 0
    wire: Dict[int, int] = field(default_factory=dict)
    """Wire block number of each block in `watch`, keyed by the wide block number."""


async def download(
    peer: Peer,
    server: Address,
    filename: bytes = b"file",
    options: Optional[Dict[str, str]] = None,
    mode: bytes = b"octet",
    rollover: int = 0,
    send_request: bool = True,
    watch: range = range(0),
    timeout: float = WAIT,
) -> Download:
    """Fetch `filename`: ACK the OACK, every windowsize-th block and the last; stop at an ERROR.

    Block numbers are checked against the wire numbering `rollover` implies, so a
    server that rolls over to the wrong number stalls this client (and the test fails).
    """
    result = Download()
    if send_request:
        peer.send(wire.rrq(filename, mode, options), server)
    blksize, window = 512, 1
    received = 0
    chunks: List[bytes] = []
    while True:
        datagram, addr = await peer.recv(timeout)
        result.sources.add(addr)
        op = opcode(datagram)
        if op == wire.ERROR:
            result.error = wire.parse_error(datagram)
            break
        if result.tid is None:
            result.tid = addr
        elif addr != result.tid:
            result.unexpected += 1
            continue
        if op == wire.OACK and received == 0:
            result.oack = wire.parse_oack(datagram)
            blksize = int(result.oack.get("blksize", blksize))
            window = int(result.oack.get("windowsize", window))
            peer.send(wire.ack(0), addr)
            continue
        if op != wire.DATA:
            raise AssertionError(f"unexpected datagram {datagram[:40]!r} from {addr}")
        number = block_of(datagram)
        if number != wire.wire_block(received + 1, rollover):
            result.unexpected += 1  # a retransmission after a late ACK: say where we are
            peer.send(wire.ack(wire.wire_block(received, rollover)), addr)
            continue
        received += 1
        if received in watch:
            result.wire[received] = number
        payload = datagram[4:]
        chunks.append(payload)
        last = len(payload) < blksize
        if last or received % window == 0:
            peer.send(wire.ack(number), addr)
        if last:
            result.complete = True
            break
    result.data = b"".join(chunks)
    return result


async def lockstep(peer: Peer, tid: Address, acked: int, blksize: int = 512) -> bytes:
    """Go on with a lock-step transfer from block `acked` (ACK it, then each block up to the short one)."""
    peer.send(wire.ack(acked), tid)
    chunks = []
    while True:
        datagram, source = await peer.recv()
        assert source == tid, (source, tid)
        assert opcode(datagram) == wire.DATA, datagram
        number = block_of(datagram)
        if number == acked & 0xFFFF:
            continue  # a retransmission already had
        assert number == (acked + 1) & 0xFFFF, (number, acked)
        acked += 1
        chunks.append(datagram[4:])
        peer.send(wire.ack(number), tid)
        if len(datagram) - 4 < blksize:
            return b"".join(chunks)


# ---------------------------------------------------------- backends, readers --


@implementer(IReader)
class Reader:
    """Serves `data`; counts `finish()` calls; `deferred=True` answers reads with Deferreds a turn later.

    `size` defaults to the data's length; pass None for a reader that does not know it.
    """

    def __init__(self, data: bytes, size: Any = "len", deferred: bool = False) -> None:
        self.data = data
        self.size: Optional[int] = len(data) if size == "len" else size
        self.deferred = deferred
        self.offset = 0
        self.reads = 0
        self.finished = 0
        self.events: List[Any] = []

    def read(self, size: int) -> Any:
        assert not self.finished, "read() after finish()"
        self.reads += 1
        chunk = self.data[self.offset : self.offset + size]
        self.offset += len(chunk)
        if not self.deferred:
            return chunk
        d: Deferred = Deferred()
        get_reactor().callLater(0, d.callback, chunk)
        return d

    def finish(self) -> None:
        self.finished += 1
        self.events.append("finish")


class ReportingReader(Reader):
    """A reader that wants to know how its transfer went (`transfer_finished`)."""

    def transfer_finished(self, report: Dict[str, Any]) -> None:
        self.events.append(("report", dict(report)))


@dataclass
class Lookup:
    """What a backend saw during one `get_reader` call."""

    file: bytes
    local: Any
    remote: Any
    mode: Any
    options: Any


@implementer(IBackend)
class Backend:
    """Serves `files` (name -> bytes) with fresh `Reader`s and records every lookup's context.

    `answer(file_name)`, if given, decides instead: return a reader or a Deferred, or raise.
    """

    def __init__(self, files: Optional[Dict[bytes, bytes]] = None,
                 answer: Optional[Callable[[bytes], Any]] = None, reader: Callable[..., Reader] = Reader,
                 **reader_options: Any) -> None:
        self.files = dict(files or {})
        self.answer = answer
        self.reader = reader
        self.reader_options = reader_options
        self.lookups: List[Lookup] = []
        self.readers: List[Reader] = []

    def get_reader(self, file_name: bytes) -> Any:
        self.lookups.append(Lookup(file_name, context.get("local"), context.get("remote"),
                                   context.get("mode"), context.get("options")))
        if self.answer is not None:
            return self.answer(file_name)
        return self.make(file_name)

    def make(self, file_name: bytes) -> Reader:
        try:
            data = self.files[file_name]
        except KeyError:
            raise FileNotFound("File not found") from None
        reader = self.reader(data, **self.reader_options)
        self.readers.append(reader)
        return reader

    def get_writer(self, file_name: bytes) -> None:
        raise AssertionError("get_writer must never be called")


# ---------------------------------------------------------------- fixtures --


class Serving:
    """Starts services and client sockets for a test; `close()` checks that nothing leaked."""

    def __init__(self) -> None:
        self.services: List[TFTPOffloadService] = []
        self.peers: List[Peer] = []

    def __call__(self, backend: Any, listen: Any = (("127.0.0.1", 0),), **options: Any) -> TFTPOffloadService:
        service = TFTPOffloadService(backend, listen=list(listen), **options)
        service.startService()
        self.services.append(service)
        return service

    def peer(self, host: str = "127.0.0.1") -> Peer:
        peer = Peer()
        get_reactor().listenUDP(0, peer, interface=host)
        self.peers.append(peer)
        return peer

    def open_transfer_ports(self, spares: bool = True) -> List[Any]:
        """Transfer sockets still open, and a transfer reader the reactor still watches with none open
        (with `spares=False`, not one that watches only spare sockets: they linger, by design)."""
        open_sockets = [s for service in self.services if service.server for s in service.server.transfers.sockets()]
        idle_readers = [r for r in get_reactor().getReaders()
                        if isinstance(r, TransferSockets) and not len(r) and (spares or not r.spares)]
        return open_sockets + idle_readers

    async def settled(self, service: TFTPOffloadService, timeout: float = WAIT) -> None:
        """Wait until `service` has no session and no transfer port open (a final ACK may be in flight)."""
        server = service.server
        assert server is not None
        await until(lambda: not server.sessions and not self.open_transfer_ports(spares=False), timeout,
                    "sessions to end and transfer ports to close")

    async def close(self) -> None:
        problems = []
        for service in self.services:
            if service.server is None:
                continue  # never started
            try:
                await self.settled(service)
            except AssertionError:
                problems.append(f"sessions left: {service.server.sessions}")
            if service.running:
                service.drain_timeout = 0
                await service.stopService()
        for peer in self.peers:
            await peer.transport.stopListening()
        await sleep(0)  # stopListening closes the socket a turn later
        if self.open_transfer_ports():
            problems.append(f"transfer ports left open: {self.open_transfer_ports()}")
        timers = [call for call in get_reactor().getDelayedCalls()
                  if type(getattr(call.func, "__self__", None)).__module__.startswith("tftp_offload")]
        if timers:
            problems.append(f"timers left: {timers}")
        assert not problems, problems


@pytest.fixture
def serve() -> Iterator[Serving]:
    """serve(backend, listen=[("127.0.0.1", 0)], **TFTPOffloadService options) -> a started service.

    Also `serve.peer(host)` for a client socket. At the end every service must be idle
    (no session, no transfer port, no timer), and is stopped.
    """
    serving = Serving()
    yield serving
    pytest_twisted.blockon(ensureDeferred(serving.close()))


@pytest.fixture
def log_events() -> Iterator[List[Dict[str, Any]]]:
    """Every twisted.logger event emitted during the test."""
    events: List[Dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def events_with(events: List[Dict[str, Any]], **fields: Any) -> List[Dict[str, Any]]:
    return [event for event in events if all(event.get(k) == v for k, v in fields.items())]
