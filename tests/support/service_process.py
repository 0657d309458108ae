"""A real `twistd -n tftp-offload` process as a service manager runs it: on a socket it
binds itself, or on one it inherits (systemd socket activation), stopped by SIGTERM.

Used by test_activation.py and test_shutdown.py. No reactor here: the tests are plain
synchronous pytest functions driving real processes and real sockets.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from tests.support.harness import Managed

REPO = Path(__file__).resolve().parents[2]

# What systemd does before it execs a socket-activated service: the listening socket is
# descriptor 3 (SD_LISTEN_FDS_START), LISTEN_FDS counts the descriptors, LISTEN_PID names
# the process they are for (the exec keeps the PID). The socket is left blocking, as
# systemd leaves it: the server must make it non-blocking itself.
LAUNCHER = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)  # inheritable, unlike the original
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="tftp")
os.execv(sys.argv[2], sys.argv[2:])
"""

TWISTD_MAIN = "from twisted.scripts.twistd import run; run()"
DEBIAN_TWISTD = "/usr/bin/twistd3"


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port free on `host` right now (for tools that bind it themselves)."""
    with socket.socket(family_of(host), socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def bound_socket(host: str) -> socket.socket:
    """A bound, blocking UDP socket on a port the kernel picks; dual-stack when `host` is `::`."""
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    if host == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, 0))
    return sock


class Twistd(Managed):
    """One `twistd -n tftp-offload` process, its log, and how it ended (a clean one, checked)."""

    def __init__(self, proc: "subprocess.Popen[bytes]", log_path: Path, port: int) -> None:
        self.proc = proc
        self.log_path = log_path
        self.port = port
        self.stopped_after: Optional[float] = None
        """Seconds from SIGTERM to the process's exit, once stop() has seen it."""

    def wait_for_log(self, text: str, timeout: float = 15.0) -> None:
        end = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None:
                raise AssertionError(f"twistd exited ({self.proc.returncode}) before logging {text!r}:\n"
                                     f"{self.log()[-4000:]}")
            if time.monotonic() > end:
                raise AssertionError(f"twistd did not log {text!r} within {timeout} s:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def terminate(self) -> float:
        """SIGTERM to this process only (what systemd's KillSignal= sends); returns when it was sent."""
        sent = time.monotonic()
        os.kill(self.proc.pid, signal.SIGTERM)
        return sent

    def wait_exit(self, sent: float, timeout: float = 20.0) -> float:
        """Wait for the exit after a SIGTERM sent at `sent`: it must be a clean shutdown.

        twistd stops its reactor on SIGTERM (the service drains) and, once shut down,
        re-raises the signal so that its parent sees how it ended: -SIGTERM here, which
        systemd counts as a clean exit. Returns seconds from the SIGTERM to the exit."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"twistd {self.pid} still running {timeout} s after SIGTERM:\n"
                                 f"{self.log()[-4000:]}") from None
        self.stopped_after = time.monotonic() - sent
        log = self.log()
        assert self.proc.returncode in (0, -signal.SIGTERM), (self.proc.returncode, log[-4000:])
        assert "Server Shut Down." in log, log[-4000:]
        assert "Traceback" not in log, log[-8000:]
        return self.stopped_after

    def stop(self, timeout: float = 20.0) -> float:  # type: ignore[override]
        """Unlike Managed.stop, insists on a clean exit and returns how long it took."""
        return self.wait_exit(self.terminate(), timeout)

    def kill_if_running(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def twistd_command(twistd: str, log_path: Path, reactor: str, args: Sequence[str]) -> List[str]:
    """`twistd` is "venv" (this interpreter's Twisted) or a path such as /usr/bin/twistd3."""
    cmd = [sys.executable, "-c", TWISTD_MAIN] if twistd == "venv" else [twistd]
    cmd += ["-n", "--pidfile=", "--logfile", str(log_path)]
    if reactor != "default":
        cmd += ["--reactor", reactor]
    return [*cmd, "tftp-offload", *args]


def environment() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def start_inherited(sock: socket.socket, workdir: Path, args: Sequence[str], reactor: str = "default",
                    twistd: str = "venv") -> Twistd:
    """twistd started on `sock` handed over as systemd does; our copy of it is closed."""
    log_path = workdir / "twistd.log"
    cmd = [sys.executable, "-c", LAUNCHER, str(sock.fileno()),
           *twistd_command(twistd, log_path, reactor, args)]
    with (workdir / "stdout").open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=environment(), pass_fds=(sock.fileno(),),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    port = int(sock.getsockname()[1])
    sock.close()
    return Twistd(proc, log_path, port)


def start_listening(workdir: Path, args: Sequence[str], reactor: str = "default") -> Twistd:
    """twistd binding its own socket on 127.0.0.1 (a port picked here)."""
    port = free_udp_port()
    log_path = workdir / "twistd.log"
    cmd = twistd_command("venv", log_path, reactor, [*args, "--listen", f"127.0.0.1:{port}"])
    with (workdir / "stdout").open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=environment(), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out)
    server = Twistd(proc, log_path, port)
    server.wait_for_log(f"Serving TFTP on 127.0.0.1:{port}")
    return server


def curl_fetch(host: str, port: int, name: str, out: Path, *options: str) -> None:
    """Fetch with curl (a real client); raises with curl's message on failure."""
    result = subprocess.run(
        ["curl", "-sS", "-g", "--max-time", "30", *options, "-o", str(out),
         f"tftp://{url_host(host)}:{port}/{name}"],
        check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"curl exit {result.returncode}: {result.stderr}"


# A lock-step TFTP client that the test paces itself (curl cannot be paused mid-transfer).

DATA, ACK, ERROR = 3, 4, 5


def rrq(name: bytes) -> bytes:
    return b"\0\1" + name + b"\0octet\0"


def ack(block: int) -> bytes:
    return struct.pack("!HH", ACK, block & 0xFFFF)


class PacedClient:
    """Reads a file block by block (512-byte blocks, no options), as slowly as the test likes."""

    def __init__(self, host: str, port: int, name: bytes) -> None:
        self.sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(5)
        self.sock.sendto(rrq(name), (host, port))
        self.server: Optional[Tuple[str, int]] = None
        self.blocks: List[bytes] = []
        self.done = False

    def next_block(self) -> bytes:
        """Receive the next new block (re-ACKing duplicates) and ACK it."""
        want = len(self.blocks) + 1
        while True:
            datagram, addr = self.sock.recvfrom(65536)
            if self.server is None:
                self.server = addr[:2]
            opcode, block = struct.unpack("!HH", datagram[:4])
            assert opcode == DATA, f"expected DATA {want}, got {datagram[:80]!r}"
            if block == want & 0xFFFF:
                payload = datagram[4:]
                self.blocks.append(payload)
                self.sock.sendto(ack(block), self.server)
                self.done = len(payload) < 512
                return payload
            if block == (want - 1) & 0xFFFF:
                self.sock.sendto(ack(block), self.server)  # our ACK was lost or late: say it again

    def read_all(self) -> bytes:
        while not self.done:
            self.next_block()
        return b"".join(self.blocks)

    def datagrams_until_exit(self, server: "Twistd", timeout: float) -> Tuple[List[bytes], float]:
        """Everything the server sends (no ACKs sent) until its process exits, and when it exited."""
        got = []
        end = time.monotonic() + timeout
        while server.proc.poll() is None and time.monotonic() < end:
            self.sock.settimeout(0.02)
            with contextlib.suppress(socket.timeout):
                got.append(self.sock.recvfrom(65536)[0])
        exited = time.monotonic()
        self.sock.settimeout(0.2)
        try:
            while True:  # what was already on its way
                got.append(self.sock.recvfrom(65536)[0])
        except socket.timeout:
            pass
        return got, exited

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def servers() -> Iterator[List[Twistd]]:
    """Processes a test started; any still running at the end is killed (by PID)."""
    started: List[Twistd] = []
    yield started
    for server in started:
        server.kill_if_running()
