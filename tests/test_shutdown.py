"""Stopping a real twistd process with SIGTERM (systemd's KillSignal=, or an upgrade's restart).

On SIGTERM the server stops listening at once, lets running transfers finish for up to
--drain-timeout seconds, aborts what is left (the client gets an ERROR) and exits. Checked
end to end with a client that the test paces itself.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import socket
import struct
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import pytest

from tests.support.service_process import (
    DATA,
    ERROR,
    PacedClient,
    Twistd,
    ack,
    rrq,
    servers,  # noqa: F401  (fixture)
    start_listening,
)

SIZE = 512 * 300 + 100  # 301 blocks of 512 in lock-step


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    (path / "kernel").write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture
def clients() -> Iterator[List[PacedClient]]:
    made: List[PacedClient] = []
    yield made
    for client in made:
        client.close()


def no_answer(port: int, wait: float = 0.5) -> bool:
    """A new RRQ to the listening port gets nothing back (nobody listens there any more)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        probe.settimeout(wait)
        probe.sendto(rrq(b"kernel"), ("127.0.0.1", port))
        try:
            probe.recvfrom(65536)
        except socket.timeout:
            return True
        return False


def test_idle_server_exits_at_once(root: Path, tmp_path: Path, reactor_name: str, servers: List[Twistd]) -> None:
    server = start_listening(tmp_path, ["--root", str(root), "--drain-timeout", "30"], reactor_name)
    servers.append(server)
    assert server.stop() < 3


def test_running_transfer_completes_during_drain(
    root: Path, tmp_path: Path, reactor_name: str, servers: List[Twistd], clients: List[PacedClient]
) -> None:
    server = start_listening(tmp_path, ["--root", str(root), "--drain-timeout", "30"], reactor_name)
    servers.append(server)
    client = PacedClient("127.0.0.1", server.port, b"kernel")
    clients.append(client)
    for _ in range(20):
        client.next_block()
    sent = server.terminate()
    server.wait_for_log("Letting 1 transfers finish")
    assert server.proc.poll() is None, "exited with a transfer still running"
    assert no_answer(server.port), "still answering new requests while draining"
    data = client.read_all()  # the rest of the file, over the transfer's own port
    last_ack = time.monotonic()
    assert data == (root / "kernel").read_bytes()
    stopped_after = server.wait_exit(sent)
    # It waited for the transfer, and not for the rest of the 30 s drain timeout after it.
    assert time.monotonic() - last_ack < 5
    assert stopped_after < 30
    assert "complete kernel to 127.0.0.1:" in server.log()


def test_stalled_transfer_is_aborted_after_drain_timeout(
    root: Path, tmp_path: Path, reactor_name: str, servers: List[Twistd], clients: List[PacedClient]
) -> None:
    drain = 1.5
    server = start_listening(tmp_path, ["--root", str(root), "--drain-timeout", str(drain)], reactor_name)
    servers.append(server)
    client = PacedClient("127.0.0.1", server.port, b"kernel")
    clients.append(client)
    client.next_block()
    client.next_block()  # then never ACKs again: the server retransmits block 2
    sent = server.terminate()
    received, exited = client.datagrams_until_exit(server, drain + 10)
    server.wait_exit(sent)
    stopped_after = exited - sent
    assert drain - 0.2 <= stopped_after <= drain + 3, stopped_after
    errors = [d for d in received if struct.unpack("!H", d[:2])[0] == ERROR]
    assert errors, f"the client was not told: {[d[:4] for d in received]}"
    assert b"shutting down" in errors[-1].lower()
    assert "aborted kernel to 127.0.0.1:" in server.log()


def test_second_sigterm_aborts_the_drain_at_once(
    root: Path, tmp_path: Path, reactor_name: str, servers: List[Twistd], clients: List[PacedClient]
) -> None:
    """The operator who signals twice does not wait out --drain-timeout, and gets no traceback."""
    server = start_listening(tmp_path, ["--root", str(root), "--drain-timeout", "60"], reactor_name)
    servers.append(server)
    client = PacedClient("127.0.0.1", server.port, b"kernel")
    clients.append(client)
    client.next_block()  # then never ACKs again
    sent = server.terminate()
    server.wait_for_log("Letting 1 transfers finish")
    server.terminate()
    received, exited = client.datagrams_until_exit(server, 15)
    server.wait_exit(sent)
    assert exited - sent < 10
    errors = [d for d in received if struct.unpack("!H", d[:2])[0] == ERROR]
    assert errors and b"shutting down" in errors[-1].lower()
    assert "aborted kernel to 127.0.0.1:" in server.log()
    assert "Traceback" not in server.log()


# ------------------------------------------------------------ under a storm --

STORM_ADDRESSES = [f"127.0.0.{i}" for i in range(10, 20)]
"""Clients spread over ten addresses, as a storm's are (and within the per-client limits)."""


class StormClient:
    """One lock-step client in the storm, driven by `run_storm`: ACKs a block every `pace` seconds
    (None: stops after block `stop_after`)."""

    def __init__(self, host: str, port: int, name: bytes, pace: Optional[float], stop_after: int = 1) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.sock.sendto(rrq(name), ("127.0.0.1", port))
        self.pace = pace
        self.stop_after = stop_after
        self.blocks: List[bytes] = []
        self.errors: List[bytes] = []
        self.done = False
        self.next_ack: Optional[Tuple[float, int, Tuple[str, int]]] = None

    def readable(self, now: float) -> None:
        with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
            while True:
                datagram, addr = self.sock.recvfrom(65536)
                opcode, block = struct.unpack("!HH", datagram[:4])
                if opcode == ERROR:
                    self.errors.append(datagram)
                    self.done = True
                elif opcode == DATA and block == len(self.blocks) + 1:
                    self.blocks.append(datagram[4:])
                    if len(datagram) - 4 < 512:
                        self.sock.sendto(ack(block), addr)
                        self.done = True
                    elif self.pace is not None:
                        self.next_ack = (now + self.pace, block, addr)
                    elif block <= self.stop_after:
                        self.sock.sendto(ack(block), addr)

    def tick(self, now: float) -> None:
        if self.next_ack is not None and now >= self.next_ack[0]:
            _, block, addr = self.next_ack
            self.next_ack = None
            self.sock.sendto(ack(block), addr)


def run_storm(clients: List[StormClient], until: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    by_fd = {client.sock.fileno(): client for client in clients}
    with selectors.DefaultSelector() as selector:
        for client in clients:
            selector.register(client.sock, selectors.EVENT_READ)
        while not until() and time.monotonic() < end:
            now = time.monotonic()
            for key, _ in selector.select(0.005):
                by_fd[key.fd].readable(now)
            for client in clients:
                client.tick(now)


def test_sigterm_under_a_storm(tmp_path: Path, reactor_name: str, servers: List[Twistd]) -> None:
    """SIGTERM during 200 transfers and 20 lookups in flight, through the AMP reference backend:
    lookups and transfers that can finish within --drain-timeout do, the rest are aborted with
    ERROR 0, the process is gone within --drain-timeout plus a second, and no ephemeral file is left."""
    from tests.support.offload_support import fd_count, short_dir, start_backend
    from tftp_offload.reference import pattern

    drain = 3.0
    sock_dir = Path(short_dir())
    ephemeral = tmp_path / "ephemeral"
    ephemeral.mkdir()
    (tmp_path / "root").mkdir()
    backend = start_backend(tmp_path / "backend", str(sock_dir / "s"), tmp_path / "root", reactor_name,
                            "--ephemeral-dir", str(ephemeral))
    clients: List[StormClient] = []
    try:
        server = start_listening(tmp_path, ["--socket", str(sock_dir / "s"), "--drain-timeout", str(drain)],
                                 reactor_name)
        servers.append(server)
        backend_fds = fd_count(backend.pid)
        size = 512 * 40 + 100  # 41 blocks: a paced client needs about 1 s
        for i in range(200):
            host = STORM_ADDRESSES[i % len(STORM_ADDRESSES)]
            name = f"ephemeral/{size}-t{i}".encode()
            # Half finish within the drain; half stall after block 1 and must be aborted.
            clients.append(StormClient(host, server.port, name, pace=0.025 if i % 2 else None))
        run_storm(clients, lambda: all(c.blocks for c in clients), 20)
        assert all(c.blocks for c in clients), "not every transfer started"
        looking = [StormClient(STORM_ADDRESSES[i % 10], server.port, f"slow/1/ephemeral/2000-l{i}".encode(),
                               pace=0.0) for i in range(20)]
        time.sleep(0.2)  # the lookups are in flight
        sent = server.terminate()
        everyone = clients + looking
        run_storm(everyone, lambda: server.proc.poll() is not None and all(c.done for c in everyone), drain + 5)
        server.wait_exit(sent)
        exited = server.stopped_after
        assert exited is not None and exited <= drain + 1, exited
        paced, stalled = clients[1::2], clients[0::2]
        for client in paced:
            assert client.done and not client.errors and b"".join(client.blocks) == pattern(0, size)
        for client in looking:
            assert b"".join(client.blocks) == pattern(0, 2000), client.errors
        for client in stalled:
            assert client.errors, "a stalled client was not told"
            code, message = struct.unpack("!H", client.errors[-1][2:4])[0], client.errors[-1][4:]
            assert code == 0 and b"shutting down" in message.lower(), client.errors[-1]
        time.sleep(0.5)
        assert list(ephemeral.iterdir()) == []
        assert fd_count(backend.pid) <= backend_fds
        print(f"SIGTERM under 200 transfers + 20 lookups: exited after {exited:.2f}s (--drain-timeout {drain})")
    finally:
        for client in clients:
            client.sock.close()
        backend.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
