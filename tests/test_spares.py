"""The spare-socket pool on its own: bounded, oldest first, emptied of what waits, closed for good."""

from __future__ import annotations

import select
import socket
from typing import List

from tftp_offload.spares import SpareSockets


def bound(n: int) -> List[socket.socket]:
    sockets = []
    for _ in range(n):
        skt = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        skt.bind(("127.0.0.1", 0))
        sockets.append(skt)
    return sockets


def test_bounded_and_oldest_first() -> None:
    pool = SpareSockets(limit=2)
    a, b, c = bound(3)
    assert pool.give("127.0.0.1", a, 0, ("127.0.0.1", 1)) and pool.give("127.0.0.1", b, 0, None)
    assert not pool.give("127.0.0.1", c, 0, None) and len(pool) == 2
    assert pool.take("::1", None) is None  # another local address has none
    assert pool.take("127.0.0.1", ("127.0.0.1", 1)) == (b, 0, None)  # a's last client asks: not a
    assert pool.take("127.0.0.1", ("127.0.0.1", 1)) is None
    assert pool.take("127.0.0.1", ("127.0.0.1", 2)) == (a, 0, ("127.0.0.1", 1))
    assert len(pool) == 0
    for skt in (a, b, c):
        skt.close()


def test_what_waits_on_a_spare_is_dropped() -> None:
    pool = SpareSockets()
    (skt,) = bound(1)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        pool.give("127.0.0.1", skt, 0, None)
        for n in range(3):
            sender.sendto(b"stale %d" % n, skt.getsockname())
        select.select([skt], [], [], 5)
        assert pool.read(skt.fileno()) and not pool.read(-5)
        try:
            skt.recv(100)
            raise AssertionError("a datagram was left waiting")
        except BlockingIOError:
            pass
        assert pool.take("127.0.0.1", None) is not None
    finally:
        sender.close()
        skt.close()


def test_close_closes_every_spare() -> None:
    pool = SpareSockets()
    sockets = bound(3)
    for skt in sockets:
        pool.give("127.0.0.1", skt, 0, None)
    pool.close()
    assert len(pool) == 0 and all(skt.fileno() == -1 for skt in sockets)


def test_the_bounds_docs_operations_states() -> None:
    """docs/operations.md: a short transfer's socket is kept, 64 at most, a quarter second after the last ends."""
    from pathlib import Path

    from tftp_offload import mux, spares

    text = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    assert spares.SPARE_SOCKETS == 64 and mux.SPARE_LINGER == 0.25
    assert "64 at most, until a quarter of a second after the last transfer\nends, or the drain on stop" in text
