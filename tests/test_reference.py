"""End to end over the offload protocol: real `twistd -n tftp-offload --socket` and `twistd -n
tftp-offload-backend` processes, a real UNIX socket between them, real TFTP clients.

Lookups are counted in the backend's log (one "Lookup" line per get_reader call). The server reuses
an answer for the same (server address, client address, filename), so tests that count use names or
client addresses (127.0.0.x) no other test uses. Every client is a subprocess or a thread with a
timeout; every loop is bounded; all traffic stays on loopback.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import pytest

from tests.support import tftp_client
from tests.support.harness import REPO, TwistdServer, url_host, wait_until_serving
from tests.support.offload_support import Process, fd_count, short_dir, start_backend, start_server, vm_hwm_kib
from tftp_offload.reference import PATTERN_PERIOD, pattern, render_grub, render_pxelinux

LOADGEN = REPO / "tests" / "support" / "loadgen.py"
BIG = 300_000
FIRST_HOST = "127.0.0.1"
HOSTS = (*(f"127.0.0.{i}" for i in range(1, 9)), "::1")


@dataclass
class Stack:
    backend: Process
    server: TwistdServer
    socket_path: str
    root: Path
    ephemeral: Path
    workdir: Path

    @property
    def port(self) -> int:
        return self.server.port

    def lookups(self, name: bytes, local: str = "") -> int:
        """get_reader calls for `name` (asked at server address `local`, if given), from the backend's log."""
        lines = [line for line in self.backend.log().splitlines() if f"Lookup {name!r} for " in line]
        return len([line for line in lines if not local or f" at ('{local}', " in line])

    def answered(self, name: bytes, local: str = "") -> List[str]:
        """The answer kinds the backend gave for `name` (asked at server address `local`), from its log."""
        lines = [line for line in self.backend.log().splitlines() if f"Answered {name!r} for " in line]
        if local:
            lines = [line for line in lines if f" at ('{local}', " in line]
        return [line.rsplit(": ", 1)[1].split(",")[0] for line in lines]


def run(cmd: Sequence[str], timeout: float = 120) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(list(cmd), check=False, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: run scripts/setup")


def make_root(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "hello.txt").write_bytes(b"Hello from tftp-offload\n")
    (path / "1k.bin").write_bytes(os.urandom(1024))
    (path / "big.bin").write_bytes(os.urandom(BIG))
    return path


def reactor_of(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("reactor", "default"))


def check_logs(stack: Stack) -> List[str]:
    problems = []
    if "Traceback" in stack.server.log():
        problems.append(f"traceback in the server's log:\n{stack.server.log()[-6000:]}")
    backend_log = stack.backend.log()
    # errors/crash (faulty_reference.tac) makes the backend log a traceback on purpose; nothing else may.
    if backend_log.count("Traceback") != backend_log.count("RuntimeError: the reference backend crashed on purpose"):
        problems.append(f"unexpected traceback in the backend's log:\n{backend_log[-6000:]}")
    return problems


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A reference backend and a server on 127.0.0.1-8 and ::1 (one port), shared by this module."""
    workdir = tmp_path_factory.mktemp("offload")
    root = make_root(workdir / "root")
    ephemeral = workdir / "ephemeral"
    ephemeral.mkdir()
    sockets = short_dir()
    socket_path = os.path.join(sockets, "backend.sock")
    reactor = reactor_of(request)
    # With the tests' failure injection (errors/crash), which the shipped reference backend has not.
    backend = start_backend(workdir, socket_path, root, reactor, "--ephemeral-dir", str(ephemeral), faults=True)
    try:
        # One address here stands for a storm's many clients: no per-client request rate.
        server = start_server(workdir, socket_path, root, reactor, HOSTS, "--give-up", "3",
                              "--max-requests-per-second-per-client", "0")
    except BaseException:
        backend.stop()
        raise
    built = Stack(backend, server, socket_path, root, ephemeral, workdir)
    yield built
    problems = []
    for process in (server, backend):
        try:
            process.stop()
        except AssertionError as e:
            problems.append(str(e))
    problems += check_logs(built)
    shutil.rmtree(sockets, ignore_errors=True)
    assert not problems, "\n".join(problems)


@pytest.fixture
def healthy(stack: Stack) -> Iterator[Stack]:
    """The shared stack, checked alive and clean before and after each test."""
    assert stack.server.alive() and stack.backend.alive()
    yield stack
    assert stack.server.alive(), stack.server.log()[-4000:]
    assert stack.backend.alive(), stack.backend.log()[-4000:]
    assert not check_logs(stack)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)


# ----------------------------------------------------------------- every answer kind --


def expected(stack: Stack, name: str, host: str, client: str = "") -> bytes:
    """What `name` holds when asked at `host` by `client` (default: from `host` itself)."""
    client = client or host
    if name.startswith("pxelinux.cfg/"):
        return render_pxelinux(name, (host, stack.port), (client, 0))
    if name.startswith("grub/"):
        return render_grub(name, (host, stack.port), (client, 0))
    if name.startswith(("generated/", "ephemeral/")):
        digits = "".join(c for c in name.split("/")[1].split("-")[0] if c.isdigit())
        return pattern(0, int(digits))
    return (stack.root / name.replace("path/", "", 1)).read_bytes()


KINDS = [
    ("1k.bin", "inline"),
    ("pxelinux.cfg/01-52-54-00-12-34-56", "inline"),
    ("big.bin", "fd"),
    ("path/big.bin", "path"),
    ("ephemeral/300000-{client}", "ephemeral"),
    ("generated/big3000000", "stream"),
    ("generated/nosize500000", "stream"),
]


def client_download(client: str, stack: Stack, host: str, name: str, out: Path) -> "subprocess.CompletedProcess[str]":
    if client == "curl":
        return run(["curl", "-sS", "--max-time", "60", "--tftp-blksize", "1468", "-o", str(out),
                    f"tftp://{url_host(host)}:{stack.port}/{name}"], timeout=70)
    return run(["atftp", "--option", "blksize 1468", "--option", "windowsize 16", "--option", "tsize 0",
                "-g", "-r", name, "-l", str(out), host, str(stack.port)], timeout=70)


@pytest.mark.parametrize("name,kind", KINDS, ids=[kind + ":" + name.split("-{")[0] for name, kind in KINDS])
@pytest.mark.parametrize("client,host", [("curl", "127.0.0.2"), ("atftp", "127.0.0.3")])
def test_every_answer_kind_downloads_intact(healthy: Stack, tmp_path: Path, client: str, host: str,
                                            name: str, kind: str) -> None:
    need(client)
    name = name.format(client=client)
    out = tmp_path / "out"
    proc = client_download(client, healthy, host, name, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # curl and atftp bind no address: the kernel gives them 127.0.0.1 whatever address they ask.
    assert out.read_bytes() == expected(healthy, name, host, client=FIRST_HOST)
    assert healthy.answered(name.encode(), host) == [kind]


def test_ipv6_and_socket_permissions(healthy: Stack, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = client_download("curl", healthy, "::1", "grub/grub.cfg-ipv6", out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == render_grub("grub/grub.cfg-ipv6", ("::1", healthy.port), ("::1", 0))
    assert stat.S_IMODE(os.stat(healthy.socket_path).st_mode) == 0o600


@pytest.fixture(scope="module")
def big_stream_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of generated/big209715200 on disk, for the load generator to verify every byte against."""
    root = tmp_path_factory.mktemp("copy")
    (root / "generated").mkdir()
    with (root / "generated" / "big209715200").open("wb") as f:
        for offset in range(0, 200 << 20, 1 << 20):
            f.write(pattern(offset, 1 << 20))
    return root


def test_200_mib_stream_with_bounded_server_memory(healthy: Stack, big_stream_copy: Path) -> None:
    assert tftp_client.get(FIRST_HOST, healthy.port, b"generated/big2000000").complete  # warm up the stream path
    before = vm_hwm_kib(healthy.server.pid)
    proc = run([sys.executable, str(LOADGEN), "--host", FIRST_HOST, "--port", str(healthy.port),
                "--file", "generated/big209715200", "--root", str(big_stream_copy), "--blksize", "1468",
                "--windowsize", "64", "--tsize", "--max-time", "200"], timeout=220)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["ok"] == 1 and stats["verified"] is True, proc.stdout
    after = vm_hwm_kib(healthy.server.pid)
    # The read-ahead is a couple of windows: the server's peak memory must not grow with the file.
    assert after - before < 24 * 1024, f"server VmHWM grew from {before} KiB to {after} KiB"
    assert healthy.answered(b"generated/big209715200") == ["stream"]


# -------------------------------------------------------------------------- errors --


@pytest.mark.parametrize(
    "name,code,message",
    [
        (b"errors/not-found", 1, "No such file on the reference backend"),
        (b"errors/access-violation", 2, "The reference backend says no"),
        (b"errors/illegal-operation", 4, "The reference backend cannot do that"),
        (b"errors/backend-error", 0, "Reference backend: something went wrong"),
        (b"errors/crash", 0, "Internal server error"),
        (b"no-such-file", 1, "File not found"),
        (b"../etc/passwd", 2, "Access violation: '..' in filename"),
        (b"path/../../etc/passwd", 2, "Access violation: '..' in filename"),
    ],
)
def test_backend_errors_reach_the_client(healthy: Stack, name: bytes, code: int, message: str) -> None:
    result = tftp_client.get(FIRST_HOST, healthy.port, name, deadline=10)
    assert result.error == (code, message), result
    assert result.data == b""


def test_non_ascii_name_end_to_end(healthy: Stack) -> None:
    """caf\u00e9.txt through the AMP backend and the reference backend's directory: served as any name."""
    name = "caf\u00e9.txt"
    (healthy.root / name).write_bytes(b"un caf\xc3\xa9\n")
    result = tftp_client.get(FIRST_HOST, healthy.port, name.encode(), deadline=10)
    assert result.complete and result.data == b"un caf\xc3\xa9\n", result.error


def test_curl_sees_file_not_found(healthy: Stack, tmp_path: Path) -> None:
    need("curl")
    proc = run(["curl", "-sS", "--max-time", "20", "-o", str(tmp_path / "x"),
                f"tftp://{FIRST_HOST}:{healthy.port}/errors/not-found"], timeout=30)
    assert proc.returncode == 68, proc.stderr  # CURLE_TFTP_NOTFOUND


# ------------------------------------------------------------------ lookups saved --


def test_twenty_identical_requests_in_flight_cost_one_lookup(healthy: Stack) -> None:
    """20 clients on one address ask for the same file while the backend takes a second to answer."""
    host, name = "127.0.0.4", b"slow/1/pxelinux.cfg/storm"
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: tftp_client.get(host, healthy.port, name, {"blksize": "1468"},
                                                          timeout=3.0, deadline=20), range(20)))
    want = render_pxelinux("pxelinux.cfg/storm", (host, healthy.port), (host, 0))
    assert [r.data for r in results] == [want] * 20, [r.error for r in results]
    assert len({r.server for r in results}) == 20, "each client has its own transfer"
    assert healthy.lookups(name, host) == 1


@pytest.mark.parametrize("name,kind", [(b"big.bin", "fd"), (b"grub/grub.cfg-uefi", "inline"),
                                       (b"generated/big3000000-uefi", "stream")])
def test_uefi_probe_then_real_request_cost_one_lookup(healthy: Stack, name: bytes, kind: str) -> None:
    """RRQ tsize=0 -> OACK (with the size) -> ERROR 8 from the client -> the real RRQ: one lookup."""
    host = {"fd": "127.0.0.5", "inline": "127.0.0.6", "stream": "127.0.0.7"}[kind]
    want = expected(healthy, name.decode(), host)
    with tftp_client.udp_socket(host) as sock:
        sock.settimeout(5)
        sock.sendto(tftp_client.rrq(name, options={"tsize": "0", "blksize": "1468"}), (host, healthy.port))
        oack, transfer = sock.recvfrom(70000)
        assert tftp_client.opcode_of(oack) == tftp_client.OACK, oack
        assert tftp_client.parse_oack(oack)["tsize"] == str(len(want))
        sock.sendto(tftp_client.error(8, b"size probe done"), transfer)
    result = tftp_client.get(host, healthy.port, name, {"blksize": "1468"}, deadline=30)
    assert result.complete and result.data == want, result.error
    assert healthy.lookups(name, host) == 1
    assert healthy.answered(name, host) == [kind]


def test_thousand_ephemeral_transfers_leave_nothing_behind(healthy: Stack) -> None:
    """1,000 distinct ephemeral answers: 880 downloaded in full (16 at a time), 60 aborted by the client
    with an ERROR after the first block, 60 abandoned after it (the server gives up after --give-up 3 s).
    No ephemeral file is left, and the server ends up holding no more descriptors than before (so the
    space of the unlinked files is freed too, once the cached answers expire)."""
    size = 30_000
    names = [f"ephemeral/{size}-e{i}".encode() for i in range(1000)]
    want = pattern(0, size)
    baseline = fd_count(healthy.server.pid)

    def download(name: bytes) -> bool:
        result = tftp_client.get(FIRST_HOST, healthy.port, name, {"blksize": "1468", "windowsize": "8"},
                                 timeout=2.0, deadline=30)
        return result.complete and result.data == want

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert all(pool.map(download, names[:880]))
    abandoned: List[socket.socket] = []
    try:
        for i, name in enumerate(names[880:]):
            sock = tftp_client.udp_socket(FIRST_HOST)
            sock.settimeout(5)
            sock.sendto(tftp_client.rrq(name, options={"blksize": "1468"}), (FIRST_HOST, healthy.port))
            oack, transfer = sock.recvfrom(70000)
            assert tftp_client.opcode_of(oack) == tftp_client.OACK, oack
            sock.sendto(tftp_client.ack(0), transfer)
            data, _ = sock.recvfrom(70000)  # the first block: the transfer is under way
            assert tftp_client.opcode_of(data) == tftp_client.DATA
            if i % 2:
                sock.sendto(tftp_client.error(0, b"changed my mind"), transfer)
                sock.close()
            else:
                abandoned.append(sock)  # never ACKs again
        assert not list(healthy.ephemeral.iterdir()), "ephemeral files are unlinked when the server opens them"
        # The abandoned transfers end by timeout, the cached answers expire: every descriptor is closed.
        wait_until(lambda: fd_count(healthy.server.pid) <= baseline, timeout=20)
    finally:
        for sock in abandoned:
            sock.close()
    assert not list(healthy.ephemeral.iterdir())
    assert sum(healthy.lookups(name) for name in names) == 1000


# ------------------------------------------------------------- backend down and back --


def fetch_error(host: str, port: int, name: bytes) -> Tuple[Optional[Tuple[int, str]], float]:
    started = time.monotonic()
    result = tftp_client.get(host, port, name, timeout=5.0, retries=1, deadline=15)
    return result.error, time.monotonic() - started


def test_backend_down_then_back(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The server starts first and waits for its backend; a backend gone means a TFTP error within the
    timeout (and the listener keeps answering); a restarted backend is found again, the server untouched."""
    reactor = reactor_of(request)
    root = make_root(tmp_path / "root")
    sockets = short_dir()
    socket_path = os.path.join(sockets, "b.sock")
    timeout = 1.5
    server = start_server(tmp_path / "server", socket_path, root, reactor, [FIRST_HOST],
                          "--backend-timeout", str(timeout), wait=False)
    backends: List[Process] = []
    try:
        time.sleep(0.5)  # the server is up, knocking on a socket that does not exist yet
        backends.append(start_backend(tmp_path / "b1", socket_path, root, reactor))
        wait_until_serving(server, timeout=10)

        # A backend too slow for the server's timeout.
        error, took = fetch_error(FIRST_HOST, server.port, b"slow/5/hello.txt")
        assert error == (0, "Backend did not answer in time") and took < timeout + 1.0, (error, took)

        backends[0].stop()
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            outcomes = list(pool.map(lambda i: fetch_error(FIRST_HOST, server.port, f"pxelinux.cfg/down-{i}".encode()),
                                     range(5)))
        for error, took in outcomes:
            assert error == (0, "Backend unavailable") and took < timeout + 1.0, outcomes
        error, took = fetch_error(FIRST_HOST, server.port, b"1k.bin")  # and again: the listener still answers
        assert error == (0, "Backend unavailable") and took < timeout + 1.0, (error, took)

        backends.append(start_backend(tmp_path / "b2", socket_path, root, reactor))

        def back() -> bool:
            result = tftp_client.get(FIRST_HOST, server.port, b"1k.bin", timeout=2.0, retries=1, deadline=10)
            return result.complete and result.data == (root / "1k.bin").read_bytes()

        wait_until(back, timeout=10, step=0.2)
        assert server.alive(), "the server must not have restarted"
    finally:
        server.stop()
        for backend in backends:
            backend.stop()
        shutil.rmtree(sockets, ignore_errors=True)
    assert "Traceback" not in server.log(), server.log()[-6000:]
    assert "Lost the connection to the backend" in server.log()
    assert server.log().count("Connected to the backend") == 2
    # Quietly retried: one line when it went (at start, and at the stop), none per attempt.
    assert server.log().count("Cannot reach the backend") == 1, server.log()[-6000:]
    assert server.log().count("Lost the connection to the backend") == 1
    assert "Scheduling retry" not in server.log()


def test_reference_backend_options() -> None:
    from twisted.python import usage

    from tftp_offload.reference import Options

    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--socket", "/tmp/x.sock"])
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--socket", "/tmp/x.sock", "--root", "/tmp", "--mode", "0666"])
    options = Options()
    options.parseOptions(["--socket", "/tmp/x.sock", "--root", "/tmp", "--mode", "0660"])
    assert options["mode"] == 0o660
    assert Options()["mode"] == 0o600


def test_the_backend_logs_each_transfer_report(healthy: Stack, tmp_path: Path) -> None:
    """TransferFinished reaches the backend that chose the file: one log line per transfer, with its outcome."""
    tag = f"report_{os.getpid()}_{time.monotonic_ns()}"  # [\w.]: a valid generated/ suffix
    out = tmp_path / "out"
    proc = client_download("curl", healthy, "127.0.0.1", f"pxelinux.cfg/{tag}", out)
    assert proc.returncode == 0, proc.stderr
    size = out.stat().st_size
    # A client that gives up after the first block.
    with tftp_client.udp_socket("127.0.0.1") as sock:
        sock.settimeout(5)
        sock.sendto(tftp_client.rrq(f"generated/big100000-{tag}".encode()), ("127.0.0.1", healthy.port))
        _, peer = sock.recvfrom(70000)
        sock.sendto(tftp_client.error(0, b"enough"), peer)

    def lines() -> List[str]:
        return [line for line in healthy.backend.log().splitlines() if "Transfer of" in line and tag in line]

    wait_until(lambda: len(lines()) == 2)
    done, quit_ = sorted(lines(), key=lambda line: "generated" in line)
    assert f"Transfer of 'pxelinux.cfg/{tag}' to 127.0.0.1:" in done
    assert f": complete, {size} bytes in " in done and "(blksize 1468, window 1, 0 retransmits)" in done
    assert f"Transfer of 'generated/big100000-{tag}' to 127.0.0.1:" in quit_
    assert ": client-error, 0 bytes in " in quit_ and "client said 0: enough)" in quit_


def test_shipped_reference_backend_injects_no_failures(tmp_path: Path) -> None:
    """errors/* and errors/crash live in the tests (faulty_reference.tac), not in the production plugin."""
    from twisted.python import context

    from tftp_offload.errors import FileNotFound
    from tftp_offload.reference import ReferenceBackend

    backend = ReferenceBackend(str(make_root(tmp_path / "root")), str(tmp_path))
    with pytest.raises(FileNotFound):
        context.call({"local": ("127.0.0.1", 69), "remote": ("127.0.0.1", 1)}, backend.get_reader, b"errors/crash")
    for name in (b"errors/not-found", b"errors/access-violation", b"errors/illegal-operation", b"errors/backend-error"):
        with pytest.raises(FileNotFound):
            context.call({"local": ("127.0.0.1", 69), "remote": ("127.0.0.1", 1)}, backend.get_reader, name)


@pytest.mark.parametrize("offset,length", [(0, 10), (PATTERN_PERIOD - 3, 10), (5, 3 * PATTERN_PERIOD + 7), (0, 0)])
def test_reference_pattern_is_one_endless_sequence(offset: int, length: int) -> None:
    """pattern(a, n) is a window on one periodic sequence, whatever the window (the tests rely on it)."""
    whole = pattern(0, offset + length)
    assert pattern(offset, length) == whole[offset:]
    assert len(pattern(offset, length)) == length
