"""The backend-side responder, driven by a bare AMP client over a real UNIX socket.

A bare client (not the server's AMPBackend) so that what the responder puts on the wire is checked
on its own terms: which answer kind it picks, what happens to the wrapped backend's readers, and that
nothing a backend does closes the connection.
"""

from __future__ import annotations

import os
from typing import Any, Awaitable, Callable, Tuple

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.protocols import amp

from tests.support.offload_support import (
    FakeBackend,
    Reader,
    file_of,
    open_fds,
    pull,
    request,
    turn,
    wait_for,
)
from tftp_offload import errors
from tftp_offload.offload import commands
from tftp_offload.offload.commands import INLINE_MAX
from tftp_offload.readers import FileReader, PathReader

Start = Callable[..., Awaitable[Tuple[Any, amp.AMP]]]


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


@pytest_twisted.ensureDeferred
async def test_stopping_with_a_descriptor_in_flight_completes(serve: Start, tmp_path: Any) -> None:
    """While a passed descriptor is held, the responder is its transport's producer; closing the
    connection (which waits for a registered producer) must still complete, and close it."""
    big = file_of(tmp_path, "big", 100_000)
    backend = FakeBackend({b"big": lambda: FileReader(os.open(big, os.O_RDONLY))})
    service, client = await serve(backend)
    await request(client, b"warm-up-not-found").addErrback(lambda f: None)
    before = open_fds()
    backend.hold()
    pending = request(client, b"big")
    pending.addErrback(lambda f: None)
    await wait_for(lambda: backend.held is not None and len(backend.held) == 1)
    connection = next(iter(service.factory.connections))
    backend.release()  # the answer is written, its descriptor held until it has been sent...
    assert connection.transport.producer is not None
    service.stopService()  # ...and the connection closed in the same turn
    await wait_for(lambda: not service.factory.connections, timeout=3)
    answer = await pending
    if isinstance(answer, dict) and answer.get("fd") is not None:
        os.close(answer["fd"])
    await wait_for(lambda: open_fds() <= before, timeout=3)
