"""--workers (workers.py) on a real twistd: processes sharing the listening port with SO_REUSEPORT.

Loopback only; every loop bounded in count and time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List

import pytest

from tests.support import tftp_client
from tests.support.harness import StartServer, TwistdServer
from tftp_offload.workers import listen_args, without_listen


def children(server: TwistdServer) -> List[int]:
    text = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text()
    return [int(pid) for pid in text.split()]


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_for_worker(server: TwistdServer) -> None:
    """Until worker 1 listens too (until then the parent serves everyone)."""
    deadline = time.monotonic() + 15
    while "[worker 1] Serving TFTP" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)


def test_workers_share_the_port_and_stop_together(twistd_factory: StartServer) -> None:
    server = twistd_factory("--workers", "2", hosts=("127.0.0.1",))
    wait_for_worker(server)
    [worker] = children(server)
    want = (server.root / "1k.bin").read_bytes()
    for _ in range(40):  # 40 client ports: the kernel's hash sends some to each process
        result = tftp_client.get("127.0.0.1", server.port, b"1k.bin", {"blksize": "1468"}, deadline=10)
        assert result.complete and result.data == want, result
    deadline = time.monotonic() + 5
    while server.log().count("1k.bin") < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in server.log().splitlines() if "1k.bin" in line]
    assert len(lines) == 40  # one transfer (and one line) each
    by_worker = sum("[worker 1]" in line for line in lines)
    assert 0 < by_worker < 40, "both processes served"
    server.assert_healthy()
    server.stop()
    deadline = time.monotonic() + 5
    while running(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(worker), "the worker outlived its parent"
    assert "Traceback" not in server.log()
    assert "exited unexpectedly" not in server.log()


def test_a_retransmitted_request_reaches_the_same_worker(twistd_factory: StartServer) -> None:
    """A ROM's duplicate RRQ (same address and port) is one transfer, whichever worker has it."""
    server = twistd_factory("--workers", "2", hosts=("127.0.0.1",))
    wait_for_worker(server)
    for _ in range(10):
        with tftp_client.udp_socket("127.0.0.1") as sock:
            request = tftp_client.rrq(b"1m.bin")
            sock.sendto(request, ("127.0.0.1", server.port))
            sock.sendto(request, ("127.0.0.1", server.port))
            sources = set()
            sock.settimeout(0.3)
            try:
                while True:
                    _data, addr = sock.recvfrom(2048)
                    sources.add(addr)
            except OSError:
                pass
            assert len(sources) == 1, sources
            sock.sendto(tftp_client.error(0, b"bye"), sources.pop())
    server.assert_healthy()


@pytest.mark.parametrize(
    ("argv", "rest"),
    [
        (["--root", "/srv", "--listen", "a:1", "-l", "b:2", "--listen=c:3", "-ld:4", "--workers", "2"],
         ["--root", "/srv", "--workers", "2"]),
        (["--socket", "/run/x", "--quiet"], ["--socket", "/run/x", "--quiet"]),
    ],
)
def test_workers_get_the_options_less_the_addresses(argv: List[str], rest: List[str]) -> None:
    assert without_listen(argv) == rest
    assert listen_args([("127.0.0.1", 69), ("::", 69)]) == ["--listen", "127.0.0.1:69", "--listen", "[::]:69"]
