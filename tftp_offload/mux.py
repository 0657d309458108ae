"""Transfer sockets, all read by one reactor reader: the hot path without per-datagram framework cost.

(What one socket does, sending and reading, is `transfer_socket.py`; opening and reading them all, here.)

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

A long transfer (`open(..., connect=True)`) gets a second socket on the same
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
import select
import socket
from typing import Any, Dict, List, Optional, Set, Tuple

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from .logs import address
from .spares import SpareSockets
from .transfer_socket import TransferSocket, arm_timestamps
from .udp import Address, bind_address, is_ipv6

log = Logger(namespace="tftp_offload")

PASSES = 32
"""Polls of the epoll object per reactor turn at most; then the listener and timers get a turn."""

SPARE_LINGER = 0.25
"""Seconds spare sockets outlive the last transfer: then an idle server holds no descriptor (a storm's
clients ask again within milliseconds of their last transfer's end; a drain closes them at once)."""

PEER_SOCKET_BLOCKS = 32
"""A transfer of at least this many blocks (or of unknown length) gets a peer socket: setting it up
(a socket, two options, bind, connect, a few microseconds) is repaid at about half a microsecond a block."""

_EPOLLIN = select.EPOLLIN


class PortsExhausted(Exception):
    """Every port of `--port-range` is in use: the request waits (is dropped; the ROM retries)."""


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
            arm_timestamps(fd)
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
            arm_timestamps(fd)
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
