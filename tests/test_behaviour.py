"""The behaviours the README promises, checked on the wire against a real twistd process
with the tests' own small client (tests/support/tftp_client.py). Loopback only."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from typing import List, Optional, Set, Tuple

import pytest

from tests.support import tftp_client
from tests.support.harness import BIG_FILE, HOSTS, StartServer, TwistdServer, free_udp_span
from tests.support.tftp_client import DATA, ERROR, OACK, Address


def replies(sock: socket.socket, seconds: float) -> List[Tuple[bytes, Address]]:
    """Everything arriving on `sock` within `seconds`."""
    got: List[Tuple[bytes, Address]] = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            datagram, addr = sock.recvfrom(70000)
        except socket.timeout:
            break
        got.append((datagram, (addr[0], addr[1])))
    return got


def first(sock: socket.socket, timeout: float = 3.0) -> Tuple[bytes, Address]:
    sock.settimeout(timeout)
    datagram, addr = sock.recvfrom(70000)
    return datagram, (addr[0], addr[1])


@pytest.mark.parametrize("host", HOSTS)
def test_no_accepted_option_starts_with_data(twistd_server: TwistdServer, host: str) -> None:
    """Options the server does not know are not echoed; with none accepted there is no OACK."""
    with tftp_client.udp_socket(host) as sock:
        sock.sendto(tftp_client.rrq(b"1k.bin", options={"x-unknown": "1"}), (host, twistd_server.port))
        datagram, addr = first(sock)
        assert datagram[:4] == struct.pack("!HH", DATA, 1), datagram[:40]
        sock.sendto(tftp_client.error(0, b"enough"), addr)


def test_oack_echoes_only_what_was_asked(twistd_server: TwistdServer) -> None:
    with tftp_client.udp_socket("127.0.0.1") as sock:
        sock.sendto(tftp_client.rrq(b"1m.bin", options={"tsize": "0", "x-foo": "bar"}),
                    ("127.0.0.1", twistd_server.port))
        datagram, addr = first(sock)
        assert tftp_client.opcode_of(datagram) == OACK, datagram
        assert tftp_client.parse_oack(datagram) == {"tsize": str(1 << 20)}
        # After an OACK the server waits for ACK 0: nothing else comes until it is sent (or it times out).
        assert all(tftp_client.opcode_of(d) == OACK for d, _ in replies(sock, 0.3))
        sock.sendto(tftp_client.ack(0), addr)
        datagram, _ = first(sock)
        assert datagram[:4] == struct.pack("!HH", DATA, 1)
        sock.sendto(tftp_client.error(0, b"enough"), addr)


@pytest.mark.parametrize("host", HOSTS)
def test_uefi_tsize_probe(twistd_server: TwistdServer, host: str) -> None:
    """RRQ tsize=0 -> OACK -> client ERROR 8 -> a second RRQ from the same port is served at once."""
    size = (twistd_server.root / "1m.bin").stat().st_size
    with tftp_client.udp_socket(host) as sock:
        sock.sendto(tftp_client.rrq(b"1m.bin", options={"tsize": "0", "blksize": "1468"}), (host, twistd_server.port))
        datagram, addr = first(sock)
        assert tftp_client.opcode_of(datagram) == OACK
        assert tftp_client.parse_oack(datagram)["tsize"] == str(size)
        sock.sendto(tftp_client.error(8, b"size probe done"), addr)
        started = time.monotonic()
        sock.sendto(tftp_client.rrq(b"1m.bin", options={"blksize": "1468"}), (host, twistd_server.port))
        datagram, addr2 = first(sock)
        assert time.monotonic() - started < 0.5
        assert tftp_client.opcode_of(datagram) == OACK and tftp_client.parse_oack(datagram) == {"blksize": "1468"}
        sock.sendto(tftp_client.error(0, b"enough"), addr2)


@pytest.mark.parametrize("host", HOSTS)
def test_duplicate_rrq_is_one_transfer(twistd_server: TwistdServer, host: str) -> None:
    """PXE ROMs resend an RRQ within milliseconds: the duplicates must not start a second transfer."""
    request = tftp_client.rrq(b"1m.bin", options={"blksize": "1468", "tsize": "0"})
    with tftp_client.udp_socket(host) as sock:
        for _ in range(4):
            sock.sendto(request, (host, twistd_server.port))
            time.sleep(0.005)
        got = replies(sock, 0.5)
        senders: Set[Address] = {addr for _, addr in got}
        assert len(senders) == 1, senders
        for addr in senders:
            sock.sendto(tftp_client.error(0, b"enough"), addr)


@pytest.mark.parametrize("host", HOSTS)
def test_netascii(twistd_server: TwistdServer, tmp_path: Path, host: str) -> None:
    """netascii converts LF to CR LF and CR to CR NUL, and answers no tsize."""
    text = b"line one\nline two\rbare CR\n" * 100
    (twistd_server.root / "text.txt").write_bytes(text)
    result = tftp_client.get(host, twistd_server.port, b"text.txt", mode=b"netascii",
                             options={"tsize": "0", "blksize": "600"}, deadline=10)
    assert result.complete, result
    assert result.oack == {"blksize": "600"}
    assert result.data == text.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def test_wrong_peer_gets_error_5(twistd_server: TwistdServer) -> None:
    """A datagram from another port at a transfer's port gets ERROR 5; the transfer goes on."""
    with tftp_client.udp_socket("127.0.0.1") as sock, tftp_client.udp_socket("127.0.0.1") as other:
        sock.sendto(tftp_client.rrq(b"1k.bin"), ("127.0.0.1", twistd_server.port))
        datagram, addr = first(sock)
        assert datagram[:4] == struct.pack("!HH", DATA, 1)
        other.sendto(tftp_client.ack(1), addr)
        reply, _ = first(other)
        assert tftp_client.opcode_of(reply) == ERROR and tftp_client.parse_error(reply)[0] == 5
        sock.sendto(tftp_client.ack(1), addr)
        datagram, _ = first(sock)
        assert datagram[:4] == struct.pack("!HH", DATA, 2)
        sock.sendto(tftp_client.ack(2), addr)
        datagram, _ = first(sock)
        assert datagram == struct.pack("!HH", DATA, 3)  # 1024 bytes: an empty last block
        sock.sendto(tftp_client.ack(3), addr)


def test_rollover_to_1(twistd_factory: StartServer, big_file: Path) -> None:
    server = twistd_factory("--rollover", "1", hosts=("127.0.0.1",))
    result = tftp_client.get("127.0.0.1", server.port, BIG_FILE.encode(),
                             {"blksize": "1468", "windowsize": "64"}, rollover=1, deadline=120)
    assert result.complete and result.error is None, result
    assert result.data == big_file.read_bytes()
    server.assert_healthy()


def test_full_server_drops_requests(twistd_factory: StartServer) -> None:
    """With --max-sessions transfers running, a new RRQ gets no answer (the ROM retries) and a
    log line; once a transfer ends, the retry is served."""
    server = twistd_factory("--max-sessions", "2", "--timeout", "5", hosts=("127.0.0.1",))
    target = ("127.0.0.1", server.port)
    socks = [tftp_client.udp_socket("127.0.0.1") for _ in range(3)]
    try:
        transfers: List[Optional[Address]] = []
        for sock in socks[:2]:  # two transfers that never ACK
            sock.sendto(tftp_client.rrq(b"1m.bin"), target)
            transfers.append(first(sock)[1])
        socks[2].sendto(tftp_client.rrq(b"1k.bin"), target)
        assert replies(socks[2], 0.5) == []
        assert "max-sessions" in server.log()
        transfer = transfers[0]
        assert transfer is not None
        socks[0].sendto(tftp_client.error(0, b"bye"), transfer)
        time.sleep(0.1)
        result = tftp_client.get("127.0.0.1", server.port, b"1k.bin", deadline=10)
        assert result.complete and result.data == (server.root / "1k.bin").read_bytes()
        socks[1].sendto(tftp_client.error(0, b"bye"), transfers[1] or target)
    finally:
        for sock in socks:
            sock.close()
    server.assert_healthy()


def test_port_range(twistd_factory: StartServer) -> None:
    """--port-range: every transfer's port is from the range; when all are in use a new RRQ gets
    no answer (the ROM retries) and a log line; once a transfer ends, the retry is served."""
    low = free_udp_span(2)
    server = twistd_factory("--port-range", f"{low}:{low + 1}", "--timeout", "5", hosts=("127.0.0.1",))
    target = ("127.0.0.1", server.port)
    socks = [tftp_client.udp_socket("127.0.0.1") for _ in range(3)]
    try:
        transfers: List[Address] = []
        for sock in socks[:2]:  # two transfers that never ACK
            sock.sendto(tftp_client.rrq(b"1m.bin"), target)
            transfers.append(first(sock)[1])
        assert sorted(port for _, port in transfers) == [low, low + 1]
        socks[2].sendto(tftp_client.rrq(b"1k.bin"), target)
        assert replies(socks[2], 0.5) == []
        assert "--port-range is in use" in server.log()
        socks[0].sendto(tftp_client.error(0, b"bye"), transfers[0])
        time.sleep(0.1)
        socks[2].sendto(tftp_client.rrq(b"1k.bin"), target)  # the ROM's retry
        datagram, addr = first(socks[2])
        assert datagram[:4] == b"\0\3\0\1" and addr[1] == transfers[0][1]
        for sock, transfer in ((socks[2], addr), (socks[1], transfers[1])):
            sock.sendto(tftp_client.error(0, b"bye"), transfer)
        time.sleep(0.1)
        result = tftp_client.get("127.0.0.1", server.port, b"1k.bin", deadline=10)
        assert result.complete and result.data == (server.root / "1k.bin").read_bytes()
    finally:
        for sock in socks:
            sock.close()
    server.assert_healthy()


def test_single_port(twistd_factory: StartServer) -> None:
    """--single-port: the whole transfer comes from the port the RRQ was sent to (windowed and
    lock-step)."""
    server = twistd_factory("--single-port", hosts=("127.0.0.1",))
    for options in (None, {"blksize": "1468", "windowsize": "16"}):
        result = tftp_client.get("127.0.0.1", server.port, b"1m.bin", options)
        assert result.complete and result.data == (server.root / "1m.bin").read_bytes()
        assert result.server == ("127.0.0.1", server.port) and result.stray == 0
    server.assert_healthy()


@pytest.mark.parametrize("listen,send_to", [("0.0.0.0", "127.0.0.2"), ("::", "127.0.0.3"), ("::", "::1")])
def test_reply_from_the_address_asked(twistd_factory: StartServer, listen: str, send_to: str) -> None:
    """Listening on a wildcard address, replies leave from the address the RRQ was sent to.
    (Only loopback addresses are ever sent to.)"""
    server = twistd_factory(hosts=(listen,), ready=(send_to,))
    family = socket.AF_INET6 if ":" in send_to else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        sock.sendto(tftp_client.rrq(b"hello.txt"), (send_to, server.port))
        datagram, addr = first(sock)
        assert datagram[:4] == struct.pack("!HH", DATA, 1)
        assert addr[0] == send_to
        sock.sendto(tftp_client.ack(1), addr)
    server.assert_healthy()
