"""Readers: what a transfer sends, behind the `IReader` contract.

The transfer driver asks a reader for a window's worth of bytes at a time,
not a block, so a file reader costs one `read` system call per window.
"""

from __future__ import annotations

import os
import stat
from typing import Optional, Union

from twisted.internet.defer import Deferred
from zope.interface import implementer

from .interfaces import IReader


@implementer(IReader)
class FileReader:
    """Reads an open file descriptor, which it owns and closes in `finish()`.

    Taking a descriptor rather than a path lets the caller open (and check)
    the file once, and lets a descriptor passed in from elsewhere be served.
    A regular file is read with `pread` at the reader's own offset, so a
    descriptor shared with another reader (or left at any offset by whoever
    opened it) reads right; a pipe is read as the stream it is.
    """

    def __init__(self, fd: int) -> None:
        self._fd: Optional[int] = fd
        self._offset = 0
        info = os.fstat(fd)
        regular = stat.S_ISREG(info.st_mode)
        self.size: Optional[int] = info.st_size if regular else None
        self._read = self._pread if regular else self._stream_read

    def read(self, size: int) -> bytes:
        if self._fd is None:
            raise ValueError("read from a finished reader")
        data = self._read(self._fd, size)
        while 0 < len(data) < size:  # a short read is only the end once a read says 0
            more = self._read(self._fd, size - len(data))
            if not more:
                break
            data += more
        return data

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


@implementer(IReader)
class BytesReader:
    """Serves bytes held in memory: generated configs and other small answers."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(bytes(data))
        self._offset = 0
        self.size: Optional[int] = len(data)

    def read(self, size: int) -> bytes:
        start = self._offset
        self._offset = start + size
        return bytes(self._data[start : start + size])

    def finish(self) -> None:
        self._data = memoryview(b"")


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

