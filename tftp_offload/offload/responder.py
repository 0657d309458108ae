"""The backend side of the offload protocol: one server connection's commands, answered from any `IBackend`.

`service.offload_service` offers a backend on a UNIX socket; this is what answers on each
connection. The responder calls `backend.get_reader(filename)` inside the same
`twisted.python.context` keys the TFTP server uses in process (`RequestContext`), so a
backend cannot tell the two apart, within `lookup_timeout` (`BoundedLookup`: the backend's
Deferred is never cancelled, a late reader is finished), and picks the answer kind itself:

- a `readers.PathReader` (the backend named a file by path): a `path` or
  `ephemeral` answer, so the server opens (and, if ephemeral, deletes) it;
- a reader over a regular file (`fileno()`, or tx-tftp's `file_obj`) larger
  than an inline answer: its descriptor, passed over the socket;
- anything that turns out to hold at most `INLINE_MAX` bytes: inline;
- anything longer (or of unknown size): a stream the server pulls in chunks.

Nothing a backend does closes the connection: every exception becomes one of
the typed errors the commands declare (AMP drops the whole connection on an
undeclared one).
"""

from __future__ import annotations

import os
import stat
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from .. import __version__
from ..context import RequestContext
from ..errors import BackendError, carrier, error_for
from ..interfaces import IBackend
from ..lookup import LookupTimeout, as_failure, ask, finish_reader
from ..readers import PathReader
from . import commands
from .commands import CHUNK_MAX, EPHEMERAL, FD, INLINE, INLINE_MAX, PATH, STREAM, BadRequest, StreamGone
from .descriptors import GIVE_UP, SentDescriptors
from .serving import ServedStream

log = Logger(namespace="tftp_offload.responder")

LOOKUP_TIMEOUT = 30.0
"""Seconds the wrapped backend may take. The server gives up much sooner (its own timeout); this only
bounds what a backend that never answers can pin down here."""

IDLE_TIMEOUT = 60.0
"""Seconds a stream may go unread before it is closed: longer than any transfer stalls and recovers."""

MAX_STREAMS = 1024
"""Open streams per connection at most: each holds a reader of the wrapped backend."""

RESPONDER_CAPABILITIES = (INLINE, FD, PATH, EPHEMERAL, STREAM, commands.TRANSFER_FINISHED)


def _regular_fd(reader: Any) -> Optional[Tuple[int, int]]:
    """(descriptor, size) if `reader` reads a regular file we can pass on as it is, else None.

    `readers.FileReader` exposes `fileno()`; python-tx-tftp's FilesystemReader (what MAAS's
    backend returns for files) holds `file_obj`. Nothing has been read from the reader yet,
    and the server reads a passed descriptor with pread from offset 0, so its position is moot.
    """
    fileno: Optional[Callable[[], int]] = getattr(reader, "fileno", None)
    if fileno is None:
        fileno = getattr(getattr(reader, "file_obj", None), "fileno", None)
    if fileno is None:
        return None
    try:
        fd = fileno()
        info = os.fstat(fd)
    except (OSError, ValueError, AttributeError):
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return fd, info.st_size


class OffloadResponder(amp.AMP):
    """One server connection: answers `ReadRequest`s from the wrapped backend, serves streams."""

    def __init__(self, factory: "OffloadResponderFactory") -> None:
        super().__init__()
        self.factory = factory
        self.version: Optional[int] = None
        self.capabilities = frozenset(commands.BASELINE_KINDS)
        """What the server said it accepts; until it says hello, version 1's baseline."""
        self.streams: Dict[int, ServedStream] = {}
        self._next_stream = 1
        self._descriptors: Optional[SentDescriptors] = None
        self.gone = False

    # -- commands ---------------------------------------------------------------------------

    @commands.Hello.responder
    def hello(self, version: int, capabilities: List[str], min_version: Optional[int] = None,
              software: Optional[str] = None) -> Dict[str, Any]:
        self.version = commands.settle_version(version, min_version or commands.MIN_PROTOCOL_VERSION)
        self.capabilities = frozenset(capabilities)
        log.info("TFTP server connected: {software}, protocol {version}, accepts {capabilities}",
                 software=software or "unknown", version=self.version, capabilities=sorted(self.capabilities))
        return {"version": self.version, "capabilities": list(RESPONDER_CAPABILITIES),
                "software": f"tftp-offload responder {__version__}"}

    @commands.ReadRequest.responder
    def read_request(self, request_id: int, local_ip: str, local_port: int, remote_ip: str, remote_port: int,
                     filename: bytes, mode: str, options: List[Dict[str, str]]) -> Deferred:
        request = RequestContext((local_ip, local_port), (remote_ip, remote_port), mode,
                                 {option["name"]: option["value"] for option in options})
        result = self._lookup(request, filename)
        result.addCallback(self._answer, request_id, filename)
        result.addCallback(_logged, request_id, filename, request.remote, request.local)
        result.addErrback(self._refuse, request_id, filename, request.remote)
        return result

    @commands.ReadChunk.responder
    def read_chunk(self, stream_id: int, offset: int, length: int) -> Deferred:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise StreamGone(f"no stream {stream_id}: closed, idle too long, or never opened")
        if not 0 < length <= CHUNK_MAX:
            raise BadRequest(f"chunk length must be 1..{CHUNK_MAX}, not {length}")
        return stream.read(offset, length)

    @commands.CloseStream.responder
    def close_stream(self, stream_id: int) -> Dict[str, Any]:
        self.drop_stream(stream_id)
        return {}

    @commands.TransferFinished.responder
    def transfer_finished(self, **report: Any) -> Dict[str, Any]:
        hook = getattr(self.factory.backend, "transfer_finished", None)
        if hook is None:
            log.debug("Transfer of {filename!r} to {remote_ip}: {outcome}", **report)
            return {}
        try:
            hook(report)
        except Exception:
            log.failure("backend.transfer_finished() failed")
        return {}

    # -- lookups ----------------------------------------------------------------------------

    def _lookup(self, request: RequestContext, filename: bytes) -> Deferred:
        """The wrapped backend's answer (a reader), or `LookupTimeout` after `lookup_timeout` seconds."""
        out: Deferred = Deferred()
        factory = self.factory
        ask(factory.reactor, factory.lookup_timeout, factory.backend.get_reader, filename, request, out.callback,
            lambda error, failure: out.errback(as_failure(error, failure)))
        return out

    def _answer(self, reader: Any, request_id: int, filename: bytes) -> Any:
        if self.gone:  # the server hung up while the backend was thinking
            finish_reader(reader)
            raise BackendError("The TFTP server disconnected")
        try:
            answer = self._answer_whole(reader)
        except BaseException:
            finish_reader(reader)
            raise
        if answer is not None:
            return answer
        # Read one byte more than fits inline: fewer means we have it all.
        head = maybeDeferred(reader.read, INLINE_MAX + 1)
        head.addCallback(self._inline_or_stream, reader, request_id, filename)
        head.addErrback(_finish_then_fail, reader)
        return head

    def _answer_whole(self, reader: Any) -> Optional[Dict[str, Any]]:
        """A path or descriptor answer if `reader` is a file and the server accepts the kind, else None.

        Either way the reader is done with when this returns an answer: the server reads the
        file itself, through its own descriptor.
        """
        caps = self.capabilities
        if isinstance(reader, PathReader):
            kind = EPHEMERAL if reader.ephemeral else PATH
            if kind in caps:
                size = reader.size
                reader.release()  # the server opens the file itself and, if ephemeral, deletes it
                return {"kind": kind, "path": reader.path, "size": size, **_max_age(reader)}
        found = _regular_fd(reader)
        if found is not None and found[1] > INLINE_MAX and FD in caps:
            fd = os.dup(found[0])
            self._held_descriptors().hold(fd)  # open until the answer carrying it has been sent
            finish_reader(reader)  # the copy keeps the file (even an unlinked one) alive for the server
            return {"kind": FD, "fd": fd, "size": found[1], **_max_age(reader)}
        return None

    def _inline_or_stream(self, data: Any, reader: Any, request_id: int, filename: bytes) -> Dict[str, Any]:
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) > INLINE_MAX + 1:
            raise TypeError(f"reader returned {type(data).__name__} of {len(data) if data else 0} bytes "
                            f"for a read of {INLINE_MAX + 1}")
        data = bytes(data)
        if len(data) <= INLINE_MAX:
            finish_reader(reader)
            return {"kind": INLINE, "data": data, "size": len(data), **_max_age(reader)}
        if self.gone:
            raise BackendError("The TFTP server disconnected")
        if len(self.streams) >= self.factory.max_streams:
            raise BackendError("Backend busy: too many open streams")
        stream_id = self._next_stream
        self._next_stream += 1
        factory = self.factory
        self.streams[stream_id] = ServedStream(stream_id, reader, len(data), request_id, filename, factory.reactor,
                                               factory.idle_timeout, self.drop_stream)
        size = reader.size if isinstance(reader.size, int) else None
        return {"kind": STREAM, "stream_id": stream_id, "data": data, "size": size, **_max_age(reader)}

    def _refuse(self, failure: Failure, request_id: int, filename: bytes, remote: Any) -> Failure:
        """Every failure of a lookup as one of the errors `ReadRequest` declares."""
        if failure.check(LookupTimeout):
            log.warn("Backend took more than {timeout} s over {file!r} for {client}", file=filename, client=remote,
                     timeout=self.factory.lookup_timeout, request_id=request_id)
            return Failure(BackendError("Backend did not answer in time"))
        code, message, expected = error_for(failure.value)
        if expected:
            log.debug("Refused {file!r} to {client}: {code} {message}", file=filename, client=remote, code=code,
                      message=message, request_id=request_id)
        else:
            log.failure("Backend failed on {file!r} for {client}", failure=failure, file=filename, client=remote,
                        request_id=request_id)
        return Failure(carrier(code, message))

    # -- streams, descriptors, the connection --------------------------------------------------

    def drop_stream(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream.close()

    def _stuck(self) -> None:
        log.warn("Dropping a server connection that has not taken a descriptor in {seconds} s",
                 seconds=GIVE_UP)
        self.transport.abortConnection()  # type: ignore[union-attr]  # connectionLost closes what is held

    def _held_descriptors(self) -> SentDescriptors:
        if self._descriptors is None:
            self._descriptors = SentDescriptors(self.transport, self.factory.reactor, self._stuck)
        return self._descriptors

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connections.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True
        self.factory.connections.discard(self)
        for stream_id in list(self.streams):
            self.drop_stream(stream_id)
        if self._descriptors is not None:
            self._descriptors.close_all()
        super().connectionLost(reason)
        log.info("TFTP server disconnected: {reason}", reason=reason.getErrorMessage())


def _logged(answer: Dict[str, Any], request_id: int, filename: bytes, remote: Any, local: Any) -> Dict[str, Any]:
    log.debug("Answered {file!r} for {client} at {local}: {kind}, {size} bytes", file=filename, client=remote,
              local=local, kind=answer["kind"], size=answer.get("size"), request_id=request_id)
    return answer


def _max_age(reader: Any) -> Dict[str, float]:
    """A reader may say how long the server may reuse its answer (`max_age` seconds; 0: never)."""
    max_age = getattr(reader, "max_age", None)
    return {} if max_age is None else {"max_age": float(max_age)}


def _finish_then_fail(failure: Failure, reader: Any) -> Failure:
    finish_reader(reader)
    return failure


class OffloadResponderFactory(ServerFactory):
    """Makes one `OffloadResponder` per server connection, all over one wrapped backend."""

    noisy = False

    def __init__(self, backend: IBackend, reactor: Any = None, lookup_timeout: float = LOOKUP_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT, max_streams: int = MAX_STREAMS) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.backend = backend
        self.reactor = reactor
        self.lookup_timeout = lookup_timeout
        self.idle_timeout = idle_timeout
        self.max_streams = max_streams
        self.connections: Set[OffloadResponder] = set()

    def buildProtocol(self, addr: Any) -> OffloadResponder:
        return OffloadResponder(self)


