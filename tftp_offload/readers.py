"""Readers: what a transfer sends, behind the `IReader` contract.

The transfer driver asks a reader for a window's worth of bytes at a time,
not a block, so a file reader costs one `read` system call per window.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Optional, Tuple, Union

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from .errors import AccessViolation, FileNotFound
from .interfaces import IReader

log = Logger(namespace="tftp_offload")


def open_regular(path: Union[str, bytes], follow_symlinks: bool = False) -> int:
    """Open `path` read-only and return its descriptor, or raise the backend error a client should see.

    Shared by every place that opens a file to serve (the directory backend, the AMP
    backend's path and ephemeral answers, the legacy backend), so they refuse alike. Only
    regular files: anything else is refused before it is opened, since opening a device can
    act (a tape rewinds, a watchdog arms) and opening a FIFO blocks until a writer comes.
    The check is made again on the open descriptor (`fstat`), which a file swapped in between
    cannot escape; O_NONBLOCK keeps even that open from hanging the reactor on a FIFO.
    `follow_symlinks=False` adds O_NOFOLLOW for callers that checked the canonical path and
    must not be raced by a link swapped in since. Error texts never name the path.
    """
    try:
        mode = os.stat(path, follow_symlinks=follow_symlinks).st_mode
    except OSError as e:
        raise _refusal(e) from None
    return open_checked(path, mode, follow_symlinks)[0]


def open_checked(path: Union[str, bytes], mode: int, follow_symlinks: bool = False) -> Tuple[int, os.stat_result]:
    """`open_regular` for a caller that has just stat'ed `path` itself (`mode`): the descriptor and its `fstat`.

    The directory backend's walk has the last component's `lstat` already; asking again
    would be a second system call per request for the same answer. The `fstat` returned is
    what the caller may compare with its own (`FileReader` takes it too: no third call).
    """
    _refuse_unless_regular(mode)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW))
    except OSError as e:
        raise _refusal(e) from None
    try:
        info = os.fstat(fd)
        _refuse_unless_regular(info.st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def _refusal(e: OSError) -> Exception:
    """The backend error for a failed stat or open: what the client is told, never the path."""
    # ENOTDIR: a file used as a directory; ENAMETOOLONG: a name no file here can have.
    if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
        return FileNotFound("File not found")
    if e.errno in (errno.EACCES, errno.EPERM, errno.ELOOP):
        return AccessViolation("Access violation: permission denied")
    return e


def _refuse_unless_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise AccessViolation(f"Access violation: {kind}")


def open_ephemeral(path: Union[str, bytes]) -> int:
    """Open a file a backend made for this one request, and delete its name at once.

    From then on the descriptor is the file: the transfer reads it while no
    name points at it, so nothing is left behind however the transfer ends,
    a crash of this process included. The name goes even when the open fails.
    Symlinks are not followed: the backend wrote this file itself.
    """
    try:
        return open_regular(path, follow_symlinks=False)
    finally:
        discard_ephemeral(path)


def discard_ephemeral(path: Union[str, bytes]) -> None:
    """Delete an ephemeral file nobody will serve; already gone is fine (its backend cleaned up)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warn("Could not delete ephemeral file {path!r}: {error}", path=path, error=str(e))


@implementer(IReader)
class FileReader:
    """Reads an open file descriptor, which it owns and closes in `finish()`.

    Taking a descriptor rather than a path lets the caller open (and check)
    the file once, and lets a descriptor passed in from elsewhere be served.
    A regular file is read with `pread` at the reader's own offset, so a
    descriptor shared with another reader (or left at any offset by whoever
    opened it) reads right; a pipe is read as the stream it is.
    """

    kind = "file"
    """The answer kind metrics count (`tftp_backend_answers_total`); a backend may set its own."""

    def __init__(self, fd: int, info: Optional[os.stat_result] = None) -> None:
        """`info`: the descriptor's `fstat`, if the caller has it (`open_checked` returns it)."""
        self._fd: Optional[int] = fd
        self._offset = 0
        if info is None:
            info = os.fstat(fd)
        regular = stat.S_ISREG(info.st_mode)
        self.size: Optional[int] = info.st_size if regular else None
        self._read = self._pread if regular else self._stream_read

    def read(self, size: int) -> bytes:
        if self._fd is None:
            raise ValueError("read from a finished reader")
        data = self._read(self._fd, size)
        # A short read is only the end once a read says 0, or (a regular file) at the size
        # fstat gave, which is what tsize told the client: no second system call to confirm it.
        while 0 < len(data) < size and (self.size is None or self._offset < self.size):
            more = self._read(self._fd, size - len(data))
            if not more:
                break
            data += more
        return data

    def fileno(self) -> int:
        """The descriptor, still owned by this reader: the AMP responder passes a copy of it on."""
        if self._fd is None:
            raise ValueError("fileno of a finished reader")
        return self._fd

    def _pread(self, fd: int, size: int) -> bytes:
        data = os.pread(fd, size, self._offset)
        self._offset += len(data)
        return data

    @staticmethod
    def _stream_read(fd: int, size: int) -> bytes:
        return os.read(fd, size)

    def finish(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class PathReader(FileReader):
    """A file a backend names by path, optionally to be deleted once served (an *ephemeral* file).

    In process it is served like any `FileReader`. Over the offload protocol the
    responder answers it as a `path` (or `ephemeral`) answer instead, so the TFTP
    server opens the file itself and takes over deleting it; `release()` lets go of
    the file without deleting it for that hand-over.
    """

    def __init__(self, path: Union[str, bytes], ephemeral: bool = False) -> None:
        super().__init__(open_regular(path, follow_symlinks=True))
        self.path = os.fsencode(path)
        self.ephemeral = ephemeral

    def finish(self) -> None:
        super().finish()
        if self.ephemeral:
            self.ephemeral = False
            discard_ephemeral(self.path)

    def release(self) -> None:
        """Close without deleting: someone else now owns the file."""
        self.ephemeral = False
        super().finish()


@implementer(IReader)
class BytesReader:
    """Serves bytes held in memory: generated configs and other small answers."""

    kind = "bytes"

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)  # bytes are not copied (the directory backend's kept files are shared)
        self._offset = 0
        self.size: Optional[int] = len(data)

    def read(self, size: int) -> bytes:
        start = self._offset
        self._offset = start + size
        return self._data[start : start + size]  # a small file's one window is the object itself, no copy

    def finish(self) -> None:
        self._data = b""


def to_netascii(data: bytes) -> bytes:
    """RFC 764 line endings: LF becomes CR LF, a bare CR becomes CR NUL. Stateless per byte."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


@implementer(IReader)
class NetasciiReader:
    """Converts another reader's bytes to netascii on the fly; the length on the wire is unknown."""

    size = None

    def __init__(self, reader: IReader) -> None:
        self._reader = reader
        self._buffer = b""
        self._eof = False

    def read(self, size: int) -> Union[bytes, "Deferred[bytes]"]:
        if self._eof or len(self._buffer) >= size:
            return self._take(size)
        result = self._reader.read(size)
        if isinstance(result, Deferred):
            return result.addCallback(self._fill, size)
        return self._fill(result, size)

    def _fill(self, raw: bytes, size: int) -> Union[bytes, "Deferred[bytes]"]:
        if len(raw) < size:
            self._eof = True
        self._buffer += to_netascii(raw)
        return self.read(size)

    def _take(self, size: int) -> bytes:
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def finish(self) -> None:
        self._reader.finish()

