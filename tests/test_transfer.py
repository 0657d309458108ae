"""The driver (server.py, session.py, transfer.py) on `task.Clock`, with the transfer-socket factory injected.

No socket and no sleep: the server's `transfers` (the factory sessions open
their port from) is a `Ports` recorder, the listener a `Listener` recorder,
and time moves only when a test advances the clock. What is checked is what
the driver does on its timers: the bounded lookup, retransmission, giving up,
duplicates and drain. The same behaviours over real loopback sockets are in
test_server.py.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from tests.support import tftp_client as wire
from tftp_offload.config import ServerConfig
from tftp_offload.deadlines import Deadlines
from tftp_offload.engine import Outcome
from tftp_offload.mux import PEER_SOCKET_BLOCKS
from tftp_offload.options import Limits
from tftp_offload.readers import BytesReader
from tftp_offload.server import DUPLICATE_WINDOW, TFTPServer

Address = Tuple[str, int]
CLIENT: Address = ("192.0.2.7", 2000)
LOCAL = "192.0.2.1"
FILE = bytes(range(256)) * 8  # 2048 bytes: four blocks of 512 and an empty fifth
TIMEOUT = 1.0
GIVE_UP = 5.0
LOOKUP = 4.0


class Port:
    """A transfer socket (transfer_socket.TransferSocket): records what it sends, queues what the client sent."""

    def __init__(self, protocol: Any, clock: Clock) -> None:
        self.protocol = protocol
        self.clock = clock
        self.sent: List[Tuple[float, bytes, Address]] = []
        self.waiting: List[Tuple[bytes, Address]] = []
        """Datagrams the kernel holds for this socket, unread (for `read_one`, the session's catch-up)."""
        self.stopped = False
        self.peer: Optional[Address] = None
        """The client, if the transfer asked for a connected peer socket (a long one)."""

    def send(self, datagram: bytes, addr: Address) -> bool:
        self.sent.append((self.clock.seconds(), datagram, addr))
        return True

    def send_all(self, datagrams: Any, addr: Address) -> int:
        for datagram in datagrams:
            self.send(datagram, addr)
        return len(datagrams)

    def last_arrival(self) -> Optional[float]:
        return self.clock.seconds()

    def stopListening(self) -> None:
        self.stopped = True

    def read_one(self) -> bool:
        if self.stopped or not self.waiting:
            return False
        self.protocol.datagramReceived(*self.waiting.pop(0))
        return True

    def blocks(self) -> List[Tuple[float, int]]:
        """(time, block) of each DATA sent."""
        return [(when, int.from_bytes(d[2:4], "big")) for when, d, _ in self.sent if wire.opcode_of(d) == wire.DATA]

    def errors(self) -> List[Tuple[int, str]]:
        return [wire.parse_error(d) for _, d, _ in self.sent if wire.opcode_of(d) == wire.ERROR]


class Ports:
    """The injected transfer-socket factory (stands in for mux.TransferSockets)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.opened: List[Port] = []
        self.closed = False

    def open(self, local: str, protocol: Any, client: Optional[Address] = None, connect: bool = False) -> Port:
        assert local == LOCAL and client == protocol.client
        self.opened.append(Port(protocol, self.clock))
        self.opened[-1].peer = client if connect else None
        return self.opened[-1]

    def exhausted(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def sockets(self) -> List[Port]:
        return [port for port in self.opened if not port.stopped]

    def __len__(self) -> int:
        return len(self.sockets())


class Listener:
    """A listening port (udp.RequestPort): records replies, with the address they leave from."""

    port = 69

    def __init__(self) -> None:
        self.replies: List[Tuple[bytes, Address, str]] = []

    def reply(self, datagram: bytes, client: Address, local: str) -> None:
        self.replies.append((datagram, client, local))

    def reply_all(self, datagrams: Any, client: Address, local: str) -> int:
        for datagram in datagrams:
            self.reply(datagram, client, local)
        return len(datagrams)

    def getHost(self) -> Any:
        return self


class Reader(BytesReader):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.finished = 0
        self.reads = 0

    def read(self, size: int) -> bytes:
        self.reads += 1
        return super().read(size)  # type: ignore[no-any-return]

    def finish(self) -> None:
        self.finished += 1
        super().finish()


class Backend:
    """Answers with a fresh `Reader` at once, or with a Deferred the test fires (`deferred=True`)."""

    def __init__(self) -> None:
        self.deferred = False
        self.lookups: List[bytes] = []
        self.pending: List[Deferred] = []
        self.cancelled: List[Deferred] = []
        self.readers: List[Reader] = []

    def get_reader(self, name: bytes) -> Any:
        self.lookups.append(name)
        if self.deferred:
            self.pending.append(Deferred(self.cancelled.append))
            return self.pending[-1]
        return self.make()

    def make(self) -> Reader:
        self.readers.append(Reader(FILE))
        return self.readers[-1]


class Driver:
    """A TFTPServer on a Clock, its injected ports, one listener, and what it logged."""

    def __init__(self, clock: Clock, events: List[Dict[str, Any]]) -> None:
        self.clock = clock
        self.backend = Backend()
        self.server = TFTPServer(self.backend, ServerConfig(limits=Limits(timeout=TIMEOUT, give_up=GIVE_UP),
                                                            lookup_timeout=LOOKUP), reactor=clock)
        self.ports = Ports(clock)
        self.server.transfers = self.ports  # type: ignore[assignment]
        self.server.path_mtu = lambda local, peer: None  # type: ignore[method-assign]
        self.listener = Listener()
        self.events = events

    def rrq(self, name: bytes = b"file", options: Optional[Dict[str, str]] = None, client: Address = CLIENT,
            raw: Optional[bytes] = None) -> None:
        """An RRQ arrives at the listener now (kernel time = the clock's)."""
        data = raw if raw is not None else wire.rrq(name, options=options)
        self.server.request_received(self.listener, data, client, LOCAL,  # type: ignore[arg-type]
                                     self.clock.seconds())

    def to(self, port: Port, datagram: bytes, client: Address = CLIENT) -> None:
        port.protocol.datagramReceived(datagram, client)

    def ends(self) -> List[Dict[str, Any]]:
        return [e for e in self.events if e.get("event") == "transfer-end"]

    def fire_timers_until(self, predicate: Any, limit: int = 100) -> None:
        """Advance to each timer in turn, as the reactor would, until `predicate()` holds."""
        for _ in range(limit):
            if predicate():
                return
            calls = self.clock.getDelayedCalls()
            assert calls, "no timer left, and the condition does not hold"
            self.clock.advance(min(call.getTime() for call in calls) - self.clock.seconds())
        raise AssertionError("condition not reached")


@pytest.fixture
def driver() -> Iterator[Driver]:
    events: List[Dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    clock = Clock()
    clock.advance(1000.0)
    try:
        yield Driver(clock, events)
    finally:
        globalLogPublisher.removeObserver(events.append)


def done(driver: Driver) -> None:
    """Nothing left behind: no session, no open port, no timer."""
    assert driver.server.sessions == {}
    assert len(driver.ports) == 0
    assert driver.clock.getDelayedCalls() == []


# ------------------------------------------------------------------ the lookup --


def test_a_synchronous_backend_costs_no_lookup_timer(driver: Driver) -> None:
    """The directory backend answers at once: the only timer is the transfers' one, for this one's deadline."""
    driver.rrq()
    [port] = driver.ports.opened
    assert port.blocks() == [(1000.0, 1)]
    [call] = driver.clock.getDelayedCalls()
    assert isinstance(call.func.__self__, Deadlines)  # type: ignore[attr-defined]
    assert len(driver.server.deadlines) == 1
    assert call.getTime() == 1000.0 + TIMEOUT


def test_lookup_timeout(driver: Driver) -> None:
    """No answer in the lookup timeout: ERROR 0 from the listener, from the address asked, and the end."""
    driver.backend.deferred = True
    driver.rrq()
    driver.clock.advance(LOOKUP - 0.001)
    assert driver.listener.replies == [] and CLIENT in driver.server.sessions
    driver.clock.advance(0.001)
    [(datagram, to, source)] = driver.listener.replies
    assert wire.parse_error(datagram) == (0, "Backend did not answer in time")
    assert (to, source) == (CLIENT, LOCAL)
    [end] = driver.ends()
    assert end["outcome"] == "refused" and end["error_message"] == "Backend did not answer in time"
    assert end["error_by"] == "server" and end["error_code"] == 0
    assert driver.server.stats.lookup_failures == 1
    assert not driver.backend.cancelled  # the backend's Deferred is never cancelled
    assert driver.ports.opened == []
    done(driver)


def test_a_reader_after_the_timeout_is_finished_unused(driver: Driver) -> None:
    driver.backend.deferred = True
    driver.rrq()
    driver.clock.advance(LOOKUP)
    late = driver.backend.make()
    driver.backend.pending[0].callback(late)
    assert late.finished == 1 and late.reads == 0
    assert driver.ports.opened == [] and len(driver.listener.replies) == 1
    done(driver)


def test_a_reader_for_a_superseded_request_is_finished_unused(driver: Driver) -> None:
    """The client asks for something else while the backend thinks: the first lookup's reader is finished."""
    driver.backend.deferred = True
    driver.rrq(b"first")
    driver.backend.deferred = False
    driver.rrq(b"second")
    [port] = driver.ports.opened  # the second request's transfer
    late = Reader(FILE)
    driver.backend.pending[0].callback(late)
    assert late.finished == 1 and late.reads == 0
    assert [e["file"] for e in driver.ends()] == ["first"]
    assert driver.ends()[0]["outcome"] == "aborted"
    assert port.blocks() == [(1000.0, 1)]


def test_an_answer_in_time_is_served(driver: Driver) -> None:
    driver.backend.deferred = True
    driver.rrq()
    driver.clock.advance(LOOKUP - 0.5)
    driver.backend.pending[0].callback(driver.backend.make())
    [port] = driver.ports.opened
    assert port.blocks() == [(1000.0 + LOOKUP - 0.5, 1)]
    [call] = driver.clock.getDelayedCalls()  # the lookup's deadline is gone; the transfers' one is set
    assert isinstance(call.func.__self__, Deadlines)  # type: ignore[attr-defined]
    assert len(driver.server.deadlines) == 1


# ------------------------------------------------------------ the transfer timer --


def test_retransmit_on_the_timer(driver: Driver) -> None:
    driver.rrq()
    [port] = driver.ports.opened
    driver.clock.advance(TIMEOUT - 0.001)
    assert port.blocks() == [(1000.0, 1)]
    driver.clock.advance(0.001)
    assert port.blocks() == [(1000.0, 1), (1000.0 + TIMEOUT, 1)]
    driver.to(port, wire.ack(1))
    assert port.blocks()[-1] == (1000.0 + TIMEOUT, 2)
    for block in range(2, 6):
        driver.to(port, wire.ack(block))
    [end] = driver.ends()
    assert end["outcome"] == "complete" and end["retransmits"] == 1 and end["bytes"] == len(FILE)
    assert driver.backend.readers[0].finished == 1
    done(driver)


def test_give_up(driver: Driver) -> None:
    """A client that never answers: resent with backoff, then given up GIVE_UP seconds after the start."""
    driver.rrq()
    [port] = driver.ports.opened
    session = driver.server.sessions[CLIENT]
    driver.fire_timers_until(lambda: session.outcome is not None)
    assert session.outcome == Outcome.TIMEOUT
    assert driver.clock.seconds() == pytest.approx(1000.0 + GIVE_UP)
    assert [when - 1000.0 for when, _ in port.blocks()] == pytest.approx([0.0, 1.0, 3.0])
    assert port.stopped and driver.backend.readers[0].finished == 1
    [end] = driver.ends()
    assert end["outcome"] == "timeout" and end["retransmits"] == 2
    done(driver)


def test_a_stranger_gets_error_5_and_the_transfer_goes_on(driver: Driver) -> None:
    driver.rrq()
    [port] = driver.ports.opened
    driver.to(port, wire.ack(1), ("192.0.2.8", 2000))
    assert port.sent[-1][2] == ("192.0.2.8", 2000) and port.errors() == [(5, "Unknown transfer ID")]
    driver.to(port, wire.ack(1))
    assert port.blocks()[-1] == (1000.0, 2)


def test_a_long_transfer_asks_for_a_peer_socket_and_a_short_one_does_not(driver: Driver) -> None:
    """At PEER_SOCKET_BLOCKS blocks (at the negotiated blksize) the port gets a socket connected to the client."""
    driver.backend.make = lambda: Reader(bytes(PEER_SOCKET_BLOCKS * 512))  # type: ignore[method-assign]
    driver.rrq()
    driver.backend.make = lambda: Reader(bytes(PEER_SOCKET_BLOCKS * 512 - 1))  # type: ignore[method-assign]
    driver.rrq(client=("192.0.2.9", 1070))
    driver.rrq(options={"blksize": "1024"}, client=("192.0.2.9", 1071))  # fewer, larger blocks
    assert [port.peer for port in driver.ports.opened] == [CLIENT, None, None]


# ----------------------------------------------------------------- duplicates --


def test_a_duplicate_rrq_is_one_transfer(driver: Driver) -> None:
    driver.rrq(options={"blksize": "1024"})
    driver.clock.advance(0.005)
    driver.rrq(options={"blksize": "1024"})
    assert driver.backend.lookups == [b"file"] and len(driver.ports.opened) == 1


def test_a_duplicate_while_the_backend_thinks_is_one_lookup(driver: Driver) -> None:
    driver.backend.deferred = True
    driver.rrq()
    driver.clock.advance(0.5)
    driver.rrq()
    assert len(driver.backend.pending) == 1
    driver.backend.pending[0].callback(driver.backend.make())
    assert len(driver.ports.opened) == 1


def test_the_same_rrq_after_the_duplicate_window_is_a_new_request(driver: Driver) -> None:
    """A client that restarted and asks again: the old transfer ends, a new one starts."""
    driver.rrq()
    driver.clock.advance(DUPLICATE_WINDOW)
    driver.rrq()
    first, second = driver.ports.opened
    assert first.stopped and not second.stopped
    assert driver.backend.readers[0].finished == 1 and driver.backend.readers[1].finished == 0
    assert [e["outcome"] for e in driver.ends()] == ["aborted"]


def test_a_probe_waiting_at_the_port_is_handled_before_its_follow_up(driver: Driver) -> None:
    """UEFI: the ERROR 8 ending the size probe is still unread when the same RRQ comes again."""
    driver.rrq(options={"tsize": "0"})
    [probe] = driver.ports.opened
    probe.waiting.append((wire.error(8, b"probe"), CLIENT))
    driver.rrq(options={"tsize": "0"})
    assert not probe.waiting and probe.stopped
    assert [e["outcome"] for e in driver.ends()] == ["probe"]
    assert len(driver.ports.opened) == 2 and len(driver.backend.lookups) == 2


# ---------------------------------------------------------------------- drain --


def test_drain_aborts_what_runs_after_the_grace(driver: Driver) -> None:
    driver.rrq()
    [port] = driver.ports.opened
    drained = driver.server.drain(2.0)
    driver.rrq(client=("192.0.2.9", 3000))  # nothing new while draining
    assert driver.backend.lookups == [b"file"] and driver.server.stats.refused["draining"] == 1
    driver.clock.advance(1.999)
    assert not drained.called and not port.stopped
    driver.clock.advance(0.001)
    assert drained.called
    assert port.errors() == [(0, "Server shutting down")]
    assert driver.backend.readers[0].finished == 1
    [end] = driver.ends()
    assert end["outcome"] == "aborted" and end["error_message"] == "Server shutting down"
    done(driver)


def test_drain_ends_when_the_last_transfer_does(driver: Driver) -> None:
    driver.rrq()
    [port] = driver.ports.opened
    drained = driver.server.drain(30.0)
    for block in range(1, 6):
        assert not drained.called
        driver.to(port, wire.ack(block))
    assert drained.called and port.errors() == []
    assert driver.ends()[0]["outcome"] == "complete"
    assert driver.ports.closed  # spare sockets go with the drain, not after their linger
    done(driver)  # the grace timer is cancelled too


def test_drain_waits_for_a_lookup_and_serves_its_answer(driver: Driver) -> None:
    driver.backend.deferred = True
    driver.rrq()
    drained = driver.server.drain(3.0)
    driver.clock.advance(1.0)
    driver.backend.pending[0].callback(driver.backend.make())
    [port] = driver.ports.opened
    for block in range(1, 6):
        driver.to(port, wire.ack(block))
    assert drained.called and driver.ends()[0]["outcome"] == "complete"
    done(driver)


def test_drain_answers_a_lookup_still_waiting_with_an_error(driver: Driver) -> None:
    driver.backend.deferred = True
    driver.rrq()
    drained = driver.server.drain(1.0)
    driver.clock.advance(1.0)
    assert drained.called
    [(datagram, to, source)] = driver.listener.replies
    assert wire.parse_error(datagram) == (0, "Server shutting down") and (to, source) == (CLIENT, LOCAL)
    late = driver.backend.make()
    driver.backend.pending[0].callback(late)
    assert late.finished == 1 and late.reads == 0
    done(driver)


# ---------------------------------------------------------------- single port --


def test_single_port_serves_from_the_listener(driver: Driver) -> None:
    """--single-port: no port is opened; the client's ACKs to the listener reach its transfer."""
    driver.server.single_port = True
    driver.rrq()
    assert driver.ports.opened == []
    driver.rrq(raw=wire.ack(1))
    driver.rrq(raw=wire.ack(1), client=("192.0.2.8", 2000))  # a stranger's ACK: ERROR 5, from the listener
    sent = [(int.from_bytes(d[2:4], "big") if wire.opcode_of(d) == wire.DATA else wire.parse_error(d), to, source)
            for d, to, source in driver.listener.replies]
    assert sent == [(1, CLIENT, LOCAL), (2, CLIENT, LOCAL), ((5, "Unknown transfer ID"), ("192.0.2.8", 2000), LOCAL)]
    for block in range(2, 6):
        driver.rrq(raw=wire.ack(block))
    assert [e["outcome"] for e in driver.ends()] == ["complete"]
    done(driver)
