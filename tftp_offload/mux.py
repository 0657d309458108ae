"""Transfer sockets, all read by one reactor reader: the hot path without per-datagram framework cost.

A transfer has a UDP socket of its own (a fresh port, bound to the address
the request was sent to, never connected: a stranger's datagram must reach
the transfer to get ERROR 5). Handing each one to the reactor as a
`udp.Port` costs a framework dispatch per datagram and copies Twisted's
internals; instead every transfer socket is registered with one `epoll`
object of ours, and that epoll descriptor is the only thing the reactor
watches (`IReadDescriptor`, public API, the same on the default and the
asyncio reactor). When it turns readable, `doRead` takes one datagram from
each ready socket and hands it to its transfer, and polls again until
nothing is ready (bounded, so the listener and timers get their turn).

With `port_range`, every transfer port comes from that range (firewalls that
open only those); `open()` raises `PortsExhausted` when none is free.
"""

from __future__ import annotations

import errno
import fcntl
import select
import socket
import struct
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from .udp import Address, bind_address, is_ipv6

log = Logger(namespace="tftp_offload")

MAX_DATAGRAM = 65536
PASSES = 32
"""Polls of the epoll object per reactor turn at most; then the listener and timers get a turn."""

UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # Linux >= 4.18; Python 3.11 lacks the constant
GSO_MAX_BYTES = 65000
"""Bytes per segmentation-offload send at most: the whole must fit in one IP datagram's length."""
GSO_MAX_SEGMENTS = 64
_GSO_REFUSED = frozenset((errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EMSGSIZE))
_SEGMENT_SIZE = struct.Struct("=H")

SIOCGSTAMP = 0x8906
_TIMEVAL = struct.Struct("@ll")
_TIMEVAL_BYTES = bytes(_TIMEVAL.size)
_EPOLLIN = select.EPOLLIN


class PortsExhausted(Exception):
    """Every port of `--port-range` is in use: the request waits (is dropped; the ROM retries)."""


class TransferSocket:
    """One transfer's socket: `send()`, `send_all()`, `last_arrival()`, `stopListening()`.

    Its protocol is anything with `datagramReceived(data, addr)` (a `transfer.Transfer`).
    """

    __slots__ = ("socket", "protocol", "port", "_fd", "_mux", "_v6", "_gso")

    def __init__(self, mux: "TransferSockets", skt: socket.socket, protocol: Any) -> None:
        self.socket: Optional[socket.socket] = skt
        self.protocol = protocol
        self.port: int = skt.getsockname()[1]
        self._fd = skt.fileno()
        self._mux = mux
        self._v6 = skt.family == socket.AF_INET6
        self._gso = mux.gso

    def send(self, datagram: bytes, addr: Address) -> bool:
        """Send; False when the kernel dropped it (a full buffer is loss, which the engine repairs)."""
        try:
            self.socket.sendto(datagram, addr)  # type: ignore[union-attr]
            return True
        except (OSError, AttributeError):  # AttributeError: stopped
            return False

    def send_all(self, datagrams: Sequence[bytes], addr: Address) -> int:
        """Send in order, stopping at the first refusal (the rest would fail too); returns how many went.

        The unsent ones are loss, repaired by the engine's retransmission like any other.
        """
        skt = self.socket
        if skt is None:
            return 0
        count = len(datagrams)
        if count > 2 and self._gso:
            return self._send_segmented(skt, datagrams, addr)
        sendto = skt.sendto
        sent = 0
        try:
            for datagram in datagrams:
                sendto(datagram, addr)
                sent += 1
        except OSError:
            pass
        return sent

    def _send_segmented(self, skt: socket.socket, datagrams: Sequence[bytes], addr: Address) -> int:
        """A window of equal-size datagrams (the last may be shorter) in one system call per 64 KB.

        UDP generic segmentation offload (UDP_SEGMENT): the kernel, or the NIC,
        cuts the buffer into datagrams. Where it is refused (no checksum offload,
        an old kernel) this socket, and the server's next ones, fall back to one
        send per datagram.
        """
        size = len(datagrams[0])
        per = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size)
        count = len(datagrams)
        sent = 0
        while sent < count:
            group = datagrams[sent : sent + per]
            if per < 2 or any(len(d) != size for d in group[:-1]) or len(group[-1]) > size:
                break  # not a run of equal sizes: the rest one by one
            if len(group) == 1:
                break
            try:
                skt.sendmsg([b"".join(group)], [(socket.SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(size))], 0, addr)
            except OSError as e:
                if e.errno not in _GSO_REFUSED:
                    return sent  # a full buffer: the rest would fail too
                self._gso = self._mux.gso = False
                log.info("UDP segmentation offload refused ({error}): sending datagram by datagram",
                         error=e.strerror)
                break
            sent += len(group)
        sendto = skt.sendto
        try:
            for datagram in datagrams[sent:]:
                sendto(datagram, addr)
                sent += 1
        except OSError:
            pass
        return sent

    def last_arrival(self) -> Optional[float]:
        """When the last datagram read from this socket arrived (kernel time, time.time() scale)."""
        if self.socket is None:
            return None
        try:
            seconds, microseconds = _TIMEVAL.unpack(fcntl.ioctl(self._fd, SIOCGSTAMP, _TIMEVAL_BYTES))
        except OSError:
            return None
        return seconds + microseconds * 1e-6

    def stopListening(self) -> None:
        """Close the socket (idempotent); nothing is read from it afterwards."""
        if self.socket is not None:
            self._mux._release(self)

    def read_one(self) -> bool:
        """Hand the protocol one datagram waiting at this socket, now; False if none was waiting."""
        try:
            data, addr = self.socket.recvfrom(MAX_DATAGRAM)  # type: ignore[union-attr]
        except (OSError, AttributeError):
            return False  # EAGAIN, or an ICMP error for an earlier send: nothing to read
        if self._v6:
            addr = addr[:2]
        try:
            self.protocol.datagramReceived(data, addr)
        except Exception:
            log.failure("Unhandled error in a transfer with {client}", client=addr)
        return True

    def __repr__(self) -> str:
        return f"<TransferSocket port {self.port}{'' if self.socket else ' closed'}>"


@implementer(IReadDescriptor)
class TransferSockets:
    """Every transfer socket of one server, and the single reactor reader that reads them.

    The epoll object exists only while a socket is open: an idle server
    holds no descriptor and no reactor reader, and `close()` releases both.
    """

    def __init__(self, reactor: Any, port_range: Optional[Tuple[int, int]] = None, gso: bool = True) -> None:
        self.reactor = reactor
        self.port_range = port_range
        self._epoll: Optional[select.epoll] = None
        self._sockets: Dict[int, TransferSocket] = {}
        self._in_read = False
        self._used: Set[int] = set()
        self._cursor = port_range[0] if port_range else 0
        self.gso = gso
        """Send windows with UDP segmentation offload; cleared for good once the kernel refuses it."""

    # -- transfers --------------------------------------------------------------------------

    def open(self, local: str, protocol: Any) -> TransferSocket:
        """A socket bound to (local, a free port), read for `protocol` from now on."""
        family = socket.AF_INET6 if is_ipv6(local) else socket.AF_INET
        skt = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)  # non-blocking: no second syscall
        try:
            self._bind(skt, local)
            fd = skt.fileno()
            try:  # noqa: SIM105  (not contextlib.suppress: per request, its enter/exit cost 3% of one)
                # The first SIOCGSTAMP makes the kernel keep each datagram's arrival time.
                fcntl.ioctl(fd, SIOCGSTAMP, _TIMEVAL_BYTES)
            except OSError:
                pass  # ENOENT: nothing received yet, as expected
            epoll = self._epoll
            if epoll is None:
                epoll = self._epoll = select.epoll()
                self.reactor.addReader(self)
            epoll.register(fd, _EPOLLIN)
        except BaseException:
            skt.close()
            raise
        transfer = TransferSocket(self, skt, protocol)
        self._sockets[transfer._fd] = transfer
        if self.port_range:
            self._used.add(transfer.port)
        return transfer

    def _bind(self, skt: socket.socket, local: str) -> None:
        if self.port_range is None:
            skt.bind(bind_address(local, 0))  # a link-local address keeps its scope
            return
        low, high = self.port_range
        size = high - low + 1
        if len(self._used) >= size:
            raise PortsExhausted(f"all {size} ports of --port-range {low}:{high} are in use")
        for _ in range(size):
            port = self._cursor
            self._cursor = low if port >= high else port + 1
            if port in self._used:
                continue
            try:
                skt.bind(bind_address(local, port))
                return
            except OSError as e:
                if e.errno != errno.EADDRINUSE:  # in use by another process: try the next one
                    raise
        raise PortsExhausted(f"no free port in --port-range {low}:{high}")

    def exhausted(self) -> bool:
        """True when `open()` is sure to fail for want of a port of `port_range`."""
        return self.port_range is not None and len(self._used) > self.port_range[1] - self.port_range[0]

    def sockets(self) -> List[TransferSocket]:
        return list(self._sockets.values())

    def __len__(self) -> int:
        return len(self._sockets)

    def _release(self, transfer: TransferSocket) -> None:
        skt, transfer.socket = transfer.socket, None
        if skt is None:
            return
        self._sockets.pop(transfer._fd, None)
        self._used.discard(transfer.port)
        if self._epoll is not None:
            try:  # noqa: SIM105  (per transfer, as above)
                self._epoll.unregister(transfer._fd)
            except (OSError, ValueError):
                pass
        skt.close()
        if not self._sockets and not self._in_read:
            self._idle()

    def _idle(self) -> None:
        """No socket left: give back the reader and the epoll descriptor."""
        epoll = self._epoll
        if epoll is not None:
            self.reactor.removeReader(self)  # while fileno() still names the descriptor
            self._epoll = None
            epoll.close()

    def close(self) -> None:
        """Close every transfer socket and the epoll descriptor (the transfers are not told)."""
        for transfer in list(self._sockets.values()):
            transfer.stopListening()
        self._idle()

    # -- IReadDescriptor ----------------------------------------------------------------------

    def fileno(self) -> int:
        return self._epoll.fileno() if self._epoll is not None else -1

    def logPrefix(self) -> str:
        return "tftp-transfers"

    def doRead(self) -> None:
        sockets = self._sockets
        self._in_read = True
        try:
            for _ in range(PASSES):
                # Looked up on every pass: a transfer ending in here can end the reactor's run too
                # (the last transfer of a drain), whose connectionLost() closes the epoll object.
                epoll = self._epoll
                if epoll is None:
                    return
                ready = epoll.poll(0)
                if not ready:
                    break
                for fd, _events in ready:
                    transfer = sockets.get(fd)
                    if transfer is not None:
                        transfer.read_one()
        finally:
            self._in_read = False
        if not sockets:
            self._idle()

    def connectionLost(self, reason: Any) -> None:
        """The reactor dropped us (it is shutting down, or the descriptor failed): close everything."""
        self._epoll_lost()

    def _epoll_lost(self) -> None:
        epoll, self._epoll = self._epoll, None
        for transfer in list(self._sockets.values()):
            transfer.stopListening()
        if epoll is not None:
            epoll.close()


class ListenerTransfer:
    """A transfer served from the listening port itself (`--single-port`), told apart by the client.

    What a `TransferSocket` offers a transfer, for firewalls and NAT that let
    only port 69 through (dnsmasq's --tftp-single-port): replies leave from the
    listener, from the address the request was sent to, and the server hands
    the transfer what the client sends to the listener.
    """

    __slots__ = ("listener", "wire_client", "local", "arrived", "_open")

    def __init__(self, listener: Any, wire_client: Address, local: str) -> None:
        self.listener = listener
        self.wire_client = wire_client
        self.local = local
        self.arrived: Optional[float] = None
        self._open = True

    def send(self, datagram: bytes, addr: Address) -> bool:
        if self._open:
            self.listener.reply(datagram, self.wire_client, self.local)
        return self._open

    def send_all(self, datagrams: Sequence[bytes], addr: Address) -> int:
        if not self._open:
            return 0
        return int(self.listener.reply_all(datagrams, self.wire_client, self.local))

    def last_arrival(self) -> Optional[float]:
        return self.arrived

    def stopListening(self) -> None:
        self._open = False
