"""The socket a transfer sends through and reads from: its own (`TransferSocket`), or the listener's.

A `TransferSocket` is one transfer's UDP socket, and for a long transfer a second
one on the same port connected to the client (`mux.py` opens them and reads them
all through one epoll object): sends (a window's first datagram alone, the rest in
segmentation-offload sends of up to 64 KB), reads handed to the transfer, and the
kernel's arrival time of the last datagram.
`ListenerTransfer` offers a transfer the same from the listening port itself
(`--single-port`).
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
from typing import TYPE_CHECKING, Any, Optional, Sequence

from twisted.logger import Logger

from .udp import Address, is_ipv6

if TYPE_CHECKING:
    from .mux import TransferSockets

log = Logger(namespace="tftp_offload")

MAX_DATAGRAM = 65536

UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # Linux >= 4.18; Python 3.11 lacks the constant
GSO_MAX_BYTES = 65000
"""Bytes per segmentation-offload send at most: the whole must fit in one IP datagram's length."""
GSO_MAX_SEGMENTS = 64
_GSO_REFUSED = frozenset((errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EMSGSIZE))
_SEGMENT_SIZE = struct.Struct("=H")

SIOCGSTAMP = 0x8906
_TIMEVAL = struct.Struct("@ll")
_TIMEVAL_BYTES = bytes(_TIMEVAL.size)


def arm_timestamps(fd: int) -> None:
    """Make the kernel keep each datagram's arrival time on `fd` (the first SIOCGSTAMP does that)."""
    try:  # noqa: SIM105  (not contextlib.suppress: its enter/exit cost 3% of a request when every transfer opened a socket)
        fcntl.ioctl(fd, SIOCGSTAMP, _TIMEVAL_BYTES)
    except OSError:
        pass  # ENOENT: nothing received yet, as expected


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
        # The address it was opened on says the family: `skt.family` builds an enum member through
        # Python code, about 7,000 instructions per transfer (2.5% of a small file's).
        self._v6 = is_ipv6(local) if local else skt.family == socket.AF_INET6
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
        control = [(socket.SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(size))]
        while sent < count:
            group = datagrams[sent : sent + per]
            if per < 2 or len(group) == 1 or any(len(d) != size for d in group[:-1]) or len(group[-1]) > size:
                break  # not a run of equal sizes, or one left: the rest one by one
            try:
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
