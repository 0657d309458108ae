"""Helpers for the integration tests: addresses, free ports, a running twistd process.

Imported by conftest.py and the tests; no reactor here either (see conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

from tests.support import tftp_client

REPO = Path(__file__).resolve().parents[2]
HOSTS = ("127.0.0.1", "::1")
MiB = 1 << 20

SMALL_FILES: Dict[str, Union[bytes, int]] = {
    "hello.txt": b"Hello from tftp-offload\n",
    "1k.bin": 1024,
    "1m.bin": MiB,
}
BIG_FILE = "100m.bin"
BIG_SIZE = 100 * MiB


# ---------------------------------------------------------------- ports --


def free_udp_port(hosts: Sequence[str] = HOSTS, attempts: int = 50) -> int:
    """A UDP port number free on every address in `hosts` right now (the kernel picks it)."""
    for _ in range(attempts):
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(socket.socket(tftp_client.family_of(hosts[0]), socket.SOCK_DGRAM))
            first.bind((hosts[0], 0))
            port = first.getsockname()[1]
            try:
                for host in hosts[1:]:
                    other = stack.enter_context(socket.socket(tftp_client.family_of(host), socket.SOCK_DGRAM))
                    other.bind((host, port))
            except OSError:
                continue
            return int(port)
    raise RuntimeError(f"no UDP port free on all of {hosts} after {attempts} attempts")


def free_udp_span(count: int, host: str = "127.0.0.1", attempts: int = 50) -> int:
    """The first of `count` consecutive UDP port numbers free on `host` right now."""
    for _ in range(attempts):
        low = free_udp_port((host,))
        with contextlib.ExitStack() as stack:
            try:
                for port in range(low, low + count):
                    held = stack.enter_context(socket.socket(tftp_client.family_of(host), socket.SOCK_DGRAM))
                    held.bind((host, port))
            except OSError:
                continue
            return low
    raise RuntimeError(f"no {count} consecutive UDP ports free on {host} after {attempts} attempts")


# -------------------------------------------------------------- servers --


def listen_arg(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class Managed:
    """A process a test started, with its twistd log: stopped by its PID only.

    Subclasses provide `proc` and `log_path`.
    """

    proc: "subprocess.Popen[bytes]"
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """The whole log, oldest first: twistd rotates its log file every megabyte (x.log.1 is newer than x.log.2)."""
        rotated = sorted(self.log_path.parent.glob(self.log_path.name + ".*"),
                         key=lambda path: int(path.suffix[1:]) if path.suffix[1:].isdigit() else 0, reverse=True)
        text = []
        for path in [*rotated, self.log_path]:
            with contextlib.suppress(FileNotFoundError):
                text.append(path.read_text(errors="replace"))
        return "".join(text)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> Optional[int]:
        """SIGTERM to this process only, then wait (SIGKILL after `timeout`)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                raise AssertionError(f"process {self.proc.pid} ignored SIGTERM for {timeout} s") from None
        return self.proc.returncode


@dataclass
class TwistdServer(Managed):
    """A running `twistd -n tftp-offload`: where it listens, its log, its process."""

    hosts: List[str]
    port: int
    root: Path
    log_path: Path
    proc: "subprocess.Popen[bytes]"
    args: List[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return self.hosts[0]

    def assert_healthy(self) -> None:
        """The process runs and its log holds no traceback."""
        assert self.alive(), f"twistd exited with {self.proc.returncode}:\n{self.log()[-4000:]}"
        log = self.log()
        assert "Traceback" not in log, log[-8000:]


StartServer = Callable[..., TwistdServer]
"""The `twistd_factory` fixture: start(*args, hosts=..., root=..., ready=...) -> TwistdServer."""


def wait_until_serving(server: TwistdServer, timeout: float = 10.0) -> None:
    """Poll each listening address with an RRQ for hello.txt until a DATA answer comes back.

    One client socket per address, so that a retried RRQ is a duplicate the server coalesces,
    and every transfer the probe started is ACKed to its end: none is left holding a session
    (a test of --max-sessions counts them)."""
    end = time.monotonic() + timeout
    for host in server.hosts:
        with tftp_client.udp_socket(host) as sock:
            served = False
            while not served:
                if not server.alive():
                    raise AssertionError(f"twistd exited with {server.proc.returncode}:\n{server.log()[-4000:]}")
                if time.monotonic() > end:
                    raise AssertionError(f"twistd not answering on {host} after {timeout} s:\n{server.log()[-4000:]}")
                with contextlib.suppress(ConnectionRefusedError):  # ICMP port unreachable: not listening yet
                    sock.sendto(tftp_client.rrq(b"hello.txt"), (host, server.port))
                # Collect answers for a moment: the first means it serves; later ones are transfers
                # started by earlier tries, which are ended too.
                sock.settimeout(0.3)
                while True:
                    try:
                        reply, addr = sock.recvfrom(70000)
                    except (socket.timeout, ConnectionRefusedError):
                        break
                    assert tftp_client.opcode_of(reply) == tftp_client.DATA, reply
                    sock.sendto(tftp_client.ack(1), addr)  # hello.txt is one block: this ends the transfer
                    served = True
                    sock.settimeout(0.05)
                if not served:
                    time.sleep(0.05)


def twistd_command(args: Sequence[str], log_path: Path, pid_path: Path, reactor: str = "default") -> List[str]:
    """The command line of a foreground twistd running the tftp-offload plugin."""
    cmd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n"]
    if reactor != "default":
        cmd += ["--reactor", reactor]
    return [*cmd, "--logfile", str(log_path), "--pidfile", str(pid_path), "tftp-offload", *args]
