"""The backend side of the offload protocol: offer any `IBackend` to a TFTP server over a UNIX socket.

A host process (the MAAS rack controller, a provisioning service, the reference
backend) keeps its python-tx-tftp style backend and adds, in a few lines:

    from tftp_offload.responder import offload_service
    offload_service(backend, "/run/tftp-offload/backend.sock").setServiceParent(application)

The responder calls `backend.get_reader(filename)` inside the same
`twisted.python.context` keys the TFTP server uses in process ("local",
"remote", "mode", "options"), so a backend cannot tell the two apart, and picks
the answer kind itself:

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

import contextlib
import os
import socket
import stat
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple, Union

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python import context
from twisted.python.failure import Failure

from . import __version__, offload
from .errors import BackendError, error_for
from .interfaces import IBackend
from .offload import (
    CHUNK_MAX,
    EPHEMERAL,
    FD,
    INLINE,
    INLINE_MAX,
    PATH,
    STREAM,
    BadRequest,
    StreamGone,
)
from .readers import PathReader

log = Logger(namespace="tftp_offload.responder")

LOOKUP_TIMEOUT = 30.0
"""Seconds the wrapped backend may take. The server gives up much sooner (its own timeout); this only
bounds what a backend that never answers can pin down here."""

IDLE_TIMEOUT = 60.0
"""Seconds a stream may go unread before it is closed: longer than any transfer stalls and recovers."""

MAX_STREAMS = 1024
"""Open streams per connection at most: each holds a reader of the wrapped backend."""

FD_SEND_CHECK = 0.01
FD_SEND_GIVE_UP = 30.0
"""A passed descriptor is closed here once the kernel has it; if the socket stays that clogged for this
long, the connection is dropped rather than the descriptor closed while still queued."""

RESPONDER_CAPABILITIES = (INLINE, FD, PATH, EPHEMERAL, STREAM, offload.TRANSFER_FINISHED)


class _LookupTimeout(Exception):
    """The wrapped backend did not answer within `LOOKUP_TIMEOUT`."""


def _finish(reader: Any) -> None:
    """`finish()` a reader we will not use; a backend's failure here is logged, never raised."""
    try:
        reader.finish()
    except Exception:
        log.failure("reader.finish() failed")


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


class _Stream:
    """One reader of the wrapped backend, read front to back on behalf of the server's `ReadChunk`s.

    The server may have several chunks in flight; the reader is asked for one at a time, in
    order, and each chunk must start where the last ended (`offset`), so a confused server gets
    an error instead of silently wrong bytes.
    """

    def __init__(self, protocol: "OffloadResponder", stream_id: int, reader: Any, position: int,
                 request_id: int, filename: bytes) -> None:
        self.protocol = protocol
        self.stream_id = stream_id
        self.reader: Any = reader
        self.position = position
        self.request_id = request_id
        self.filename = filename
        self.eof = False
        self.failed: Optional[str] = None
        self._queue: Deque[Tuple[int, int, Deferred]] = deque()
        self._busy = False
        factory = protocol.factory
        self._idle_timeout = factory.idle_timeout
        self._timer = factory.reactor.callLater(self._idle_timeout, self._idle)

    def read(self, offset: int, length: int) -> Deferred:
        if self._timer.active():
            self._timer.reset(self._idle_timeout)
        d: Deferred = Deferred()
        self._queue.append((offset, length, d))
        if not self._busy:
            self._next()
        return d

    def _next(self) -> None:
        while self._queue and not self._busy:
            offset, length, d = self._queue.popleft()
            if self.reader is None and not self.eof:
                d.errback(StreamGone(f"stream {self.stream_id} is closed"))
            elif offset != self.position:
                d.errback(BadRequest(f"stream {self.stream_id} is at offset {self.position}, not {offset}"))
            elif self.failed is not None:
                d.errback(BackendError(self.failed))
            elif self.eof:
                d.callback({"data": b"", "eof": True})
            else:
                self._busy = True
                result = maybeDeferred(self.reader.read, length)
                result.addBoth(self._read_done, length, d)

    def _read_done(self, result: Union[bytes, Failure], length: int, d: Deferred) -> None:
        self._busy = False
        if self.reader is None:  # closed while the read was running
            d.errback(StreamGone(f"stream {self.stream_id} is closed"))
        elif isinstance(result, Failure) or not isinstance(result, (bytes, bytearray, memoryview)) \
                or len(result) > length:
            if isinstance(result, Failure):
                log.failure("Reading stream {stream_id} ({file!r}) failed", failure=result,
                            stream_id=self.stream_id, file=self.filename, request_id=self.request_id)
            else:
                log.error("Reader of {file!r} returned {got!r} for a read of {length} bytes",
                          file=self.filename, got=type(result).__name__ if not isinstance(result, bytes)
                          else f"{len(result)} bytes", length=length)
            self.failed = "Error reading the file"
            self._release_reader()
            d.errback(BackendError(self.failed))
        else:
            data = bytes(result)
            self.position += len(data)
            if len(data) < length:
                # A short read is the end: release the backend's reader now rather than at CloseStream.
                self.eof = True
                self._release_reader()
            d.callback({"data": data, "eof": self.eof})
        self._next()

    def _idle(self) -> None:
        log.info("Closing stream {stream_id} ({file!r}): unread for {seconds} s", stream_id=self.stream_id,
                 file=self.filename, seconds=self._idle_timeout, request_id=self.request_id)
        self.protocol.drop_stream(self.stream_id)

    def _release_reader(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None:
            _finish(reader)

    def close(self) -> None:
        if self._timer.active():
            self._timer.cancel()
        self._release_reader()
        self.eof = False  # anything still queued is told the stream is gone
        if not self._busy:
            self._next()


class OffloadResponder(amp.AMP):
    """One server connection: answers `ReadRequest`s from the wrapped backend, serves streams."""

    def __init__(self, factory: "OffloadResponderFactory") -> None:
        super().__init__()
        self.factory = factory
        self.version: Optional[int] = None
        self.capabilities = frozenset(offload.BASELINE_KINDS)
        """What the server said it accepts; until it says hello, version 1's baseline."""
        self.streams: Dict[int, _Stream] = {}
        self._next_stream = 1
        self._held_fds: Set[int] = set()
        self.gone = False

    # -- commands ---------------------------------------------------------------------------

    @offload.Hello.responder
    def hello(self, version: int, capabilities: List[str], min_version: Optional[int] = None,
              software: Optional[str] = None) -> Dict[str, Any]:
        self.version = offload.settle_version(version, min_version or offload.MIN_PROTOCOL_VERSION)
        self.capabilities = frozenset(capabilities)
        log.info("TFTP server connected: {software}, protocol {version}, accepts {capabilities}",
                 software=software or "unknown", version=self.version, capabilities=sorted(self.capabilities))
        return {"version": self.version, "capabilities": list(RESPONDER_CAPABILITIES),
                "software": f"tftp-offload responder {__version__}"}

    @offload.ReadRequest.responder
    def read_request(self, request_id: int, local_ip: str, local_port: int, remote_ip: str, remote_port: int,
                     filename: bytes, mode: str, options: List[Dict[str, str]]) -> Deferred:
        ctx = {
            "local": (local_ip, local_port),
            "remote": (remote_ip, remote_port),
            "mode": mode,
            "options": {option["name"]: option["value"] for option in options},
        }
        result = self._lookup(ctx, filename)
        result.addCallback(self._answer, request_id, filename)
        result.addCallback(_logged, request_id, filename, ctx["remote"], ctx["local"])
        result.addErrback(self._refuse, request_id, filename, ctx["remote"])
        return result

    @offload.ReadChunk.responder
    def read_chunk(self, stream_id: int, offset: int, length: int) -> Deferred:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise StreamGone(f"no stream {stream_id}: closed, idle too long, or never opened")
        if not 0 < length <= CHUNK_MAX:
            raise BadRequest(f"chunk length must be 1..{CHUNK_MAX}, not {length}")
        return stream.read(offset, length)

    @offload.CloseStream.responder
    def close_stream(self, stream_id: int) -> Dict[str, Any]:
        self.drop_stream(stream_id)
        return {}

    @offload.TransferFinished.responder
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

    def _lookup(self, ctx: Dict[str, Any], filename: bytes) -> Deferred:
        """The wrapped backend's answer, within `LOOKUP_TIMEOUT`.

        The backend's own Deferred is never cancelled (a Deferred without a canceller would
        swallow a reader that arrives later, and nobody would finish it); a late reader is
        finished here instead.
        """
        try:
            result = context.call(ctx, self.factory.backend.get_reader, filename)
        except Exception:
            return fail()
        if not isinstance(result, Deferred):
            return succeed(result)
        out: Deferred = Deferred()
        timer = self.factory.reactor.callLater(self.factory.lookup_timeout, _give_up, out)

        def arrived(value: Any) -> None:
            if out.called:  # too late: nobody will serve it
                if not isinstance(value, Failure):
                    _finish(value)
                return None
            timer.cancel()
            if isinstance(value, Failure):
                out.errback(value)
            else:
                out.callback(value)
            return None

        result.addBoth(arrived)
        return out

    def _answer(self, reader: Any, request_id: int, filename: bytes) -> Any:
        if self.gone:  # the server hung up while the backend was thinking
            _finish(reader)
            raise BackendError("The TFTP server disconnected")
        try:
            answer = self._answer_whole(reader)
        except BaseException:
            _finish(reader)
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
            self._close_when_sent(fd)
            _finish(reader)  # the copy keeps the file (even an unlinked one) alive for the server
            return {"kind": FD, "fd": fd, "size": found[1], **_max_age(reader)}
        return None

    def _inline_or_stream(self, data: Any, reader: Any, request_id: int, filename: bytes) -> Dict[str, Any]:
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) > INLINE_MAX + 1:
            raise TypeError(f"reader returned {type(data).__name__} of {len(data) if data else 0} bytes "
                            f"for a read of {INLINE_MAX + 1}")
        data = bytes(data)
        if len(data) <= INLINE_MAX:
            _finish(reader)
            return {"kind": INLINE, "data": data, "size": len(data), **_max_age(reader)}
        if self.gone:
            raise BackendError("The TFTP server disconnected")
        if len(self.streams) >= self.factory.max_streams:
            raise BackendError("Backend busy: too many open streams")
        stream_id = self._next_stream
        self._next_stream += 1
        self.streams[stream_id] = _Stream(self, stream_id, reader, len(data), request_id, filename)
        size = reader.size if isinstance(reader.size, int) else None
        return {"kind": STREAM, "stream_id": stream_id, "data": data, "size": size, **_max_age(reader)}

    def _refuse(self, failure: Failure, request_id: int, filename: bytes, remote: Any) -> Failure:
        """Every failure of a lookup as one of the errors `ReadRequest` declares."""
        if failure.check(_LookupTimeout):
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
        return Failure(offload.typed_error(code, message))

    # -- streams, descriptors, the connection --------------------------------------------------

    def drop_stream(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream.close()

    def _close_when_sent(self, fd: int) -> None:
        """Close our copy of a passed descriptor once the kernel has taken it (it must stay open till then).

        Twisted queues descriptors for `sendmsg` with the bytes they ride on and has no
        "sent" notification, so we watch its queue; a transport without one (not Twisted's
        UNIX transport) gets a fixed grace period.
        """
        self._held_fds.add(fd)
        reactor = self.factory.reactor
        started = reactor.seconds()

        def check() -> None:
            if fd not in self._held_fds:  # closed with the connection
                return
            queue = getattr(self.transport, "_sendmsgQueue", None)
            waited = reactor.seconds() - started
            if queue is None and waited < 5.0:
                reactor.callLater(5.0, check)
                return
            if queue is not None and fd in queue:
                if waited < FD_SEND_GIVE_UP:
                    reactor.callLater(FD_SEND_CHECK, check)
                    return
                log.warn("Dropping a server connection that has not taken a descriptor in {seconds} s",
                         seconds=FD_SEND_GIVE_UP)
                self.transport.abortConnection()  # type: ignore[union-attr]
                return  # connectionLost closes it: never close a descriptor still queued for sending
            self._held_fds.discard(fd)
            os.close(fd)

        reactor.callLater(0, check)

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connections.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True
        self.factory.connections.discard(self)
        for stream_id in list(self.streams):
            self.drop_stream(stream_id)
        for fd in self._held_fds:
            os.close(fd)
        self._held_fds.clear()
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


def _give_up(out: Deferred) -> None:
    if not out.called:
        out.errback(_LookupTimeout())


def _finish_then_fail(failure: Failure, reader: Any) -> Failure:
    _finish(reader)
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


class OffloadService(Service):
    """Offers a backend on a UNIX socket while running; see `offload_service`."""

    def __init__(self, backend: IBackend, socket_path: str, mode: int = 0o660, reactor: Any = None,
                 **responder_options: Any) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.socket_path = socket_path
        self.mode = mode
        self.reactor = reactor
        self.factory = OffloadResponderFactory(backend, reactor, **responder_options)
        self.port: Any = None

    def startService(self) -> None:
        _remove_stale_socket(self.socket_path)
        endpoint = UNIXServerEndpoint(self.reactor, self.socket_path, mode=self.mode)
        # The socket is chmod()ed to `mode` after bind(); a restrictive umask closes the gap between.
        umask = os.umask(0o177)
        try:
            listening = endpoint.listen(self.factory)
        finally:
            os.umask(umask)
        result: List[Any] = []
        listening.addBoth(result.append)  # a UNIX listen is synchronous: this has fired
        if isinstance(result[0], Failure):
            result[0].raiseException()
        self.port = result[0]
        log.info("Offering the tftp-offload protocol on {path} (mode {mode:o})", path=self.socket_path,
                 mode=self.mode)
        super().startService()

    def stopService(self) -> Optional[Deferred]:
        super().stopService()
        port, self.port = self.port, None
        for connection in list(self.factory.connections):
            connection.transport.loseConnection()  # type: ignore[union-attr]
        return port.stopListening() if port is not None else None


def _remove_stale_socket(path: str) -> None:
    """Delete a socket file nobody listens on (left by a process that died), so that we can listen.

    A live listener is left alone (listening then fails with "address in use"), and so is
    anything that is not a socket.
    """
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("Removing stale socket {path}", path=path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


def offload_service(backend: IBackend, socket_path: str, mode: int = 0o660, reactor: Any = None,
                    **responder_options: Any) -> OffloadService:
    """An `IService` offering `backend` to tftp-offload servers on the UNIX socket `socket_path`.

    `mode` is the socket's permission bits: who may connect is who may ask for files. A stale
    socket left by a dead process is replaced; a live one is not.
    `responder_options`: `lookup_timeout`, `idle_timeout`, `max_streams` (see this module).
    """
    return OffloadService(backend, socket_path, mode, reactor, **responder_options)
