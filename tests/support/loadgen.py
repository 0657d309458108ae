#!/usr/bin/env python3
"""A small windowed, verifying, concurrent TFTP load generator, owned by the project.

The tests need what a boot storm does: many downloads at once, windows (RFC
7440), big block sizes, rollover past block 65535, and every byte checked.
This does that with the standard library only (no compiler, nothing from outside the repository),
and independently of the code under test: packets are built and parsed with
`struct` here.

    python3 tests/support/loadgen.py --host 127.0.0.1 --port 6969 --file 1m.bin \\
        --root /srv/tftp --blksize 1468 --windowsize 16 --tsize --concurrency 8 --count 100

prints one JSON object: {"ok", "failed", "verify_fail", "bytes", "verified",
"seconds", "errors"} and exits 0 only if every transfer completed (and, with
--root, matched the file byte for byte). Every wait is bounded: per-datagram
timeouts with a retry budget, and --max-time for the whole run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import selectors
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

RRQ, DATA, ACK, ERROR, OACK = 1, 3, 4, 5, 6
_HEADER = struct.Struct("!HH")


def _rrq(name: bytes, options: Dict[str, str]) -> bytes:
    out = struct.pack("!H", RRQ) + name + b"\0octet\0"
    for key, value in options.items():
        out += key.encode() + b"\0" + value.encode() + b"\0"
    return out


def _ack(block: int) -> bytes:
    return _HEADER.pack(ACK, block & 0xFFFF)


class Transfer:
    """One download: RRQ, optional OACK, DATA in (windowed), ACKs out; the payload hashed as it comes."""

    def __init__(self, host: str, port: int, name: bytes, options: Dict[str, str], timeout: float,
                 retries: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.target: Tuple[str, int] = (host, port)
        self.peer: Optional[Tuple[str, int]] = None
        self.options = options
        self.blksize = 512
        self.windowsize = 1
        self.timeout = timeout
        self.retries = retries
        self.stalls = 0
        self.received = 0  # blocks received in order (wide counter)
        self.gap_acked = -1
        self.size = 0
        self.digest = hashlib.sha256()
        self.tsize: Optional[int] = None
        self.error: Optional[str] = None
        self.done = False
        self.last_sent = _rrq(name, options)
        self.deadline = time.monotonic() + timeout
        self.sock.sendto(self.last_sent, self.target)

    def _send(self, datagram: bytes) -> None:
        self.last_sent = datagram
        self.sock.sendto(datagram, self.peer or self.target)

    def readable(self) -> None:
        for _ in range(256):
            try:
                datagram, addr = self.sock.recvfrom(70000)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # ICMP port unreachable: nobody listens there
                self._fail(f"socket error: {e}")
                return
            self._datagram(datagram, (addr[0], addr[1]))
            if self.done:
                return

    def _datagram(self, datagram: bytes, peer: Tuple[str, int]) -> None:
        if self.peer is None:
            self.peer = peer
        elif peer != self.peer:
            return  # a stranger (or a duplicate transfer): RFC 1350 says ignore it
        self.stalls = 0
        self.deadline = time.monotonic() + self.timeout
        if len(datagram) < 4:
            self._fail("short datagram")
            return
        op, block = _HEADER.unpack_from(datagram)
        if op == ERROR:
            message = datagram[4:].split(b"\0", 1)[0].decode("utf-8", "replace")
            self._fail(f"ERROR {block}: {message}")
        elif op == OACK and self.received == 0:
            fields = datagram[2:].split(b"\0")[:-1]
            oack = {fields[i].decode().lower(): fields[i + 1].decode() for i in range(0, len(fields) - 1, 2)}
            self.blksize = int(oack.get("blksize", self.blksize))
            self.windowsize = int(oack.get("windowsize", self.windowsize))
            if "tsize" in oack:
                self.tsize = int(oack["tsize"])
            self._send(_ack(0))
        elif op == DATA:
            self._data(block, datagram)
        else:
            self._fail(f"unexpected opcode {op}")

    def _data(self, block: int, datagram: bytes) -> None:
        if block == (self.received + 1) & 0xFFFF:
            self.received += 1
            payload = datagram[4:]
            self.size += len(payload)
            self.digest.update(payload)
            last = len(payload) < self.blksize
            if last or self.received % self.windowsize == 0:
                self._send(_ack(self.received))
            if last:
                self.done = True
        elif block == self.received & 0xFFFF or self.gap_acked != self.received:
            # Our ACK was lost (a block we have again), or a gap: say where we are, once per position.
            self.gap_acked = self.received
            self._send(_ack(self.received))

    def tick(self, now: float) -> None:
        if self.done or now < self.deadline:
            return
        self.stalls += 1
        if self.stalls > self.retries:
            self._fail("timed out")
            return
        self.deadline = now + self.timeout
        self._send(self.last_sent)

    def _fail(self, why: str) -> None:
        self.error = why
        self.done = True


def _file_digest(path: Path) -> Tuple[int, str]:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return path.stat().st_size, digest.hexdigest()


def run(host: str, port: int, name: str, root: Optional[Path] = None, blksize: Optional[int] = None,
        windowsize: Optional[int] = None, tsize: bool = False, concurrency: int = 1, count: int = 1,
        timeout: float = 1.0, retries: int = 8, max_time: float = 120.0) -> Dict[str, object]:
    """Download `name` `count` times, `concurrency` at once; the tallies as a dict (see the module doc)."""
    options: Dict[str, str] = {}
    if blksize is not None:
        options["blksize"] = str(blksize)
    if windowsize is not None:
        options["windowsize"] = str(windowsize)
    if tsize:
        options["tsize"] = "0"
    want = _file_digest(root / name) if root is not None else None
    tally: Dict[str, object] = {"ok": 0, "failed": 0, "verify_fail": 0, "bytes": 0, "verified": False}
    errors: List[str] = []
    selector = selectors.DefaultSelector()
    started = time.monotonic()
    end = started + max_time
    launched = 0
    running: List[Transfer] = []
    try:
        while (launched < count or running) and time.monotonic() < end:
            while launched < count and len(running) < concurrency:
                transfer = Transfer(host, port, name.encode(), options, timeout, retries)
                selector.register(transfer.sock, selectors.EVENT_READ, transfer)
                running.append(transfer)
                launched += 1
            for key, _ in selector.select(timeout=0.05):
                key.data.readable()
            now = time.monotonic()
            for transfer in running:
                transfer.tick(now)
            for transfer in [t for t in running if t.done]:
                running.remove(transfer)
                selector.unregister(transfer.sock)
                transfer.sock.close()
                _count(transfer, want, tally, errors)
    finally:
        for transfer in running:
            transfer.sock.close()
        selector.close()
    tally["failed"] = int(tally["failed"]) + len(running) + (count - launched)  # type: ignore[call-overload]
    if running or launched < count:
        errors.append(f"--max-time {max_time} s reached")
    tally["verified"] = want is not None and tally["ok"] == count and tally["verify_fail"] == 0
    tally["seconds"] = round(time.monotonic() - started, 3)
    tally["errors"] = sorted(set(errors))[:10]
    return tally


def _count(transfer: Transfer, want: Optional[Tuple[int, str]], tally: Dict[str, object], errors: List[str]) -> None:
    if transfer.error is not None:
        tally["failed"] = int(tally["failed"]) + 1  # type: ignore[call-overload]
        errors.append(transfer.error)
        return
    tally["bytes"] = int(tally["bytes"]) + transfer.size  # type: ignore[call-overload]
    if want is not None:
        size, digest = want
        if transfer.size != size or transfer.digest.hexdigest() != digest or transfer.tsize not in (None, size):
            tally["verify_fail"] = int(tally["verify_fail"]) + 1  # type: ignore[call-overload]
            errors.append(f"verify: got {transfer.size} bytes (tsize {transfer.tsize}), want {size}")
            return
    tally["ok"] = int(tally["ok"]) + 1  # type: ignore[call-overload]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", required=True, help="server address (loopback only in the tests)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--file", required=True, help="file name to request")
    parser.add_argument("--root", type=Path, help="verify against ROOT/FILE, byte for byte")
    parser.add_argument("--blksize", type=int)
    parser.add_argument("--windowsize", type=int)
    parser.add_argument("--tsize", action="store_true", help="ask for tsize (checked against the file)")
    parser.add_argument("--concurrency", type=int, default=1, help="transfers at once")
    parser.add_argument("--count", type=int, help="transfers in all (default: --concurrency)")
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds before a retry")
    parser.add_argument("--retries", type=int, default=8)
    parser.add_argument("--max-time", type=float, default=120.0, help="bound on the whole run, seconds")
    args = parser.parse_args(argv)
    tally = run(args.host, args.port, args.file, args.root, args.blksize, args.windowsize, args.tsize,
                args.concurrency, args.count or args.concurrency, args.timeout, args.retries, args.max_time)
    print(json.dumps(tally))
    return 0 if tally["failed"] == 0 and tally["verify_fail"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
