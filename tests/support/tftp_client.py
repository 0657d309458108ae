"""A tiny blocking TFTP client for the integration tests (independent of the code under test).

It builds and parses packets with `struct` alone, so a codec bug in the server
cannot hide behind the same bug here. Every wait is bounded: each receive has a
timeout and each transfer a wall-clock deadline.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6

Address = Tuple[str, int]


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def udp_socket(host: str, rcvbuf: int = 4 << 20) -> socket.socket:
    """A UDP socket on an ephemeral port: on `host` itself when it is a loopback address (the
    server's), else on the wildcard address (a server elsewhere: inside a network namespace)."""
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    local = host if ipaddress.ip_address(host.split("%", 1)[0]).is_loopback else ("::" if ":" in host else "0.0.0.0")
    sock.bind((local, 0))
    return sock


def request(opcode: int, filename: bytes, mode: bytes = b"octet", options: Optional[Dict[str, str]] = None) -> bytes:
    out = struct.pack("!H", opcode) + filename + b"\0" + mode + b"\0"
    for name, value in (options or {}).items():
        out += name.encode() + b"\0" + value.encode() + b"\0"
    return out


def rrq(filename: bytes, mode: bytes = b"octet", options: Optional[Dict[str, str]] = None) -> bytes:
    return request(RRQ, filename, mode, options)


def ack(block: int) -> bytes:
    return struct.pack("!HH", ACK, block & 0xFFFF)


def error(code: int, message: bytes = b"") -> bytes:
    return struct.pack("!HH", ERROR, code) + message + b"\0"


def opcode_of(datagram: bytes) -> int:
    return struct.unpack("!H", datagram[:2])[0] if len(datagram) >= 2 else -1


def parse_error(datagram: bytes) -> Tuple[int, str]:
    code = struct.unpack("!H", datagram[2:4])[0]
    return code, datagram[4:].split(b"\0", 1)[0].decode("ascii", "replace")


def parse_oack(datagram: bytes) -> Dict[str, str]:
    fields = datagram[2:].split(b"\0")[:-1]
    return {fields[i].decode().lower(): fields[i + 1].decode() for i in range(0, len(fields) - 1, 2)}


def wire_block(block: int, rollover: int = 0) -> int:
    """The 16-bit block number on the wire for the `block`-th block (0 = the OACK's ACK)."""
    if rollover == 0 or block == 0:
        return block & 0xFFFF
    return (block - 1) % 0xFFFF + 1


@dataclass
class Result:
    data: bytes = b""
    oack: Optional[Dict[str, str]] = None
    error: Optional[Tuple[int, str]] = None
    server: Optional[Address] = None
    complete: bool = False
    stray: int = 0
    notes: list = field(default_factory=list)


def first_reply(host: str, port: int, datagram: bytes, timeout: float = 3.0) -> Tuple[bytes, Address]:
    """Send one datagram from a fresh socket; return the first answer (and who sent it)."""
    with udp_socket(host) as sock:
        sock.settimeout(timeout)
        sock.sendto(datagram, (host, port))
        reply, addr = sock.recvfrom(70000)
        return reply, (addr[0], addr[1])


def get(
    host: str,
    port: int,
    filename: bytes,
    options: Optional[Dict[str, str]] = None,
    mode: bytes = b"octet",
    timeout: float = 1.0,
    retries: int = 5,
    deadline: float = 60.0,
    rollover: int = 0,
) -> Result:
    """Download `filename`; honours blksize/windowsize from the OACK; after block 65535 expects
    block `rollover` (0 or 1).

    ACKs every `windowsize`-th block since its last ACK, and the last block; on a gap ACKs the last
    in-order block (RFC 7440), and the window then counts from there, as the server's go-back-N does.
    """
    result = Result()
    blksize, windowsize = 512, 1
    end = time.monotonic() + deadline
    chunks = []
    received = 0  # blocks received in order (wide counter)
    gap_acked = -1
    since_ack = 0  # in-order blocks received since our last ACK
    with udp_socket(host) as sock:
        last_sent = rrq(filename, mode, options)
        sock.sendto(last_sent, (host, port))
        stalls = 0
        while time.monotonic() < end:
            sock.settimeout(min(timeout, max(0.01, end - time.monotonic())))
            try:
                datagram, addr = sock.recvfrom(70000)
            except socket.timeout:
                stalls += 1
                if stalls > retries:
                    result.notes.append("timed out")
                    break
                sock.sendto(last_sent, result.server or (host, port))
                continue
            peer = (addr[0], addr[1])
            if result.server is None:
                result.server = peer
            elif peer != result.server:
                result.stray += 1
                continue
            stalls = 0
            op = opcode_of(datagram)
            if op == ERROR:
                result.error = parse_error(datagram)
                break
            if op == OACK and received == 0:
                result.oack = parse_oack(datagram)
                blksize = int(result.oack.get("blksize", blksize))
                windowsize = int(result.oack.get("windowsize", windowsize))
                last_sent = ack(0)
                sock.sendto(last_sent, peer)
                continue
            if op != DATA or len(datagram) < 4:
                result.notes.append(f"unexpected opcode {op}")
                continue
            block = struct.unpack("!H", datagram[2:4])[0]
            if block == wire_block(received + 1, rollover):
                received += 1
                payload = datagram[4:]
                chunks.append(payload)
                last = len(payload) < blksize
                since_ack += 1
                if last or since_ack >= windowsize:
                    since_ack = 0
                    last_sent = ack(wire_block(received, rollover))
                    sock.sendto(last_sent, peer)
                if last:
                    result.complete = True
                    break
            elif block == wire_block(received, rollover) or gap_acked != received:
                # A retransmission of the last block we have (our ACK was lost), or a gap: say where
                # we are, once per position (a duplicate ACK must not be needed for progress).
                gap_acked = received
                since_ack = 0
                last_sent = ack(wire_block(received, rollover))
                sock.sendto(last_sent, peer)
    result.data = b"".join(chunks)
    return result


def main(argv: Optional[list] = None) -> int:
    """`python tests/support/tftp_client.py HOST PORT NAME [--option NAME=VALUE]... [--timeout S]`: one download,
    then one JSON line on stdout: complete, error, bytes, sha256, seconds. For running a client where
    the test process cannot be (inside a network namespace: `ip netns exec NS python ...`)."""
    import argparse
    import hashlib
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("name")
    parser.add_argument("--option", action="append", default=[], help="NAME=VALUE, sent in the RRQ")
    parser.add_argument("--timeout", type=float, default=1.0, help="our own retransmission timeout")
    parser.add_argument("--retries", type=int, default=20)
    parser.add_argument("--deadline", type=float, default=120.0)
    parser.add_argument("--out", help="write the file here too")
    args = parser.parse_args(argv)
    options = dict(option.split("=", 1) for option in args.option)
    started = time.monotonic()
    result = get(args.host, args.port, args.name.encode(), options or None, timeout=args.timeout,
                 retries=args.retries, deadline=args.deadline)
    seconds = time.monotonic() - started
    if args.out:
        with open(args.out, "wb") as out:
            out.write(result.data)
    print(json.dumps({"complete": result.complete, "error": result.error, "bytes": len(result.data),
                      "sha256": hashlib.sha256(result.data).hexdigest(), "seconds": seconds,
                      "notes": result.notes}))
    return 0 if result.complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
