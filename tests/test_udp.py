"""udp.py: address helpers, the ancillary data of a request, and RequestPort over real loopback sockets.

`_ancillary` is fed hand-built control messages (every shape the kernel
sends: IPv4 and IPv6 packet info, a v4-mapped destination on a dual-stack
socket, a link-local one with its interface, the receive time); the
`RequestPort` tests send real datagrams on the reactor under test. The last
test pins the one private Twisted name udp.py relies on.
"""

from __future__ import annotations

import socket
import time
from typing import List, Tuple

import pytest
import pytest_twisted
from twisted.internet import udp
from twisted.internet.protocol import DatagramProtocol

from tests.support.inprocess import get_reactor, until
from tftp_offload.udp import (
    _IN6_PKTINFO,
    _IN_PKTINFO,
    _TIMESPEC,
    IP_PKTINFO,
    IPV6_PKTINFO,
    SO_TIMESTAMPNS,
    RequestPort,
    bind_address,
    is_ipv6,
    plain_host,
)


class Requests(DatagramProtocol):
    """A listener's protocol: records what `RequestPort` hands it."""

    noisy = False

    def __init__(self) -> None:
        self.got: List[Tuple[bytes, Tuple[str, int], str, float]] = []

    def requestReceived(self, data: bytes, client: Tuple[str, int], local: str, arrived: float) -> None:
        self.got.append((data, client, local, arrived))


def v4_info(destination: str, route_source: str = "198.51.100.1") -> Tuple[int, int, bytes]:
    """in_pktinfo: interface, the address a reply would be routed from, and the header's destination."""
    info = _IN_PKTINFO.pack(1, socket.inet_aton(route_source), socket.inet_aton(destination))
    return (socket.IPPROTO_IP, IP_PKTINFO, info)


def v6_info(destination: str, ifindex: int = 0) -> Tuple[int, int, bytes]:
    info = _IN6_PKTINFO.pack(socket.inet_pton(socket.AF_INET6, destination), ifindex)
    return (socket.IPPROTO_IPV6, IPV6_PKTINFO, info)


def stamp(seconds: int, nanoseconds: int) -> Tuple[int, int, bytes]:
    return (socket.SOL_SOCKET, SO_TIMESTAMPNS, _TIMESPEC.pack(seconds, nanoseconds))


# ------------------------------------------------------------ address helpers --


@pytest.mark.parametrize(("wire", "plain"), [
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8::7", "2001:db8::7"),
    ("::ffff:7f00:1", "::ffff:7f00:1"),  # not the dotted form a dual-stack socket reports: left alone
    ("fe80::1%eth0", "fe80::1%eth0"),
])
def test_plain_host(wire: str, plain: str) -> None:
    assert plain_host(wire) == plain


def test_is_ipv6() -> None:
    assert is_ipv6("::1") and is_ipv6("fe80::1%lo") and not is_ipv6("127.0.0.1")


def test_bind_address_keeps_a_scope() -> None:
    assert bind_address("127.0.0.1", 69) == ("127.0.0.1", 69)
    host, port, _flow, scope = bind_address("fe80::1%lo", 69)
    assert (host, port, scope) == ("fe80::1", 69, socket.if_nametoindex("lo"))
    with pytest.raises(OSError, match="no interface named 'no-such-if0'"):
        bind_address("fe80::1%no-such-if0", 69)


# ------------------------------------------------------------- ancillary data --


@pytest.fixture
def unbound() -> RequestPort:
    """A RequestPort never started: `_ancillary` reads only what it is given (and getHost() as a fallback)."""
    return RequestPort(0, Requests(), "127.0.0.1")


def test_ancillary_v4(unbound: RequestPort) -> None:
    assert unbound._ancillary([v4_info("192.0.2.1"), stamp(1_700_000_000, 250_000_000)]) == \
        ("192.0.2.1", 1_700_000_000.25)


def test_ancillary_v4_mapped_on_a_dual_stack_socket(unbound: RequestPort) -> None:
    local, _ = unbound._ancillary([v6_info("::ffff:127.0.0.2")])
    assert local == "127.0.0.2"


def test_ancillary_v6_and_link_local(unbound: RequestPort) -> None:
    assert unbound._ancillary([v6_info("2001:db8::1", 1)])[0] == "2001:db8::1"
    lo = socket.if_nametoindex("lo")
    assert unbound._ancillary([v6_info("fe80::1", lo)])[0] == "fe80::1%lo"
    assert unbound._ancillary([v6_info("fe80::1", 999_999)])[0] == "fe80::1%999999"  # an interface gone since


def test_ancillary_without_a_timestamp_is_now(unbound: RequestPort) -> None:
    before = time.time()
    _, arrived = unbound._ancillary([v4_info("192.0.2.1")])
    assert before <= arrived <= time.time()


# ------------------------------------------------------------ real datagrams --


@pytest_twisted.ensureDeferred
async def test_a_wildcard_listener_sees_and_replies_from_the_address_asked() -> None:
    requests = Requests()
    port = RequestPort(0, requests, "0.0.0.0", reactor=get_reactor())
    port.startListening()
    try:
        number = port.getHost().port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.bind(("127.0.0.1", 0))
            client.settimeout(2)
            sent = time.time()
            client.sendto(b"\0\1hello\0octet\0", ("127.0.0.2", number))
            await until(lambda: requests.got, what="the request")
            [(data, peer, local, arrived)] = requests.got
            assert data == b"\0\1hello\0octet\0" and peer == client.getsockname()
            assert local == "127.0.0.2"
            assert sent - 1 < arrived <= time.time()  # the kernel's receive time
            port.reply(b"answer", peer, local)
            reply, source = client.recvfrom(100)
            assert (reply, source) == (b"answer", ("127.0.0.2", number))
    finally:
        await port.stopListening()  # udp.Port's: its Deferred fires once the socket is closed
    assert port.reply_all([b"late"], ("127.0.0.1", 9), "127.0.0.1") == 0  # stopped: nothing sent, no error


@pytest_twisted.ensureDeferred
async def test_adopt_listens_on_the_socket_given() -> None:
    """Socket activation: the inherited socket itself is read (and made non-blocking), not a new one."""
    inherited = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    inherited.bind(("127.0.0.1", 0))
    address = inherited.getsockname()
    requests = Requests()
    port = RequestPort.adopt(inherited.detach(), socket.AF_INET, requests, reactor=get_reactor())
    port.startListening()
    try:
        assert port.socket.getsockname() == address and not port.socket.getblocking()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"\0\1x\0octet\0", address)
            await until(lambda: requests.got, what="the request")
        assert requests.got[0][2] == "127.0.0.1"
    finally:
        await port.stopListening()


def test_the_private_twisted_name_udp_py_relies_on() -> None:
    """`RequestPort._use_socket` sets udp.Port's `_preexistingSocket` (no public API for a subclass).

    If Twisted renames it, startListening would bind a socket of its own and socket
    activation would silently listen elsewhere: this fails first.
    """
    plain = udp.Port(0, DatagramProtocol())
    assert plain._preexistingSocket is None  # type: ignore[attr-defined]
    import inspect

    source = inspect.getsource(udp.Port)
    assert "self._preexistingSocket" in source and "_fromListeningDescriptor" in source
