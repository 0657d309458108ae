"""TFTPOffloadService (service.py): listening, inherited sockets, and the drain on stop.

Real UDP sockets on loopback, in this process, with `inprocess`'s client and
recording backend; the `serve` fixture checks nothing is left behind.
"""

from __future__ import annotations

import os
import socket
from typing import List, Tuple

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError

from tests.support import tftp_client as wire
from tests.support.harness import free_udp_port
from tests.support.inprocess import (
    Backend,
    Peer,
    Serving,
    download,
    get_reactor,
    lockstep,
    opcode,
    serve,  # noqa: F401  (fixture)
    sleep,
    until,
)
from tftp_offload.config import ServerConfig
from tftp_offload.options import Limits
from tftp_offload.service import TFTPOffloadService
from tftp_offload.udp import Address

FILE = os.urandom(3000)


def port_of(service: TFTPOffloadService, index: int = 0) -> int:
    return service.addresses()[index][1]


@pytest_twisted.ensureDeferred
async def test_addresses_tell_the_ports_the_kernel_picked(serve: Serving) -> None:
    service = serve(Backend({b"file": FILE}), listen=[("127.0.0.1", 0), ("::1", 0)])
    (v4, p4), (v6, p6) = service.addresses()
    assert (v4, v6) == ("127.0.0.1", "::1") and p4 > 0 and p6 > 0
    got = await download(serve.peer("::1"), ("::1", p6))
    assert got.complete and got.data == FILE


# ---------------------------------------------------------------------- drain --


async def transfer_running(serve: Serving, backend: Backend, drain_timeout: float) -> Tuple[
        TFTPOffloadService, Address, Peer, bytes, Address]:
    """A service with one transfer under way: its DATA 1 received, not yet ACKed."""
    service = serve(backend, drain_timeout=drain_timeout)
    server = ("127.0.0.1", port_of(service))
    peer = serve.peer()
    peer.send(wire.rrq(b"file"), server)
    first, tid = await peer.recv()
    assert opcode(first) == wire.DATA
    return service, server, peer, first, tid


@pytest_twisted.ensureDeferred
async def test_stop_lets_a_running_transfer_finish(serve: Serving) -> None:
    backend = Backend({b"file": FILE})
    service, server, peer, first, tid = await transfer_running(serve, backend, drain_timeout=2.0)

    reactor = get_reactor()
    started = reactor.seconds()
    stopped = service.stopService()
    assert not stopped.called and not service.running
    latecomer = serve.peer()  # the listening port is closed at once: nobody new is served
    latecomer.send(wire.rrq(b"file"), server)

    await sleep(0.05)  # a slow client, still well inside the drain time
    assert not stopped.called
    assert first[4:] + await lockstep(peer, tid, 1) == FILE
    stopped.addTimeout(2.0, reactor)
    await stopped
    assert reactor.seconds() - started < 1.0
    assert backend.readers[0].finished == 1
    assert len(backend.lookups) == 1
    await latecomer.silence()
    assert not [d for d, _ in peer.received if opcode(d) == wire.ERROR]


@pytest_twisted.ensureDeferred
async def test_stop_aborts_a_stalled_transfer_after_the_drain_timeout(serve: Serving) -> None:
    backend = Backend({b"file": FILE})
    service, server, peer, _first, tid = await transfer_running(serve, backend, drain_timeout=0.2)

    reactor = get_reactor()
    started = reactor.seconds()
    stopped = service.stopService()
    stopped.addTimeout(2.0, reactor)
    await stopped  # the client never ACKs
    elapsed = reactor.seconds() - started
    assert 0.15 <= elapsed < 1.0
    reply, source = await peer.recv()
    assert source == tid
    assert wire.parse_error(reply) == (0, "Server shutting down")
    assert backend.readers[0].finished == 1
    assert service.server.sessions == {}

    peer.send(wire.rrq(b"file"), server)  # after the stop: nothing answers
    peer.send(wire.ack(1), tid)
    await peer.silence()


@pytest_twisted.ensureDeferred
async def test_stop_waits_for_lookups_in_flight(serve: Serving) -> None:
    """A lookup in flight when the service stops is waited for within the drain, and served."""
    pending: List[Deferred] = []
    backend = Backend({b"file": FILE})
    backend.answer = lambda name: pending.append(Deferred()) or pending[-1]
    service = serve(backend, drain_timeout=5.0)
    server = ("127.0.0.1", port_of(service))
    peer = serve.peer()
    peer.send(wire.rrq(b"file"), server)
    await until(lambda: pending, what="the lookup")

    stopped = service.stopService()
    stopped.addTimeout(3.0, get_reactor())
    await sleep(0.1)
    assert not stopped.called
    other = serve.peer()  # nothing new is taken meanwhile
    other.send(wire.rrq(b"file"), server)
    await other.silence()
    pending[0].callback(backend.make(b"file"))
    got = await download(peer, server, send_request=False)
    assert got.complete and got.data == FILE
    await stopped  # at once after the transfer, not after the whole drain timeout
    assert len(pending) == 1 and backend.readers[0].finished == 1


@pytest_twisted.ensureDeferred
async def test_stop_aborts_lookups_the_drain_did_not_see_answered(serve: Serving) -> None:
    pending: List[Deferred] = []
    backend = Backend({b"file": FILE})
    backend.answer = lambda name: pending.append(Deferred()) or pending[-1]
    service = serve(backend, drain_timeout=0.2)
    server = ("127.0.0.1", port_of(service))
    peer = serve.peer()
    peer.send(wire.rrq(b"file"), server)
    await until(lambda: pending, what="the lookup")
    stopped = service.stopService()
    stopped.addTimeout(2.0, get_reactor())
    reply, source = await peer.recv()
    assert source == server  # from the address asked: the listener closes after the drain
    assert wire.parse_error(reply) == (0, "Server shutting down")
    await stopped
    late = backend.make(b"file")
    pending[0].callback(late)  # the backend answers after the stop: its reader is released
    assert late.finished == 1 and late.reads == 0


@pytest_twisted.ensureDeferred
async def test_stop_when_idle_is_immediate(serve: Serving) -> None:
    service = serve(Backend({b"file": FILE}), drain_timeout=30.0)
    stopped = service.stopService()
    stopped.addTimeout(1.0, get_reactor())
    await stopped


# ------------------------------------------------------------ listening ports --


@pytest_twisted.ensureDeferred
async def test_v4_and_v6_wildcards_on_one_port(serve: Serving) -> None:
    """[::] beside 0.0.0.0 on the same port is made IPv6-only, so both can bind."""
    port = free_udp_port(("0.0.0.0",))  # the service binds [::] v6-only beside it
    backend = Backend({b"file": FILE})
    service = serve(backend, listen=[("0.0.0.0", port), ("::", port)])
    assert [p.getHost().port for p in service.ports] == [port, port]
    for host in ("127.0.0.1", "::1"):
        got = await download(serve.peer(host), (host, port), b"file")
        assert got.complete and got.data == FILE
        assert {source[0] for source in got.sources} == {host}
    assert [lookup.local for lookup in backend.lookups] == [("127.0.0.1", port), ("::1", port)]


def test_failed_start_closes_what_it_opened() -> None:
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", 0))
    try:
        service = TFTPOffloadService(Backend(), listen=[("127.0.0.1", 0), blocker.getsockname()])
        with pytest.raises(CannotListenError):
            service.startService()
        assert service.ports == [] and not service.running
    finally:
        blocker.close()


# ----------------------------------------------------------- inherited sockets --


@pytest.mark.parametrize(("family", "bind", "target"), [
    (socket.AF_INET, "0.0.0.0", "127.0.0.2"),
    (socket.AF_INET6, "::", "127.0.0.2"),
    (socket.AF_INET6, "::", "::1"),
], ids=["v4-wildcard", "dual-stack-v4", "dual-stack-v6"])
@pytest_twisted.ensureDeferred
async def test_inherited_socket_serves(serve: Serving, family: int, bind: str, target: str) -> None:
    """A bound socket handed over as a descriptor (as systemd does: blocking) is served, with replies
    from the address asked."""
    made = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        made.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    made.bind((bind, 0))
    port = made.getsockname()[1]
    fd = os.dup(made.fileno())  # the service owns (and closes) its descriptor
    made.close()
    assert os.get_blocking(fd)

    backend = Backend({b"file": FILE})
    service = serve(backend, listen=[], inherited=[(fd, family)])
    assert [p.getHost().port for p in service.ports] == [port]
    assert not os.get_blocking(fd)
    peer = serve.peer("::1" if ":" in target else "127.0.0.1")
    got = await download(peer, (target, port), b"file", {"blksize": "1024"})
    assert got.complete and got.data == FILE
    assert {source[0] for source in got.sources} == {target}
    assert backend.lookups[0].local == (target, port)

    service.drain_timeout = 0
    await serve.settled(service)
    await service.stopService()
    await sleep(0)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with the service


# -- configuration ---------------------------------------------------------------------------------


def test_keywords_and_config_make_one_server_config() -> None:
    """The keywords are ServerConfig's fields: given ones override `config`, the rest come from it."""
    default = TFTPOffloadService(Backend({}))
    assert default.config == ServerConfig()
    base = ServerConfig(max_sessions=7, quiet=True, drain_timeout=3.0)
    service = TFTPOffloadService(Backend({}), config=base, max_sessions=9, limits=Limits(max_windowsize=4),
                                 port_range=(49152, 49407), single_port=True)
    assert service.config == ServerConfig(max_sessions=9, quiet=True, drain_timeout=3.0,
                                          limits=Limits(max_windowsize=4), port_range=(49152, 49407),
                                          single_port=True)
    assert (service.max_sessions, service.quiet, service.drain_timeout, service.limits.max_windowsize) == \
        (9, True, 3.0, 4)
    positional = TFTPOffloadService(Backend({}), [("127.0.0.1", 0)], Limits(rollover=1), 5, 2.5)
    assert (positional.limits.rollover, positional.max_sessions, positional.lookup_timeout) == (1, 5, 2.5)


def test_a_bad_keyword_is_a_value_error_naming_the_option() -> None:
    with pytest.raises(ValueError) as caught:
        TFTPOffloadService(Backend({}), max_sessions=0)
    assert str(caught.value) == "--max-sessions must be from 1 to 1000000, not 0"
    with pytest.raises(ValueError, match=r"^--max-window-bytes must be from 512 "):
        TFTPOffloadService(Backend({}), config=ServerConfig(), limits=Limits(max_window_bytes=100))


def test_setting_an_attribute_replaces_the_config_checked_again() -> None:
    service = TFTPOffloadService(Backend({}))
    service.drain_timeout = 0
    service.log_starts = True
    assert service.config == ServerConfig(drain_timeout=0, log_starts=True)
    with pytest.raises(ValueError, match=r"^--drain-timeout must be from 0.0 to 3600.0, not -1$"):
        service.drain_timeout = -1
    assert service.drain_timeout == 0


@pytest_twisted.ensureDeferred
async def test_the_server_gets_the_service_config(serve: Serving) -> None:
    service = serve(Backend({b"file": FILE}), listen=[("127.0.0.1", 0)], max_sessions=3, quiet=True,
                    lookup_timeout=2.0)
    server = service.server
    assert server is not None and server.config is service.config
    assert (server.max_sessions, server.quiet, server.lookup_timeout) == (3, True, 2.0)
    got = await download(serve.peer("127.0.0.1"), ("127.0.0.1", port_of(service)))
    assert got.complete and got.data == FILE
