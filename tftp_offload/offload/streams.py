"""A stream answer on the server's side: pulled from the backend with `ReadChunk`s into a bounded buffer.

A reader of a stream reads at its own pace; chunks are asked for ahead of it (`CHUNKS_IN_FLIGHT` at
most) so the round trip to the backend hides behind the transfer, and what has been read is dropped,
except while the stream is young: its first `RETAIN_MAX` bytes are kept so that a reader stopping
early (the UEFI size probe) hands the stream back to be read again from byte 0.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import BackendError
from .commands import CHUNK_MAX, CloseStream, ReadChunk

log = Logger(namespace="tftp_offload.amp")

RETAIN_MAX = (1 << 20) + CHUNK_MAX
"""Bytes of a stream's start kept so that a reader stopping early can hand the stream back."""

CHUNKS_IN_FLIGHT = 4
"""`ReadChunk`s outstanding per stream: enough to hide the round trip, few enough to stay bounded."""


class StreamSource:
    """A backend stream, pulled with `ReadChunk`s into a bounded buffer ahead of its reader.

    `data` holds stream bytes from offset `base`; `pos` is where the reader is. While the
    stream is young (`retaining`), nothing read is dropped, so the stream can be rewound for
    the next reader; past `RETAIN_MAX` it is a plain read-ahead buffer of about two reads.
    """

    def __init__(self, protocol: Any, stream_id: int, size: Optional[int], head: bytes, clock: IReactorTime,
                 timeout: float, on_closed: Callable[[], object]) -> None:
        self.protocol: Any = protocol
        """The connection the stream lives on (an AMP client with a `gone` flag)."""
        self._clock = clock
        self._timeout = timeout
        self._on_closed = on_closed
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
        """Still at its start, whole and usable: a new reader can read it again from byte 0."""
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
                d = self.protocol.callRemote(ReadChunk, stream_id=self.stream_id, offset=offset,
                                        length=length)
            except Exception as e:
                self._failed(e)
                return
            self.requested += length
            self.in_flight += 1
            d.addTimeout(self._timeout, self._clock)
            d.addCallbacks(self._chunk, self._chunk_failed, (offset, length), None, (offset, length))
            d.addErrback(log_bug, "a stream chunk")

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
                self.protocol.callRemote(CloseStream, stream_id=self.stream_id)
            except Exception:
                log.failure("Could not close stream {stream_id}", stream_id=self.stream_id)
        self._on_closed()




def log_bug(failure: Failure, what: str) -> None:
    """The last errback on a call's Deferred: AMP drops the connection over an error left unhandled."""
    log.failure("Bug while handling {what}", failure=failure, what=what)
