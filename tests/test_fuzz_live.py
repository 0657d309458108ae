"""100,000 random and mutated datagrams at a real twistd process, to its listening port and to live
transfer ports: correct files are served during and after, no traceback, RSS within the bound.

The fuzz comes from 127.0.0.2-5 (the per-client limits are per address, and
the checks run from 127.0.0.1, as a legitimate client beside an attacker
would). It is sent as fast as one thread can, paced only so that the whole run
stays bounded (FUZZ_SECONDS); what the server cannot read in time the kernel
drops, as on a real network.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import time
from typing import Dict, List, Tuple

from tests.support import tftp_client
from tests.support.abuse import RSS_LIMIT_MB, fetch_time, rss_mb
from tests.support.harness import StartServer, TwistdServer

FUZZ_COUNT = 100_000
FUZZ_SECONDS = 60.0
FUZZ_RATE = 10_000
"""Datagrams a second at most: about what one core's server reads while serving, so most are read."""
FUZZERS = [f"127.0.0.{i}" for i in range(2, 6)]
CHECK_EVERY = 20_000
WARM_UP = 20_000
"""RSS after this many is the reference for growth: the first ones warm the process up (code paths
first taken, the allocator's pools), which is no leak."""

Address = Tuple[str, int]

ABSURD_OPTIONS = [
    ("blksize", "0"), ("blksize", "7"), ("blksize", "65465"), ("blksize", "65464"), ("windowsize", "64"),
    ("blksize", "99999999999999999999"),
    ("blksize", "-1"), ("blksize", "0x10"), ("blksize", " 512"), ("blksize", "١٢٣"), ("windowsize", "0"),
    ("windowsize", "65536"), ("tsize", "-5"), ("tsize", "1" * 400), ("timeout", "0"), ("timeout", "256"),
    ("timeout", "nan"), ("rollover", "7"), ("BLKSIZE", "1468"), ("", ""), ("x" * 300, "y" * 300),
]


def request(rng: random.Random, name: bytes) -> bytes:
    options = {}
    for _ in range(rng.choice([0, 1, 2, 3, 40])):
        key, value = rng.choice(ABSURD_OPTIONS)
        options[key] = value
    mode = rng.choice([b"octet", b"netascii", b"OCTET", b"mail", b"", b"\xff"])
    body = name + b"\0" + mode + b"\0" + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in options.items())
    return struct.pack("!H", rng.choice([1, 1, 1, 2])) + body


NAMES = [b"1k.bin", b"hello.txt", b"1m.bin", b"sub/inner.bin", b"../../etc/passwd", b"/etc/passwd",
         b"escape", b"sub\\..\\..\\x", b"missing", b"caf\xc3\xa9.txt", b"\xff\xfe", b"a" * 2000, b"%2e%2e/x"]


def valid(rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return request(rng, rng.choice(NAMES))
    if kind == 1:
        return struct.pack("!HH", 4, rng.randrange(65536))  # ACK
    if kind == 2:
        return struct.pack("!HH", 3, rng.randrange(65536)) + rng.randbytes(rng.choice([0, 1, 511, 512, 1468]))
    if kind == 3:
        return struct.pack("!HH", 5, rng.randrange(10)) + rng.randbytes(rng.randrange(40)) + b"\0"
    return b"\0\6" + b"blksize\0" + str(rng.randrange(100000)).encode() + b"\0"  # an OACK, at a server


def mutate(rng: random.Random, datagram: bytes) -> bytes:
    data = bytearray(datagram)
    how = rng.randrange(6)
    if how == 0 and data:  # flip bits
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == 1:  # truncate
        del data[rng.randrange(len(data) + 1):]
    elif how == 2:  # wrong opcode
        data[0:2] = struct.pack("!H", rng.choice([0, 6, 7, 9, 255, 256, 65535]))
    elif how == 3:  # oversized
        data += rng.randbytes(rng.choice([600, 9000, 65000]))
    elif how == 4:  # NULs removed or added
        data = bytearray(bytes(data).replace(b"\0", b"", 1) if rng.random() < 0.5 else bytes(data) + b"\0" * 5)
    return bytes(data)


def fuzz_datagram(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.3:
        return rng.randbytes(rng.choice([0, 1, 2, 3, 4, 5, 20, 100, 516]))
    if roll < 0.5:
        return valid(rng)
    return mutate(rng, valid(rng))


class LiveTransfers:
    """Transfers the fuzzers keep open: their ports get fuzz from their own client and from strangers."""

    def __init__(self, server: TwistdServer, sockets: List[socket.socket], rng: random.Random) -> None:
        self.server = server
        self.sockets = sockets
        self.rng = rng
        self.ports: Dict[socket.socket, Address] = {}

    def refresh(self) -> None:
        """Start a transfer from each fuzz socket that has none (they end by give-up or fuzz)."""
        for sock in self.sockets:
            sock.sendto(tftp_client.rrq(b"1m.bin", options={"blksize": "1024", "windowsize": "4"}),
                        ("127.0.0.1", self.server.port))
        time.sleep(0.05)
        self.ports.clear()
        for sock in self.sockets:
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                while True:
                    datagram, addr = sock.recvfrom(70000)
                    if addr[1] != self.server.port and tftp_client.opcode_of(datagram) in (3, 6):
                        self.ports[sock] = (addr[0], addr[1])

    def target(self) -> Tuple[socket.socket, Address]:
        sock, port = self.rng.choice(list(self.ports.items()))
        if self.rng.random() < 0.5:  # a stranger to that transfer
            sock = self.rng.choice(self.sockets)
        return sock, port


def drain(sockets: List[socket.socket]) -> None:
    for sock in sockets:
        with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
            for _ in range(10_000):
                sock.recv(70000)


def test_fuzz_a_live_server(twistd_factory: StartServer) -> None:
    server = twistd_factory("--give-up", "3", "--timeout", "0.5", hosts=["127.0.0.1"])
    rng = random.Random(13)
    sockets: List[socket.socket] = []
    for host in FUZZERS:
        for _ in range(8):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((host, 0))
            sock.setblocking(False)
            sockets.append(sock)
    transfers = LiveTransfers(server, sockets, rng)
    fetch_time(server)
    idle = rss_mb(server.pid)
    peak = warm = idle
    sent, to_transfers, checks = 0, 0, []
    listening = ("127.0.0.1", server.port)
    try:
        start = time.monotonic()
        transfers.refresh()
        while sent < FUZZ_COUNT:
            assert time.monotonic() - start < FUZZ_SECONDS, f"fuzzing took over {FUZZ_SECONDS} s ({sent} sent)"
            for _ in range(500):
                datagram = fuzz_datagram(rng)
                if transfers.ports and rng.random() < 0.5:
                    sock, target = transfers.target()
                    to_transfers += 1
                else:
                    sock, target = rng.choice(sockets), listening
                with contextlib.suppress(OSError):  # a full buffer, or an ICMP error for an earlier send
                    sock.sendto(datagram, target)
                sent += 1
            time.sleep(max(0.0, start + sent / FUZZ_RATE - time.monotonic()))
            if sent % 5000 == 0:
                drain(sockets)
                transfers.refresh()
                peak = max(peak, rss_mb(server.pid))
            if sent % CHECK_EVERY == 0:
                checks.append(fetch_time(server, b"1k.bin"))
            if sent == WARM_UP:
                warm = rss_mb(server.pid)
        elapsed = time.monotonic() - start
    finally:
        for sock in sockets:
            sock.close()
    time.sleep(4)  # --give-up 3: the fuzzers' transfers end
    after_fetch = fetch_time(server, b"1m.bin")
    after = rss_mb(server.pid)
    print(f"fuzzed {sent} datagrams ({to_transfers} to live transfer ports) in {elapsed:.1f}s: RSS idle "
          f"{idle:.1f} MB, after {WARM_UP} {warm:.1f} MB, peak {peak:.1f} MB, after {after:.1f} MB; "
          f"fetches during {checks}, after {after_fetch:.2f}s")
    assert sent >= FUZZ_COUNT and to_transfers >= FUZZ_COUNT // 4
    assert peak < RSS_LIMIT_MB and after < RSS_LIMIT_MB
    assert after <= warm * 1.1, (warm, after)
    assert max(checks) < 5
    server.assert_healthy()
