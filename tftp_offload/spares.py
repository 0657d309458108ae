"""Spare transfer sockets: a short transfer's socket kept, bound and watched, for the next transfer.

A boot storm's small files each need a port for a fraction of a millisecond.
Making one (`socket`, `bind`, the timestamp `ioctl`, `epoll_ctl`) and closing it
is five system calls of a small transfer's dozen. A spare is a socket whose
transfer has ended, still bound to its port and in `TransferSockets`' epoll set:
the next transfer to the same local address takes it (oldest first, so a port
rests as long as the pool allows before it is used again). What arrives at a
spare (a client's late duplicate of its final ACK, say) is read and dropped when
the epoll set says so, as a closed port would drop it; one that arrives in the
moment before the next transfer takes the socket reaches that transfer as a
stranger's, and its sender gets ERROR 5 (an empty read to be sure of nothing
waiting would cost each small transfer a failed system call and its exception,
a twentieth of its time). A spare is
never handed to the client whose transfer it served last: a ROM that asks for
its next file from the same port would otherwise meet its old transfer's ID
pair again, where a late datagram of the old transfer passes for the new one's
(RFC 1350 chooses transfer IDs afresh for that reason).

Only sockets without a peer socket and without `--port-range` become spares (a
range's ports are counted out one by one), and `TransferSockets` closes them
all when its last transfer ends: an idle server holds no socket, as before.
"""

from __future__ import annotations

import socket
from typing import Dict, Optional, Tuple

from .udp import Address

SPARE_SOCKETS = 64
"""Spare sockets at most (per server): more than a storm's small transfers in flight at once."""

DRAIN_READS = 64
"""Datagrams read from a spare at once at most (a flood aimed at one waits for the next turn)."""

Spare = Tuple[socket.socket, int, Optional[Address]]
"""A spare socket, its port (0: not asked of the kernel yet) and the client it served last."""


class SpareSockets:
    """Spares by local address, oldest first."""

    def __init__(self, limit: int = SPARE_SOCKETS) -> None:
        self.limit = limit
        self._by_local: Dict[str, Dict[int, Spare]] = {}
        self._local_of: Dict[int, str] = {}
        """Every spare's descriptor, to its local address."""

    def take(self, local: str, client: Optional[Address]) -> Optional[Spare]:
        """The oldest spare bound to `local` that did not serve `client` last; None if there is none."""
        spares = self._by_local.get(local)
        if not spares:
            return None
        for fd in spares:  # oldest first
            spare = spares[fd]
            if client is None or spare[2] != client:
                del spares[fd], self._local_of[fd]  # and no more iterating
                return spare
        return None

    def give(self, local: str, skt: socket.socket, port: int, client: Optional[Address]) -> bool:
        """Keep `skt` (bound to `local`, `port`; its transfer was with `client`) for a later transfer;
        False when the pool is full."""
        if len(self._local_of) >= self.limit:
            return False
        fd = skt.fileno()
        self._by_local.setdefault(local, {})[fd] = (skt, port, client)
        self._local_of[fd] = local
        return True

    def read(self, fd: int) -> bool:
        """Drop what waits on spare `fd` (the epoll set said it is readable); False if `fd` is no spare."""
        local = self._local_of.get(fd)
        if local is None:
            return False
        drain(self._by_local[local][fd][0], DRAIN_READS)
        return True

    def close(self) -> None:
        """Close every spare."""
        for spares in self._by_local.values():
            for skt, _port, _client in spares.values():
                skt.close()
        self._by_local.clear()
        self._local_of.clear()

    def __len__(self) -> int:
        return len(self._local_of)


def drain(skt: socket.socket, reads: int) -> None:
    """Read and drop up to `reads` datagrams waiting on `skt` (non-blocking)."""
    recv = skt.recv
    for _ in range(reads):
        try:
            recv(1)
        except OSError:
            return  # EAGAIN: nothing left (or an ICMP error for an earlier send, now consumed)
