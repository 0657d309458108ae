"""A backend that is down, on a real `twistd -n tftp-offload --socket PATH` process.

What the operator sees: one line naming what is wrong with --socket (missing, a regular file, a
directory), no retry chatter, requests answered at once, and a clean shutdown that does not warn.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.support import tftp_client
from tests.support.offload_support import short_dir, start_backend, start_server


@pytest.fixture
def sockets() -> Iterator[str]:
    path = short_dir("tfb-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def reactor_of(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("reactor", "default"))


def wait_for_log(server: object, text: str, timeout: float = 10.0) -> str:
    end = time.monotonic() + timeout
    while True:
        log = server.log()  # type: ignore[attr-defined]
        if text in log:
            return str(log)
        assert time.monotonic() < end, f"{text!r} not logged:\n{log[-3000:]}"
        time.sleep(0.05)


@pytest.mark.parametrize("kind,says,protocol", [
    ("regular", "is a regular file, not a UNIX socket: is the backend running", "amp"),
    ("directory", "is a directory, not a UNIX socket", "amp"),
    ("missing", "does not exist: is the backend running", "amp"),
    ("regular", "is a regular file, not a UNIX socket: is the backend running", "legacy"),
    ("missing", "does not exist: is the backend running", "legacy"),
])
def test_socket_that_is_not_one_is_said_in_one_line(request: pytest.FixtureRequest, tmp_path: Path,
                                                   sockets: str, kind: str, says: str, protocol: str) -> None:
    """AMP says it at start (it connects at once); legacy at the first request (one connection each)."""
    path = os.path.join(sockets, "backend.sock")
    if kind == "regular":
        Path(path).write_text("not a socket\n")
    elif kind == "directory":
        os.mkdir(path)
    root = tmp_path / "root"
    root.mkdir()
    server = start_server(tmp_path, path, root, reactor_of(request), ["127.0.0.1"], "--backend-timeout", "4",
                          "--protocol", protocol, wait=False)
    try:
        wait_for_log(server, "Serving TFTP on")
        if protocol == "amp":
            wait_for_log(server, says)
        for i in range(3):
            started = time.monotonic()
            result = tftp_client.get("127.0.0.1", server.port, f"pxelinux.cfg/x{i}".encode(), timeout=3.0,
                                     retries=1, deadline=10)
            assert result.error == (0, "Backend unavailable"), result
            assert time.monotonic() - started < 1.5, "answered at once, not after --backend-timeout"
        time.sleep(2.5)  # a few retries' worth
        log = server.log()
        assert log.count(says) == 1, log[-3000:]
        assert "Scheduling retry" not in log and "Traceback" not in log, log[-3000:]
    finally:
        server.stop()
    assert "Lost the connection" not in server.log()


def test_clean_shutdown_does_not_warn(request: pytest.FixtureRequest, tmp_path: Path, sockets: str) -> None:
    path = os.path.join(sockets, "backend.sock")
    root = tmp_path / "root"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"Hello from tftp-offload\n")
    reactor = reactor_of(request)
    backend = start_backend(tmp_path / "b", path, root, reactor)
    try:
        server = start_server(tmp_path / "s", path, root, reactor, ["127.0.0.1"])
        try:
            assert tftp_client.get("127.0.0.1", server.port, b"hello.txt", deadline=10).complete
        finally:
            server.stop()
    finally:
        backend.stop()
    log = server.log()
    assert "Server Shut Down." in log
    assert "Lost the connection to the backend" not in log, log[-3000:]
    assert not [line for line in log.splitlines() if "[warn]" in line and "backend" in line.lower()], log[-3000:]
