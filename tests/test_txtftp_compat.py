"""Backends written for python-tx-tftp (as MAAS's rack controller writes them) work unchanged.

The backend here is deliberately *not* built from our classes: it does not
declare our `IBackend`, its readers are its own, and it raises exceptions
shaped like python-tx-tftp's `tftp.errors` (same names, same hierarchy, same
`FileNotFound(file_path)` whose text is the server's path), defined below and
derived from nothing of ours. It answers the way rackd's `TFTPBackend` does:
`get_reader` reads `context.get("local")` / `context.get("remote")` and returns
a Deferred; generated configs come from readers whose `read()` returns
Deferreds and whose `size` is None. Every failure must reach the client as the
right TFTP ERROR and leave a log line. Real UDP on loopback, in this process.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import deferLater
from twisted.python import context

from tests.support import tftp_client as wire
from tests.support.inprocess import (
    Serving,
    download,
    events_with,
    get_reactor,
    log_events,  # noqa: F401  (fixture)
    serve,  # noqa: F401  (fixture)
)

Events = List[Dict[str, Any]]


# -------------------------------------------- python-tx-tftp's tftp.errors, by shape --


class TFTPError(Exception):
    """Base exception class for this package."""


class BackendError(TFTPError):
    """Base exception class for backend errors."""


class Unsupported(BackendError):
    """Operation not supported by the backend."""


class AccessViolation(BackendError):
    """The operation on this file is not allowed."""


class FileNotFound(BackendError):
    """The file could not be found; its text is the path, which is no business of the client's."""

    def __init__(self, file_path: Any) -> None:
        super().__init__(file_path)
        self.file_path = file_path

    def __str__(self) -> str:
        return f"File not found: {self.file_path}"


for _cls in (TFTPError, BackendError, Unsupported, AccessViolation, FileNotFound):
    _cls.__module__ = "tftp.errors"


# ---------------------------------------------------------- readers, rackd-style --


class DeferredReader:
    """Generated content handed out a chunk at a time through Deferreds; its length unknown."""

    size: Optional[int] = None

    def __init__(self, data: bytes, fail_at: Optional[int] = None, raise_at: Optional[int] = None,
                 fired: bool = False) -> None:
        self.data = data
        self.offset = 0
        self.reads = 0
        self.finished = 0
        self.fail_at = fail_at
        self.raise_at = raise_at
        self.fired = fired

    def read(self, size: int) -> Any:
        self.reads += 1
        if self.reads == self.raise_at:
            raise OSError("disk went away")
        if self.reads == self.fail_at:
            return deferLater(get_reactor(), 0.001, self._broken)
        chunk = self.data[self.offset : self.offset + size]
        self.offset += len(chunk)
        if self.fired:
            return succeed(chunk)  # a Deferred that has already fired
        return deferLater(get_reactor(), 0.001, lambda: chunk)

    @staticmethod
    def _broken() -> bytes:
        raise OSError("image store unreachable")

    def finish(self) -> None:
        self.finished += 1


class SizedReader(DeferredReader):
    """A file whose length is known (tsize is answered), read through Deferreds all the same."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.size = len(data)


KERNEL = bytes(range(256)) * 800  # 200 KiB: several windows


class RackStyleBackend:
    """Decides like rackd's TFTPBackend: by name, a tick later, from the request's context.

    `get_reader(file_name, skip_logging=False, protocol=None)` has rackd's signature;
    the server passes only the name.
    """

    def __init__(self) -> None:
        self.seen: List[Tuple[bytes, Any, Any, Any, Any]] = []
        self.readers: List[DeferredReader] = []

    def get_reader(self, file_name: bytes, skip_logging: bool = False, protocol: Any = None) -> Any:
        local_host, local_port = context.get("local")
        remote_host, remote_port = context.get("remote")
        self.seen.append((file_name, (local_host, local_port), (remote_host, remote_port),
                          context.get("mode"), context.get("options")))
        name = file_name.decode("ascii")
        # Synchronous refusals, before any Deferred exists.
        if name == "sync/missing":
            raise FileNotFound(file_name)
        if name == "sync/bug":
            raise RuntimeError("a bug in the backend")
        if name == "never":
            return Deferred()
        if name == "failed-deferred":
            return fail(FileNotFound(file_name))
        return deferLater(get_reactor(), 0.005, self._decide, name, local_host, remote_host)

    def _decide(self, name: str, local_host: str, remote_host: str) -> DeferredReader:
        if name == "pxelinux.cfg/default":
            config = f"DEFAULT local\nAPPEND url=http://{local_host}:5248/ client={remote_host}\n".encode()
            return self._keep(DeferredReader(config * 40))
        if name == "boot/kernel":
            return self._keep(SizedReader(KERNEL))
        if name == "boot/fired":
            return self._keep(DeferredReader(KERNEL, fired=True))
        if name == "read/fails":
            return self._keep(DeferredReader(KERNEL, fail_at=2))
        if name == "read/raises":
            return self._keep(DeferredReader(KERNEL, raise_at=2))
        if name == "denied":
            raise AccessViolation()
        if name == "insecure":
            raise BackendError("Insecure path")
        if name == "unsupported":
            raise Unsupported("Not this one")
        if name == "bug":
            raise KeyError("subarch")
        raise FileNotFound(name)

    def _keep(self, reader: DeferredReader) -> DeferredReader:
        self.readers.append(reader)
        return reader

    def get_writer(self, file_name: bytes) -> Any:
        raise Unsupported("Write support is disabled")


def server_of(service: Any) -> Tuple[str, int]:
    return ("127.0.0.1", int(service.ports[0].getHost().port))


@pytest_twisted.ensureDeferred
async def test_generated_config_with_deferred_reads_and_unknown_size(serve: Serving) -> None:
    backend = RackStyleBackend()
    service = serve(backend)
    peer = serve.peer()
    got = await download(peer, server_of(service), b"pxelinux.cfg/default", {"blksize": "1024", "tsize": "0"})
    assert got.complete
    assert got.data == b"DEFAULT local\nAPPEND url=http://127.0.0.1:5248/ client=127.0.0.1\n" * 40
    assert got.oack == {"blksize": "1024"}  # no tsize: the size is unknown
    [(name, local, remote, mode, options)] = backend.seen
    assert name == b"pxelinux.cfg/default"
    assert local == server_of(service)
    assert remote == peer.address
    assert (mode, options) == ("octet", {"blksize": "1024", "tsize": "0"})
    await serve.settled(service)
    assert [reader.finished for reader in backend.readers] == [1]


@pytest.mark.parametrize(
    ("name", "options", "oack"),
    [
        (b"boot/kernel", {"blksize": "1400", "tsize": "0", "windowsize": "4"},
         {"blksize": "1400", "tsize": str(len(KERNEL)), "windowsize": "4"}),
        (b"boot/fired", {"blksize": "1400", "windowsize": "8"}, {"blksize": "1400", "windowsize": "8"}),
        (b"boot/fired", {"tsize": "0"}, None),  # nothing accepted: DATA 1, no empty OACK
    ],
)
@pytest_twisted.ensureDeferred
async def test_files_with_deferred_reads(serve: Serving, name: bytes, options: Dict[str, str],
                                         oack: Optional[Dict[str, str]]) -> None:
    backend = RackStyleBackend()
    service = serve(backend)
    got = await download(serve.peer(), server_of(service), name, options)
    assert got.complete and got.data == KERNEL
    assert got.oack == oack
    await serve.settled(service)
    assert [reader.finished for reader in backend.readers] == [1]


@pytest_twisted.ensureDeferred
async def test_netascii_over_deferred_reads(serve: Serving) -> None:
    backend = RackStyleBackend()
    service = serve(backend)
    got = await download(serve.peer(), server_of(service), b"pxelinux.cfg/default", mode=b"netascii")
    assert got.complete
    assert got.data == b"DEFAULT local\r\nAPPEND url=http://127.0.0.1:5248/ client=127.0.0.1\r\n" * 40


@pytest.mark.parametrize(
    ("name", "error"),
    [
        (b"sync/missing", (1, "File not found")),
        (b"failed-deferred", (1, "File not found")),
        # tx-tftp's FileNotFound says the server's path: the client gets the standard text instead.
        (b"pxelinux.cfg/01-52-54-00-aa-bb-cc", (1, "File not found")),
        (b"denied", (2, "Access violation")),
        (b"insecure", (0, "Insecure path")),
        (b"unsupported", (4, "Not this one")),
    ],
)
@pytest_twisted.ensureDeferred
async def test_tx_tftp_errors(serve: Serving, log_events: Events, name: bytes, error: Tuple[int, str]) -> None:
    service = serve(RackStyleBackend())
    got = await download(serve.peer(), server_of(service), name)
    assert got.error == error
    [line] = events_with(log_events, outcome="refused")
    assert line["error_code"] == error[0] and line["file"] == name.decode()


@pytest.mark.parametrize(("name", "exception"), [(b"sync/bug", RuntimeError), (b"bug", KeyError)])
@pytest_twisted.ensureDeferred
async def test_any_other_exception(serve: Serving, log_events: Events, name: bytes, exception: type) -> None:
    service = serve(RackStyleBackend())
    got = await download(serve.peer(), server_of(service), name)
    assert got.error == (0, "Internal server error")
    [line] = events_with(log_events, event="backend-error")
    assert line["log_failure"].check(exception)  # the traceback is in the log...
    assert f"raise {exception.__name__}(" in line["log_failure"].getTraceback()  # ...to the raise, sync or not


@pytest.mark.parametrize("name", [b"read/fails", b"read/raises"])
@pytest_twisted.ensureDeferred
async def test_read_failure_mid_transfer(serve: Serving, log_events: Events, name: bytes) -> None:
    backend = RackStyleBackend()
    service = serve(backend)
    got = await download(serve.peer(), server_of(service), name, {"blksize": "512"})
    assert got.error == (0, "Error reading the file")
    assert [e for e in log_events if "log_failure" in e and e["log_failure"].check(OSError)]
    await serve.settled(service)
    assert [reader.finished for reader in backend.readers] == [1]


@pytest_twisted.ensureDeferred
async def test_client_abort_finishes_the_reader(serve: Serving) -> None:
    backend = RackStyleBackend()
    service = serve(backend)
    peer = serve.peer()
    peer.send(wire.rrq(b"boot/kernel"), server_of(service))
    datagram, tid = await peer.recv()
    assert wire.opcode_of(datagram) == wire.DATA
    peer.send(wire.error(0, b"cancelled"), tid)
    await serve.settled(service)
    assert [reader.finished for reader in backend.readers] == [1]


@pytest_twisted.ensureDeferred
async def test_backend_that_never_answers(serve: Serving, log_events: Events) -> None:
    service = serve(RackStyleBackend(), lookup_timeout=0.3)
    got = await download(serve.peer(), server_of(service), b"never")
    assert got.error == (0, "Backend did not answer in time")
    assert events_with(log_events, outcome="refused", file="never")
