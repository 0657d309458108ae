"""What the abuse tests measure of a real twistd process: its memory, its descriptors, a legitimate client's wait."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support import tftp_client
from tests.support.harness import TwistdServer

CLIENT = "127.0.0.1"
"""The legitimate client's address; attackers send from other loopback addresses."""

RSS_LIMIT_MB = 150


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def fetch_time(server: TwistdServer, name: bytes = b"1k.bin", deadline: float = 20) -> float:
    """Seconds a legitimate client from CLIENT takes to get `name` whole (it retries every second)."""
    started = time.monotonic()
    result = tftp_client.get(CLIENT, server.port, name, {"blksize": "1468"}, timeout=0.5, retries=40,
                             deadline=deadline)
    elapsed = time.monotonic() - started
    assert result.complete and result.data == (server.root / name.decode()).read_bytes(), result.error
    return elapsed
