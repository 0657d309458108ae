"""The Twisted driver (server.py, udp.py) over real UDP sockets on loopback, in this process.

Each test starts a `TFTPOffloadService` on an ephemeral port and talks to it
with `inprocess.Peer`, a non-blocking client on the same reactor. The `serve`
fixture checks at the end of every test that no session, transfer port or
timer was left behind.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable, Dict, List, Tuple

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, ensureDeferred, fail

from tests.support import tftp_client as wire
from tests.support.inprocess import (
    QUIET,
    Backend,
    Peer,
    Reader,
    ReportingReader,
    Serving,
    block_of,
    data_packet,
    download,
    events_with,
    get_reactor,
    lockstep,
    log_events,  # noqa: F401  (fixture)
    opcode,
    serve,  # noqa: F401  (fixture)
    sleep,
    until,
)
from tftp_offload.errors import AccessViolation, BackendError, FileNotFound, Unsupported
from tftp_offload.mux import PEER_SOCKET_BLOCKS
from tftp_offload.options import Limits
from tftp_offload.service import TFTPOffloadService

FILE = os.urandom(3000)
LARGE = os.urandom(100_000)
"""Six blocks of 512 (the last one short)."""


def port_of(service: TFTPOffloadService, index: int = 0) -> int:
    return int(service.ports[index].getHost().port)


Start = Callable[..., Tuple[TFTPOffloadService, Tuple[str, int], Peer]]


@pytest.fixture
def start(serve: Serving) -> Start:
    """start(backend, **service options) -> (service, its address on 127.0.0.1, a client): most tests' prologue.

    The service and the client are `serve`'s, so its end-of-test checks (nothing left behind) apply.
    """
    def started(backend: Any, **options: Any) -> Tuple[TFTPOffloadService, Tuple[str, int], Peer]:
        service = serve(backend, **options)
        return service, ("127.0.0.1", port_of(service)), serve.peer()

    return started


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")


# ------------------------------------------------ reply from the address asked --


@pytest.mark.parametrize(
    ("listen", "target", "client", "seen"),
    [
        pytest.param("0.0.0.0", "127.0.0.2", "127.0.0.1", "127.0.0.2", id="v4-wildcard"),
        pytest.param("::", "127.0.0.2", "127.0.0.1", "127.0.0.2", id="dual-stack-v4", marks=needs_ipv6),
        pytest.param("::", "::1", "::1", "::1", id="dual-stack-v6", marks=needs_ipv6),
        pytest.param("::1", "::1", "::1", "::1", id="v6", marks=needs_ipv6),
        pytest.param("127.0.0.2", "127.0.0.2", "127.0.0.1", "127.0.0.2", id="v4"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_replies_come_from_the_address_asked(serve: Serving, listen: str, target: str, client: str,
                                                   seen: str) -> None:
    backend = Backend({b"file": FILE})
    service = serve(backend, listen=[(listen, 0)])
    port = port_of(service)
    peer = serve.peer(client)

    got = await download(peer, (target, port), b"file", {"blksize": "1024", "tsize": "0"})
    assert got.complete and got.data == FILE
    assert got.oack == {"blksize": "1024", "tsize": str(len(FILE))}
    assert {host for host, _ in got.sources} == {target}, got.sources
    assert got.tid is not None and got.tid[1] != port

    [lookup] = backend.lookups
    assert lookup.local == (seen, port)
    assert lookup.remote == peer.address
    assert lookup.mode == "octet"
    assert lookup.options == {"blksize": "1024", "tsize": "0"}

    # Errors from the request port leave from the address asked too: missing file, WRQ, malformed.
    for request, code in ((wire.rrq(b"missing"), 1), (wire.request(wire.WRQ, b"file"), 2),
                          (b"\0\1file\0mail\0", 4)):
        peer.send(request, (target, port))
        reply, source = await peer.recv()
        assert opcode(reply) == wire.ERROR and wire.parse_error(reply)[0] == code, reply
        assert source == (target, port)
    assert backend.lookups[-1].local == (seen, port)


# ----------------------------------------------------------------- duplicates --


@pytest.mark.parametrize("slow_backend", [False, True], ids=["sync-backend", "deferred-backend"])
@pytest_twisted.ensureDeferred
async def test_duplicate_request_is_one_transfer(start: Start, slow_backend: bool) -> None:
    """A ROM's retransmitted RRQ 5 ms later: one backend call, one transfer, one TID."""
    backend = Backend({b"file": FILE})
    if slow_backend:
        def answer(name: bytes) -> Deferred:
            d: Deferred = Deferred()
            get_reactor().callLater(0.02, lambda: d.callback(backend.make(name)))
            return d

        backend.answer = answer
    _, server, peer = start(backend)
    request = wire.rrq(b"file", b"octet", {"blksize": "512"})
    peer.send(request, server)
    await sleep(0.005)
    peer.send(request, server)
    await sleep(0.05 if slow_backend else 0.005)

    got = await download(peer, server, send_request=False)
    assert got.complete and got.data == FILE
    await peer.silence()
    assert len(backend.lookups) == 1
    tids = {source for datagram, source in peer.received if opcode(datagram) in (wire.OACK, wire.DATA)}
    assert len(tids) == 1, tids
    assert len(backend.readers) == 1 and backend.readers[0].finished == 1


@pytest_twisted.ensureDeferred
async def test_duplicate_read_after_its_transfer_completed_is_ignored(start: Start) -> None:
    """A one-block file can be sent and ACKed before the reactor reads the ROM's duplicate RRQ.

    The duplicate arrived (kernel time) while the transfer ran: no second transfer. The same
    request arriving after the end is a client reusing its port for a new request: served.
    """
    backend = Backend({b"small": b"x" * 100})
    service, server, peer = start(backend)
    listener = service.ports[0]
    request = wire.rrq(b"small", b"octet")
    peer.send(request, server)
    sent = time.time()
    reply, tid = await peer.recv()
    assert opcode(reply) == wire.DATA and block_of(reply) == 1
    peer.send(wire.ack(1), tid)
    acked = time.time()  # the final ACK has arrived by now (loopback stamps it inside sendto)
    await until(lambda: not service.server.sessions, what="the transfer to complete")  # type: ignore[union-attr]

    # What the listener would report for a duplicate that arrived before the final ACK:
    service.server.request_received(listener, request, peer.address, "127.0.0.1", sent)  # type: ignore[union-attr]
    await peer.silence()
    assert len(backend.lookups) == 1
    assert [block_of(d) for d, _ in peer.received if opcode(d) == wire.DATA] == [1]

    # One that arrived just after the final ACK (but was read after the reactor handled it) is new:
    # the client had its file and reuses its port.
    service.server.request_received(listener, request, peer.address, "127.0.0.1", acked)  # type: ignore[union-attr]
    reply, tid = await peer.recv()
    assert opcode(reply) == wire.DATA and block_of(reply) == 1
    peer.send(wire.ack(1), tid)
    await until(lambda: not service.server.sessions, what="the second transfer to complete")  # type: ignore[union-attr]
    assert len(backend.lookups) == 2

    # And one sent now, after the end, is new as well.
    got = await download(peer, server, b"small")
    assert got.complete and got.data == b"x" * 100
    assert len(backend.lookups) == 3


def test_a_completed_transfer_is_remembered_for_its_own_five_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ended first is forgotten first, and a client that completed again is kept for its later end;
    at most MAX_REMEMBERED are kept. (Expiry walks a queue: see `TFTPServer._remember_completed`.)"""
    from twisted.internet.task import Clock

    from tftp_offload import server as server_module
    from tftp_offload.server import REMEMBER_COMPLETED, TFTPServer

    class Ended:
        """What `_remember_completed` reads of a session."""

        def __init__(self, client: Tuple[str, int], raw: bytes) -> None:
            self.client, self.raw = client, raw

    a, b, c = ("192.0.2.1", 1000), ("192.0.2.2", 1000), ("192.0.2.3", 1000)
    server = TFTPServer(Backend({}), reactor=Clock())
    def remember(ended: Ended, when: float) -> None:
        server._remember_completed(ended, when)  # type: ignore[arg-type]  # a stand-in for a Session

    remember(Ended(a, b"one"), 100.0)
    remember(Ended(a, b"two"), 103.0)  # the same client, again, later
    remember(Ended(b, b"b"), 100.0 + REMEMBER_COMPLETED + 0.5)
    assert server._completed == {a: (b"two", 103.0), b: (b"b", 105.5)}  # a's first end expired, not its second
    remember(Ended(c, b"c"), 103.0 + REMEMBER_COMPLETED + 0.5)
    assert server._completed == {b: (b"b", 105.5), c: (b"c", 108.5)}
    monkeypatch.setattr(server_module, "MAX_REMEMBERED", 2)
    remember(Ended(a, b"three"), 109.0)
    assert server._completed == {c: (b"c", 108.5), a: (b"three", 109.0)}


@pytest_twisted.ensureDeferred
async def test_same_request_after_a_client_error_is_served(start: Start) -> None:
    """Only completed transfers are remembered: a request again after the client's ERROR is new."""
    backend = Backend({b"small": b"x" * 100})
    service, server, peer = start(backend)
    request = wire.rrq(b"small", b"octet", {"tsize": "0"})
    peer.send(request, server)
    reply, tid = await peer.recv()
    assert opcode(reply) == wire.OACK
    peer.send(wire.error(8, b"probe done"), tid)
    await until(lambda: not service.server.sessions, what="the probe to end")  # type: ignore[union-attr]
    got = await download(peer, server, b"small", {"tsize": "0"})
    assert got.complete and got.data == b"x" * 100
    assert len(backend.lookups) == 2


# ----------------------------------------------------------------- UEFI probe --


@pytest_twisted.ensureDeferred
async def test_uefi_size_probe_then_transfer_from_the_same_port(serve: Serving, start: Start) -> None:
    backend = Backend({b"file": FILE})
    service, server, peer = start(backend)

    peer.send(wire.rrq(b"file", b"octet", {"tsize": "0", "blksize": "1468"}), server)
    reply, tid = await peer.recv()
    assert opcode(reply) == wire.OACK
    assert wire.parse_oack(reply) == {"tsize": str(len(FILE)), "blksize": "1468"}
    peer.send(wire.error(8, b"tsize only"), tid)

    got = await download(peer, server, b"file", {"blksize": "1468"})
    assert got.complete and got.data == FILE
    assert got.oack == {"blksize": "1468"}
    assert got.tid != tid
    await serve.settled(service)
    assert [reader.finished for reader in backend.readers] == [1] * len(backend.readers)
    assert len(backend.readers) in (1, 2)


# ------------------------------------------------------- refusals and strangers --


@pytest_twisted.ensureDeferred
async def test_write_request_refused(start: Start) -> None:
    backend = Backend({b"file": FILE})
    _, server, peer = start(backend)
    peer.send(wire.request(wire.WRQ, b"file", b"octet", {"blksize": "1024"}), server)
    reply, _ = await peer.recv()
    assert opcode(reply) == wire.ERROR
    assert wire.parse_error(reply)[0] == 2
    assert backend.lookups == []


@pytest.mark.parametrize(
    "request_",
    [
        b"\0\1file\0",  # no mode
        b"\0\1file\0mail\0",  # obsolete mode
        b"\0\1\0octet\0",  # empty filename
        b"\0\1file\0octet\0blksize\0big\0",  # not a number
        b"\0\1file\0octet\0blksize\0",  # option without value
        b"\0\1file\0octet",  # no final NUL
    ],
    ids=["no-mode", "mail", "empty-name", "bad-number", "no-value", "no-nul"],
)
@pytest_twisted.ensureDeferred
async def test_malformed_request_gets_error_4(start: Start, request_: bytes) -> None:
    backend = Backend({b"file": FILE})
    _, server, peer = start(backend)
    peer.send(request_, server)
    reply, _ = await peer.recv()
    assert opcode(reply) == wire.ERROR and wire.parse_error(reply)[0] == 4, reply
    assert backend.lookups == []


@pytest_twisted.ensureDeferred
async def test_garbage_on_the_request_port_is_ignored(start: Start) -> None:
    backend = Backend({b"file": FILE})
    _, server, peer = start(backend)
    for datagram in (wire.ack(1), data_packet(1, b"x" * 10), wire.error(0, b"what"), b"\0\6blksize\0512\0",
                     b"\0", b"", b"\0\x09abc", b"\xff\xff"):
        peer.send(datagram, server)
    await peer.silence()
    assert backend.lookups == []
    got = await download(peer, server, b"file")
    assert got.complete and got.data == FILE


@pytest.mark.parametrize("size", [len(FILE), PEER_SOCKET_BLOCKS * 512 + 100], ids=["short", "long"])
@pytest_twisted.ensureDeferred
async def test_stranger_on_a_transfer_port_gets_error_5(serve: Serving, start: Start, size: int) -> None:
    """Short and long transfers alike (a long one's client is read through its connected peer socket)."""
    content = os.urandom(size)
    backend = Backend({b"file": content})
    service, server, peer = start(backend)
    stranger = serve.peer()
    elsewhere = serve.peer("127.0.0.3")  # same port number is not enough: the address counts too

    peer.send(wire.rrq(b"file"), server)
    first, tid = await peer.recv()
    assert opcode(first) == wire.DATA and block_of(first) == 1
    for intruder in (stranger, elsewhere):
        intruder.send(wire.ack(1), tid)
        reply, source = await intruder.recv()
        assert opcode(reply) == wire.ERROR and wire.parse_error(reply)[0] == 5
        assert source == tid
    await peer.silence(0.05)  # the intruders' ACKs moved nothing along
    assert first[4:] + await lockstep(peer, tid, 1) == content
    await serve.settled(service)
    assert backend.readers[0].finished == 1


# --------------------------------------------------------------- max sessions --


@pytest_twisted.ensureDeferred
async def test_max_sessions_drops_and_recovers(serve: Serving, start: Start, log_events: List[Dict[str, Any]]) -> None:
    pending: List[Deferred] = []
    backend = Backend({b"file": FILE})

    def answer(name: bytes) -> Deferred:
        d: Deferred = Deferred()
        pending.append(d)
        return d

    backend.answer = answer
    service, server, first = start(backend, max_sessions=2)
    second, third = serve.peer(), serve.peer()
    first.send(wire.rrq(b"file"), server)
    second.send(wire.rrq(b"file"), server)
    await until(lambda: len(pending) == 2, what="two lookups")
    third.send(wire.rrq(b"file"), server)
    await third.silence()
    assert len(backend.lookups) == 2
    [busy] = events_with(log_events, event="dropped", reason="capacity")
    assert busy["client"] == "127.0.0.1:%d" % third.address[1] and busy["log_level"].name == "warn"

    pending[0].callback(backend.make(b"file"))
    got = await download(first, server, send_request=False)
    assert got.complete and got.data == FILE
    await until(lambda: len(service.server.sessions) == 1, what="the first session to end")
    [recovered] = events_with(log_events, event="accepting")
    assert recovered["dropped"] == 1

    backend.answer = None  # the retry is answered at once
    got = await download(third, server, b"file")
    assert got.complete and got.data == FILE
    pending[1].callback(backend.make(b"file"))
    got = await download(second, server, send_request=False)
    assert got.complete and got.data == FILE
    await serve.settled(service)
    assert [reader.finished for reader in backend.readers] == [1, 1, 1]


# ------------------------------------------------------------ backend behaviour --


@pytest_twisted.ensureDeferred
async def test_deferred_reader_with_deferred_reads_and_unknown_size(serve: Serving, start: Start) -> None:
    """tx-tftp style: get_reader answers a Deferred; read() answers Deferreds; size None: no tsize."""
    backend = Backend({b"file": LARGE}, size=None, deferred=True)  # larger than one read-ahead
    backend.answer = lambda name: _later(backend.make, name)
    service, server, peer = start(backend)

    got = await download(peer, server, b"file", {"tsize": "0", "blksize": "1000", "windowsize": "2"})
    assert got.complete and got.data == LARGE
    assert got.oack == {"blksize": "1000", "windowsize": "2"}
    # With nothing else to answer, no OACK at all: DATA 1 straight away.
    got = await download(peer, server, b"file", {"tsize": "0"})
    assert got.complete and got.data == LARGE and got.oack is None
    await serve.settled(service)
    assert [reader.finished for reader in backend.readers] == [1, 1]
    assert all(reader.reads > 1 for reader in backend.readers)


def _later(function: Any, *args: Any) -> Deferred:
    d: Deferred = Deferred()
    get_reactor().callLater(0.001, lambda: d.callback(function(*args)))
    return d


@pytest.mark.parametrize("deferred", [False, True], ids=["raised", "failed-deferred"])
@pytest.mark.parametrize(
    ("exception", "code", "message"),
    [
        (FileNotFound("File not found"), 1, "File not found"),
        (AccessViolation("Access violation"), 2, "Access violation"),
        (Unsupported("No such thing"), 4, "No such thing"),
        (BackendError("Backend unavailable"), 0, "Backend unavailable"),
        (RuntimeError("secret internal detail"), 0, "Internal server error"),
    ],
    ids=["not-found", "access", "unsupported", "backend-error", "unexpected"],
)
@pytest_twisted.ensureDeferred
async def test_backend_errors(start: Start, log_events: List[Dict[str, Any]], exception: Exception,
                              code: int, message: str, deferred: bool) -> None:
    def answer(name: bytes) -> Any:
        if name != b"bad":
            return backend.make(name)
        if deferred:
            return fail(exception)
        raise exception

    backend = Backend({b"file": FILE}, answer=answer)
    _, server, peer = start(backend)
    peer.send(wire.rrq(b"bad"), server)
    reply, source = await peer.recv()
    assert source == server
    assert opcode(reply) == wire.ERROR
    assert wire.parse_error(reply) == (code, message)
    failures = [event for event in log_events if "log_failure" in event]
    if isinstance(exception, RuntimeError):
        [event] = failures
        assert event["log_failure"].value is exception
    else:
        assert failures == []
    # The server keeps serving, this client included.
    got = await download(peer, server, b"file")
    assert got.complete and got.data == FILE


@pytest_twisted.ensureDeferred
async def test_backend_that_never_answers(start: Start) -> None:
    late: List[Deferred] = []
    backend = Backend({b"file": FILE}, answer=lambda name: late.append(Deferred()) or late[-1])
    service, server, peer = start(backend, lookup_timeout=0.1)
    started = get_reactor().seconds()
    peer.send(wire.rrq(b"file"), server)
    reply, source = await peer.recv()
    elapsed = get_reactor().seconds() - started
    assert source == server
    assert wire.parse_error(reply) == (0, "Backend did not answer in time")
    assert 0.09 <= elapsed < 1.0
    assert service.server.sessions == {}
    # The backend's Deferred is not cancelled (see the deferToThread test): an answer that comes
    # after all is finished at once, and the client hears nothing more.
    assert not late[0].called
    reader = backend.make(b"file")
    late[0].callback(reader)
    assert reader.finished == 1 and reader.reads == 0
    await peer.silence()


@pytest_twisted.ensureDeferred
async def test_thread_backend_slower_than_the_timeout(start: Start) -> None:
    """deferToThread's Deferred cannot be cancelled: a reader it brings late must still be finished."""
    from twisted.internet.threads import deferToThread

    backend = Backend({b"file": FILE})

    def slow(name: bytes) -> Reader:
        time.sleep(0.2)
        return backend.make(name)

    backend.answer = lambda name: deferToThread(slow, name)
    _, server, peer = start(backend, lookup_timeout=0.05)
    peer.send(wire.rrq(b"file"), server)
    reply, _ = await peer.recv()
    assert wire.parse_error(reply) == (0, "Backend did not answer in time")
    await until(lambda: backend.readers, what="the thread's answer")
    await until(lambda: backend.readers[0].finished, what="the late reader to be finished")
    assert backend.readers[0].finished == 1


# ------------------------------------------------------- finish() exactly once --


@pytest_twisted.ensureDeferred
async def test_finish_once_on_complete_client_error_and_timeout(serve: Serving, start: Start) -> None:
    backend = Backend({b"file": FILE})
    service, server, peer = start(backend, limits=Limits(timeout=0.05, give_up=0.2))

    got = await download(peer, server, b"file")  # complete
    assert got.complete

    quitter = serve.peer()  # the client gives up after the first block
    quitter.send(wire.rrq(b"file"), server)
    _, tid = await quitter.recv()
    quitter.send(wire.error(0, b"changed my mind"), tid)

    silent = serve.peer()  # never ACKs: retransmissions, then the server gives up
    silent.send(wire.rrq(b"file"), server)
    started = get_reactor().seconds()
    await silent.recv()
    await serve.settled(service)
    elapsed = get_reactor().seconds() - started
    assert 0.15 <= elapsed < 1.5
    resent = [datagram for datagram, _ in silent.received if opcode(datagram) == wire.DATA]
    assert len(resent) >= 2 and {block_of(d) for d in resent} == {1}
    assert [reader.finished for reader in backend.readers] == [1, 1, 1]


@pytest_twisted.ensureDeferred
async def test_finish_once_when_superseded(serve: Serving, start: Start) -> None:
    """A new, different request from the same client port ends the old transfer (and finishes its reader)."""
    backend = Backend({b"file": FILE, b"other": FILE[::-1]})
    service, server, peer = start(backend)
    peer.send(wire.rrq(b"file"), server)
    first, old_tid = await peer.recv()
    assert opcode(first) == wire.DATA
    got = await download(peer, server, b"other")
    assert got.complete and got.data == FILE[::-1] and got.tid != old_tid
    await serve.settled(service)
    assert [reader.finished for reader in backend.readers] == [1, 1]
    # The old transfer is gone: an ACK to it is a stranger's.
    peer.send(wire.ack(1), old_tid)
    await peer.silence()


@pytest_twisted.ensureDeferred
async def test_finish_when_a_read_fails(serve: Serving, start: Start, log_events: List[Dict[str, Any]]) -> None:
    class Failing(Reader):
        def read(self, size: int) -> Any:
            if self.offset:
                raise OSError("disk on fire")
            return super().read(size)

    backend = Backend({b"file": LARGE}, reader=Failing)  # more than one read
    service, server, peer = start(backend)
    got = await download(peer, server, b"file", {"blksize": "512"})
    assert got.error == (0, "Error reading the file")
    await serve.settled(service)
    assert backend.readers[0].finished == 1
    assert [e for e in log_events if "log_failure" in e and e["log_failure"].check(OSError)]


@pytest_twisted.ensureDeferred
async def test_closed_while_the_backend_thinks(start: Start) -> None:
    """A lookup still pending when its session is superseded: the late reader is finished at once."""
    pending: List[Deferred] = []
    backend = Backend({b"file": FILE, b"other": FILE[::-1]})
    backend.answer = lambda name: pending.append(Deferred()) or pending[-1] if name == b"file" else backend.make(name)
    _, server, peer = start(backend)
    peer.send(wire.rrq(b"file"), server)
    await until(lambda: pending, what="the lookup")
    got = await download(peer, server, b"other")
    assert got.complete and got.data == FILE[::-1]
    assert not pending[0].called
    late = backend.make(b"file")
    pending[0].callback(late)  # the backend answers after all: the reader is finished, unused
    assert late.finished == 1 and late.reads == 0
    await peer.silence()


# ------------------------------------------------------------ transfer report --


@pytest_twisted.ensureDeferred
async def test_transfer_finished_report_before_finish(serve: Serving, start: Start) -> None:
    backend = Backend({b"file": FILE}, reader=ReportingReader)
    service, server, peer = start(backend)
    got = await download(peer, server, b"file", {"blksize": "1024", "windowsize": "4"})
    assert got.complete and got.data == FILE
    quitter = serve.peer()
    quitter.send(wire.rrq(b"file"), server)
    _, tid = await quitter.recv()
    quitter.send(wire.error(8, b"probe"), tid)
    await serve.settled(service)

    complete, quit_ = backend.readers
    assert [event if event == "finish" else event[0] for event in complete.events] == ["report", "finish"]
    report = complete.events[0][1]
    assert report["outcome"] == "complete"
    assert report["bytes"] == len(FILE)
    assert report["blksize"] == 1024 and report["windowsize"] == 4
    assert report["retransmits"] == 0
    assert 0 <= report["duration"] < 5
    assert report["file"] == b"file"
    report = quit_.events[0][1]
    assert [event if event == "finish" else event[0] for event in quit_.events] == ["report", "finish"]
    assert report["outcome"] == "client-error" and report["bytes"] == 0
    assert report["client_error"] == "8: probe"


# ------------------------------------------------------------------- netascii --


@pytest_twisted.ensureDeferred
async def test_netascii(serve: Serving, start: Start) -> None:
    text = b"a\nb\rc"
    backend = Backend({b"text": text, b"long": b"line\n" * 300}, reader=ReportingReader)
    service, server, peer = start(backend)
    options = {"tsize": "0", "windowsize": "8", "blksize": "100"}
    got = await download(peer, server, b"text", options, mode=b"netascii")
    assert got.complete and got.data == b"a\r\nb\r\0c"
    assert got.oack == {"blksize": "100"}  # no tsize, no windowsize: window 1
    assert backend.lookups[0].mode == "netascii"

    # Window 1 on the wire: without an ACK, nothing but block 1 (and its retransmissions) comes.
    peer.send(wire.rrq(b"long", b"netascii", options), server)
    oack, tid = await peer.recv()
    assert opcode(oack) == wire.OACK
    peer.send(wire.ack(0), tid)
    await sleep(QUIET)
    first = peer.drop_queued()
    assert {block_of(d) for d, _ in first} == {1}
    assert first[0][0][4:] + await lockstep(peer, tid, 1, blksize=100) == b"line\r\n" * 300
    await serve.settled(service)
    assert backend.readers[1].events[0][1]["windowsize"] == 1


# ------------------------------------------------------------------- rollover --

BIG = os.urandom(600_000)
"""75,000 blocks of 8 bytes: past block 65535."""


@pytest.mark.parametrize("rollover", [0, 1])
@pytest_twisted.ensureDeferred
async def test_rollover(serve: Serving, start: Start, rollover: int) -> None:
    backend = Backend({b"big": BIG}, reader=ReportingReader)
    service, server, peer = start(backend, limits=Limits(rollover=rollover))
    got = await download(peer, server, b"big", {"blksize": "8", "windowsize": "64"},
                         rollover=rollover, watch=range(65534, 65539))
    assert got.complete and got.data == BIG
    assert len(BIG) // 8 + 1 > 65535
    assert got.wire == {65534: 65534, 65535: 65535, 65536: 0 if rollover == 0 else 1,
                        65537: 1 if rollover == 0 else 2, 65538: 2 if rollover == 0 else 3}
    await serve.settled(service)
    report = backend.readers[0].events[0][1]
    assert report["outcome"] == "complete" and report["bytes"] == len(BIG)


# ---------------------------------------------------------------- no leaks --


@pytest_twisted.ensureDeferred
async def test_session_table_and_ports_do_not_leak(serve: Serving, start: Start) -> None:
    """Every way a session ends, many at once, on one service: afterwards nothing is left."""
    from twisted.internet.defer import DeferredList, ensureDeferred

    never: List[Deferred] = []

    def answer(name: bytes) -> Any:
        if name == b"hang":
            never.append(Deferred())
            return never[-1]
        if name == b"boom":
            raise RuntimeError("boom")
        return backend.make(name)

    backend = Backend({b"file": FILE, b"big": os.urandom(50_000)}, answer=answer)
    service, server, _ = start(backend, limits=Limits(timeout=0.05, give_up=0.2), lookup_timeout=0.1)

    async def complete(options: Dict[str, str]) -> None:
        got = await download(serve.peer(), server, b"big", options)
        assert got.complete

    async def quits() -> None:
        peer = serve.peer()
        peer.send(wire.rrq(b"file", b"octet", {"tsize": "0"}), server)
        _, tid = await peer.recv()
        peer.send(wire.error(8, b""), tid)

    async def stalls() -> None:
        peer = serve.peer()
        peer.send(wire.rrq(b"file"), server)
        await peer.recv()

    async def refused(name: bytes) -> None:
        got = await download(serve.peer(), server, name)
        assert got.error is not None

    async def superseded() -> None:
        peer = serve.peer()
        peer.send(wire.rrq(b"big"), server)
        await peer.recv()
        got = await download(peer, server, b"file")
        assert got.complete

    async def protocol_error() -> None:
        peer = serve.peer()
        peer.send(wire.rrq(b"file"), server)
        _, tid = await peer.recv()
        peer.send(wire.rrq(b"file"), tid)  # not an ACK: the transfer ends with ERROR 4
        reply, _ = await peer.recv()
        assert wire.parse_error(reply)[0] == 4

    jobs = [complete({}), complete({"blksize": "1400", "windowsize": "8"}), complete({"tsize": "0"}),
            quits(), quits(), stalls(), stalls(), refused(b"missing"), refused(b"boom"), refused(b"hang"),
            superseded(), protocol_error()]
    results = await DeferredList([ensureDeferred(job) for job in jobs], consumeErrors=True)
    failures = [result for ok, result in results if not ok]
    assert not failures, failures
    await serve.settled(service)
    assert service.server.sessions == {}
    assert serve.open_transfer_ports(spares=False) == []
    # Short transfers' sockets linger as spares a moment (mux.SPARE_LINGER), then go too.
    await until(lambda: not serve.open_transfer_ports(), 2.0, "the spare sockets to close")
    assert len(backend.readers) == 10
    assert [reader.finished for reader in backend.readers] == [1] * 10


@pytest_twisted.ensureDeferred
async def test_bad_traffic_log_lines_are_rate_limited(serve: Serving, start: Start,
                                                     log_events: List[Dict[str, Any]]) -> None:
    """Stray datagrams and write requests share one log budget; a full server says so once."""
    pending: List[Deferred] = []
    backend = Backend({b"file": FILE}, answer=lambda name: pending.append(Deferred()) or pending[-1])
    service, server, peer = start(backend, max_sessions=1)
    peer.send(wire.rrq(b"file"), server)
    await until(lambda: pending, what="the lookup")
    others = [serve.peer() for _ in range(30)]
    kinds = ("ignored", "dropped", "write-request")
    for other in others:  # in turn: a stray DATA, a request there is no room for, a write request
        other.send(b"\0\3\0\1stray", server)
        other.send(wire.rrq(b"file"), server)
        other.send(wire.request(wire.WRQ, b"file"), server)
    guard = service.server.guard  # type: ignore[union-attr]
    # Every stray DATA and WRQ is logged or counted as suppressed; "no room" is logged once, when it fills.
    await until(lambda: guard.suppressed_total + len([e for e in log_events if e.get("event") in kinds])
                >= 61, what="61 datagrams handled")
    await sleep(0.05)
    logged = [e for e in log_events if e.get("event") in kinds]
    assert 10 <= len(logged) <= 20  # ten a second; the burst may straddle a second
    assert {e["event"] for e in logged[:10]} == set(kinds)
    assert len([e for e in log_events if e.get("reason") == "capacity"]) == 1  # once, not per dropped request
    pending[0].callback(backend.make(b"file"))
    got = await download(peer, server, send_request=False)
    assert got.complete


@pytest_twisted.ensureDeferred
async def test_errors_to_malformed_requests_are_budgeted(start: Start) -> None:
    """A flood of malformed RRQs (spoofable) gets a bounded number of ERROR replies."""
    from tftp_offload.guard import ERROR_REPLIES_PER_SECOND as REFUSALS_PER_SECOND

    _, server, peer = start(Backend({b"file": FILE}))
    for _ in range(3 * REFUSALS_PER_SECOND):
        peer.send(b"\0\1no-terminator", server)
    await sleep(0.3)
    errors = [d for d, _ in peer.drop_queued() if opcode(d) == wire.ERROR]
    # One second's budget, perhaps two when the burst straddles a second boundary.
    assert 0 < len(errors) <= 2 * REFUSALS_PER_SECOND


# ------------------------------------------------------ freed without the collector --


@pytest_twisted.ensureDeferred
async def test_finished_sessions_are_freed_without_the_cycle_collector(serve: Serving, start: Start) -> None:
    """A finished session, its engine and its buffers are freed by reference counting alone.

    Measured before: 1,073 Session and ReadTransfer objects (and their windows of
    data) alive after every transfer had ended, freed only by gc.collect(). Here
    the collector is off during a burst that ends sessions every way.
    """
    import gc

    from tftp_offload.engine import ReadTransfer
    from tftp_offload.lookup import BoundedLookup
    from tftp_offload.server import Session
    from tftp_offload.transfer import Transfer

    def alive() -> List[Any]:
        return [o for o in gc.get_objects() if isinstance(o, (Session, Transfer, ReadTransfer, BoundedLookup))]

    backend = Backend({b"file": FILE, b"big": LARGE})
    service, server, _ = start(backend, limits=Limits(timeout=0.05, give_up=0.2))
    gc.collect()
    before = {id(o) for o in alive()}  # an earlier test's may still be referenced (by its report)
    gc.disable()
    try:
        for _ in range(10):
            for name, options in ((b"big", {"blksize": "1400", "windowsize": "8"}), (b"file", {})):
                got = await download(serve.peer(), server, name, options)
                assert got.complete
            refused = await download(serve.peer(), server, b"missing")
            assert refused.error is not None
            quitter = serve.peer()
            quitter.send(wire.rrq(b"big", b"octet", {"tsize": "0"}), server)
            _, tid = await quitter.recv()
            quitter.send(wire.error(8, b"probe"), tid)
        silent = serve.peer()  # a transfer the server gives up on
        silent.send(wire.rrq(b"big"), server)
        await silent.recv()
        await serve.settled(service)
        await sleep(0.01)  # a stopped port's connectionLost runs a turn later
        assert len(backend.readers) == 31
        left = [o for o in alive() if id(o) not in before]
        assert left == []
    finally:
        gc.enable()
# ---------------------------------------------------------------- single port --


@pytest_twisted.ensureDeferred
async def test_single_port_serves_every_transfer_from_the_listening_port(serve: Serving) -> None:
    """--single-port: two transfers at once, each told apart by its client's address, both from
    the address and port asked (a wildcard listener), and no transfer socket opened."""
    service = serve(Backend({b"file": FILE, b"large": LARGE}), listen=[("0.0.0.0", 0)], single_port=True)
    port = port_of(service)
    target = ("127.0.0.2", port)
    peers = [serve.peer(), serve.peer()]
    assert service.server is not None
    one = ensureDeferred(download(peers[0], target, b"large", {"blksize": "1024", "windowsize": "8"}))
    two = ensureDeferred(download(peers[1], target, b"file"))
    await until(lambda: len(service.server.sessions) == 2 or one.called, what="two transfers")
    assert len(service.server.transfers) == 0
    for got, data in ((await one, LARGE), (await two, FILE)):
        assert got.complete and got.data == data
        assert got.sources == {target} and got.unexpected == 0


@pytest_twisted.ensureDeferred
async def test_single_port_stray_ack_gets_error_5(serve: Serving, start: Start) -> None:
    _, server, peer = start(Backend({b"large": LARGE}), single_port=True)
    stranger = serve.peer()
    peer.send(wire.rrq(b"large"), server)
    first, source = await peer.recv()
    assert opcode(first) == wire.DATA and source == server
    stranger.send(wire.ack(1), server)
    reply, source = await stranger.recv()
    assert wire.parse_error(reply)[0] == 5 and source == server
    # The transfer carries on undisturbed, and its repeated final ACK gets no ERROR 5.
    data = first[4:] + await lockstep(peer, server, 1)
    assert data == LARGE
    peer.send(wire.ack((len(LARGE) // 512 + 1) & 0xFFFF), server)
    await peer.silence()
