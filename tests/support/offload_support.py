"""Helpers for the offload tests: fake backends, reading readers to the end, real twistd pairs.

Like conftest.py, nothing here imports the reactor at module level (pytest-twisted installs the one
chosen with --reactor after collection starts).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.protocols import amp
from twisted.python import context
from zope.interface import implementer

from tests.support.harness import (
    REPO,
    Managed,
    TwistdServer,
    free_udp_port,
    listen_arg,
    twistd_command,
    wait_until_serving,
)
from tftp_offload.interfaces import IBackend
from tftp_offload.offload import commands
from tftp_offload.offload.client import AMPBackend
from tftp_offload.offload.commands import CHUNK_MAX
from tftp_offload.readers import PathReader
from tftp_offload.reference import pattern

Answer = Union[Any, Exception, Callable[[], Any]]

Start = Callable[..., Tuple[AMPBackend, Any]]
"""The `pair` fixture's type: start(backend, responder_options={}, **amp_options) -> (AMPBackend, responder)."""


def short_dir(prefix: str = "tftpo-") -> str:
    """A fresh directory with a short path: a UNIX socket path must fit in 108 bytes."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = short_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def ctx(remote: str = "127.0.0.1", remote_port: int = 40000, local: str = "127.0.0.1", local_port: int = 69,
        mode: str = "octet", options: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """The context keys the TFTP server sets around `get_reader`."""
    return {"local": (local, local_port), "remote": (remote, remote_port), "mode": mode, "options": options or {}}


def get_reader(backend: Any, name: bytes, **where: Any) -> Deferred:
    """`backend.get_reader(name)` as the server calls it, always as a Deferred."""
    return maybeDeferred(context.call, ctx(**where), backend.get_reader, name)


async def read_all(reader: Any, size: int = 65536, limit: int = 100_000) -> bytes:
    """Read `size` at a time until a short read, as the server does; bounded by `limit` reads."""
    chunks: List[bytes] = []
    for _ in range(limit):
        chunk = await maybeDeferred(reader.read, size)
        chunks.append(chunk)
        if len(chunk) < size:
            return b"".join(chunks)
    raise AssertionError(f"no end after {limit} reads")


class Reader:
    """An in-memory reader with the knobs the tests need: Deferred reads, no size, failures."""

    def __init__(self, data: bytes, sized: bool = True, deferred: bool = False,
                 fail_at: Optional[int] = None, overshoot: bool = False) -> None:
        self.data = data
        self.offset = 0
        self.size: Optional[int] = len(data) if sized else None
        self.deferred = deferred
        self.fail_at = fail_at
        self.overshoot = overshoot
        self.finished = 0

    def read(self, n: int) -> Any:
        if self.finished:
            raise AssertionError("read after finish")
        if self.fail_at is not None and self.offset + n > self.fail_at:
            raise OSError(5, "Input/output error")
        chunk = self.data[self.offset : self.offset + n + (1 if self.overshoot else 0)]
        self.offset += len(chunk)
        if self.deferred:
            d: Deferred = Deferred()
            from twisted.internet import reactor

            reactor.callLater(0, d.callback, chunk)
            return d
        return chunk

    def finish(self) -> None:
        self.finished += 1


@implementer(IBackend)
class FakeBackend:
    """Answers from a table: a reader (or a callable making one), or an exception to raise.

    Records every call with its context. Between `hold()` and `release()`, answers wait
    (so lookups stay in flight).
    """

    def __init__(self, answers: Dict[bytes, Answer]) -> None:
        self.answers = answers
        self.calls: List[Dict[str, Any]] = []
        self.held: Optional[List[Any]] = None
        self.readers: List[Any] = []
        self.reports: List[Dict[str, Any]] = []

    def get_reader(self, name: bytes) -> Any:
        self.calls.append({"name": name, **{k: context.get(k) for k in ("local", "remote", "mode", "options")}})
        answer = self.answers.get(name, FileNotFoundError(name))
        if isinstance(answer, Exception):
            raise answer
        reader = answer() if callable(answer) else answer
        if isinstance(reader, Deferred):
            return reader
        self.readers.append(reader)
        if self.held is not None:
            waiting: Deferred = Deferred()
            self.held.append((waiting, reader))
            return waiting
        return reader

    def hold(self) -> None:
        self.held = []

    def release(self) -> None:
        held, self.held = self.held or [], None
        for waiting, reader in held:
            waiting.callback(reader)

    def get_writer(self, name: bytes) -> None:
        raise NotImplementedError

    def transfer_finished(self, report: Dict[str, Any]) -> None:
        self.reports.append(report)

    def count(self, name: bytes) -> int:
        return sum(1 for call in self.calls if call["name"] == name)


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, step: float = 0.01) -> None:
    """Let the reactor run until `predicate()` holds; fail after `timeout` seconds."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout} s")
        await deferLater(reactor, step, lambda: None)


async def turn(seconds: float = 0.0) -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


# ------------------------------------------------------------------- real processes --


@dataclass
class Process(Managed):
    """A twistd process we started: its command, log and PID (stopped by PID only)."""

    cmd: List[str]
    log_path: Path
    proc: "subprocess.Popen[bytes]"
    env: Dict[str, str] = field(default_factory=dict)
    cwd: Optional[Path] = None


def _env() -> Dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


FAULTY_BACKEND = Path(__file__).resolve().parent / "faulty_reference.tac"


def start_backend(workdir: Path, socket_path: str, root: Path, reactor: str, *extra: str,
                  faults: bool = False) -> Process:
    """`twistd -n tftp-offload-backend --socket PATH --root DIR`, waited for until the socket exists.

    `faults`: the reference backend with the tests' failure injection (faulty_reference.tac) instead."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "backend.log"
    cmd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n"]
    if reactor != "default":
        cmd += ["--reactor", reactor]
    cmd += ["--logfile", str(log_path), "--pidfile", str(workdir / "backend.pid")]
    args = ["--socket", socket_path, "--root", str(root), *extra]
    env = _env()
    if faults:
        cmd += ["-y", str(FAULTY_BACKEND)]
        env["TFTPO_BACKEND_ARGS"] = " ".join(shlex.quote(arg) for arg in args)
    else:
        cmd += ["tftp-offload-backend", *args]
    with (workdir / "backend.out").open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    backend = Process(cmd, log_path, proc)
    end = time.monotonic() + 15
    while not (os.path.exists(socket_path) and "Offering the tftp-offload protocol" in backend.log()):
        if not backend.alive() or time.monotonic() > end:
            out_text = (workdir / "backend.out").read_text(errors="replace")[-3000:]
            backend.stop()
            raise AssertionError(f"backend did not start: {cmd}\n{out_text}\n{backend.log()[-3000:]}")
        time.sleep(0.05)
    return backend


def start_server(workdir: Path, socket_path: str, root: Path, reactor: str, hosts: Sequence[str],
                 *extra: str, wait: bool = True) -> TwistdServer:
    """`twistd -n tftp-offload --socket PATH` listening on `hosts` (one port), answering once `wait`."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_udp_port(hosts)
    args = ["--socket", socket_path]
    for host in hosts:
        args += ["--listen", listen_arg(host, port)]
    args += list(extra)
    log_path = workdir / "server.log"
    cmd = twistd_command(args, log_path, workdir / "server.pid", reactor)
    with (workdir / "server.out").open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    server = TwistdServer(list(hosts), port, root, log_path, proc, cmd)
    if wait:
        try:
            wait_until_serving(server, timeout=15)
        except AssertionError as e:
            server.stop()
            raise AssertionError(f"{e}\n{(workdir / 'server.out').read_text(errors='replace')[-3000:]}") from None
    return server


def vm_hwm_kib(pid: int) -> int:
    """The peak resident set size of process `pid`, in KiB (VmHWM in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


ALL = list(commands.CAPABILITIES)


def request(client: amp.AMP, name: bytes, remote: str = "192.0.2.9", options: Any = ()) -> Deferred:
    return client.callRemote(commands.ReadRequest, request_id=7, local_ip="192.0.2.1", local_port=69,
                             remote_ip=remote, remote_port=2000, filename=name, mode="octet",
                             options=[{"name": k, "value": v} for k, v in options])


async def pull(client: amp.AMP, answer: Dict[str, Any], chunk: int = CHUNK_MAX, limit: int = 10_000) -> bytes:
    """The whole of a stream answer: its first bytes, then ReadChunks until eof; closes it."""
    data = [answer["data"]]
    offset = len(answer["data"])
    for _ in range(limit):
        got = await client.callRemote(commands.ReadChunk, stream_id=answer["stream_id"], offset=offset, length=chunk)
        data.append(got["data"])
        offset += len(got["data"])
        if got["eof"]:
            client.callRemote(commands.CloseStream, stream_id=answer["stream_id"])
            return b"".join(data)
    raise AssertionError("stream without end")


def file_of(tmp_path: Any, name: str, size: int) -> Any:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


WINDOW = 64 * 1468


async def fetch(client: Any, name: bytes, size: int = WINDOW, **where: Any) -> bytes:
    reader = await get_reader(client, name, **where)
    try:
        return await read_all(reader, size)
    finally:
        reader.finish()


def inner(reader: Any) -> Any:
    return reader.reader


def files(tmp_path: Path) -> Dict[str, Path]:
    out = {}
    for name, size in [("big", 300_000), ("path", 200_000), ("small", 1000)]:
        out[name] = tmp_path / name
        out[name].write_bytes(os.urandom(size))
    return out


def ephemeral(tmp_path: Path, size: int = 100_000) -> Callable[[], PathReader]:
    counter = [0]

    def make() -> PathReader:
        counter[0] += 1
        path = tmp_path / f"eph-{counter[0]}"
        path.write_bytes(pattern(0, size))
        return PathReader(str(path), ephemeral=True)

    return make
