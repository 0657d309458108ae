"""UDP ports that know which local address each datagram was sent to.

Twisted has no API for a datagram's destination address. A server listening
on a wildcard address must still answer from the address the client wrote to
(ROMs drop replies from anywhere else) and must tell the backend that address
(MAAS renders boot URLs from it). `RequestPort` asks the kernel for it with
IP_PKTINFO / IPV6_RECVPKTINFO on every datagram, and can send a reply from it.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import struct
import time
from typing import Any, Optional, Sequence, Tuple

from twisted.internet import udp
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

log = Logger()

Address = Tuple[str, int]

# Linux values; Python 3.11's socket module lacks IP_PKTINFO.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
IP_MTU = getattr(socket, "IP_MTU", 14)
IPV6_MTU = getattr(socket, "IPV6_MTU", 24)

REQUEST_RCVBUF = 4 << 20
"""Receive buffer asked for on listening ports (the kernel caps it at net.core.rmem_max)."""

_IN_PKTINFO = struct.Struct("=I4s4s")  # ifindex, spec_dst, addr
_IN6_PKTINFO = struct.Struct("=16sI")  # addr, ifindex
_TIMESPEC = struct.Struct("@ll")
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_ANCILLARY_SPACE = (
    socket.CMSG_SPACE(_IN6_PKTINFO.size) + socket.CMSG_SPACE(_IN_PKTINFO.size) + socket.CMSG_SPACE(_TIMESPEC.size)
)

_SOL_SOCKET, _SOL_IP, _SOL_IPV6 = int(socket.SOL_SOCKET), int(socket.IPPROTO_IP), int(socket.IPPROTO_IPV6)
_inet_ntoa = socket.inet_ntoa

_READ_DONE = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ECONNREFUSED))
"""recvmsg errors that end a read pass (as udp.Port's): nothing left, a signal, an ICMP error for an earlier send."""


def plain_host(host: str) -> str:
    """`::ffff:a.b.c.d` as `a.b.c.d`: a dual-stack socket's view of an IPv4 peer, as people write it."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def is_ipv6(host: str) -> bool:
    return ":" in host


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def bind_address(host: str, port: int) -> tuple:
    """What bind() needs for `host`: Python's ignores a scope written in the string (fe80::1%eth0
    fails with EINVAL), so a scoped address becomes (host, port, 0, scope id)."""
    if "%" not in host:
        return (host, port)
    try:
        return socket.getaddrinfo(host, port, socket.AF_INET6, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST)[0][4]
    except socket.gaierror:
        raise OSError(f"no interface named {host.partition('%')[2]!r}, or not an IPv6 address") from None


def _interface_name(ifindex: int) -> str:
    """`eth0` for its index: a link-local address is written `fe80::1%eth0`, as `ip` shows it."""
    try:
        return socket.if_indextoname(ifindex)
    except OSError:  # gone since the datagram arrived
        return str(ifindex)


class RequestPort(udp.Port):
    """A listening UDP port that hands its protocol `(datagram, client, local address, arrival)`.

    The protocol must have `requestReceived(data, client, local_host, arrived)`,
    `arrived` being the kernel's receive time (`time.time()` scale): it orders a
    request against events on other sockets, which the reactor may handle in
    another order. Replies sent with `reply()` leave from the local address.

    A `udp.Port` subclass, for its reactor registration, `stopListening()` and
    `connectionLost()`; `doRead` is ours (recvmsg for the ancillary data) and uses
    only udp.Port's public attributes (`socket`, `protocol`, `maxThroughput`,
    `addressFamily`, `connected`). One private name remains: `_preexistingSocket`,
    see `_use_socket`.
    """

    def __init__(self, port: int, proto: Any, interface: str = "", v6only: Optional[bool] = None,
                 maxPacketSize: int = 65536, reactor: Any = None, reuse_port: bool = False) -> None:
        super().__init__(port, proto, interface, maxPacketSize, reactor)
        self._reuse_port = reuse_port
        self._v6only = v6only
        self._wildcard = _is_wildcard(interface)

    @classmethod
    def adopt(cls, fd: int, family: int, proto: Any, reactor: Any = None) -> "RequestPort":
        """Take over an already bound socket (socket activation); it is set non-blocking here."""
        skt = socket.socket(family, socket.SOCK_DGRAM, 0, fd)
        skt.setblocking(False)
        host = skt.getsockname()[0]
        self = cls(skt.getsockname()[1], proto, host, None, 65536, reactor)
        self._use_socket(skt)
        self._enable_ancillary(skt)
        return self

    def _use_socket(self, skt: socket.socket) -> None:
        """Listen on `skt`, already bound, instead of a socket udp.Port would make and bind.

        Twisted has no public way to give a `udp.Port` subclass a socket:
        `reactor.adoptDatagramPort` builds a plain udp.Port (whose `doRead`
        cannot see a datagram's destination address), through this same private
        attribute, which `startListening` checks before it binds.
        tests/test_udp.py fails if it disappears.
        """
        self._preexistingSocket = skt  # type: ignore[assignment]

    def startListening(self) -> None:
        if "%" in self.interface and self._preexistingSocket is None:  # type: ignore[has-type]
            # udp.Port binds (interface, port), which loses a link-local address's scope.
            skt = self.createInternetSocket()
            try:
                skt.bind(bind_address(self.interface, self.port))
            except OSError as e:
                skt.close()
                raise CannotListenError(self.interface, self.port, e) from e
            self._use_socket(skt)
        super().startListening()

    def createInternetSocket(self) -> socket.socket:
        skt = super().createInternetSocket()
        with contextlib.suppress(OSError):
            # A boot storm's RRQs arrive at once; a default buffer holds only a few hundred.
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, REQUEST_RCVBUF)
        if self._reuse_port:
            # --workers: each worker binds the same address; the kernel hashes every client to one.
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if self.addressFamily == socket.AF_INET6 and self._v6only is not None:
            skt.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(self._v6only))
        self._enable_ancillary(skt)
        return skt

    def getHost(self) -> Any:
        """As udp.Port's, built once: every request asks (its local port goes to the backend)."""
        host = self.__dict__.get("_host")
        if host is None or not self.connected:
            host = self._host = super().getHost()
        return host

    def _enable_ancillary(self, skt: socket.socket) -> None:
        with contextlib.suppress(OSError):
            skt.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        if skt.family == socket.AF_INET6:
            skt.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        else:
            skt.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)

    def doRead(self) -> None:
        read = 0
        sock = self.socket
        family = self.addressFamily
        while read < self.maxThroughput:
            try:
                data, ancillary, _flags, addr = sock.recvmsg(self.maxPacketSize, _ANCILLARY_SPACE)
            except OSError as e:
                if e.args[0] in _READ_DONE:
                    return
                raise
            read += len(data)
            local, arrived = self._ancillary(ancillary)
            if family == socket.AF_INET6:
                addr = addr[:2]
            try:
                self.protocol.requestReceived(data, addr, local, arrived)
            except Exception:
                log.failure("Unhandled error handling a datagram from {client}", client=addr)

    def _ancillary(self, ancillary: list) -> Tuple[str, float]:
        """The local address a datagram was sent to, and when it arrived."""
        local = None
        arrived = 0.0
        # The kernel's order: the timestamp, then the address. Module constants, not socket.X
        # lookups: this runs for every request a boot storm sends.
        for level, kind, payload in ancillary:
            if level == _SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = _TIMESPEC.unpack_from(payload)
                arrived = seconds + nanoseconds * 1e-9
            elif level == _SOL_IP and kind == IP_PKTINFO:
                local = _inet_ntoa(_IN_PKTINFO.unpack_from(payload)[2])
            elif level == _SOL_IPV6 and kind == IPV6_PKTINFO:
                raw, ifindex = _IN6_PKTINFO.unpack_from(payload)
                address = ipaddress.IPv6Address(raw)
                if address.ipv4_mapped is not None:
                    # An IPv4 datagram on a dual-stack socket. Before Python 3.13, str() writes
                    # ::ffff:7f00:2, which plain_host() cannot map back to 127.0.0.2.
                    local = str(address.ipv4_mapped)
                else:
                    local = str(address)
                    if local.startswith("fe80:"):
                        local = f"{local}%{_interface_name(ifindex)}"
        return local or self.getHost().host, arrived or time.time()

    def reply(self, datagram: bytes, client: Address, local: str) -> None:
        """Send from `local` (the address the client's request was sent to); losses are not errors."""
        try:
            self.reply_all((datagram,), client, local, True)
        except OSError as e:
            log.warn("Could not send to {client}: {error}", client=client, error=e)

    def reply_all(self, datagrams: Sequence[bytes], client: Address, local: str, strict: bool = False) -> int:
        """Send each from `local`, stopping at the first the kernel refuses (raised if `strict`); how many went."""
        if not self.connected:
            return 0  # stopped listening: a shutdown's last words are not worth a traceback
        sent = 0
        try:
            if not self._wildcard:
                for datagram in datagrams:
                    self.socket.sendto(datagram, client)
                    sent += 1
                return sent
            if self.addressFamily == socket.AF_INET6:
                host, _, scope = local.partition("%")
                if "." in host and ":" not in host:
                    host = "::ffff:" + host
                # A link-local source needs its interface: the client's address carries no scope.
                ifindex = socket.if_nametoindex(scope) if scope and not scope.isdigit() else int(scope or 0)
                info = _IN6_PKTINFO.pack(socket.inet_pton(socket.AF_INET6, host), ifindex)
                cmsg = [(socket.IPPROTO_IPV6, IPV6_PKTINFO, info)]
            else:
                cmsg = [(socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, socket.inet_aton(local), b"\0" * 4))]
            for datagram in datagrams:
                self.socket.sendmsg([datagram], cmsg, 0, client)
                sent += 1
        except OSError:
            if strict:
                raise
        return sent


def path_mtu(local: str, peer: str) -> Optional[int]:
    """The kernel's MTU for the route from `local` to `peer`, or None if it cannot tell."""
    family = socket.AF_INET6 if is_ipv6(peer) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind(bind_address(local, 0))
            probe.connect((peer, 9))
            if family == socket.AF_INET6:
                return int(probe.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU))
            return int(probe.getsockopt(socket.IPPROTO_IP, IP_MTU))
    except OSError:
        return None

