"""examples/embed.py runs as written and serves curl; under `--reactor=asyncio`, on that reactor."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from tests.support import tftp_client
from tests.support.harness import REPO, free_udp_port

EXAMPLE = REPO / "examples" / "embed.py"

ASYNCIO_LAUNCHER = (
    "import runpy, sys; from twisted.internet import asyncioreactor; asyncioreactor.install(); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)
"""Runs the example unchanged with the asyncio reactor installed first, as rackd installs it
(`install()` raises if any other reactor was imported before, so the example cannot run on another)."""


def example_command(reactor: str, port: int, root: Path) -> List[str]:
    if reactor == "asyncio":
        return [sys.executable, "-c", ASYNCIO_LAUNCHER, str(EXAMPLE), str(port), str(root)]
    return [sys.executable, str(EXAMPLE), str(port), str(root)]


@pytest.fixture
def example(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tuple[int, Path, "subprocess.Popen[bytes]"]]:
    """The example serving `tmp_path/root` on 127.0.0.1; stopped with SIGTERM (its PID only)."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "kernel").write_bytes(os.urandom(300_000))
    port = free_udp_port(("127.0.0.1",))
    reactor = str(request.config.getoption("reactor", "default"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    out_path = tmp_path / "example.out"
    with out_path.open("wb") as out:
        proc = subprocess.Popen(example_command(reactor, port, root), cwd=tmp_path, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        end = time.monotonic() + 10
        while b"Serving TFTP on" not in out_path.read_bytes():
            assert proc.poll() is None, out_path.read_text()
            assert time.monotonic() < end, "the example did not start:\n" + out_path.read_text()
            time.sleep(0.05)
        yield port, root, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
                raise AssertionError("the example ignored SIGTERM") from None
    output = out_path.read_text()
    assert proc.returncode == 0, output
    assert "Traceback" not in output, output


def curl(port: int, name: str, out: Path) -> "subprocess.CompletedProcess[bytes]":
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed: run scripts/setup")
    return subprocess.run(["curl", "-s", "--max-time", "20", "--tftp-blksize", "1468", "-o", str(out),
                           f"tftp://127.0.0.1:{port}/{name}"], capture_output=True, timeout=30, check=False)


def test_example_serves_curl(example: Tuple[int, Path, "subprocess.Popen[bytes]"], tmp_path: Path) -> None:
    port, root, _proc = example

    result = curl(port, "hello.cfg", tmp_path / "hello.cfg")
    assert result.returncode == 0, result
    text = (tmp_path / "hello.cfg").read_text()
    assert "KERNEL http://127.0.0.1:5248/images/linux" in text
    assert "client=127.0.0.1" in text

    result = curl(port, "kernel", tmp_path / "kernel")
    assert result.returncode == 0, result
    assert (tmp_path / "kernel").read_bytes() == (root / "kernel").read_bytes()

    assert curl(port, "missing", tmp_path / "missing").returncode == 68  # TFTP file not found

    # Still answering requests after all that (a direct probe, independent of curl).
    reply, _ = tftp_client.first_reply("127.0.0.1", port, tftp_client.rrq(b"../etc/passwd"))
    assert tftp_client.parse_error(reply)[0] == 2
