"""UDP ports that know which local address each datagram was sent to.

Twisted has no API for a datagram's destination address. A server listening
on a wildcard address must still answer from the address the client wrote to
(ROMs drop replies from anywhere else) and must tell the backend that address
(MAAS renders boot URLs from it). `RequestPort` asks the kernel for it with
IP_PKTINFO / IPV6_RECVPKTINFO on every datagram, and can send a reply from it.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import socket
import struct
import time
from typing import Any, Optional, Tuple

from twisted.internet import base, udp
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

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
_TIMEVAL = struct.Struct("@ll")
SIOCGSTAMP = 0x8906
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_ANCILLARY_SPACE = (
    socket.CMSG_SPACE(_IN6_PKTINFO.size) + socket.CMSG_SPACE(_IN_PKTINFO.size) + socket.CMSG_SPACE(_TIMESPEC.size)
)

_READ_IGNORE = frozenset(udp._sockErrReadIgnore)  # type: ignore[attr-defined]  # EAGAIN, EINTR...
_READ_REFUSE = frozenset(udp._sockErrReadRefuse)  # type: ignore[attr-defined]  # ECONNREFUSED...


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
    """

    def __init__(self, port: int, proto: Any, interface: str = "", v6only: Optional[bool] = None,
                 maxPacketSize: int = 65536, reactor: Any = None) -> None:
        super().__init__(port, proto, interface, maxPacketSize, reactor)
        self._v6only = v6only
        self._wildcard = _is_wildcard(interface)

    @classmethod
    def adopt(cls, fd: int, family: int, proto: Any, reactor: Any = None) -> "RequestPort":
        """Take over an already bound socket (socket activation); it is set non-blocking here."""
        skt = socket.socket(family, socket.SOCK_DGRAM, 0, fd)
        skt.setblocking(False)
        host = skt.getsockname()[0]
        self = cls(skt.getsockname()[1], proto, host, None, 65536, reactor)
        self._preexistingSocket = skt  # type: ignore[attr-defined,assignment]
        self._enable_ancillary(skt)
        return self

    def startListening(self) -> None:
        if "%" in self.interface and self._preexistingSocket is None:  # type: ignore[has-type]
            # udp.Port binds (interface, port), which loses a link-local address's scope.
            skt = self.createInternetSocket()
            try:
                skt.bind(bind_address(self.interface, self.port))
            except OSError as e:
                skt.close()
                raise CannotListenError(self.interface, self.port, e) from e
            self._preexistingSocket = skt  # type: ignore[assignment]
        super().startListening()

    def createInternetSocket(self) -> socket.socket:
        skt = super().createInternetSocket()
        with contextlib.suppress(OSError):
            # A boot storm's RRQs arrive at once; a default buffer holds only a few hundred.
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, REQUEST_RCVBUF)
        if self.addressFamily == socket.AF_INET6 and self._v6only is not None:
            skt.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(self._v6only))
        self._enable_ancillary(skt)
        return skt

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
                if e.args[0] in _READ_IGNORE or e.args[0] in _READ_REFUSE:
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
        for level, kind, payload in ancillary:
            if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO:
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
            elif level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                local = socket.inet_ntoa(_IN_PKTINFO.unpack_from(payload)[2])
            elif level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = _TIMESPEC.unpack_from(payload)
                arrived = seconds + nanoseconds * 1e-9
        return local or self.getHost().host, arrived or time.time()

    def reply(self, datagram: bytes, client: Address, local: str) -> None:
        """Send from `local` (the address the client's request was sent to); losses are not errors."""
        if not self.connected:
            return  # stopped listening: a shutdown's last words are not worth a traceback
        try:
            if not self._wildcard:
                self.socket.sendto(datagram, client)
            elif self.addressFamily == socket.AF_INET6:
                host, _, scope = local.partition("%")
                if "." in host and ":" not in host:
                    host = "::ffff:" + host
                # A link-local source needs its interface: the client's address carries no scope.
                ifindex = socket.if_nametoindex(scope) if scope and not scope.isdigit() else int(scope or 0)
                info = _IN6_PKTINFO.pack(socket.inet_pton(socket.AF_INET6, host), ifindex)
                self.socket.sendmsg([datagram], [(socket.IPPROTO_IPV6, IPV6_PKTINFO, info)], 0, client)
            else:
                info = _IN_PKTINFO.pack(0, socket.inet_aton(local), b"\0" * 4)
                self.socket.sendmsg([datagram], [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0, client)
        except OSError as e:
            log.warn("Could not send to {client}: {error}", client=client, error=e)


class TransferPort(udp.Port):
    """The ephemeral port of one transfer: bound to the request's local address, never connected.

    Not connected, so that a stray datagram from another (address, port)
    reaches the protocol and can be answered with ERROR 5 (RFC 1350).
    One exists per transfer, so it opens and closes without udp.Port's log
    lines. This is the hot path, so it trims `udp.Port`: `send` skips `write`'s
    per-call address validation (the peer's address came from the kernel),
    and `doRead` takes one datagram per readiness event instead of reading
    until EAGAIN (the reactor polls level-triggered, so nothing waits longer,
    and a lock-step transfer saves a failing system call and an exception
    per block).
    """

    def _bindSocket(self) -> None:
        # As udp.Port's, less its log line: one port per transfer would log two lines each.
        try:
            skt = self.createInternetSocket()
            skt.bind(bind_address(self.interface, 0))
        except OSError as e:
            raise CannotListenError(self.interface, 0, e) from e
        self._realPortNumber = skt.getsockname()[1]
        self.connected = 1
        self.socket = skt
        self.fileno = skt.fileno  # type: ignore[method-assign]
        with contextlib.suppress(OSError):  # ENOENT: nothing received yet, as expected
            # The first SIOCGSTAMP makes the kernel keep each datagram's arrival time.
            fcntl.ioctl(skt.fileno(), SIOCGSTAMP, bytes(_TIMEVAL.size))

    def last_arrival(self) -> Optional[float]:
        """When the last datagram read from this port arrived (kernel time, time.time() scale)."""
        try:
            seconds, microseconds = _TIMEVAL.unpack(fcntl.ioctl(self.socket.fileno(), SIOCGSTAMP,
                                                                bytes(_TIMEVAL.size)))
        except (OSError, AttributeError):
            return None
        return seconds + microseconds * 1e-6

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        # As udp.Port's, less its log line.
        self._realPortNumber = None
        self.maxThroughput = -1
        base.BasePort.connectionLost(self, reason)
        self.protocol.doStop()
        self.socket.close()
        del self.socket
        del self.fileno

    def doRead(self) -> None:
        try:
            data, addr = self.socket.recvfrom(self.maxPacketSize)
        except OSError:
            return  # EAGAIN, or an ICMP error for an earlier send: nothing to read
        if self.addressFamily == socket.AF_INET6:
            addr = addr[:2]
        try:
            self.protocol.datagramReceived(data, addr)
        except Exception:
            log.failure("Unhandled error in a transfer with {client}", client=addr)

    def send(self, datagram: bytes, addr: Address) -> bool:
        """Send; False when the kernel dropped it (a full buffer is loss, which the engine repairs)."""
        try:
            self.socket.sendto(datagram, addr)
            return True
        except OSError:
            return False


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

