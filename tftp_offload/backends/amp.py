"""Ask a backend process what each RRQ gets, over the offload protocol (AMP on a UNIX socket).

`twistd tftp-offload --socket PATH` uses this. One persistent connection
carries every lookup (many in flight); it is made with backoff, so the server
may start before the backend, and remade after the backend restarts, with
lookups that were cut off resent on the new connection while their time lasts.

Lookups that ask the same thing share one backend call, and an answer is
reused for a few seconds (`cache_ttl`), so a ROM's retransmitted RRQs and a
UEFI size probe followed by the real RRQ cost one lookup. "The same thing" is
(local address, local port, client address, filename, mode): not the client's
port, nor its options, which change between the probe and the real request.
A backend whose answers depend on those can say `max_age` 0 (never reused nor
shared).

A reader is consumed once, so every caller gets its own reader over a shared
answer:

    inline     a new `BytesReader` over the same bytes
    fd         a `FileReader` over a dup() of the descriptor (each reads with
               pread at its own offset)
    ephemeral  opened and unlinked the moment the answer arrives, then like fd:
               the file is gone from the file system before the first byte is
               sent, and its space is freed when the last reader finishes, so
               nothing is left behind whatever ends the transfer, crashes included
    path       the file opened again for each reader
    stream     cannot be shared: its bytes are pulled once, and teeing them to
               readers at different speeds needs unbounded memory. A stream goes
               to one reader at a time. Its first ~1 MiB is kept while it lasts, so
               a reader that stopped early (the UEFI probe reads one window, then
               the client says ERROR 8) hands the stream back and the real RRQ
               starts over from byte 0 without a new lookup; other concurrent
               callers get streams of their own.
"""

from __future__ import annotations

import os
import random
import stat
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple, Union

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python import context
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import __version__, offload
from ..errors import BackendError, TFTPError, Unsupported
from ..interfaces import IBackend, IReader
from ..offload import CHUNK_MAX, EPHEMERAL, FD, INLINE, PATH, STREAM
from ..readers import BytesReader, FileReader, open_ephemeral, open_regular
from .outage import Outage, explain

log = Logger(namespace="tftp_offload.amp")

CACHE_TTL = 5.0
"""Seconds an answer is reused: long enough for a probe and its real RRQ, a retry or two."""

CACHE_MAX_ENTRIES = 512
"""Answers kept at most (a descriptor answer holds one open file each)."""

CACHE_MAX_BYTES = 32 << 20
"""Bytes of inline answers and kept stream heads at most."""

RETAIN_MAX = (1 << 20) + CHUNK_MAX
"""Bytes of a stream's start kept so that a reader stopping early can hand the stream back."""

CHUNKS_IN_FLIGHT = 4
"""`ReadChunk`s outstanding per stream: enough to hide the round trip, few enough to stay bounded."""

RETRY_MAX_DELAY = 2.0
"""Seconds between connection attempts at most: a restarted backend is found again within this."""

RETRY_FIRST_DELAY = 0.05
"""Seconds before the first reconnection attempt; each failure doubles it, up to `retry_max_delay`."""

NUDGE_INTERVAL = 0.1
"""While the backend is down, a request may try a connection at once, at most this often: a backend that
is back is found by the next request, a flood of requests does not become a flood of attempts."""

UNAVAILABLE = "Backend unavailable"
NO_ANSWER = "Backend did not answer in time"

STOP_GRACE = 3600.0
"""On stop, seconds to wait for stream readers (running transfers) before closing the connection. In
practice the TFTP service's drain timeout ends them sooner."""

Key = Tuple[str, int, str, bytes, str]


class _Request:
    """One RRQ as the backend sees it: what it names, who asked, where."""

    __slots__ = ("filename", "local", "remote", "mode", "options")

    def __init__(self, filename: bytes) -> None:
        self.filename = filename
        local = context.get("local") or ("", 0)
        remote = context.get("remote") or ("", 0)
        self.local: Tuple[str, int] = (str(local[0]), int(local[1]))
        self.remote: Tuple[str, int] = (str(remote[0]), int(remote[1]))
        self.mode: str = context.get("mode") or "octet"
        self.options: Dict[str, str] = dict(context.get("options") or {})

    @property
    def key(self) -> Key:
        return (self.local[0], self.local[1], self.remote[0], self.filename, self.mode)


# -------------------------------------------------------------------------------- answers --


class _Answer:
    """What one `ReadRequest` returned, held for as long as it may be reused."""

    kind = ""
    weight = 0
    """Bytes it holds, counted against `CACHE_MAX_BYTES`."""

    def new_reader(self) -> Optional[Any]:
        """A reader of its own for one more caller, or None if this answer cannot serve another now."""
        raise NotImplementedError

    def release(self) -> None:
        """Nobody else will ask for a reader: let go of what only the answer holds."""


class _InlineAnswer(_Answer):
    kind = INLINE

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.weight = len(data)

    def new_reader(self) -> BytesReader:
        return BytesReader(self.data)


class _FdAnswer(_Answer):
    """A regular file we hold open (a passed descriptor, or an ephemeral file already unlinked)."""

    def __init__(self, fd: int, kind: str) -> None:
        self.fd: Optional[int] = fd
        self.kind = kind

    def new_reader(self) -> Optional[FileReader]:
        return None if self.fd is None else FileReader(os.dup(self.fd))

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


class _PathAnswer(_Answer):
    kind = PATH

    def __init__(self, path: bytes) -> None:
        self.path = path

    def new_reader(self) -> FileReader:
        # Opened for each reader, like a file in a served directory. Symlinks are followed:
        # boot trees are full of them, and the backend that named the path is trusted.
        return FileReader(open_regular(self.path, follow_symlinks=True))


class _StreamAnswer(_Answer):
    kind = STREAM

    def __init__(self, source: "_StreamSource") -> None:
        self.source = source
        self.cached = False

    @property
    def weight(self) -> int:  # type: ignore[override]
        return len(self.source.data)

    def new_reader(self) -> Optional["_StreamReader"]:
        source = self.source
        if source.in_use or not source.rewindable():
            return None
        source.rewind()
        source.in_use = True
        return _StreamReader(self)

    def reader_done(self) -> None:
        source = self.source
        source.in_use = False
        if not self.cached or not source.rewindable():
            source.close()

    def release(self) -> None:
        self.cached = False
        if not self.source.in_use:
            self.source.close()


class _StreamSource:
    """A backend stream, pulled with `ReadChunk`s into a bounded buffer ahead of its reader.

    `data` holds stream bytes from offset `base`; `pos` is where the reader is. While the
    stream is young (`retaining`), nothing read is dropped, so the stream can be rewound for
    the next reader; past `RETAIN_MAX` it is a plain read-ahead buffer of about two reads.
    """

    def __init__(self, backend: "AMPBackend", protocol: "_ClientProtocol", stream_id: int, size: Optional[int],
                 head: bytes) -> None:
        self.backend = backend
        self.protocol = protocol
        self.stream_id = stream_id
        self.size = size
        self.data = bytearray(head)
        self.base = 0
        self.pos = 0
        self.requested = len(head)
        self.arrived: Dict[int, Tuple[bytes, bool]] = {}
        self.in_flight = 0
        self.eof = size is not None and len(head) >= size
        self.error: Optional[BaseException] = None
        self.retaining = True
        self.in_use = False
        self.closed = False
        self.reads = 0
        self._waiting: Optional[Tuple[Deferred, int]] = None

    @property
    def end(self) -> int:
        return self.base + len(self.data)

    def rewindable(self) -> bool:
        return self.retaining and self.base == 0 and self.error is None and not self.closed

    def rewind(self) -> None:
        self.pos = 0
        self.reads = 0

    def read(self, size: int) -> Union[bytes, Deferred]:
        self.reads += 1
        if self.end - self.pos >= size or self.eof:
            data = self._take(size)
            self._fill(size)
            return data
        if self.error is not None:
            raise self.error
        d: Deferred = Deferred()
        self._waiting = (d, size)
        self._fill(size)
        return d

    def _take(self, size: int) -> bytes:
        start = self.pos - self.base
        with memoryview(self.data) as view:  # one copy, not two; released before _trim resizes
            data = bytes(view[start : start + size])
        self.pos += len(data)
        self._trim()
        return data

    def _trim(self) -> None:
        if self.retaining and len(self.data) > RETAIN_MAX:
            self.retaining = False
        if not self.retaining and self.pos > self.base:
            del self.data[: self.pos - self.base]
            self.base = self.pos

    def _fill(self, size: int) -> None:
        """Keep chunks coming until one read (two, once the transfer shows progress) is buffered ahead."""
        if self.closed or self.eof or self.error is not None:
            return
        target = self.pos + size * (2 if self.reads > 1 else 1)
        if self.protocol.gone:
            self._failed(BackendError("Lost the connection to the backend"))
            return
        while self.requested < target and self.in_flight < CHUNKS_IN_FLIGHT:
            length = CHUNK_MAX if self.size is None else min(CHUNK_MAX, self.size - self.requested)
            if length <= 0:
                break
            offset = self.requested
            try:
                d = self.protocol.callRemote(offload.ReadChunk, stream_id=self.stream_id, offset=offset,
                                             length=length)
            except Exception as e:
                self._failed(e)
                return
            self.requested += length
            self.in_flight += 1
            d.addTimeout(self.backend.timeout, self.backend.reactor)
            d.addCallbacks(self._chunk, self._chunk_failed, (offset, length), None, (offset, length))
            d.addErrback(_log_bug, "a stream chunk")

    def _chunk(self, response: Dict[str, Any], offset: int, length: int) -> None:
        self.in_flight -= 1
        if self.closed:
            return
        data, eof = response["data"], response["eof"]
        if len(data) > length:
            self._failed(BackendError(f"Backend sent {len(data)} bytes for a chunk of {length}"))
            return
        self.arrived[offset] = (data, eof or len(data) < length)
        while self.end in self.arrived and not self.eof:
            data, eof = self.arrived.pop(self.end)
            self.data += data
            self.eof = eof or (self.size is not None and self.end >= self.size)
        if self.eof:
            self.arrived.clear()
        self._trim()
        self._wake()

    def _chunk_failed(self, failure: Failure, offset: int, length: int) -> None:
        self.in_flight -= 1
        if self.closed:
            return
        if failure.check(CancelledError):
            self._failed(BackendError("Backend did not send the next chunk in time"))
        elif failure.check(ConnectionClosed):
            self._failed(BackendError("Lost the connection to the backend"))
        else:
            log.error("Backend failed stream {stream_id} at {offset}: {error}", stream_id=self.stream_id,
                      offset=offset, error=failure.getErrorMessage())
            self._failed(BackendError("Backend failed while streaming the file"))

    def _failed(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        waiting = self._waiting
        if waiting is None:
            return
        d, size = waiting
        if self.end - self.pos >= size or self.eof:
            self._waiting = None
            d.callback(self._take(size))
            self._fill(size)
        elif self.error is not None:
            self._waiting = None
            d.errback(self.error)
        else:
            self._fill(size)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.data = bytearray()
        self.arrived.clear()
        if not self.protocol.gone:  # even after EOF: the backend may hold the stream till told
            try:
                self.protocol.callRemote(offload.CloseStream, stream_id=self.stream_id)
            except Exception:
                log.failure("Could not close stream {stream_id}", stream_id=self.stream_id)
        self.backend._stream_closed()


@implementer(IReader)
class _StreamReader:
    """One transfer's view of a stream answer."""

    def __init__(self, answer: _StreamAnswer) -> None:
        self._answer: Optional[_StreamAnswer] = answer
        self.size = answer.source.size

    def read(self, size: int) -> Union[bytes, Deferred]:
        if self._answer is None:
            raise ValueError("read from a finished reader")
        return self._answer.source.read(size)

    def finish(self) -> None:
        answer, self._answer = self._answer, None
        if answer is not None:
            answer.reader_done()


@implementer(IReader)
class _Reported:
    """A reader handed to the server, which tells the backend how its transfer went (`transfer_finished`)."""

    __slots__ = ("_reader", "_backend", "_request", "_request_id", "size", "read", "kind")

    def __init__(self, reader: Any, backend: "AMPBackend", request: _Request, request_id: int, kind: str) -> None:
        self._reader = reader
        self._backend = backend
        self._request = request
        self._request_id = request_id
        self.size = reader.size
        self.read = reader.read  # the hot path: no extra call per read
        self.kind = kind
        """The answer kind (inline, fd, path, ephemeral, stream), for metrics."""

    def transfer_finished(self, report: Dict[str, Any]) -> None:
        self._backend._report(self._request, self._request_id, report)

    def finish(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.finish()


# ------------------------------------------------------------------------------- lookups --


class _Waiter:
    """One `get_reader` call waiting for a lookup, with its own deadline."""

    def __init__(self, backend: "AMPBackend", request: _Request) -> None:
        self.backend = backend
        self.request = request
        self.lookup: Optional[_Lookup] = None
        self.deferred: Deferred = Deferred(self._cancel)
        self.fail_fast = False
        """Asked while the backend was known to be down: answered when the next attempt fails, not at the timeout."""
        self._timer = backend.reactor.callLater(backend.timeout, self._expire)

    def _expire(self) -> None:
        lookup, self.lookup = self.lookup, None
        sent = lookup is not None and lookup.request_id is not None
        if lookup is not None:
            lookup.forget(self)
        # What the client reads on its console: short, true, and no paths or internals.
        message = NO_ANSWER if sent else UNAVAILABLE
        log.warn("{message} ({timeout} s) for {file!r} from {client}{reason}", message=message,
                 timeout=self.backend.timeout, file=self.request.filename, client=self.request.remote,
                 reason="" if sent else f": {self.backend.unavailable_reason()}", outcome="backend-timeout")
        self.deferred.errback(BackendError(message))

    def _cancel(self, deferred: Deferred) -> None:
        if self._timer.active():
            self._timer.cancel()
        lookup, self.lookup = self.lookup, None
        if lookup is not None:
            lookup.forget(self)

    def succeed(self, reader: Any) -> None:
        self._timer.cancel()
        self.lookup = None
        self.deferred.callback(reader)

    def fail(self, failure: Failure) -> None:
        self._timer.cancel()
        self.lookup = None
        self.deferred.errback(failure)


class _Lookup:
    """One `ReadRequest`, and everyone waiting for its answer."""

    def __init__(self, backend: "AMPBackend", request: _Request, shared: bool) -> None:
        self.backend = backend
        self.request = request
        self.key = request.key if shared else None
        self.request_id: Optional[int] = None
        self.waiters: List[_Waiter] = []

    def add(self, waiter: _Waiter) -> None:
        waiter.lookup = self
        self.waiters.append(waiter)

    def forget(self, waiter: _Waiter) -> None:
        if waiter in self.waiters:
            self.waiters.remove(waiter)
        if not self.waiters and self.request_id is None:
            self.backend._abandon(self)  # never sent: nobody needs it sent any more

    def take_waiters(self) -> List[_Waiter]:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.lookup = None
        return waiters


# ------------------------------------------------------------------------------ connection --


class _ClientProtocol(amp.AMP):
    """The connection to the backend; usable once `Hello` has settled the version."""

    def __init__(self, backend: "AMPBackend") -> None:
        super().__init__()
        self.backend = backend
        self.version: Optional[int] = None
        self.capabilities: frozenset = frozenset()
        self.gone = False

    def connectionMade(self) -> None:
        super().connectionMade()
        try:
            d = self.callRemote(offload.Hello, version=offload.PROTOCOL_VERSION,
                                min_version=offload.MIN_PROTOCOL_VERSION, capabilities=list(offload.CAPABILITIES),
                                software=f"tftp-offload {__version__}")
        except Exception:
            log.failure("Could not greet the backend")
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        d.addCallbacks(self._greeted, self._refused)
        d.addErrback(_log_bug, "the backend's greeting")

    def _greeted(self, response: Dict[str, Any]) -> None:
        version = response["version"]
        if not offload.MIN_PROTOCOL_VERSION <= version <= offload.PROTOCOL_VERSION:
            self._refused(Failure(offload.IncompatibleVersion(f"backend chose version {version}")))
            return
        self.version = version
        self.capabilities = frozenset(response["capabilities"])
        self.backend._connected(self, response.get("software"))

    def _refused(self, failure: Failure) -> None:
        if self.gone:
            return
        log.error("Backend at {path} refused our greeting: {error}", path=self.backend.socket_path,
                  error=failure.getErrorMessage())
        self.backend._greeting_refused(failure.getErrorMessage())
        self.transport.loseConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        """AMP raises on bytes that are not AMP (a box too long, an empty box...); the reactor would log a
        traceback for that. One line instead, and the connection is dropped (calls on it are resent)."""
        try:
            super().dataReceived(data)
        except Exception as e:
            log.error("Backend at {path} sent something that is not the offload protocol ({error}); dropping "
                      "the connection", path=self.backend.socket_path, error=f"{type(e).__name__}: {e}"[:200],
                      outcome="backend-error")
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True
        self.backend._lost(self, reason)
        # Descriptors that arrived with a box we never decoded must not leak.
        for fd in self._descriptors.values():
            os.close(fd)
        self._descriptors.clear()
        super().connectionLost(reason)  # fails the calls still outstanding


class _ClientFactory(Factory):
    noisy = False

    def __init__(self, backend: "AMPBackend") -> None:
        self.backend = backend

    def buildProtocol(self, addr: Any) -> _ClientProtocol:
        return _ClientProtocol(self.backend)


class _Connector:
    """Keeps one connection to the backend: connects, and after a failed attempt or a lost connection
    tries again with backoff (`RETRY_FIRST_DELAY`, doubling up to `max_delay`, jittered), or at once
    when asked (`now()`).

    Instead of `ClientService`, which logs every retry ("Scheduling retry 7 to connect ... in
    2.108 seconds", every 2 s for as long as the backend is away) and cannot be told to try now.
    What an operator hears of an outage is `Outage`'s business.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, factory: Factory, clock: Any, max_delay: float,
                 failed: Any) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.clock = clock
        self.max_delay = max_delay
        self.failed = failed
        self.protocol: Optional[Any] = None
        self.connecting: Optional[Deferred] = None
        self._timer: Optional[Any] = None
        self._failures = 0
        self._stopped = True
        self._on_lost: List[Deferred] = []

    def start(self) -> None:
        self._stopped = False
        self._attempt()

    def now(self) -> None:
        """Try at once, unless connected, connecting, or stopped."""
        if self._stopped or self.protocol is not None or self.connecting is not None:
            return
        self._attempt()

    def within(self, delay: float) -> None:
        """Make the next attempt no later than `delay` seconds from now (while waiting to retry)."""
        timer = self._timer
        if timer is not None and timer.active() and timer.getTime() - self.clock.seconds() > delay:
            timer.reset(delay)

    def _attempt(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.connecting = d = self.endpoint.connect(self.factory)
        d.addCallbacks(self._made, self._not_made)

    def _made(self, protocol: Any) -> None:
        self.connecting = None
        self._failures = 0
        self.protocol = protocol

    def _not_made(self, failure: Failure) -> None:
        self.connecting = None
        if self._stopped:
            return
        self._failures += 1
        self._later()
        self.failed(failure)

    def lost(self, protocol: Any) -> None:
        """The connection `protocol` had is gone (its connectionLost)."""
        if protocol is not self.protocol:
            return
        self.protocol = None
        waiting, self._on_lost = self._on_lost, []
        for d in waiting:
            d.callback(None)
        if not self._stopped:
            self._later()

    def _later(self) -> None:
        delay = min(self.max_delay, RETRY_FIRST_DELAY * 2 ** max(self._failures - 1, 0)) + _jitter()
        self._timer = self.clock.callLater(delay, self._attempt)

    def stop(self) -> Deferred:
        """No more attempts; close the connection. Fires once it is closed."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.connecting is not None:
            self.connecting.cancel()
        if self.protocol is None or self.protocol.transport is None:
            return succeed(None)
        d: Deferred = Deferred()
        self._on_lost.append(d)
        self.protocol.transport.loseConnection()
        return d


# --------------------------------------------------------------------------------- backend --


@implementer(IBackend)
class AMPBackend(Service):
    """The TFTP server's backend when another process decides: `twistd tftp-offload --socket PATH`.

    A service: while running it keeps one connection to the backend listening on
    `socket_path` (reconnecting with backoff). `timeout` bounds each lookup: then the
    client gets TFTP error 0 "Backend did not answer in time" (or "Backend unavailable"
    when there was no connection to ask on) and the listener carries on.
    """

    def __init__(self, socket_path: str, timeout: float = 4.0, reactor: Any = None, cache_ttl: float = CACHE_TTL,
                 retry_max_delay: float = RETRY_MAX_DELAY) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.socket_path = socket_path
        self.timeout = timeout
        self.reactor = reactor
        self.cache_ttl = cache_ttl
        self.retry_max_delay = retry_max_delay
        self.stats: Dict[str, int] = dict.fromkeys(
            ("lookups", "answers", "coalesced", "cache_hits", "errors", "resent", "reports", "connections"), 0)
        """Counters, for tests and the operator's curiosity: lookups sent, and how many were saved."""
        self._protocol: Optional[_ClientProtocol] = None
        self._connector: Optional[_Connector] = None
        self._inflight: Dict[Key, _Lookup] = {}
        self._queued: List[_Lookup] = []
        self._cache: "OrderedDict[Key, Tuple[_Answer, Any]]" = OrderedDict()
        self._cache_bytes = 0
        self._request_ids = 0
        self._open_streams = 0
        self._streams_closed: List[Deferred] = []
        self._awaiting = 0
        """ReadRequests sent and not yet answered: stopping waits for them (their files must go)."""
        self._answers_in: List[Deferred] = []
        self._last_error = "not connected yet"
        self._last_failure = -NUDGE_INTERVAL
        self._last_failure_wall = 0.0
        self.outage = Outage(log, "the backend", socket_path, reactor)

    # -- IService --------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        endpoint = UNIXClientEndpoint(self.reactor, self.socket_path, timeout=self.timeout)
        self._connector = _Connector(endpoint, _ClientFactory(self), self.reactor, self.retry_max_delay,
                                     self._connect_failed)
        log.info("Asking the backend at {path} what to serve", path=self.socket_path)
        self._connector.start()

    def stopService(self) -> Deferred:
        """Refuse new lookups now; close the connection once no transfer is still pulling a stream and
        the answers still on their way have come (at most `timeout`): a late ephemeral file is deleted,
        a late descriptor closed."""
        super().stopService()
        shutting = Failure(BackendError("Server shutting down"))
        for lookup in [*self._inflight.values(), *self._queued]:
            for waiter in lookup.take_waiters():
                waiter.fail(shutting)
        self._inflight.clear()
        self._queued.clear()
        while self._cache:
            self._uncache(next(iter(self._cache)))
        waits: List[Deferred] = []
        if self._open_streams:
            streams: Deferred = Deferred()
            self._streams_closed.append(streams)
            timer = self.reactor.callLater(STOP_GRACE, self._stream_closed, force=True)
            streams.addBoth(_cancel_timer, timer)
            waits.append(streams)
        if self._awaiting:
            answers: Deferred = Deferred()
            self._answers_in.append(answers)
            timer = self.reactor.callLater(self.timeout, self._answer_in, force=True)
            answers.addBoth(_cancel_timer, timer)
            waits.append(answers)
        done: Deferred = DeferredList(waits) if waits else succeed(None)
        connector = self._connector  # kept: it hears of the connection's end through _lost
        if connector is not None:
            done.addCallback(lambda _: connector.stop())
        return done

    def _answer_in(self, force: bool = False) -> None:
        if not force:
            self._awaiting -= 1
        if self._awaiting <= 0 or force:
            waiting, self._answers_in = self._answers_in, []
            for d in waiting:
                if not d.called:
                    d.callback(None)

    # -- IBackend ---------------------------------------------------------------------------

    def get_reader(self, file_name: bytes) -> Union[Any, Deferred]:
        if not self.running:
            raise BackendError("Backend connection is not running")
        request = _Request(file_name)
        key = request.key
        cached = self._cache.get(key)
        if cached is not None:
            answer, request_id = cached[0], cached[1].request_id
            reader = answer.new_reader()  # a path answer may raise FileNotFound here: the caller's answer
            if reader is not None:
                self.stats["cache_hits"] += 1
                return _Reported(reader, self, request, request_id, answer.kind)
        fail_fast = self._protocol is None and self.outage.down
        if fail_fast and self._connector is not None and self._connector.connecting is None:
            if self.reactor.seconds() - self._last_failure < NUDGE_INTERVAL and not self._socket_is_new():
                self.outage.refused += 1  # known down a moment ago: say so now, not after the timeout
                self._connector.within(NUDGE_INTERVAL)  # and have the next attempt soon: it is wanted
                raise BackendError(UNAVAILABLE)
            self._connector.now()  # it may be back: the attempt decides (on a UNIX socket, within a ms)
        waiter = _Waiter(self, request)
        waiter.fail_fast = fail_fast
        lookup = self._inflight.get(key)
        if lookup is not None:
            self.stats["coalesced"] += 1
            lookup.add(waiter)
        else:
            self._start(_Lookup(self, request, shared=True), [waiter])
        return waiter.deferred

    def get_writer(self, file_name: bytes) -> None:
        raise Unsupported("Write requests are not supported")

    # -- lookups ----------------------------------------------------------------------------

    def _start(self, lookup: _Lookup, waiters: List[_Waiter]) -> None:
        for waiter in waiters:
            lookup.add(waiter)
        if lookup.key is not None:
            self._inflight[lookup.key] = lookup
        protocol = self._protocol
        if protocol is None:
            self._queued.append(lookup)
        else:
            self._send(lookup, protocol)

    def _abandon(self, lookup: _Lookup) -> None:
        if lookup.key is not None and self._inflight.get(lookup.key) is lookup:
            del self._inflight[lookup.key]
        if lookup in self._queued:
            self._queued.remove(lookup)

    def _send(self, lookup: _Lookup, protocol: "_ClientProtocol") -> None:
        self._request_ids += 1
        lookup.request_id = request_id = self._request_ids
        request = lookup.request
        self.stats["lookups"] += 1
        try:
            d = protocol.callRemote(
                offload.ReadRequest, request_id=request_id, local_ip=request.local[0], local_port=request.local[1],
                remote_ip=request.remote[0], remote_port=request.remote[1], filename=request.filename,
                mode=request.mode, options=[{"name": k, "value": v} for k, v in request.options.items()])
        except Exception:  # amp.TooLong for an absurd filename or option list, mostly
            self._failed(Failure(), lookup, protocol)
            return
        self._awaiting += 1
        d.addBoth(_passing, self._answer_in)
        d.addCallbacks(self._answered, self._failed, (lookup, protocol), None, (lookup, protocol))
        d.addErrback(_log_bug, "a backend answer")

    def _answered(self, response: Dict[str, Any], lookup: _Lookup, protocol: "_ClientProtocol") -> None:
        if lookup.key is not None and self._inflight.get(lookup.key) is lookup:
            del self._inflight[lookup.key]
        self.stats["answers"] += 1
        try:
            answer = self._answer_from(response, protocol)
        except Exception:
            self._failed(Failure(), lookup, protocol)
            return
        max_age = response.get("max_age")
        shared = max_age is None or max_age > 0
        ttl = self.cache_ttl if max_age is None else min(self.cache_ttl, max_age)
        cached = ttl > 0 and lookup.key is not None and self.running
        if cached:  # before any waiter runs on: what it does next may already ask again
            self._cache_put(lookup.key, answer, ttl, lookup)  # type: ignore[arg-type]
        given: List[Tuple[_Waiter, Any]] = []
        alone: List[_Waiter] = []
        for waiter in lookup.take_waiters():
            if given and not shared:
                alone.append(waiter)
                continue
            try:
                reader = answer.new_reader()
            except Exception:
                given.append((waiter, Failure()))
                continue
            if reader is None:  # a stream already has its reader: this caller needs a stream of its own
                alone.append(waiter)
            else:
                given.append((waiter, _Reported(reader, self, waiter.request, lookup.request_id or 0, answer.kind)))
        if not cached:
            answer.release()  # readers already given keep what they need
        for waiter in alone:
            self._start(_Lookup(self, waiter.request, shared=False), [waiter])
        for waiter, result in given:
            if isinstance(result, Failure):
                waiter.fail(result)
            else:
                waiter.succeed(result)

    def _answer_from(self, response: Dict[str, Any], protocol: "_ClientProtocol") -> _Answer:
        """Turn a `ReadRequest` answer into something local. Ephemeral files are unlinked here, at once."""
        kind = response["kind"]
        size = response.get("size")
        if size is not None and not 0 <= size < 1 << 63:
            log.warn("Backend at {path} gave a size of {size} bytes", path=self.socket_path, size=size,
                     outcome="backend-error")
            raise BackendError("Backend sent an invalid answer")
        if kind == INLINE and response["data"] is not None:
            return _InlineAnswer(response["data"])
        if kind == FD and response["fd"] is not None:
            fd = response["fd"]
            os.set_inheritable(fd, False)  # received descriptors are not close-on-exec
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise BackendError("Backend passed a descriptor that is not a regular file")
            return _FdAnswer(fd, FD)
        if kind == EPHEMERAL and response["path"] is not None:
            path = response["path"]
            return _FdAnswer(open_ephemeral(path), EPHEMERAL)
        if kind == PATH and response["path"] is not None:
            return _PathAnswer(response["path"])
        if kind == STREAM and response["stream_id"] is not None:
            self._open_streams += 1
            source = _StreamSource(self, protocol, response["stream_id"], response["size"], response["data"] or b"")
            return _StreamAnswer(source)
        log.warn("Backend at {path} sent an answer this server does not understand: kind {kind!r} without what "
                 "it needs", path=self.socket_path, kind=kind, outcome="backend-error")
        raise BackendError("Backend sent an invalid answer")

    def _failed(self, failure: Failure, lookup: _Lookup, protocol: "_ClientProtocol") -> None:
        cut_off = bool(failure.check(ConnectionClosed)) or protocol.gone  # gone: dropped over a protocol error
        if cut_off and lookup.waiters and self.running:
            # Cut off by a backend restart: ask again on the next connection, while time lasts.
            self.stats["resent"] += 1
            lookup.request_id = None
            if self._protocol is None:
                self._queued.append(lookup)
            else:
                self._send(lookup, self._protocol)
            return
        if lookup.key is not None and self._inflight.get(lookup.key) is lookup:
            del self._inflight[lookup.key]
        self.stats["errors"] += 1
        if not failure.check(TFTPError):
            if cut_off:
                failure = Failure(BackendError("Lost the connection to the backend"))
            else:
                log.failure("Lookup of {file!r} failed", failure=failure, file=lookup.request.filename)
                failure = Failure(BackendError("Backend error"))
        for waiter in lookup.take_waiters():
            waiter.fail(failure)

    # -- the cache --------------------------------------------------------------------------

    def _cache_put(self, key: Key, answer: _Answer, ttl: float, lookup: _Lookup) -> None:
        self._uncache(key)
        timer = self.reactor.callLater(ttl, self._expire, key, answer)
        self._cache[key] = (answer, _Entry(lookup.request_id or 0, timer, answer.weight))
        self._cache_bytes += answer.weight
        if isinstance(answer, _StreamAnswer):
            answer.cached = True
        while self._cache and (len(self._cache) > CACHE_MAX_ENTRIES or self._cache_bytes > CACHE_MAX_BYTES):
            self._uncache(next(iter(self._cache)))

    def _expire(self, key: Key, answer: _Answer) -> None:
        cached = self._cache.get(key)
        if cached is not None and cached[0] is answer:
            self._uncache(key)

    def _uncache(self, key: Key) -> None:
        cached = self._cache.pop(key, None)
        if cached is None:
            return
        answer, entry = cached
        self._cache_bytes -= entry.weight
        if entry.timer.active():
            entry.timer.cancel()
        answer.release()

    # -- the connection ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """A greeted connection to the backend is up (the `tftp_backend_up` metric)."""
        return self._protocol is not None

    def _connected(self, protocol: _ClientProtocol, software: Optional[str]) -> None:
        self._protocol = protocol
        self.stats["connections"] += 1
        refused = self.outage.refused
        away = self.outage.back(quiet=True)
        log.info("Connected to the backend at {path} ({software}, protocol {version}){after}", path=self.socket_path,
                 software=software or "unknown software", version=protocol.version,
                 after="" if away is None else f", after {away:.1f} s without it ({refused} requests refused)",
                 )
        queued, self._queued = self._queued, []
        for lookup in queued:
            if lookup.waiters:
                self._send(lookup, protocol)
            else:
                self._abandon(lookup)

    def _lost(self, protocol: _ClientProtocol, reason: Failure) -> None:
        if self._connector is not None:
            self._connector.lost(protocol)
        if self._protocol is not protocol:
            if self.running and protocol.version is None:  # it hung up before settling the greeting
                self._last_failure = self.reactor.seconds()
                self.outage.went(f"the connection closed before the greeting: {reason.getErrorMessage()}")
            return
        self._protocol = None
        self._last_error = f"connection lost: {reason.getErrorMessage()}"
        if self.running:
            self.outage.went(reason.getErrorMessage(),
                             "Lost the connection to {what} at {path}: {reason}; reconnecting")
        else:  # we closed it: shutting down is not news
            log.info("Closed the connection to the backend at {path}", path=self.socket_path)
        # Streams of that connection are gone with it; other answers are local and stay good.
        for key in [k for k, (answer, _) in self._cache.items() if isinstance(answer, _StreamAnswer)]:
            self._uncache(key)

    def _connect_failed(self, failure: Failure) -> None:
        self._last_error = failure.getErrorMessage()
        self._last_failure = self.reactor.seconds()
        self._last_failure_wall = time.time()
        self.outage.went(explain(self.socket_path, failure))
        # Those who asked while it was known down are told now; earlier ones wait out their timeout.
        for lookup in list(self._queued):
            for waiter in [w for w in lookup.waiters if w.fail_fast]:
                lookup.forget(waiter)
                self.outage.refused += 1
                waiter.fail(Failure(BackendError(UNAVAILABLE)))

    def _socket_is_new(self) -> bool:
        """A socket made since the last failed attempt: a backend just started, worth trying at once."""
        try:
            info = os.stat(self.socket_path)
        except OSError:
            return False
        return stat.S_ISSOCK(info.st_mode) and info.st_ctime >= self._last_failure_wall

    def _greeting_refused(self, reason: str) -> None:
        self._last_error = f"greeting refused: {reason}"
        self._last_failure = self.reactor.seconds()
        self.outage.went(self._last_error)

    def unavailable_reason(self) -> str:
        return self._last_error

    def _stream_closed(self, force: bool = False) -> None:
        if not force:
            self._open_streams -= 1
        if self._open_streams <= 0 or force:
            waiting, self._streams_closed = self._streams_closed, []
            for d in waiting:
                if not d.called:
                    d.callback(None)

    # -- reports ----------------------------------------------------------------------------

    def _report(self, request: _Request, request_id: int, report: Dict[str, Any]) -> None:
        protocol = self._protocol
        if protocol is None or offload.TRANSFER_FINISHED not in protocol.capabilities:
            return
        client = report.get("client") or request.remote
        try:
            protocol.callRemote(
                offload.TransferFinished, request_id=request_id, outcome=str(report["outcome"]),
                filename=request.filename, local_ip=request.local[0], local_port=request.local[1],
                remote_ip=str(client[0]), remote_port=int(client[1]), bytes=int(report["bytes"]),
                duration=float(report["duration"]), blksize=int(report["blksize"]),
                windowsize=int(report["windowsize"]), retransmits=int(report["retransmits"]),
                client_error=report.get("client_error"))
        except Exception:
            log.failure("Could not report a transfer to the backend")
            return
        self.stats["reports"] += 1


class _Entry:
    __slots__ = ("request_id", "timer", "weight")

    def __init__(self, request_id: int, timer: Any, weight: int) -> None:
        self.request_id = request_id
        self.timer = timer
        self.weight = weight


def _jitter() -> float:
    """Up to 0.2 s added to each retry delay, so servers restarted together do not knock in step."""
    return random.random() * 0.2


def _passing(result: Any, call: Any) -> Any:
    call()
    return result


def _cancel_timer(result: Any, timer: Any) -> Any:
    if timer.active():
        timer.cancel()
    return result


def _log_bug(failure: Failure, what: str) -> None:
    """The last errback on a call's Deferred: AMP drops the connection over an error left unhandled."""
    log.failure("Bug while handling {what}", failure=failure, what=what)
