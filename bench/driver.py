#!/usr/bin/env python3
"""The driver's own cost per small-file request, without sockets: a benchmark, not a test.

One request is what a boot storm's small files are: RRQ (blksize, tsize) -> OACK -> ACK 0 ->
DATA 1 -> ACK 1 -> the transfer-end line, through the real `TFTPServer`, `Session`, `Transfer`,
engine, directory backend (a real 1 KiB file) and text log observer (writing to /dev/null), on a
`task.Clock`, 50 requests in flight together (-c) as in bench/run's small-file row. The listener
and the transfer sockets are stand-ins that send nothing, so what is measured is our Python per
request (plus the backend's lstat; the file has settled and is served from memory), not the kernel's UDP:
the figure to watch when changing the per-request path, steadier than a load run on a shared
machine. Compare two checkouts with PYTHONPATH:

  .venv/bin/python bench/driver.py [--quiet] [--profile] [-n 20000] [-c 50]
  PYTHONPATH=../old .venv/bin/python bench/driver.py      # an older checkout, same venv
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from typing import Any, List, Sequence, Tuple

from twisted.internet.task import Clock
from twisted.logger import globalLogBeginner

from tftp_offload import logs
from tftp_offload.backends.directory import DirectoryBackend
from tftp_offload.backends.small_files import SETTLED
from tftp_offload.config import ServerConfig
from tftp_offload.guard import GuardLimits
from tftp_offload.server import TFTPServer

RRQ = b"\0\1config\0octet\0blksize\x001468\0tsize\x000\0"
ACK0, ACK1 = b"\0\4\0\0", b"\0\4\0\1"
KERNEL_RRQ = b"\0\1kernel\0octet\0blksize\x001468\0"
MISSING_RRQ = b"\0\1pxelinux.cfg/01-52-54-00-12-34-56\0octet\0blksize\x001468\0tsize\x000\0"
KERNEL_SIZE = 8 << 20
LOCAL = "127.0.0.1"


class _Host:
    host, port = LOCAL, 69


class Listener:
    """A listening port that sends nothing (`RequestPort`'s part the driver uses)."""

    def getHost(self) -> _Host:
        return _Host()

    def reply(self, datagram: bytes, client: Tuple[str, int], local: str) -> None:
        pass

    def reply_all(self, datagrams: Sequence[bytes], client: Tuple[str, int], local: str) -> int:
        return len(datagrams)


class Port:
    """A transfer socket that sends nothing (`mux.TransferSocket`'s part the transfer uses)."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol

    def send(self, datagram: bytes, addr: Tuple[str, int]) -> bool:
        return True

    def send_all(self, datagrams: List[bytes], addr: Tuple[str, int]) -> int:
        return len(datagrams)

    def last_arrival(self) -> float:
        return time.time()

    def stopListening(self) -> None:
        pass


class Ports:
    """The transfer-socket factory, handing out `Port`s."""

    def open(self, local: str, protocol: Any, client: Any = None, connect: bool = False) -> Port:
        return Port(protocol)

    def exhausted(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=20000, help="requests per round (3 rounds, the best is shown)")
    ap.add_argument("-c", type=int, default=50, help="small-file requests in flight together (as bench/run's)")
    ap.add_argument("--quiet", action="store_true", help="as --quiet: no line for a complete transfer")
    ap.add_argument("--profile", action="store_true", help="then one more round under cProfile, by own time")
    ap.add_argument("--missing", action="store_true",
                    help="requests for a file that does not exist instead (ERROR 1 from the listener)")
    ap.add_argument("--ack", action="store_true",
                    help="the hot path instead: ACK in, next DATA out, lock-step through an 8 MiB file (us per ACK)")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="tftp-driver-bench-")
    with open(os.path.join(root, "config"), "wb") as f:
        f.write(os.urandom(1024))
    with open(os.path.join(root, "kernel"), "wb") as f:
        f.write(os.urandom(KERNEL_SIZE))
    # A boot server's files are older than SETTLED: wait, so that config is served from memory as
    # the load runs' is (backends/small_files.py), not read from disk per request.
    time.sleep(SETTLED + 0.1)
    sink = open(os.devnull, "w")  # noqa: SIM115  (the log's destination for the life of the process)
    clock = Clock()
    # Its lines are written at each clock.advance (a write per request: more than a real turn's share).
    globalLogBeginner.beginLoggingTo([logs.TextLinesObserver(sink, clock)], discardBuffer=True,
                                     redirectStandardIO=False)
    server = TFTPServer(DirectoryBackend(root), ServerConfig(
        max_sessions=100_000, quiet=args.quiet,
        guard=GuardLimits(max_sessions_per_client=0, requests_per_second_per_client=0)), clock)
    server.transfers = Ports()  # type: ignore[assignment]
    listener = Listener()

    def some(first: int, count: int) -> None:
        """`count` requests in flight together, as a load run's 50: each step for all of them in turn."""
        clients = [(LOCAL, 1024 + (first + i) % 60000) for i in range(count)]
        transfers = []
        for client in clients:
            server.request_received(listener, RRQ, client, LOCAL, time.time())  # type: ignore[arg-type]
            transfer = server.sessions[client].transfer
            assert transfer is not None
            transfers.append(transfer)
        for ack in (ACK0, ACK1):
            for client, transfer in zip(clients, transfers):
                transfer.datagramReceived(ack, client)
        if any(client in server.sessions for client in clients):
            raise SystemExit("a request did not complete: the benchmark no longer matches the driver")

    def run() -> None:
        for first in range(0, args.n, args.c):
            some(first, min(args.c, args.n - first))
            clock.advance(0.0001 * args.c)

    acks = [b"\0\4" + (block & 0xFFFF).to_bytes(2, "big") for block in range(1, KERNEL_SIZE // 1468 + 2)]

    def run_acks() -> None:
        for i in range(args.n // 2000 + 1):
            client = (LOCAL, 1024 + i % 60000)
            server.request_received(listener, KERNEL_RRQ, client, LOCAL, time.time())  # type: ignore[arg-type]
            transfer = server.sessions[client].transfer
            assert transfer is not None
            received = transfer.datagramReceived
            received(ACK0, client)
            for ack in acks:
                received(ack, client)
            if client in server.sessions:
                raise SystemExit("a transfer did not complete: the benchmark no longer matches the driver")
            clock.advance(0.0001)

    def run_missing() -> None:
        for i in range(args.n):
            client = (LOCAL, 1024 + i % 60000)
            server.request_received(listener, MISSING_RRQ, client, LOCAL, time.time())  # type: ignore[arg-type]
            if client in server.sessions:
                raise SystemExit("a request was not refused: the benchmark no longer matches the driver")
            clock.advance(0.0001)

    if args.ack:
        run, per, unit = run_acks, (args.n // 2000 + 1) * (len(acks) + 1), "ACK (lock-step, 8 MiB)"
    elif args.missing:
        run, per, unit = run_missing, args.n, "request for a missing file"
    else:
        per, unit = args.n, "request"
    run()  # warm-up: caches, and the remembered transfers at their steady size
    best = min(_timed(run) for _ in range(3)) / per * 1e6
    print(f"{best:.2f} us per {unit} (best of 3 rounds; {'--quiet' if args.quiet else 'logging on'})")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(run)
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)


def _timed(run: Any) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
