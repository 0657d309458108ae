"""Transfer sockets, all read by one reactor reader: the hot path without per-datagram framework cost.

A transfer has a UDP socket of its own (a fresh port, bound to the address
the request was sent to, not connected: a stranger's datagram must reach
the transfer to get ERROR 5). Handing each one to the reactor as a
`udp.Port` costs a framework dispatch per datagram and copies Twisted's
internals; instead every transfer socket is registered with one `epoll`
object of ours, and that epoll descriptor is the only thing the reactor
watches (`IReadDescriptor`, public API, the same on the default and the
asyncio reactor). When it turns readable, `doRead` takes one datagram from
each ready socket and hands it to its transfer, and polls again until
nothing is ready (bounded, so the listener and timers get their turn).

A long transfer (`open(..., peer=client)`) gets a second socket on the same
port, connected to its client: the kernel hands the client's datagrams to
that one (a connected socket matches them better) and everyone else's to the
first, which still answers strangers with ERROR 5. Connected, a datagram
needs no address either way and the kernel no route lookup per send: in a
boot storm's lock-step transfers, a sixth of the server's CPU.

A short transfer's socket, once it ends, is kept as a spare for the next one
(`spares`): no socket, bind, ioctl, epoll_ctl or close per small file.

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

from .logs import address
from .spares import SpareSockets
from .udp import Address, bind_address, is_ipv6

log = Logger(namespace="tftp_offload")

MAX_DATAGRAM = 65536
PASSES = 32
"""Polls of the epoll object per reactor turn at most; then the listener and timers get a turn."""

SPARE_LINGER = 0.25
"""Seconds spare sockets outlive the last transfer: then an idle server holds no descriptor (a storm's
clients ask again within milliseconds of their last transfer's end; a drain closes them at once)."""

PEER_SOCKET_BLOCKS = 32
"""A transfer of at least this many blocks (or of unknown length) gets a peer socket: setting it up
(a socket, two options, bind, connect, a few microseconds) is repaid at about half a microsecond a block."""

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
    `peer_socket`, for a long transfer, is the second socket on the port, connected to
    `peer` (the client): `send_all()` (always to the client) goes out through it, and
    what it receives is the client's.
    """

    __slots__ = ("socket", "protocol", "peer_socket", "peer", "local", "client", "_port", "_fd", "_peer_fd",
                 "_mux", "_v6", "_gso")

    def __init__(self, mux: "TransferSockets", skt: socket.socket, protocol: Any, port: int = 0,
                 local: str = "", client: Optional[Address] = None) -> None:
        self.socket: Optional[socket.socket] = skt
        self.local = local
        """The address bound (as `open()` was given it)."""
        self.client = client
        """Whom the transfer is with, if `open()` was told (a spare does not go back to it)."""
        self.protocol = protocol
        self.peer_socket: Optional[socket.socket] = None
        self.peer: Optional[Address] = None
        self._port = port
        """The bound port, once known: from --port-range at once, else asked of the kernel when wanted."""
        self._fd = skt.fileno()
        self._peer_fd = -1
        self._mux = mux
        self._v6 = skt.family == socket.AF_INET6
        self._gso = mux.gso

    @property
    def port(self) -> int:
        """The transfer's port (a system call the first time without --port-range: nothing per request asks)."""
        if not self._port and self.socket is not None:
            self._port = self.socket.getsockname()[1]
        return self._port

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
        skt = self.peer_socket
        if skt is None:
            skt = self.socket
            if skt is None:
                return 0
            if len(datagrams) > 2 and self._gso:
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
        if len(datagrams) > 2 and self._gso:
            return self._send_segmented(skt, datagrams, None)
        send = skt.send  # connected to the client (who `addr` is): no address to pass, no route to look up
        sent = 0
        try:
            for datagram in datagrams:
                send(datagram)
                sent += 1
        except OSError:
            pass
        return sent

    def _send_segmented(self, skt: socket.socket, datagrams: Sequence[bytes], addr: Optional[Address]) -> int:
        """A window of equal-size datagrams (the last may be shorter): the first alone, the rest in
        one system call per 64 KB.

        UDP generic segmentation offload (UDP_SEGMENT): the kernel, or the NIC,
        cuts the buffer into datagrams. Those reach the client together, at the
        end of the send, so the first goes ahead on its own: the client wakes and
        starts on the window while the kernel cuts the rest, instead of the two
        taking turns (a fifth more at windowsize 16 on loopback, no change at 64).
        Where it is refused (no checksum offload, an old kernel) this socket, and
        the server's next ones, fall back to one send per datagram.
        """
        try:
            if addr is None:  # the connected peer socket
                skt.send(datagrams[0])
            else:
                skt.sendto(datagrams[0], addr)
        except OSError:
            return 0
        size = len(datagrams[1])
        per = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size)
        count = len(datagrams)
        sent = 1
        while sent < count:
            group = datagrams[sent : sent + per]
            if per < 2 or len(group) == 1 or any(len(d) != size for d in group[:-1]) or len(group[-1]) > size:
                break  # not a run of equal sizes, or one left: the rest one by one
            try:
                control = [(socket.SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(size))]
                if addr is None:
                    skt.sendmsg([b"".join(group)], control)
                else:
                    skt.sendmsg([b"".join(group)], control, 0, addr)
            except OSError as e:
                if e.errno not in _GSO_REFUSED:
                    return sent  # a full buffer: the rest would fail too
                self._gso = self._mux.gso = False
                log.info("UDP segmentation offload refused ({error}): sending datagram by datagram",
                         error=e.strerror)
                break
            sent += len(group)
        try:
            if addr is None:
                for datagram in datagrams[sent:]:
                    skt.send(datagram)
                    sent += 1
            else:
                for datagram in datagrams[sent:]:
                    skt.sendto(datagram, addr)
                    sent += 1
        except OSError:
            pass
        return sent

    def last_arrival(self) -> Optional[float]:
        """When the client's last datagram read here arrived (kernel time, time.time() scale)."""
        if self.socket is None:
            return None
        try:
            fd = self._peer_fd if self._peer_fd >= 0 else self._fd
            seconds, microseconds = _TIMEVAL.unpack(fcntl.ioctl(fd, SIOCGSTAMP, _TIMEVAL_BYTES))
        except OSError:
            return None
        return seconds + microseconds * 1e-6

    def stopListening(self) -> None:
        """Close the socket (idempotent); nothing is read from it afterwards."""
        if self.socket is not None:
            self._mux._release(self)

    def read_one(self) -> bool:
        """Hand the protocol one datagram waiting here, now (the client's first); False if none was waiting."""
        return (self._peer_fd >= 0 and self.read_peer()) or self.read_stranger()

    def read_peer(self) -> bool:
        """One datagram from the connected peer socket: the client's, by the kernel's word."""
        try:
            data = self.peer_socket.recv(MAX_DATAGRAM)  # type: ignore[union-attr]
        except (OSError, AttributeError):
            return False  # EAGAIN, or an ICMP error for an earlier send (the client's port closed)
        try:
            self.protocol.datagramReceived(data, self.peer)
        except Exception:
            log.failure("Unhandled error in a transfer with {client}", client=self.peer)
        return True

    def read_stranger(self) -> bool:
        """One datagram from the unconnected socket: the client's, or (with a peer socket) a stranger's."""
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

    The epoll object exists only while a socket is open (a transfer's, or a
    spare's, `SPARE_LINGER` seconds at most after the last transfer): an idle
    server holds no descriptor and no reactor reader, and `close()` releases both.
    """

    def __init__(self, reactor: Any, port_range: Optional[Tuple[int, int]] = None, gso: bool = True) -> None:
        self.reactor = reactor
        self.port_range = port_range
        self._epoll: Optional[select.epoll] = None
        self._sockets: Dict[int, TransferSocket] = {}
        self._peers: Dict[int, TransferSocket] = {}
        """Peer sockets' descriptors, to their transfers."""
        self._in_read = False
        self.spares = SpareSockets()
        """Short transfers' sockets between transfers (none with `port_range`)."""
        self._linger: Any = None
        """The call that closes the spares, once no transfer is left (`_quiet`)."""
        self._used: Set[int] = set()
        self._cursor = port_range[0] if port_range else 0
        self.gso = gso
        """Send windows with UDP segmentation offload; cleared for good once the kernel refuses it."""

    # -- transfers --------------------------------------------------------------------------

    def open(self, local: str, protocol: Any, client: Optional[Address] = None,
             connect: bool = False) -> TransferSocket:
        """A socket bound to (local, a free port), read for `protocol` (a transfer with `client`) from now on.

        With `connect` (a long transfer), a second socket on the same port connected to
        `client` (`TransferSocket.peer_socket`); where the kernel refuses that, the one socket
        serves alone, as for a short transfer. A short one may get a spare (`spares`).
        """
        peer = client if connect else None
        spare = self.spares.take(local, client) if peer is None else None
        if spare is not None:  # bound, armed and in the epoll set already
            skt, port, _last = spare
            transfer = TransferSocket(self, skt, protocol, port, local, client)
            self._sockets[transfer._fd] = transfer
            return transfer
        family = socket.AF_INET6 if is_ipv6(local) else socket.AF_INET
        skt = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)  # non-blocking: no second syscall
        try:
            port = self._bind(skt, local)
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
        transfer = TransferSocket(self, skt, protocol, port, local, client)
        self._sockets[fd] = transfer
        if port:
            self._used.add(port)
        if peer is not None:
            self._connect_peer(transfer, skt, local, peer)
        return transfer

    def _connect_peer(self, transfer: TransferSocket, skt: socket.socket, local: str, peer: Address) -> None:
        """Give `transfer` its peer socket: the same (local, port), connected to `peer`.

        SO_REUSEPORT lets the two share the port. The first socket gets it only after its
        bind: had it been set before, the kernel's choice of a free port for another
        transfer (also bound to port 0 with it set) could fall on this one, shared between
        sockets of one user. So nothing else joins the port, which holds exactly these two.
        """
        twin = socket.socket(skt.family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            twin.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            twin.bind(bind_address(local, transfer.port))
            twin.connect(bind_address(*peer))
            fd = twin.fileno()
            try:  # noqa: SIM105  (as in open())
                fcntl.ioctl(fd, SIOCGSTAMP, _TIMEVAL_BYTES)
            except OSError:
                pass
            self._epoll.register(fd, _EPOLLIN)  # type: ignore[union-attr]
        except OSError as e:
            twin.close()
            log.debug("No connected socket for a transfer to {client}: {error}", client=address(*peer),
                      error=str(e))
            return
        transfer.peer_socket, transfer.peer, transfer._peer_fd = twin, peer, fd
        self._peers[fd] = transfer

    def _bind(self, skt: socket.socket, local: str) -> int:
        """Bind to a free port of `port_range` and return it, or to any port (returns 0: the kernel's choice)."""
        if self.port_range is None:
            skt.bind(bind_address(local, 0))  # a link-local address keeps its scope
            return 0
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
                return port
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
        twin, transfer.peer_socket = transfer.peer_socket, None
        if twin is None and self.port_range is None and self._epoll is not None \
                and self.spares.give(transfer.local, skt, transfer._port, transfer.client):
            if not self._sockets and not self._in_read:
                self._quiet()
            return  # a spare now, for the next short transfer
        self._used.discard(transfer._port)
        skt.close()  # which takes it out of the epoll set too (it is never duplicated): no epoll_ctl
        if twin is not None:
            self._peers.pop(transfer._peer_fd, None)
            transfer._peer_fd = -1
            twin.close()
        if not self._sockets and not self._in_read:
            self._quiet()

    def _quiet(self) -> None:
        """The last transfer ended: the spares wait `SPARE_LINGER` seconds for the next, then all goes.

        A storm's lock-step clients end a turn's transfers together and ask again after it, so
        the server is without a transfer between turns many times a second.
        """
        if not self.spares:
            self._idle()
        elif self._linger is None:
            self._linger = self.reactor.callLater(SPARE_LINGER, self._linger_over)

    def _linger_over(self) -> None:
        self._linger = None
        if not self._sockets:
            self._idle()

    def _idle(self) -> None:
        """No transfer left: close the spares, give back the reader and the epoll descriptor."""
        linger, self._linger = self._linger, None
        if linger is not None and linger.active():
            linger.cancel()
        self.spares.close()
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
        sockets, peers = self._sockets, self._peers
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
                    transfer = peers.get(fd)
                    if transfer is not None:
                        transfer.read_peer()
                        continue
                    transfer = sockets.get(fd)
                    if transfer is not None:
                        transfer.read_stranger()
                    else:
                        self.spares.read(fd)
        finally:
            self._in_read = False
        if not sockets:
            self._quiet()

    def connectionLost(self, reason: Any) -> None:
        """The reactor dropped us (it is shutting down, or the descriptor failed): close everything."""
        self._epoll_lost()

    def _epoll_lost(self) -> None:
        epoll, self._epoll = self._epoll, None
        for transfer in list(self._sockets.values()):
            transfer.stopListening()
        self.spares.close()
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
