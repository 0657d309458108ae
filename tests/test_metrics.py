"""The Prometheus endpoint (metrics.py), end to end: a real `twistd --metrics`, a known set of
transfers from real clients (curl, tftp-hpa) and from a scripted one (abort, size probe,
timeout, a stranger, a write request, a malformed request), then a scrape over HTTP
(urllib) whose every counter and histogram count is checked exactly.

Synchronous pytest: the test drives real processes and sockets, no reactor here.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Dict, Iterator, Tuple

import pytest

from tests.support import tftp_client
from tests.support.offload_support import short_dir, start_backend, start_server
from tests.support.service_process import Twistd, curl_fetch, start_listening

HOST = "127.0.0.1"
FILES = {"hello.txt": b"Hello from tftp-offload\n", "k1000.bin": bytes(range(250)) * 4,
         "k3000.bin": bytes(3000)}

_SAMPLE = re.compile(r"^([a-z_]+)(\{[^}]*\})? (\S+)$")


def scrape(url: str) -> Dict[str, float]:
    """`name{labels}` -> value, for every sample of the page (comments skipped)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, line
        samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def metered(tmp_path: Path, reactor_name: str) -> Iterator[Tuple[Twistd, str]]:
    root = tmp_path / "root"
    root.mkdir()
    for name, content in FILES.items():
        (root / name).write_bytes(content)
    port = free_tcp_port()
    server = start_listening(tmp_path, ["--root", str(root), "--metrics", f"{HOST}:{port}", "--timeout", "0.5",
                                        "--give-up", "2"], reactor_name)
    try:
        server.wait_for_log(f"Serving metrics on http://{HOST}:{port}/metrics")
        yield server, f"http://{HOST}:{port}/metrics"
        server.stop()
    finally:
        server.kill_if_running()


def sock() -> socket.socket:
    s = tftp_client.udp_socket(HOST)
    s.settimeout(5)
    return s


def wait_for(url: str, name: str, value: float, timeout: float = 20.0) -> Dict[str, float]:
    end = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if samples.get(name) == value or time.monotonic() > end:
            return samples
        time.sleep(0.1)


def test_a_scrape_counts_each_transfer_exactly(metered: Tuple[Twistd, str], tmp_path: Path) -> None:
    server, url = metered
    port = server.port
    before = scrape(url)
    assert before['tftp_transfers_started_total'] == 0
    assert before['tftp_sessions_active'] == 0

    # A transfer left to time out (no options: 512-byte blocks, no OACK): DATA 1, never ACKed.
    stalled = sock()
    stalled.sendto(tftp_client.rrq(b"k1000.bin"), (HOST, port))
    first, transfer_port = stalled.recvfrom(70000)
    assert tftp_client.opcode_of(first) == tftp_client.DATA
    # A stranger writes to that transfer's port: ERROR 5, and the transfer carries on.
    with sock() as stranger:
        stranger.sendto(tftp_client.ack(1), transfer_port)
        reply, _ = stranger.recvfrom(70000)
        assert tftp_client.parse_error(reply)[0] == 5

    # Two successes from real clients: curl (blksize and tsize: an OACK first), tftp-hpa (no options).
    curl_fetch(HOST, port, "hello.txt", tmp_path / "hello.txt")
    assert (tmp_path / "hello.txt").read_bytes() == FILES["hello.txt"]
    got = tmp_path / "k1000.bin"
    subprocess.run(["tftp", "-m", "binary", HOST, str(port), "-c", "get", "k1000.bin", str(got)],
                   check=True, capture_output=True, timeout=30)
    assert got.read_bytes() == FILES["k1000.bin"]
    # A missing file (curl exits 68 on TFTP "file not found").
    missing = subprocess.run(["curl", "-sS", "--max-time", "10", "-o", str(tmp_path / "nope"),
                              f"tftp://{HOST}:{port}/nope.bin"], check=False, capture_output=True,
                             timeout=30)
    assert missing.returncode == 68, missing.stderr
    # A client abort: DATA 1 arrives, the client says ERROR 0.
    with sock() as aborting:
        aborting.sendto(tftp_client.rrq(b"k3000.bin"), (HOST, port))
        data, peer = aborting.recvfrom(70000)
        assert tftp_client.opcode_of(data) == tftp_client.DATA
        aborting.sendto(tftp_client.error(0, b"changed my mind"), peer)
    # A UEFI-style size probe: tsize=0 gets the OACK, then ERROR 8.
    with sock() as probing:
        probing.sendto(tftp_client.rrq(b"k3000.bin", options={"tsize": "0", "blksize": "1468"}), (HOST, port))
        oack, peer = probing.recvfrom(70000)
        assert tftp_client.parse_oack(oack)["tsize"] == "3000"
        probing.sendto(tftp_client.error(8, b"size probe"), peer)
    # Refused outright: a write request, a malformed request.
    with sock() as writer:
        writer.sendto(tftp_client.request(2, b"upload.bin"), (HOST, port))
        assert tftp_client.parse_error(writer.recvfrom(70000)[0])[0] == 2
        writer.sendto(b"\0\1no-terminator", (HOST, port))
        assert tftp_client.parse_error(writer.recvfrom(70000)[0])[0] == 4

    samples = wait_for(url, 'tftp_transfers_finished_total{outcome="timeout"}', 1)
    # What the stalled client received: DATA 1 and each retransmission of it (loopback loses nothing).
    stalled.settimeout(0.2)
    received = 1
    while True:
        try:
            stalled.recvfrom(70000)
        except socket.timeout:
            break
        received += 1
    stalled.close()
    retransmits = received - 1
    assert retransmits >= 1

    # The engine may tell a size probe from another client error; either way it is one of the two.
    probes = samples.pop('tftp_transfers_finished_total{outcome="probe"}', 0)
    samples['tftp_transfers_finished_total{outcome="client-error"}'] += probes
    expected = {
        "tftp_transfers_started_total": 5,  # the stalled one, curl, tftp-hpa, the abort, the probe
        'tftp_transfers_finished_total{outcome="complete"}': 2,
        'tftp_transfers_finished_total{outcome="client-error"}': 2,
        'tftp_transfers_finished_total{outcome="timeout"}': 1,
        'tftp_transfers_finished_total{outcome="protocol-error"}': 0,
        'tftp_transfers_finished_total{outcome="aborted"}': 0,
        "tftp_sessions_active": 0,
        "tftp_backend_lookups_in_flight": 0,
        "tftp_sent_bytes_total": len(FILES["hello.txt"]) + len(FILES["k1000.bin"]),
        # OACK + 1 DATA (curl), 2 DATA (tftp-hpa), 1 DATA (abort), OACK (probe), DATA 1 and its resends
        "tftp_sent_datagrams_total": 2 + 2 + 1 + 1 + received,
        "tftp_retransmitted_datagrams_total": retransmits,
        "tftp_duplicate_acks_total": 0,
        'tftp_errors_sent_total{code="1"}': 1,
        'tftp_errors_sent_total{code="2"}': 1,
        'tftp_errors_sent_total{code="4"}': 1,
        'tftp_errors_sent_total{code="5"}': 1,
        'tftp_requests_refused_total{reason="wrq"}': 1,
        'tftp_requests_refused_total{reason="malformed"}': 1,
        'tftp_requests_refused_total{reason="stranger"}': 1,
        'tftp_requests_refused_total{reason="capacity"}': 0,
        'tftp_backend_answers_total{kind="directory"}': 5,
        'tftp_backend_answers_total{kind="file"}': 0,
        "tftp_backend_lookup_failures_total": 1,
        "tftp_backend_lookup_seconds_count": 6,
        'tftp_backend_lookup_seconds_bucket{le="+Inf"}': 6,
        "tftp_first_datagram_seconds_count": 5,
        "tftp_transfer_duration_seconds_count": 5,
        "tftp_transfer_size_bytes_count": 2,
        "tftp_transfer_size_bytes_sum": len(FILES["hello.txt"]) + len(FILES["k1000.bin"]),
        'tftp_transfer_size_bytes_bucket{le="1024.0"}': 2,
    }
    assert {name: samples.get(name) for name in expected} == expected
    # Every code and reason the scrape shows is one of those above: nothing else was counted.
    for name, value in samples.items():
        if name.startswith(("tftp_errors_sent_total", "tftp_requests_refused_total", "tftp_backend_answers_total")):
            assert value == expected.get(name, 0), name
    # A directory has no connection: no backend_up series. No label names a client or a file.
    assert not any(name.startswith("tftp_backend_up") for name in samples)
    assert not any("127.0.0.1" in name or ".bin" in name or ".txt" in name for name in samples)
    # Histograms are cumulative and end at their count.
    assert samples['tftp_transfer_duration_seconds_bucket{le="+Inf"}'] == 5
    assert samples['tftp_transfer_duration_seconds_bucket{le="0.001"}'] <= samples[
        'tftp_transfer_duration_seconds_bucket{le="1.0"}'] <= 5


# ------------------------------------------------------- the collector on its own --


class _Backend:
    """What the collector reads from an AMP backend: `connected` and its `stats` counters."""

    def __init__(self, connected: bool, connections: int) -> None:
        self.connected = connected
        self.stats = {"connections": connections, "cache_hits": 7, "coalesced": 3}


def render(server: object) -> Dict[str, float]:
    from prometheus_client.core import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    from tftp_offload.metrics import TFTPCollector

    registry = CollectorRegistry(auto_describe=False)  # a host's own registry, as docs/embedding.md shows
    registry.register(TFTPCollector(lambda: server))  # type: ignore[arg-type]
    samples = {}
    for line in generate_latest(registry).decode().splitlines():
        match = _SAMPLE.match(line)
        if match:
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


@pytest.mark.parametrize(("connected", "connections", "up", "reconnects"), [(True, 1, 1, 0), (False, 3, 0, 2)])
def test_backend_connection_series(connected: bool, connections: int, up: int, reconnects: int) -> None:
    from types import SimpleNamespace

    from tftp_offload.stats import Stats

    stats = Stats()
    stats.refuse("capacity")
    stats.error_sent(0)
    server = SimpleNamespace(stats=stats, sessions={}, backend=_Backend(connected, connections))
    samples = render(server)
    assert samples["tftp_backend_up"] == up
    assert samples["tftp_backend_reconnects_total"] == reconnects
    assert samples['tftp_backend_lookups_saved_total{how="cache"}'] == 7
    assert samples['tftp_backend_lookups_saved_total{how="coalesced"}'] == 3
    assert samples['tftp_requests_refused_total{reason="capacity"}'] == 1
    assert samples['tftp_errors_sent_total{code="0"}'] == 1


def test_nothing_is_exported_before_the_service_starts() -> None:
    assert render(None) == {}


# ------------------------------------------------- a real AMP backend going away --


def test_backend_up_down_and_reconnects(tmp_path: Path, reactor_name: str) -> None:
    """twistd --socket --metrics against the reference backend: tftp_backend_up follows the
    connection, tftp_backend_reconnects_total counts the connection made after a backend restart."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "hello.txt").write_bytes(FILES["hello.txt"])
    sockets = short_dir()
    socket_path = f"{sockets}/backend.sock"
    port = free_tcp_port()
    url = f"http://{HOST}:{port}/metrics"
    backend = start_backend(tmp_path / "b1", socket_path, root, reactor_name)
    processes = [backend]
    try:
        server = start_server(tmp_path / "s", socket_path, root, reactor_name, [HOST], "--metrics", f"{HOST}:{port}")
        processes.append(server)
        samples = scrape(url)
        assert samples["tftp_backend_up"] == 1 and samples["tftp_backend_reconnects_total"] == 0
        assert samples['tftp_backend_answers_total{kind="inline"}'] >= 1  # the readiness probe's hello.txt

        backend.stop()
        assert wait_for(url, "tftp_backend_up", 0)["tftp_backend_up"] == 0
        backend = start_backend(tmp_path / "b2", socket_path, root, reactor_name)
        processes.append(backend)
        samples = wait_for(url, "tftp_backend_up", 1)
        assert samples["tftp_backend_up"] == 1 and samples["tftp_backend_reconnects_total"] == 1
        assert tftp_client.get(HOST, server.port, b"hello.txt").data == FILES["hello.txt"]
    finally:
        for process in reversed(processes):
            process.stop()
        shutil.rmtree(sockets, ignore_errors=True)
    assert "Traceback" not in server.log()
