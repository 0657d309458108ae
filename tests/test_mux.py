"""The transfer socket layer (mux.py) over real loopback sockets, on the reactor under test.

One epoll descriptor is the only reactor reader for every transfer socket; these
tests check that datagrams reach the right protocol from it, that strangers are
seen with their address, that stopping releases every descriptor (the epoll one
included), and the --port-range allocation and exhaustion.
"""

from __future__ import annotations

import os
import select
import socket
import time
from typing import Any, List, Tuple

import pytest
import pytest_twisted

from tests.support.harness import free_udp_span
from tests.support.inprocess import get_reactor, until
from tftp_offload import mux as mux_module
from tftp_offload.mux import PortsExhausted, TransferSockets


class Recorder:
    def __init__(self) -> None:
        self.got: List[Tuple[bytes, Tuple[str, int]]] = []

    def datagramReceived(self, data: bytes, addr: Tuple[str, int]) -> None:
        self.got.append((data, addr))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def client(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(2)
    return s


def readers() -> List[Any]:
    return list(get_reactor().getReaders())


@pytest_twisted.ensureDeferred
async def test_datagrams_reach_their_own_protocol_through_one_reader() -> None:
    mux = TransferSockets(get_reactor())
    before = open_fds()
    protocols = [Recorder() for _ in range(3)]
    transfers = [mux.open("127.0.0.1", p) for p in protocols]
    try:
        assert mux in readers()
        assert sum(1 for r in readers() if r is mux) == 1
        peers = [client() for _ in transfers]
        for i, (peer, transfer) in enumerate(zip(peers, transfers)):
            for n in range(3):
                peer.sendto(b"%d-%d" % (i, n), ("127.0.0.1", transfer.port))
        await until(lambda: all(len(p.got) == 3 for p in protocols), what="every datagram")
        for i, (peer, protocol) in enumerate(zip(peers, protocols)):
            assert [d for d, _ in protocol.got] == [b"%d-%d" % (i, n) for n in range(3)]
            assert {a for _, a in protocol.got} == {peer.getsockname()}
        # Replies leave from the transfer's port, and arrival times are kept.
        assert transfers[0].send(b"reply", peers[0].getsockname())
        data, addr = peers[0].recvfrom(100)
        assert (data, addr[1]) == (b"reply", transfers[0].port)
        assert transfers[0].last_arrival() is not None
        assert transfers[0].send_all([b"a", b"b"], peers[0].getsockname()) == 2
        assert [peers[0].recvfrom(10)[0] for _ in range(2)] == [b"a", b"b"]
        for peer in peers:
            peer.close()
    finally:
        mux.close()
    assert mux not in readers()
    assert len(mux) == 0
    assert open_fds() == before  # every socket and the epoll descriptor


@pytest.fixture
def short_linger(monkeypatch: pytest.MonkeyPatch) -> float:
    """Spare sockets outlive the last transfer by a tenth of a second here (SPARE_LINGER)."""
    monkeypatch.setattr(mux_module, "SPARE_LINGER", 0.1)
    return 0.1


@pytest_twisted.ensureDeferred
async def test_last_socket_closed_releases_the_reader_and_a_new_one_brings_it_back(short_linger: float) -> None:
    mux = TransferSockets(get_reactor())
    before = open_fds()
    first = mux.open("127.0.0.1", Recorder())
    first.stopListening()
    first.stopListening()  # idempotent
    assert len(mux) == 0 and len(mux.spares) == 1  # a spare for a while: the next transfer may come at once
    await until(lambda: mux not in readers() and open_fds() == before, 2.0, "the spare and the reader to go")
    assert len(mux.spares) == 0
    assert not first.send(b"x", ("127.0.0.1", 9))  # a stopped socket drops, never raises
    protocol = Recorder()
    second = mux.open("127.0.0.1", protocol)
    try:
        peer = client()
        peer.sendto(b"again", ("127.0.0.1", second.port))
        await until(lambda: protocol.got, what="a datagram after the reader came back")
        peer.close()
    finally:
        mux.close()
    assert open_fds() == before


@pytest_twisted.ensureDeferred
async def test_a_short_transfers_socket_serves_the_next_client(short_linger: float) -> None:
    """Same port, nothing of the last transfer's left on it, and never to the client it served last."""
    mux = TransferSockets(get_reactor())
    before = open_fds()
    one, two = client(), client()
    first = mux.open("127.0.0.1", Recorder(), one.getsockname())
    port = first.port
    keep = mux.open("127.0.0.1", Recorder())  # a transfer still running: the spare is kept, not lingering
    first.stopListening()
    one.sendto(b"late duplicate", ("127.0.0.1", port))  # reaches the spare: read and dropped
    waiting = socket.socket(fileno=os.dup(first._fd))  # the spare's socket, to look at
    await until(lambda: not select.select([waiting], [], [], 0)[0], what="the spare to be read")
    waiting.close()
    assert mux.open("127.0.0.1", Recorder(), one.getsockname()).port != port  # not back to its last client
    protocol = Recorder()
    second = mux.open("127.0.0.1", protocol, two.getsockname())
    assert second.port == port and len(mux.spares) == 0
    two.sendto(b"mine", ("127.0.0.1", port))
    await until(lambda: protocol.got, what="the new client's datagram")
    assert [d for d, _ in protocol.got] == [b"mine"]  # the old one's did not reach the new transfer
    one.close(), two.close()
    keep.stopListening()
    mux.close()
    assert mux not in readers() and open_fds() == before


def test_no_spares_with_a_port_range_or_a_peer_socket(short_linger: float) -> None:
    low = free_udp_span(2)
    mux = TransferSockets(get_reactor(), (low, low + 1))
    try:
        a, _b = mux.open("127.0.0.1", Recorder()), mux.open("127.0.0.1", Recorder())
        a.stopListening()
        assert len(mux.spares) == 0  # a range's ports are counted out: a closed one is free again
    finally:
        mux.close()
    mux = TransferSockets(get_reactor())
    peer = client()
    try:
        keep = mux.open("127.0.0.1", Recorder())
        long = mux.open("127.0.0.1", Recorder(), peer.getsockname(), connect=True)
        assert long.peer_socket is not None
        long.stopListening()
        assert len(mux.spares) == 0 and keep.socket is not None
    finally:
        peer.close()
        mux.close()


@pytest_twisted.ensureDeferred
async def test_a_session_that_stops_its_socket_while_being_read(short_linger: float) -> None:
    """The common case: the final ACK ends the session inside doRead."""
    mux = TransferSockets(get_reactor())
    before = open_fds()

    class Ender(Recorder):
        transfer: Any = None

        def datagramReceived(self, data: bytes, addr: Tuple[str, int]) -> None:
            super().datagramReceived(data, addr)
            self.transfer.stopListening()

    enders = [Ender() for _ in range(4)]
    for e in enders:
        e.transfer = mux.open("127.0.0.1", e)
    peer = client()
    for e in enders:
        peer.sendto(b"last", ("127.0.0.1", e.transfer.port))
    await until(lambda: all(e.got for e in enders), what="every final datagram")
    peer.close()
    assert len(mux) == 0
    await until(lambda: mux not in readers() and open_fds() == before, 2.0, "the spares and the reader to go")


@pytest_twisted.ensureDeferred
async def test_ipv6() -> None:
    try:
        peer = client("::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    mux = TransferSockets(get_reactor())
    protocol = Recorder()
    transfer = mux.open("::1", protocol)
    try:
        peer.sendto(b"six", ("::1", transfer.port))
        await until(lambda: protocol.got, what="an IPv6 datagram")
        assert protocol.got == [(b"six", peer.getsockname()[:2])]
    finally:
        peer.close()
        mux.close()


def test_port_range_is_used_and_exhaustion_is_an_error() -> None:
    low = free_udp_span(3)
    span = [low, low + 1, low + 2]
    mux = TransferSockets(get_reactor(), port_range=(low, low + 2))
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:
            blocker.bind(("127.0.0.1", low + 1))  # another process's port: skipped
        except OSError:
            pytest.skip("a port of the range is taken")
        a = mux.open("127.0.0.1", Recorder())
        b = mux.open("127.0.0.1", Recorder())
        assert [a.port, b.port] == [low, low + 2]
        with pytest.raises(PortsExhausted):
            mux.open("127.0.0.1", Recorder())
        blocker.close()
        c = mux.open("127.0.0.1", Recorder())
        assert c.port == low + 1
        assert mux.exhausted()
        with pytest.raises(PortsExhausted):
            mux.open("127.0.0.1", Recorder())
        b.stopListening()
        assert not mux.exhausted()
        assert mux.open("127.0.0.1", Recorder()).port == low + 2
        assert sorted(t.port for t in mux.sockets()) == span
    finally:
        blocker.close()
        mux.close()
    assert len(mux) == 0


def test_reader_lost_while_reading() -> None:
    """The last transfer of a drain ends inside doRead and the reactor, shutting down, calls
    connectionLost() there: reading stops cleanly (no exception), every descriptor closed."""
    reactor = get_reactor()
    mux = TransferSockets(reactor)
    before = open_fds()

    class Loser(Recorder):
        def datagramReceived(self, data: bytes, addr: Tuple[str, int]) -> None:
            super().datagramReceived(data, addr)
            reactor.removeReader(mux)  # as the reactor's disconnectAll() does
            mux.connectionLost(None)

    protocols = [Loser(), Loser()]
    transfers = [mux.open("127.0.0.1", p) for p in protocols]
    peer = client()
    for transfer in transfers:
        peer.sendto(b"x", ("127.0.0.1", transfer.port))
    peer.close()
    time.sleep(0.05)
    assert select.select([mux.fileno()], [], [], 2)[0]
    mux.doRead()  # called directly: an exception fails the test
    assert sum(len(p.got) for p in protocols) == 1
    assert len(mux) == 0 and mux not in readers() and open_fds() == before
    mux.close()  # harmless afterwards


# ------------------------------------------------------------------- peer sockets --


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest_twisted.ensureDeferred
async def test_a_peer_socket_takes_the_clients_datagrams_and_strangers_still_reach_the_transfer(host: str) -> None:
    """A long transfer's two sockets share one port: the client's datagrams arrive through the
    connected one, a stranger's through the other (so it can be told ERROR 5), and replies to
    the client leave from the port it knows, the window through segmentation offload too."""
    before = open_fds()
    try:
        peer, stranger = client(host), client(host)
    except OSError:
        pytest.skip("no IPv6 loopback")
    mux = TransferSockets(get_reactor())
    protocol = Recorder()
    address = peer.getsockname()[:2]
    transfer = mux.open(host, protocol, address, connect=True)
    try:
        assert transfer.peer_socket is not None and transfer.peer == address
        assert transfer.peer_socket.getsockname()[1] == transfer.port
        peer.sendto(b"ack", (host, transfer.port))
        stranger.sendto(b"who", (host, transfer.port))
        await until(lambda: len(protocol.got) == 2, what="both datagrams")
        assert sorted(protocol.got) == sorted([(b"ack", address), (b"who", stranger.getsockname()[:2])])
        assert transfer.last_arrival() is not None
        window = [bytes([i]) * 1000 for i in range(5)] + [b"end"]
        assert transfer.send_all(window, address) == len(window)
        got = [peer.recvfrom(2000) for _ in window]
        assert [d for d, _ in got] == window and {a[1] for _, a in got} == {transfer.port}
        assert transfer.send(b"error 5", stranger.getsockname()[:2])
        data, source = stranger.recvfrom(100)
        assert (data, source[1]) == (b"error 5", transfer.port)
        # A second long transfer gets a port of its own: nothing else joins a shared one.
        other = mux.open(host, Recorder(), stranger.getsockname()[:2], connect=True)
        assert other.port != transfer.port
    finally:
        peer.close()
        stranger.close()
        mux.close()
    assert len(mux) == 0 and mux not in readers() and open_fds() == before


def test_a_peer_socket_the_kernel_refuses_leaves_the_transfer_its_one_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel without SO_REUSEPORT (an option number it does not know, here): the transfer is
    served from its one unconnected socket, and nothing is left open."""
    monkeypatch.setattr(socket, "SO_REUSEPORT", 9999)
    before = open_fds()
    mux = TransferSockets(get_reactor())
    peer = client()
    try:
        transfer = mux.open("127.0.0.1", Recorder(), peer.getsockname(), connect=True)
        assert transfer.peer_socket is None
        assert transfer.send_all([b"a", b"b"], peer.getsockname()) == 2
        assert [peer.recvfrom(10)[0] for _ in range(2)] == [b"a", b"b"]
    finally:
        peer.close()
        mux.close()
    assert open_fds() == before
