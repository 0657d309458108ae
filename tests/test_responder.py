"""The backend-side responder, driven by a bare AMP client over a real UNIX socket.

A bare client (not the server's AMPBackend) so that what the responder puts on the wire is checked
on its own terms: which answer kind it picks, what happens to the wrapped backend's readers, and that
nothing a backend does closes the connection.
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Sequence, Tuple

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.protocols import amp

from tests.support.offload_support import FakeBackend, Reader, open_fds, sock_dir, turn, wait_for  # noqa: F401
from tftp_offload import errors
from tftp_offload.offload import commands
from tftp_offload.offload.commands import CHUNK_MAX, INLINE_MAX
from tftp_offload.offload.service import offload_service
from tftp_offload.readers import FileReader, PathReader

ALL = list(commands.CAPABILITIES)
Start = Callable[..., Awaitable[Tuple[Any, amp.AMP]]]


@pytest.fixture
def serve(sock_dir: str) -> Iterator[Start]:
    """start(backend, capabilities=ALL, hello=True, **responder_options) -> (service, connected AMP client)."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol

    services: List[Any] = []
    clients: List[amp.AMP] = []

    async def start(backend: Any, capabilities: Sequence[str] = ALL, hello: bool = True,
                    **options: Any) -> Tuple[Any, amp.AMP]:
        path = os.path.join(sock_dir, f"r{len(services)}.sock")
        service = offload_service(backend, path, **options)
        service.startService()
        services.append(service)
        client = await connectProtocol(UNIXClientEndpoint(reactor, path), amp.AMP())
        clients.append(client)
        if hello:
            answer = await client.callRemote(commands.Hello, version=1, capabilities=list(capabilities))
            assert answer["version"] == 1
        return service, client

    yield start
    for client in clients:
        if client.transport is not None:
            client.transport.loseConnection()
    for service in services:
        if service.running:
            pytest_twisted.blockon(maybeDeferred(service.stopService))


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


# ------------------------------------------------------------------------ answer kinds --


@pytest_twisted.ensureDeferred
async def test_small_content_is_inline_whatever_its_reader(serve: Start, tmp_path: Any) -> None:
    small = file_of(tmp_path, "small", 1000)
    exact = os.urandom(INLINE_MAX)
    backend = FakeBackend({
        b"bytes": Reader(b"hello"),
        b"unsized-deferred": lambda: Reader(b"y" * 5000, sized=False, deferred=True),
        b"exactly-inline": Reader(exact),
        b"small-file": lambda: FileReader(os.open(small, os.O_RDONLY)),
        b"empty": Reader(b""),
    })
    _, client = await serve(backend)
    for name, want in [(b"bytes", b"hello"), (b"unsized-deferred", b"y" * 5000), (b"exactly-inline", exact),
                       (b"small-file", small.read_bytes()), (b"empty", b"")]:
        answer = await request(client, name)
        assert (answer["kind"], answer["data"], answer["size"]) == ("inline", want, len(want)), name
    assert all(getattr(r, "finished", 1) == 1 for r in backend.readers)


@pytest_twisted.ensureDeferred
async def test_large_file_is_passed_by_descriptor(serve: Start, tmp_path: Any) -> None:
    big = file_of(tmp_path, "big", 300_000)
    backend = FakeBackend({b"big": lambda: FileReader(os.open(big, os.O_RDONLY))})
    _, client = await serve(backend)
    answer = await request(client, b"big")
    assert answer["kind"] == "fd" and answer["size"] == 300_000
    fd = answer["fd"]
    try:
        assert os.pread(fd, 400_000, 0) == big.read_bytes()
    finally:
        os.close(fd)
    reader = backend.readers[0]
    with pytest.raises(ValueError):
        reader.fileno()  # finished: the responder let go of its own descriptor


@pytest_twisted.ensureDeferred
async def test_path_readers_are_answered_by_path(serve: Start, tmp_path: Any) -> None:
    static = file_of(tmp_path, "static", 100)
    temp = file_of(tmp_path, "temp", 100_000)
    backend = FakeBackend({b"static": lambda: PathReader(str(static)),
                           b"temp": lambda: PathReader(str(temp), ephemeral=True)})
    _, client = await serve(backend)
    answer = await request(client, b"static")
    assert (answer["kind"], answer["path"], answer["size"]) == ("path", os.fsencode(static), 100)
    answer = await request(client, b"temp")
    assert (answer["kind"], answer["path"]) == ("ephemeral", os.fsencode(temp))
    assert temp.exists(), "deleting an ephemeral file is the server's job once it has it open"


@pytest.mark.parametrize("sized", [True, False])
@pytest.mark.parametrize("deferred", [False, True])
@pytest_twisted.ensureDeferred
async def test_large_content_is_streamed(serve: Start, sized: bool, deferred: bool) -> None:
    content = os.urandom(INLINE_MAX * 5 + 123)
    backend = FakeBackend({b"big": lambda: Reader(content, sized=sized, deferred=deferred)})
    _, client = await serve(backend)
    answer = await request(client, b"big")
    assert answer["kind"] == "stream"
    assert answer["size"] == (len(content) if sized else None)
    assert len(answer["data"]) == INLINE_MAX + 1  # what was read to tell inline from stream goes along
    assert await pull(client, answer, chunk=10_000) == content
    await wait_for(lambda: backend.readers[0].finished == 1)


@pytest_twisted.ensureDeferred
async def test_one_byte_over_inline_is_a_stream_that_ends_at_once(serve: Start) -> None:
    content = os.urandom(INLINE_MAX + 1)
    backend = FakeBackend({b"f": Reader(content)})
    _, client = await serve(backend)
    answer = await request(client, b"f")
    assert answer["kind"] == "stream" and answer["data"] == content
    got = await client.callRemote(commands.ReadChunk, stream_id=answer["stream_id"], offset=len(content), length=100)
    assert got == {"data": b"", "eof": True}
    # Asking again past the end is harmless (several chunks may have been in flight).
    got = await client.callRemote(commands.ReadChunk, stream_id=answer["stream_id"], offset=len(content), length=100)
    assert got == {"data": b"", "eof": True}
    assert backend.readers[0].finished == 1


@pytest_twisted.ensureDeferred
async def test_kinds_the_server_did_not_offer_are_not_used(serve: Start, tmp_path: Any) -> None:
    """A server that accepts only the baseline (inline, stream) gets files as streams, and an ephemeral
    file is then deleted by its reader's finish() on the backend side."""
    big = file_of(tmp_path, "big", 200_000)
    temp = file_of(tmp_path, "temp", 100_000)
    backend = FakeBackend({b"big": lambda: FileReader(os.open(big, os.O_RDONLY)),
                           b"temp": lambda: PathReader(str(temp), ephemeral=True)})
    _, client = await serve(backend, capabilities=commands.BASELINE_KINDS)
    answer = await request(client, b"big")
    assert answer["kind"] == "stream"
    assert await pull(client, answer) == big.read_bytes()
    content = temp.read_bytes()
    answer = await request(client, b"temp")
    assert answer["kind"] == "stream"
    assert await pull(client, answer) == content
    await wait_for(lambda: not temp.exists())


@pytest_twisted.ensureDeferred
async def test_no_hello_means_the_baseline(serve: Start, tmp_path: Any) -> None:
    big = file_of(tmp_path, "big", 200_000)
    backend = FakeBackend({b"big": lambda: FileReader(os.open(big, os.O_RDONLY))})
    _, client = await serve(backend, hello=False)
    answer = await request(client, b"big")
    assert answer["kind"] == "stream"


@pytest_twisted.ensureDeferred
async def test_backend_sees_the_request_in_context(serve: Start) -> None:
    backend = FakeBackend({b"f": Reader(b"x")})
    _, client = await serve(backend)
    await request(client, b"f", remote="2001:db8::7", options=[("tsize", "0"), ("blksize", "1468")])
    assert backend.calls == [{"name": b"f", "local": ("192.0.2.1", 69), "remote": ("2001:db8::7", 2000),
                              "mode": "octet", "options": {"tsize": "0", "blksize": "1468"}}]


@pytest_twisted.ensureDeferred
async def test_max_age_is_passed_on(serve: Start) -> None:
    reader = Reader(b"once")
    reader.max_age = 0  # type: ignore[attr-defined]
    _, client = await serve(FakeBackend({b"f": reader}))
    answer = await request(client, b"f")
    assert answer["max_age"] == 0.0


# ----------------------------------------------------------------------------- errors --


class FileNotFound(Exception):
    """python-tx-tftp's class of that name (the responder recognises it by its module and name)."""


FileNotFound.__module__ = "tftp.errors"


def failing(exc: Exception) -> Callable[[], Deferred]:
    def answer() -> Deferred:
        d: Deferred = Deferred()
        d.errback(exc)
        return d

    return answer


@pytest.mark.parametrize(
    "answer,error,message",
    [
        (errors.FileNotFound("Not here"), commands.ReadRequest.errors and errors.FileNotFound, "Not here"),
        (errors.AccessViolation("No"), errors.AccessViolation, "No"),
        (errors.Unsupported("Cannot"), errors.Unsupported, "Cannot"),
        (errors.BackendError("Region controller unreachable"), errors.BackendError, "Region controller unreachable"),
        (FileNotFound("/srv/secret/path"), errors.FileNotFound, "File not found"),
        (PermissionError(13, "denied", "/srv/secret"), errors.AccessViolation, "Access violation"),
        (RuntimeError("bug with /srv/secret"), errors.BackendError, "Internal server error"),
        (failing(errors.AccessViolation("Later no")), errors.AccessViolation, "Later no"),
        (failing(ZeroDivisionError()), errors.BackendError, "Internal server error"),
        (lambda: Reader(b"x" * 10, fail_at=0), errors.BackendError, "Internal server error"),
        (lambda: Reader(b"x" * (INLINE_MAX + 10), overshoot=True), errors.BackendError, "Internal server error"),
        (lambda: Reader(b"x" * 10, deferred=True, fail_at=0), errors.BackendError, "Internal server error"),
    ],
    ids=["not-found", "access", "unsupported", "backend-error", "txtftp-name", "permission", "crash",
         "deferred-access", "deferred-crash", "read-raises", "read-overshoots", "deferred-read-raises"],
)
@pytest_twisted.ensureDeferred
async def test_backend_failures_become_typed_errors(serve: Start, answer: Any, error: type, message: str) -> None:
    backend = FakeBackend({b"f": answer, b"ok": Reader(b"fine")})
    _, client = await serve(backend)
    with pytest.raises(error) as caught:
        await request(client, b"f")
    assert str(caught.value) == message
    assert "secret" not in str(caught.value)
    # The connection survived: the next request is answered.
    assert (await request(client, b"ok"))["data"] == b"fine"
    assert all(r.finished == 1 for r in backend.readers if isinstance(r, Reader))


@pytest_twisted.ensureDeferred
async def test_slow_backend_times_out_and_its_late_reader_is_finished(serve: Start) -> None:
    late: Deferred = Deferred()
    backend = FakeBackend({b"slow": lambda: late})
    _, client = await serve(backend, lookup_timeout=0.2)
    with pytest.raises(errors.BackendError, match="did not answer in time"):
        await request(client, b"slow")
    reader = Reader(b"too late")
    late.callback(reader)
    assert reader.finished == 1


@pytest_twisted.ensureDeferred
async def test_reader_arriving_after_the_server_left_is_finished(serve: Start) -> None:
    later: Deferred = Deferred()
    backend = FakeBackend({b"slow": lambda: later})
    _, client = await serve(backend)
    request(client, b"slow").addErrback(lambda f: None)
    await turn(0.05)
    client.transport.loseConnection()
    await turn(0.05)
    reader = Reader(b"x" * 100)
    later.callback(reader)
    assert reader.finished == 1


# ----------------------------------------------------------------------------- streams --


@pytest_twisted.ensureDeferred
async def test_chunks_in_flight_are_served_in_order(serve: Start) -> None:
    content = os.urandom(INLINE_MAX * 8)
    backend = FakeBackend({b"big": lambda: Reader(content, deferred=True)})
    _, client = await serve(backend)
    answer = await request(client, b"big")
    offset = len(answer["data"])
    calls = []
    for i in range(6):  # six at once, as the server's read-ahead sends them
        calls.append(client.callRemote(commands.ReadChunk, stream_id=answer["stream_id"],
                                       offset=offset + i * 30_000, length=30_000))
    got = [await d for d in calls]
    assert b"".join(g["data"] for g in got) == content[offset : offset + 6 * 30_000]


@pytest_twisted.ensureDeferred
async def test_bad_chunk_requests_are_refused_without_harm(serve: Start) -> None:
    content = os.urandom(INLINE_MAX * 3)
    backend = FakeBackend({b"big": lambda: Reader(content)})
    _, client = await serve(backend)
    answer = await request(client, b"big")
    sid, offset = answer["stream_id"], len(answer["data"])
    with pytest.raises(commands.BadRequest):
        await client.callRemote(commands.ReadChunk, stream_id=sid, offset=offset + 1, length=10)
    with pytest.raises(commands.BadRequest):
        await client.callRemote(commands.ReadChunk, stream_id=sid, offset=offset, length=CHUNK_MAX + 1)
    with pytest.raises(commands.StreamGone):
        await client.callRemote(commands.ReadChunk, stream_id=sid + 100, offset=0, length=10)
    got = await client.callRemote(commands.ReadChunk, stream_id=sid, offset=offset, length=10)
    assert got["data"] == content[offset : offset + 10]


@pytest_twisted.ensureDeferred
async def test_failing_stream_read_is_an_error_not_a_hangup(serve: Start) -> None:
    content = os.urandom(INLINE_MAX * 3)
    backend = FakeBackend({b"big": lambda: Reader(content, fail_at=INLINE_MAX * 2)})
    _, client = await serve(backend)
    answer = await request(client, b"big")
    with pytest.raises(errors.BackendError, match="Error reading"):
        await pull(client, answer)
    assert backend.readers[0].finished == 1
    assert (await client.callRemote(commands.Hello, version=1, capabilities=[]))["version"] == 1


@pytest_twisted.ensureDeferred
async def test_idle_streams_are_closed(serve: Start) -> None:
    backend = FakeBackend({b"big": lambda: Reader(os.urandom(INLINE_MAX * 3))})
    _, client = await serve(backend, idle_timeout=0.2)
    answer = await request(client, b"big")
    await wait_for(lambda: backend.readers[0].finished == 1, timeout=3)
    with pytest.raises(commands.StreamGone):
        await client.callRemote(commands.ReadChunk, stream_id=answer["stream_id"], offset=INLINE_MAX + 1, length=10)


@pytest_twisted.ensureDeferred
async def test_close_and_disconnect_release_streams(serve: Start) -> None:
    backend = FakeBackend({b"big": lambda: Reader(os.urandom(INLINE_MAX * 3))})
    service, client = await serve(backend)
    first = await request(client, b"big")
    await request(client, b"big")
    client.callRemote(commands.CloseStream, stream_id=first["stream_id"])
    client.callRemote(commands.CloseStream, stream_id=9999)  # unknown: ignored
    await wait_for(lambda: backend.readers[0].finished == 1)
    assert backend.readers[1].finished == 0
    client.transport.loseConnection()
    await wait_for(lambda: backend.readers[1].finished == 1)
    assert not any(c.streams for c in service.factory.connections)


@pytest_twisted.ensureDeferred
async def test_stream_limit(serve: Start) -> None:
    backend = FakeBackend({b"big": lambda: Reader(os.urandom(INLINE_MAX * 3))})
    _, client = await serve(backend, max_streams=1)
    await request(client, b"big")
    with pytest.raises(errors.BackendError, match="too many open streams"):
        await request(client, b"big")
    assert backend.readers[1].finished == 1


# ------------------------------------------------------------ descriptors, reports, socket --


@pytest_twisted.ensureDeferred
async def test_passed_descriptors_are_not_leaked(serve: Start, tmp_path: Any) -> None:
    big = file_of(tmp_path, "big", 100_000)
    backend = FakeBackend({b"big": lambda: FileReader(os.open(big, os.O_RDONLY))})
    _, client = await serve(backend)
    await request(client, b"warm-up-not-found").addErrback(lambda f: None)
    before = open_fds()
    for _ in range(50):
        answer = await request(client, b"big")
        os.close(answer["fd"])
    await wait_for(lambda: open_fds() == before, timeout=3)


@pytest_twisted.ensureDeferred
async def test_transfer_reports_reach_the_backend(serve: Start) -> None:
    backend = FakeBackend({})
    _, client = await serve(backend)
    report = {"request_id": 3, "outcome": "complete", "filename": b"f", "local_ip": "192.0.2.1", "local_port": 69,
              "remote_ip": "192.0.2.9", "remote_port": 2000, "bytes": 1234, "duration": 0.5, "blksize": 1468,
              "windowsize": 16, "retransmits": 2, "client_error": None}
    client.callRemote(commands.TransferFinished, **report)
    await wait_for(lambda: bool(backend.reports))
    assert backend.reports == [report]


@pytest.mark.parametrize("mode", [0o600, 0o660])
@pytest_twisted.ensureDeferred
async def test_socket_permissions_and_stale_socket(serve: Start, sock_dir: str, mode: int) -> None:
    # A socket file left behind by a process that died: the service must take its place.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(sock_dir, "r0.sock"))
    stale.close()
    service, client = await serve(FakeBackend({b"f": Reader(b"x")}), mode=mode)
    assert stat.S_IMODE(os.stat(service.socket_path).st_mode) == mode
    assert (await request(client, b"f"))["data"] == b"x"


def test_offload_service_is_a_service() -> None:
    from twisted.application.service import IService

    service = offload_service(FakeBackend({}), "/nonexistent/x.sock")
    assert IService.providedBy(service)
