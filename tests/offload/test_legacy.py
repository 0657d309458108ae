"""The legacy MAAS offload backend (offload/legacy.py) against a clean-room responder.

`legacy_responder` plays rackd from the format's description. Most tests run
the server, the backend and the responder in this process over real sockets
(UDP on loopback, a UNIX socket in a private folder); the last ones run a real
`twistd -n tftp-offload --socket PATH --protocol legacy` and the responder as
processes, and fetch with curl.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError
from twisted.logger import formatEvent
from twisted.python import context

from tests.support import legacy_responder
from tests.support import tftp_client as wire
from tests.support.harness import REPO, TwistdServer, free_udp_port, twistd_command, wait_until_serving
from tests.support.inprocess import (
    Serving,
    download,
    events_with,
    get_reactor,
    log_events,  # noqa: F401  (fixture)
    serve,  # noqa: F401  (fixture)
    until,
)
from tests.support.legacy_responder import MALFORMED, Responder, render
from tftp_offload.errors import AccessViolation, BackendError
from tftp_offload.offload.legacy import INVALID, NO_ANSWER, UNREACHABLE, LegacyBackend

HELLO = b"Hello from the legacy responder\n"
BIG = os.urandom(300_000)
"""Several windows' worth: long enough for a client to abort midway."""

Events = List[Dict[str, Any]]


# ------------------------------------------------- in-process, over real sockets --


@dataclass
class Rackd:
    """A responder on a UNIX socket, standing in for rackd."""

    state: Responder
    socket_path: str
    root: Path
    eph_dir: Path
    port: Any = None

    def start(self) -> None:
        self.state, self.port = legacy_responder.listen(get_reactor(), self.socket_path, self.root, self.eph_dir)

    def backend(self, timeout: float = 2.0, late_grace: float = 0.0) -> LegacyBackend:
        """No grace by default: the exchange ends with the timeout (tests of late answers give one)."""
        return LegacyBackend(self.socket_path, timeout=timeout, late_grace=late_grace)

    def eph_files(self) -> List[str]:
        return os.listdir(self.eph_dir)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: a UNIX socket's path must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tftp-legacy-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def files(short_dir: Path) -> Tuple[Path, Path]:
    """(root, eph_dir): the responder's static files, and the folder it writes ephemeral ones to."""
    root, eph_dir, store = short_dir / "root", short_dir / "eph", short_dir / "store"
    for folder in (root, eph_dir, store):
        folder.mkdir()
    eph_dir.chmod(0o700)
    (root / "hello.txt").write_bytes(HELLO)
    (root / "big.bin").write_bytes(BIG)
    # MAAS's boot resources are symlinks into a cache: a static answer's path may be one.
    (store / "kernel").write_bytes(BIG[:5000])
    (root / "linked").symlink_to(store / "kernel")
    (root / "folder").mkdir()
    return root, eph_dir


@pytest.fixture
def rackd(short_dir: Path, files: Tuple[Path, Path]) -> Iterator[Rackd]:
    root, eph_dir = files
    responder = Rackd(Responder(root, eph_dir), str(short_dir / "rackd.sock"), root, eph_dir)
    responder.start()
    yield responder
    if responder.port is not None:
        pytest_twisted.blockon(responder.port.stopListening())


def lookups_running() -> List[Any]:
    """The legacy backend's own timers still pending: an exchange with rackd not yet over."""
    return [call for call in get_reactor().getDelayedCalls()
            if type(getattr(call.func, "__self__", None)).__module__ == "tftp_offload.offload.legacy"]


async def fetch(serve: Serving, service: Any, name: bytes, options: Any = None, host: str = "127.0.0.1") -> Any:
    peer = serve.peer(host)
    return await download(peer, (host, int(service.ports[0].getHost().port)), name, options)


@pytest_twisted.ensureDeferred
async def test_static_file(serve: Serving, rackd: Rackd, log_events: Events) -> None:
    service = serve(rackd.backend())
    got = await fetch(serve, service, b"big.bin", {"blksize": "1468", "tsize": "0", "windowsize": "8"})
    assert got.complete and got.data == BIG
    assert got.oack == {"blksize": "1468", "tsize": str(len(BIG)), "windowsize": "8"}
    [seen] = rackd.state.requests
    # The whole request in one read (rackd parses at the third NUL), addresses plain, no ports.
    assert seen.raw == b"127.0.0.1\x00127.0.0.1\x00big.bin\x00$"
    assert seen.reads == 1
    assert rackd.state.rejected == []
    # One connection per request must not mean log lines per request (Twisted's factories log two).
    assert not [formatEvent(e) for e in log_events if "factory" in formatEvent(e).lower()]


@pytest_twisted.ensureDeferred
async def test_static_file_through_a_symlink(serve: Serving, rackd: Rackd) -> None:
    service = serve(rackd.backend())
    got = await fetch(serve, service, b"linked")
    assert got.complete and got.data == BIG[:5000]


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
@pytest_twisted.ensureDeferred
async def test_ipv6_addresses(serve: Serving, rackd: Rackd) -> None:
    try:
        service = serve(rackd.backend(), listen=[("::1", 0)])
    except Exception as e:
        pytest.skip(f"no IPv6 loopback: {e}")
    got = await fetch(serve, service, b"hello.txt", host="::1")
    assert got.complete and got.data == HELLO
    assert rackd.state.requests[0].raw == b"::1\0::1\0hello.txt\0$"


@pytest_twisted.ensureDeferred
async def test_mapped_local_address_is_sent_as_ipv4(rackd: Rackd) -> None:
    """Whatever form the context carries (a dual-stack socket's view), rackd gets plain IPv4."""
    backend = rackd.backend()
    ctx = {"local": ("::ffff:c000:201", 69), "remote": ("::ffff:192.0.2.99", 2000), "mode": "octet", "options": {}}
    reader = await context.call(ctx, backend.get_reader, b"hello.txt")
    try:
        assert reader.read(100) == HELLO
    finally:
        reader.finish()
    assert rackd.state.requests[0].raw == b"192.0.2.1\x00192.0.2.99\0hello.txt\0$"


def test_called_outside_a_request(rackd: Rackd) -> None:
    with pytest.raises(BackendError, match="outside a TFTP request"):
        rackd.backend().get_reader(b"hello.txt")


@pytest_twisted.ensureDeferred
async def test_ephemeral_file_is_served_and_deleted(serve: Serving, rackd: Rackd) -> None:
    service = serve(rackd.backend())
    name = "eph/3000/pxelinux.cfg/01-52-54-00-12-34-56"
    got = await fetch(serve, service, name.encode(), {"tsize": "0"})
    assert got.complete
    assert service.server is not None and service.server.stats.answers["ephemeral"] == 1
    assert got.data == render("127.0.0.1", "127.0.0.1", name, 3000)
    assert got.oack == {"tsize": "3000"}
    assert rackd.eph_files() == []


@pytest_twisted.ensureDeferred
async def test_ephemeral_file_is_gone_before_the_transfer_ends(serve: Serving, rackd: Rackd) -> None:
    """Open, then unlink at once: after the client aborts midway (or if we died) nothing is left."""
    service = serve(rackd.backend())
    peer = serve.peer()
    server = ("127.0.0.1", int(service.ports[0].getHost().port))
    peer.send(wire.rrq(b"eph/200000/boot.ipxe"), server)
    datagram, tid = await peer.recv()
    assert wire.opcode_of(datagram) == wire.DATA and datagram[2:4] == b"\0\1"
    assert rackd.eph_files() == []  # already unlinked: the open descriptor is serving it
    peer.send(wire.error(0, b"user aborted"), tid)
    await serve.settled(service)
    assert rackd.eph_files() == []


@pytest_twisted.ensureDeferred
async def test_ephemeral_file_deleted_when_the_server_gave_up_first(serve: Serving, rackd: Rackd) -> None:
    """The answer comes after the server's own lookup timeout: its EPH file is still deleted."""
    service = serve(rackd.backend(timeout=3.0), lookup_timeout=0.3)
    got = await fetch(serve, service, b"slow/0.8/eph/100/late.cfg")
    assert got.error == (0, "Backend did not answer in time")
    assert len(rackd.eph_files()) == 1  # rackd wrote it; its answer is still on its way
    await until(lambda: not lookups_running(), 3.0, "the late answer")
    assert rackd.eph_files() == []


@pytest_twisted.ensureDeferred
async def test_late_answer_after_the_backend_timeout_is_read_and_its_file_deleted(
        serve: Serving, rackd: Rackd, log_events: Events) -> None:
    """rackd answers after our own timeout (the server's is timeout + 1, as tap.py wires it): the client
    is told at the timeout, the connection stays open, the late EPH file is deleted."""
    service = serve(rackd.backend(timeout=0.5, late_grace=3.0), lookup_timeout=1.5)
    started = time.monotonic()
    got = await fetch(serve, service, b"slow/1.2/eph/100/late.cfg")
    assert got.error == (0, NO_ANSWER)
    assert time.monotonic() - started < 1.2, "told at the backend's timeout, not the server's"
    await until(lambda: not lookups_running(), 4.0, "the late answer")
    assert rackd.eph_files() == []
    text = " ".join(formatEvent(e) for e in log_events)
    assert "Late answer from rackd for slow/1.2/eph/100/late.cfg" in text and "deleted" in text
    assert "closed without an answer" not in text


@pytest_twisted.ensureDeferred
async def test_a_late_answer_is_waited_for_a_bounded_time(rackd: Rackd, log_events: Events) -> None:
    """rackd never answers: the connection is closed at timeout + late_grace, and the log says we closed it."""
    backend = rackd.backend(timeout=0.2, late_grace=0.3)
    ctx = {"local": ("127.0.0.1", 69), "remote": ("127.0.0.1", 2000)}
    started = time.monotonic()
    with pytest.raises(BackendError, match=NO_ANSWER):
        await context.call(ctx, backend.get_reader, b"hang/forever")
    await until(lambda: not backend.lookups, 3.0, "the exchange to end")
    assert 0.45 < time.monotonic() - started < 2.0
    text = " ".join(formatEvent(e) for e in log_events)
    assert "Stopped waiting for rackd" in text and "closed without an answer" not in text


@pytest_twisted.ensureDeferred
async def test_stopping_waits_for_answers_in_flight(serve: Serving, rackd: Rackd, log_events: Events) -> None:
    """SIGTERM while rackd is still generating a file: the service stops once the answer came and its file
    is deleted; the session was ended at once ("Server shutting down"), and nobody blames rackd."""
    backend = rackd.backend(timeout=2.0, late_grace=2.0)
    backend.startService()
    service = serve(backend)
    peer = serve.peer()
    peer.send(wire.rrq(b"slow/0.5/eph/100/in-flight.cfg"), ("127.0.0.1", int(service.ports[0].getHost().port)))
    await until(lambda: rackd.state.requests, 2.0, "the request to reach rackd")
    service.drain_timeout = 0
    await service.stopService()
    reply, _ = await peer.recv()
    assert wire.parse_error(reply) == (0, "Server shutting down")
    stopping = backend.stopService()
    assert not stopping.called, "an exchange is still running"
    await stopping
    assert rackd.eph_files() == [] and not backend.lookups
    text = " ".join(formatEvent(e) for e in log_events)
    assert "closed without an answer" not in text


@pytest_twisted.ensureDeferred
async def test_traversal_is_access_violation_without_server_paths(serve: Serving, rackd: Rackd,
                                                                  log_events: Events) -> None:
    """rackd's "Insecure path: b'/srv/...' is not a child of ..." reaches the client as rackd's own TFTP server
    sends it: ERROR 2 "Access violation", no path."""
    service = serve(rackd.backend())
    for name in (b"../../etc/passwd", b"/../etc/passwd", b"pxelinux.cfg/../../../etc/shadow"):
        got = await fetch(serve, service, name)
        assert got.error == (2, "Access violation"), name
    assert any(r.filename == b"../../etc/passwd" for r in rackd.state.requests)


@pytest_twisted.ensureDeferred
async def test_ephemeral_file_deleted_when_the_caller_cancels(rackd: Rackd) -> None:
    """A caller that cancels the lookup (e.g. with addTimeout) leaves no EPH file behind either."""
    backend = rackd.backend(timeout=3.0)
    ctx = {"local": ("127.0.0.1", 69), "remote": ("127.0.0.1", 2000)}
    lookup = context.call(ctx, backend.get_reader, b"slow/0.3/eph/100/cancelled.cfg")
    lookup.addErrback(lambda failure: failure.trap(CancelledError))
    lookup.cancel()
    await until(lambda: not lookups_running(), 3.0, "the answer after the cancel")
    assert rackd.state.requests and rackd.eph_files() == []


@pytest_twisted.ensureDeferred
async def test_file_not_found(serve: Serving, rackd: Rackd, log_events: Events) -> None:
    service = serve(rackd.backend())
    got = await fetch(serve, service, b"pxelinux.cfg/01-aa-bb-cc-dd-ee-ff")
    assert got.error == (1, "File not found")
    assert events_with(log_events, outcome="refused", error_code=1)


@pytest.mark.parametrize(
    ("name", "tftp"),
    [
        (b"error/0/Insecure path", (2, "Access violation")),
        (b"error/0/File not found: /var/lib/maas/boot-resources/current/x", (1, "File not found")),
        (b"error/2/Not for you", (2, "Not for you")),
        (b"error/0/", (0, "Backend error")),
    ],
)
@pytest_twisted.ensureDeferred
async def test_error_replies(serve: Serving, rackd: Rackd, log_events: Events, name: bytes,
                             tftp: Tuple[int, str]) -> None:
    service = serve(rackd.backend())
    got = await fetch(serve, service, name)
    assert got.error == tftp
    assert events_with(log_events, outcome="refused", error_code=tftp[0])


@pytest.mark.parametrize("kind", sorted(MALFORMED))
@pytest_twisted.ensureDeferred
async def test_malformed_reply_is_error_0_and_a_log_line(serve: Serving, rackd: Rackd, log_events: Events,
                                                         kind: str) -> None:
    """Empty (rackd closed without answering), truncated, trailing bytes, wrong fields, too long..."""
    service = serve(rackd.backend())
    got = await fetch(serve, service, f"malformed/{kind}".encode())
    assert got.error == (0, INVALID)
    [warning] = events_with(log_events, outcome="backend-error")
    assert warning["log_level"].name == "warn"
    assert warning["file"] == f"malformed/{kind}".encode()
    if kind == "oversized":
        assert "exceeds" in warning["log_format"]
    else:
        assert warning["reason"] and warning["reply"]
    # The server goes on answering.
    again = await fetch(serve, service, b"hello.txt")
    assert again.complete and again.data == HELLO


@pytest_twisted.ensureDeferred
async def test_reply_in_pieces_is_read_to_the_end(serve: Serving, rackd: Rackd) -> None:
    service = serve(rackd.backend())
    got = await fetch(serve, service, b"split/hello.txt")
    assert got.complete and got.data == HELLO


@pytest_twisted.ensureDeferred
async def test_a_directory_is_not_served(serve: Serving, rackd: Rackd, log_events: Events) -> None:
    service = serve(rackd.backend())
    got = await fetch(serve, service, b"folder")
    assert got.error == (2, "Access violation: a directory")
    assert events_with(log_events, outcome="backend-error")


@pytest_twisted.ensureDeferred
async def test_silent_responder_times_out_without_blocking_others(serve: Serving, rackd: Rackd,
                                                                  log_events: Events) -> None:
    service = serve(rackd.backend(timeout=1.5))
    port = int(service.ports[0].getHost().port)
    stuck = serve.peer()
    started = time.monotonic()
    stuck.send(wire.rrq(b"hang/forever"), ("127.0.0.1", port))
    # Meanwhile other requests are answered at once.
    for _ in range(3):
        got = await fetch(serve, service, b"hello.txt")
        assert got.complete and got.data == HELLO
    assert stuck.received == [], "the stuck request was answered before the others were served"
    reply, _ = await stuck.recv()
    waited = time.monotonic() - started
    assert wire.parse_error(reply) == (0, NO_ANSWER)
    assert 1.4 < waited < 3.5, waited
    assert events_with(log_events, outcome="backend-timeout")
    assert not lookups_running()


@pytest_twisted.ensureDeferred
async def test_responder_absent_then_started(serve: Serving, rackd: Rackd, log_events: Events) -> None:
    """No socket: ERROR 0 at once, every time; once rackd listens, the next request is served."""
    await rackd.port.stopListening()
    rackd.port = None
    if os.path.exists(rackd.socket_path):
        os.unlink(rackd.socket_path)
    backend = rackd.backend(timeout=2.0)
    service = serve(backend)
    assert backend.connected is None  # no request yet: nothing known (no tftp_backend_up series)
    for _ in range(2):
        started = time.monotonic()
        got = await fetch(serve, service, b"hello.txt")
        assert got.error == (0, UNREACHABLE)
        assert time.monotonic() - started < 1.0  # at once, not after the 2 s backend timeout
    assert len(events_with(log_events, outcome="backend-unavailable")) == 2
    assert backend.connected is False

    # A socket file nobody listens on (rackd died): refused at once too.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(rackd.socket_path)
    stale.close()
    got = await fetch(serve, service, b"hello.txt")
    assert got.error == (0, UNREACHABLE)
    os.unlink(rackd.socket_path)

    rackd.start()
    got = await fetch(serve, service, b"hello.txt")
    assert got.complete and got.data == HELLO
    assert backend.connected is True
    assert service.server is not None and service.server.stats.answers["path"] == 1  # a static file


def test_unsendable_filename_never_reaches_rackd(rackd: Rackd) -> None:
    """A NUL cannot come from the wire (it ends the name), but a caller in process may pass one."""
    ctx = {"local": ("127.0.0.1", 69), "remote": ("127.0.0.1", 2000)}
    with pytest.raises(AccessViolation, match="NUL in filename"):
        context.call(ctx, rackd.backend().get_reader, b"caf\x00e.cfg")
    assert rackd.state.connections == 0


@pytest_twisted.ensureDeferred
async def test_non_ascii_name_is_served(serve: Serving, rackd: Rackd) -> None:
    """caf\u00e9.txt, as MAAS serves it: asked of rackd as the client sent it, and the file comes back."""
    name = "caf\u00e9.txt".encode()
    (rackd.root / "caf\u00e9.txt").write_bytes(b"du caf\xc3\xa9\n")
    service = serve(rackd.backend())
    got = await fetch(serve, service, name)
    assert got.complete and got.data == b"du caf\xc3\xa9\n"
    assert rackd.state.requests[-1].filename == name
    eph = await fetch(serve, service, "eph/50/caf\u00e9.cfg".encode())
    assert eph.complete and len(eph.data) == 50 and rackd.eph_files() == []


@pytest.mark.parametrize("mode", [b"netascii"])
@pytest_twisted.ensureDeferred
async def test_netascii(serve: Serving, rackd: Rackd, mode: bytes) -> None:
    service = serve(rackd.backend())
    peer = serve.peer()
    got = await download(peer, ("127.0.0.1", int(service.ports[0].getHost().port)), b"hello.txt", mode=mode)
    assert got.complete and got.data == HELLO.replace(b"\n", b"\r\n")


# ------------------------------------------------------ real processes, curl --


def _run(cmd: List[str], timeout: float = 30) -> "subprocess.CompletedProcess[bytes]":
    return subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)


@dataclass
class Processes:
    server: TwistdServer
    responder: "subprocess.Popen[bytes]"
    socket_path: str
    root: Path
    eph_dir: Path
    workdir: Path

    def start_responder(self) -> None:
        with (self.workdir / "responder.out").open("ab") as out:
            self.responder = subprocess.Popen(
                [sys.executable, str(Path(legacy_responder.__file__)), self.socket_path, str(self.root),
                 str(self.eph_dir)], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        end = time.monotonic() + 10
        while not os.path.exists(self.socket_path):
            assert self.responder.poll() is None, (self.workdir / "responder.out").read_text()
            assert time.monotonic() < end, "responder did not start"
            time.sleep(0.02)

    def stop_responder(self) -> None:
        if self.responder.poll() is None:
            self.responder.terminate()  # this PID only
            self.responder.wait(10)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)

    def curl(self, name: str, out: Path) -> "subprocess.CompletedProcess[bytes]":
        return _run(["curl", "-s", "--max-time", "20", "--tftp-blksize", "1468", "-o", str(out),
                     f"tftp://127.0.0.1:{self.server.port}/{name}"])


@pytest.fixture(scope="module")
def processes(request: pytest.FixtureRequest) -> Iterator[Processes]:
    """The responder and `twistd -n tftp-offload --socket PATH --protocol legacy`, under the reactor
    this run uses; both stopped (by PID) at the end, and the server's log must hold no traceback."""
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed: run scripts/setup")
    workdir = Path(tempfile.mkdtemp(prefix="tftp-legacy-e2e-", dir="/tmp"))
    root, eph_dir = workdir / "root", workdir / "eph"
    root.mkdir()
    eph_dir.mkdir(mode=0o700)
    (root / "hello.txt").write_bytes(HELLO)
    (root / "1m.bin").write_bytes(os.urandom(1 << 20))
    socket_path = str(workdir / "rackd.sock")
    procs = Processes(None, None, socket_path, root, eph_dir, workdir)  # type: ignore[arg-type]
    procs.start_responder()

    reactor = str(request.config.getoption("reactor", "default"))
    port = free_udp_port(("127.0.0.1",))
    log_path = workdir / "twistd.log"
    args = ["--socket", socket_path, "--protocol", "legacy", "--backend-timeout", "1",
            "--listen", f"127.0.0.1:{port}"]
    cmd = twistd_command(args, log_path, workdir / "twistd.pid", reactor)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with (workdir / "twistd.out").open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    procs.server = TwistdServer(["127.0.0.1"], port, root, log_path, proc, cmd)
    try:
        wait_until_serving(procs.server)
        yield procs
    finally:
        procs.stop_responder()
        procs.server.stop()
        log = procs.server.log()
        shutil.rmtree(workdir, ignore_errors=True)
        assert "Traceback" not in log, log[-8000:]


def test_twistd_static_files(processes: Processes, tmp_path: Path) -> None:
    for name in ("hello.txt", "1m.bin"):
        out = tmp_path / name
        result = processes.curl(name, out)
        assert result.returncode == 0, result.stderr
        assert out.read_bytes() == (processes.root / name).read_bytes()


def test_twistd_ephemeral_file(processes: Processes, tmp_path: Path) -> None:
    name = "eph/70000/grub/grub.cfg-01-52-54-00-ab-cd-ef"
    out = tmp_path / "grub.cfg"
    result = processes.curl(name, out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == render("127.0.0.1", "127.0.0.1", name, 70000)
    assert os.listdir(processes.eph_dir) == []


def test_twistd_not_found(processes: Processes, tmp_path: Path) -> None:
    result = processes.curl("pxelinux.cfg/default-missing", tmp_path / "x")
    assert result.returncode == 68, result  # curl: TFTP file not found


def test_twistd_without_rackd(processes: Processes, tmp_path: Path) -> None:
    """rackd stopped: each request fails fast with a TFTP error; rackd back: served again."""
    processes.stop_responder()
    try:
        for _ in range(3):
            started = time.monotonic()
            result = processes.curl("hello.txt", tmp_path / "x")
            assert result.returncode not in (0, 28), result  # an error, not a curl timeout
            assert time.monotonic() - started < 3
        processes.server.assert_healthy()
        assert "Cannot reach rackd" in processes.server.log()
    finally:
        processes.start_responder()
    out = tmp_path / "hello.txt"
    result = processes.curl("hello.txt", out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == HELLO
    log = processes.server.log()
    assert log.count("Cannot reach rackd") == 1, log[-3000:]  # once, not per request
    assert "Reached rackd at" in log and "3 requests refused" in log, log[-3000:]


def test_twistd_non_ascii_name(processes: Processes) -> None:
    """caf\u00e9.txt end to end: asked of rackd as sent, served."""
    (processes.root / "caf\u00e9.txt").write_bytes(b"un caf\xc3\xa9\n")
    result = wire.get("127.0.0.1", processes.server.port, "caf\u00e9.txt".encode(), deadline=10)
    assert result.complete and result.data == b"un caf\xc3\xa9\n", result.error


def test_twistd_late_answer_leaves_no_file(processes: Processes, tmp_path: Path) -> None:
    """--backend-timeout 1 and a rackd that takes 2 s over an ephemeral file: ERROR at once, and no file left."""
    for i in range(3):
        started = time.monotonic()
        result = processes.curl(f"slow/2/eph/100/late-{i}.cfg", tmp_path / "x")
        assert result.returncode not in (0, 28), result
        assert time.monotonic() - started < 2.5
    end = time.monotonic() + 10
    while os.listdir(processes.eph_dir) and time.monotonic() < end:
        time.sleep(0.05)
    assert os.listdir(processes.eph_dir) == []
    log = processes.server.log()
    assert log.count("Late answer from rackd") >= 3, log[-3000:]
    assert "closed without an answer" not in log


def test_twistd_sigterm_with_a_lookup_in_flight_leaves_no_file(processes: Processes, tmp_path: Path,
                                                               request: pytest.FixtureRequest) -> None:
    """SIGTERM while rackd generates a file: the drain waits for the answer (its transfer then runs
    until --drain-timeout and is aborted, since this client never ACKs), the file is deleted, it exits."""
    reactor = str(request.config.getoption("reactor", "default"))
    port = free_udp_port(("127.0.0.1",))
    log_path = tmp_path / "twistd.log"
    cmd = twistd_command(["--socket", processes.socket_path, "--protocol", "legacy", "--backend-timeout", "1",
                          "--drain-timeout", "2", "--listen", f"127.0.0.1:{port}"], log_path,
                         tmp_path / "twistd.pid", reactor)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with (tmp_path / "out").open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    server = TwistdServer(["127.0.0.1"], port, processes.root, log_path, proc, cmd)
    try:
        wait_until_serving(server)
        with wire.udp_socket("127.0.0.1") as sock:
            sock.sendto(wire.rrq(b"slow/0.8/eph/100/sigterm.cfg"), ("127.0.0.1", port))
            time.sleep(0.3)
            server.stop()
    finally:
        server.stop()
    assert os.listdir(processes.eph_dir) == []
    log = server.log()
    assert "Traceback" not in log, log[-4000:]
    assert "closed without an answer" not in log, log[-4000:]
    # The answer came within the drain: its transfer began, and was ended by the shutdown.
    assert "aborted slow/0.8/eph/100/sigterm.cfg to 127.0.0.1:" in log, log[-4000:]
    assert "sent ERROR 0: Server shutting down" in log, log[-4000:]
    assert "Server Shut Down." in log
