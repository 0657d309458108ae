"""Stopping a real twistd process with SIGTERM (systemd's KillSignal=, or an upgrade's restart).

On SIGTERM the server stops listening at once, lets running transfers finish for up to
--drain-timeout seconds, aborts what is left (the client gets an ERROR) and exits. Checked
end to end with a client that the test paces itself.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Iterator, List

import pytest
from service_process import (
    ERROR,
    PacedClient,
    Twistd,
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
