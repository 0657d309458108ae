"""Abuse limits against a real twistd process on loopback, with the issue's measured attacks as tests.

The attacker sends from 127.0.0.2 (many ports), the legitimate client from
127.0.0.1: the limits are per client address. Every flood is bounded in count
and time. Memory is read from /proc (VmRSS) of the twistd process itself.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Callable, Iterator, List, Tuple

import pytest

from tests.support import tftp_client
from tests.support.abuse import CLIENT, RSS_LIMIT_MB, fds, fetch_time, rss_mb
from tests.support.harness import StartServer, TwistdServer

ATTACKER = "127.0.0.2"
Maker = Callable[..., List[socket.socket]]
@pytest.fixture
def attacker_sockets() -> Iterator[Maker]:
    made: List[socket.socket] = []

    def make(count: int, host: str = ATTACKER) -> List[socket.socket]:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            sock.bind((host, 0))
            sock.setblocking(False)
            made.append(sock)
        return made[-count:]

    yield make
    for sock in made:
        sock.close()


def drain_replies(socks: List[socket.socket]) -> List[bytes]:
    got: List[bytes] = []
    for sock in socks:
        with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
            while True:
                got.append(sock.recv(70000))
    return got


def server_on_v4(twistd_factory: StartServer, *args: str) -> TwistdServer:
    return twistd_factory("--give-up", "3", *args, hosts=[CLIENT])


def test_one_source_cannot_hold_every_session(twistd_factory: StartServer, attacker_sockets: Maker) -> None:
    """Measured: 2,000 RRQs from one address (never ACKed) held all 1,000 sessions; another client
    timed out after 20 s. Now that address gets --max-sessions-per-client of them (100).

    --max-sessions 300 and 400 attacking ports: without the per-client cap they would hold every
    session (checked: the other client then times out)."""
    server = server_on_v4(twistd_factory, "--give-up", "20", "--max-sessions", "300")
    socks = attacker_sockets(400)
    names = [b"1m.bin", b"1k.bin", b"hello.txt", b"sub/inner.bin", b"1m.bin"]
    for round_, name in enumerate(names):
        for sock in socks:
            sock.sendto(tftp_client.rrq(name, options={"blksize": str(512 + round_)}), (CLIENT, server.port))
    time.sleep(0.3)
    waited = fetch_time(server)
    print(f"2,000 RRQs from one address over 400 ports: another client served in {waited:.3f}s")
    assert waited < 2.0
    log = server.log()
    assert "--max-sessions-per-client" in log
    server.assert_healthy()


def rrq_flood(server: TwistdServer, socks: List[socket.socket], count: int, per_second: float,
              every: int = 0) -> Tuple[float, float, List[float]]:
    """`count` RRQs (never ACKed) at `per_second` from `socks` in turn; every `every` of them a legitimate
    fetch is timed. Returns (seconds taken, peak RSS, fetch times)."""
    sent, peak, waits = 0, rss_mb(server.pid), []
    request = tftp_client.rrq(b"1m.bin", options={"blksize": "1468", "tsize": "0"})
    start = time.monotonic()
    while sent < count and time.monotonic() - start < 3 * count / per_second:
        for sock in socks[sent % len(socks):][:100]:
            with contextlib.suppress(OSError):
                sock.sendto(request, (CLIENT, server.port))
            sent += 1
        time.sleep(max(0.0, start + sent / per_second - time.monotonic()))
        if every and sent % every < 100:
            drain_replies(socks)
            peak = max(peak, rss_mb(server.pid))
            waits.append(fetch_time(server))
    elapsed = time.monotonic() - start
    drain_replies(socks)
    assert sent >= count
    return elapsed, max(peak, rss_mb(server.pid)), waits


def settle(server: TwistdServer, baseline: int, timeout: float = 20) -> None:
    """Wait until the server holds no more descriptors than `baseline` (its abandoned transfers have
    given up: with --give-up 3 the last retransmission timer may fire up to 7 s after the last ACK)."""
    end = time.monotonic() + timeout
    while fds(server.pid) > baseline:
        assert time.monotonic() < end, f"{fds(server.pid)} descriptors open, {baseline} before"
        time.sleep(0.2)


def test_flood_of_requests_from_one_source(twistd_factory: StartServer, attacker_sockets: Maker) -> None:
    """Measured: during 20,000 RRQs in 10 s a legitimate fetch waited 6-12 s. Now under 2 s, RSS stays
    under the bound during the flood and comes back near idle after it.

    "Idle" is taken after a first, small flood (2,000 RRQs) has warmed the process up (code paths
    first run, the allocator's pools): growth from there on is what a leak would be."""
    server = server_on_v4(twistd_factory)
    socks = attacker_sockets(500)
    started = rss_mb(server.pid)
    idle_fds = fds(server.pid)
    rrq_flood(server, socks, 2000, 2000)
    settle(server, idle_fds)  # --give-up 3: the warm-up's sessions end
    fetch_time(server)
    idle = rss_mb(server.pid)
    elapsed, peak, waits = rrq_flood(server, socks, 20_000, 2000, every=4000)
    assert elapsed < 15
    settle(server, idle_fds)  # every transfer port closed again
    fetch_time(server)
    after = rss_mb(server.pid)
    print(f"20,000 RRQs in {elapsed:.1f}s: RSS at start {started:.1f} MB, idle {idle:.1f} MB, "
          f"peak {peak:.1f} MB, after {after:.1f} MB; legitimate fetches took {['%.2f' % w for w in waits]} s")
    assert max(waits) < 2.0, waits
    assert peak < RSS_LIMIT_MB, peak
    assert after <= idle * 1.1, (idle, after)
    server.assert_healthy()


@pytest.mark.parametrize("kind", ["wrq", "missing", "traversal"])
def test_error_replies_are_one_budget(twistd_factory: StartServer, attacker_sockets: Maker, kind: str) -> None:
    """Measured: 10,000 WRQs of 10 bytes got 10,000 replies of 63 bytes (6.3x); RRQs for `..` names
    3.55x, for missing files 1.9x. Now every ERROR from the listening port larger than the datagram
    it answers spends one budget; smaller ones (File not found to a longer RRQ) amplify nothing."""
    from tftp_offload.guard import ERROR_REPLIES_PER_SECOND

    server = server_on_v4(twistd_factory)
    # Several source addresses, as a spoofer would use: the per-client rate alone would not do.
    socks = [*attacker_sockets(20, "127.0.0.2"), *attacker_sockets(20, "127.0.0.3"),
             *attacker_sockets(20, "127.0.0.4")]
    datagram = {"wrq": tftp_client.request(2, b"x", b"octet"), "missing": tftp_client.rrq(b"no-such-file"),
                "traversal": tftp_client.rrq(b"../../../../etc/passwd")}[kind]
    start = time.monotonic()
    replies: List[bytes] = []
    for i in range(10_000):
        with contextlib.suppress(OSError):
            socks[i % len(socks)].sendto(datagram, (CLIENT, server.port))
        if i % 500 == 499:
            time.sleep(0.002)
            replies += drain_replies(socks)
    elapsed = time.monotonic() - start
    time.sleep(0.5)
    replies += drain_replies(socks)
    errors = [r for r in replies if tftp_client.opcode_of(r) == tftp_client.ERROR]
    budget = ERROR_REPLIES_PER_SECOND * (1 + elapsed + 0.5)
    amplification = sum(map(len, replies)) / (10_000 * len(datagram))
    print(f"{kind}: 10,000 x {len(datagram)} bytes in {elapsed:.2f}s got {len(errors)} ERRORs, "
          f"amplification {amplification:.3f}")
    assert len([r for r in errors if len(r) > len(datagram)]) <= budget
    assert amplification < 1
    # and the log did not get a line per datagram
    assert server.log().count("\n") < 500
    assert fetch_time(server) < 3
    server.assert_healthy()


def test_allow_serves_only_listed_networks(twistd_factory: StartServer) -> None:
    """--allow: a dual-stack socket sees 127.0.0.2 as ::ffff:127.0.0.2, matched as IPv4."""
    server = twistd_factory("--allow", "127.0.0.2/32", "--allow", "::1/128", hosts=["::"], ready=["::1"])
    with tftp_client.udp_socket("127.0.0.1") as sock:
        sock.settimeout(1.0)
        sock.sendto(tftp_client.rrq(b"hello.txt"), ("127.0.0.1", server.port))
        with pytest.raises(socket.timeout):
            sock.recvfrom(70000)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.bind(("127.0.0.2", 0))
        sock.settimeout(3)
        sock.sendto(tftp_client.rrq(b"hello.txt"), ("127.0.0.1", server.port))
        reply, transfer = sock.recvfrom(70000)
        assert tftp_client.opcode_of(reply) == tftp_client.DATA
        assert reply[4:] == (server.root / "hello.txt").read_bytes()
        sock.sendto(tftp_client.ack(1), transfer)
    time.sleep(0.2)
    assert "127.0.0.1" in server.log() and "not on an --allow network" in server.log()
    server.assert_healthy()


def test_unacked_big_windows_do_not_run_up_memory(twistd_factory: StartServer, attacker_sockets: Maker) -> None:
    """Measured: 1,000 RRQs asking blksize 65464 windowsize 64, never ACKed, took RSS to 1.1 GB."""
    server = twistd_factory("--give-up", "5", "--max-sessions-per-client", "0",
                            "--max-requests-per-second-per-client", "0", hosts=[CLIENT])
    (server.root / "1m.bin").stat()
    idle = rss_mb(server.pid)
    socks = attacker_sockets(1000)
    for sock in socks:
        sock.sendto(tftp_client.rrq(b"1m.bin", options={"blksize": "65464", "windowsize": "64"}),
                    (CLIENT, server.port))
    peak = idle
    for _ in range(20):
        time.sleep(0.1)
        drain_replies(socks)
        peak = max(peak, rss_mb(server.pid))
    print(f"1,000 unACKed 64 x 65464 requests: RSS idle {idle:.1f} MB, peak {peak:.1f} MB")
    assert peak < RSS_LIMIT_MB, f"RSS {peak:.0f} MB: the first window must not be read before ACK 0"
    server.assert_healthy()
