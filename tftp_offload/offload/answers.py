"""What one `ReadRequest` answer is on the server's side, and a reader of its own for each caller.

A reader is consumed once, so every caller gets its own reader over a shared answer:

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
import stat
from typing import Any, Callable, Dict, Optional, Union

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from ..errors import BackendError
from ..interfaces import IReader
from ..readers import BytesReader, FileReader, open_ephemeral, open_regular
from .commands import EPHEMERAL, FD, INLINE, PATH, STREAM
from .streams import StreamSource

log = Logger(namespace="tftp_offload.amp")

INVALID = "Backend sent an invalid answer"


class Answer:
    """What one `ReadRequest` returned, held for as long as it may be reused."""

    kind = ""
    weight = 0
    """Bytes it holds, counted against the cache's byte bound."""

    def new_reader(self) -> Optional[Any]:
        """A reader of its own for one more caller, or None if this answer cannot serve another now."""
        raise NotImplementedError

    def keep(self) -> None:
        """The cache holds this answer: more readers may be asked for after the current ones finish."""

    def release(self) -> None:
        """Nobody else will ask for a reader: let go of what only the answer holds."""


class InlineAnswer(Answer):
    kind = INLINE

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.weight = len(data)

    def new_reader(self) -> BytesReader:
        return BytesReader(self.data)


class FdAnswer(Answer):
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


class PathAnswer(Answer):
    kind = PATH

    def __init__(self, path: bytes) -> None:
        self.path = path

    def new_reader(self) -> FileReader:
        # Opened for each reader, like a file in a served directory. Symlinks are followed:
        # boot trees are full of them, and the backend that named the path is trusted.
        return FileReader(open_regular(self.path, follow_symlinks=True))


class StreamAnswer(Answer):
    kind = STREAM

    def __init__(self, source: StreamSource) -> None:
        self.source = source
        self.cached = False

    @property
    def weight(self) -> int:  # type: ignore[override]
        return len(self.source.data)

    def new_reader(self) -> Optional["StreamReader"]:
        source = self.source
        if source.in_use or not source.rewindable():
            return None
        source.rewind()
        source.in_use = True
        return StreamReader(self)

    def reader_done(self) -> None:
        """Its reader finished: the stream is free for the next (if cached and still at its start)."""
        source = self.source
        source.in_use = False
        if not self.cached or not source.rewindable():
            source.close()

    def keep(self) -> None:
        self.cached = True

    def release(self) -> None:
        self.cached = False
        if not self.source.in_use:
            self.source.close()


@implementer(IReader)
class StreamReader:
    """One transfer's view of a stream answer."""

    def __init__(self, answer: StreamAnswer) -> None:
        self._answer: Optional[StreamAnswer] = answer
        self.size = answer.source.size

    def read(self, size: int) -> Union[bytes, Deferred]:
        if self._answer is None:
            raise ValueError("read from a finished reader")
        return self._answer.source.read(size)

    @property
    def source(self) -> Optional[StreamSource]:
        """The stream being read (None once finished): what the tests measure the read-ahead of."""
        return None if self._answer is None else self._answer.source

    def finish(self) -> None:
        answer, self._answer = self._answer, None
        if answer is not None:
            answer.reader_done()


def answer_from(response: Dict[str, Any], where: str, open_stream: Callable[[int, Optional[int], bytes], StreamSource],
                claim_fd: Callable[[int], object]) -> Answer:
    """Turn a `ReadRequest` answer into something local, or raise `BackendError` (logged, naming `where`).

    A passed descriptor is claimed at once (`claim_fd`: the connection no longer closes it when it
    ends) and closed here if the answer is not usable; ephemeral files are unlinked here, at once.
    """
    kind = response["kind"]
    size = response.get("size")
    fd = response.get("fd")
    if fd is not None:
        claim_fd(fd)
        os.set_inheritable(fd, False)  # received descriptors are not close-on-exec
    try:
        if size is not None and not 0 <= size < 1 << 63:
            log.warn("Backend at {path} gave a size of {size} bytes", path=where, size=size, outcome="backend-error")
            raise BackendError(INVALID)
        if kind == FD and fd is not None:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BackendError("Backend passed a descriptor that is not a regular file")
            answer: Answer = FdAnswer(fd, FD)
            fd = None
            return answer
        if kind == INLINE and response["data"] is not None:
            return InlineAnswer(response["data"])
        if kind == EPHEMERAL and response["path"] is not None:
            return FdAnswer(open_ephemeral(response["path"]), EPHEMERAL)
        if kind == PATH and response["path"] is not None:
            return PathAnswer(response["path"])
        if kind == STREAM and response["stream_id"] is not None:
            return StreamAnswer(open_stream(response["stream_id"], size, response["data"] or b""))
        log.warn("Backend at {path} sent an answer this server does not understand: kind {kind!r} without what "
                 "it needs", path=where, kind=kind, outcome="backend-error")
        raise BackendError(INVALID)
    finally:
        if fd is not None:  # passed along with an answer that does not use it
            os.close(fd)
