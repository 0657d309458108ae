"""The responder's side of a stream: one backend reader, read front to back for the server's `ReadChunk`s."""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Optional, Tuple, Union

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import BackendError
from ..lookup import finish_reader
from .commands import BadRequest, StreamGone

log = Logger(namespace="tftp_offload.responder")


class ServedStream:
    """One reader of the wrapped backend, read front to back on behalf of the server's `ReadChunk`s.

    The server may have several chunks in flight; the reader is asked for one at a time, in
    order, and each chunk must start where the last ended (`offset`), so a confused server gets
    an error instead of silently wrong bytes. Unread for `idle_timeout` seconds, the stream calls
    `on_idle(stream_id)` (the responder then drops it).
    """

    def __init__(self, stream_id: int, reader: Any, position: int, request_id: int, filename: bytes,
                 clock: IReactorTime, idle_timeout: float, on_idle: Callable[[int], object]) -> None:
        self.stream_id = stream_id
        self.reader: Any = reader
        self.position = position
        self.request_id = request_id
        self.filename = filename
        self.eof = False
        self.failed: Optional[str] = None
        self._queue: Deque[Tuple[int, int, Deferred]] = deque()
        self._busy = False
        self._idle_timeout = idle_timeout
        self._on_idle = on_idle
        self._timer = clock.callLater(idle_timeout, self._idle)

    def read(self, offset: int, length: int) -> Deferred:
        """The `ReadChunk` answer ({"data", "eof"}) for `length` bytes at `offset`."""
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
        self._on_idle(self.stream_id)

    def _release_reader(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None:
            finish_reader(reader)

    def close(self) -> None:
        """Done with: the backend's reader is finished, chunks still queued are told the stream is gone."""
        if self._timer.active():
            self._timer.cancel()
        self._release_reader()
        self.eof = False
        if not self._busy:
            self._next()
