"""Readers: file descriptors, bytes, and netascii conversion over either (Deferreds, no reactor)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple, Union

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.support.sim import QUICK
from tftp_offload.interfaces import IReader
from tftp_offload.readers import BytesReader, FileReader, NetasciiReader, to_netascii

Result = Union[bytes, "Deferred[bytes]"]


def resolved(result: Result) -> bytes:
    """The bytes of a read, waiting for nothing: a Deferred here must have fired already."""
    if not isinstance(result, Deferred):
        return result
    box: List[Any] = []
    result.addBoth(box.append)
    assert box, "the Deferred has not fired"
    value = box[0]
    if not isinstance(value, bytes):
        value.raiseException()
    assert isinstance(value, bytes)
    return value


def read_all(reader: Any, size: int) -> List[bytes]:
    """Read `size` at a time until a short read, as the transfer driver does."""
    chunks: List[bytes] = []
    for _ in range(100_000):
        chunk = resolved(reader.read(size))
        assert len(chunk) <= size
        chunks.append(chunk)
        if len(chunk) < size:
            return chunks
    raise AssertionError("the reader never ended")


def from_netascii(data: bytes) -> bytes:
    """Undo RFC 764 line endings (CR LF -> LF, CR NUL -> CR), refusing anything else after CR."""
    out = bytearray()
    i = 0
    while i < len(data):
        byte = data[i]
        if byte == 13:
            follower = data[i + 1 : i + 2]
            assert follower in (b"\n", b"\0"), f"bare CR at {i}"
            out += b"\n" if follower == b"\n" else b"\r"
            i += 2
        else:
            assert byte != 10, f"bare LF at {i}"
            out.append(byte)
            i += 1
    return bytes(out)


# -- FileReader -----------------------------------------------------------------------------------


def open_file(path: Path, content: bytes) -> int:
    path.write_bytes(content)
    return os.open(path, os.O_RDONLY)


def test_file_reader_reads_the_whole_file(tmp_path: Path) -> None:
    content = os.urandom(10_000)
    reader = FileReader(open_file(tmp_path / "f", content))
    verifyObject(IReader, reader)
    assert reader.size == 10_000
    chunks = read_all(reader, 4096)
    assert [len(c) for c in chunks] == [4096, 4096, 1808]
    assert b"".join(chunks) == content
    reader.finish()


def test_file_reader_exact_multiple_ends_with_an_empty_read(tmp_path: Path) -> None:
    reader = FileReader(open_file(tmp_path / "f", b"x" * 1024))
    assert [len(c) for c in read_all(reader, 512)] == [512, 512, 0]
    reader.finish()


def test_file_reader_empty_file(tmp_path: Path) -> None:
    reader = FileReader(open_file(tmp_path / "f", b""))
    assert reader.size == 0
    assert reader.read(512) == b""
    reader.finish()


def record_preads(monkeypatch: pytest.MonkeyPatch, cap: Optional[int] = None) -> List[Tuple[int, int]]:
    """From here on os.pread records (size, offset) of each call, and with `cap` reads that much at most."""
    real: Callable[[int, int, int], bytes] = os.pread
    calls: List[Tuple[int, int]] = []

    def pread(fd: int, n: int, offset: int) -> bytes:
        calls.append((n, offset))
        return real(fd, n if cap is None else min(n, cap), offset)

    monkeypatch.setattr(os, "pread", pread)
    return calls


def test_file_reader_keeps_reading_after_a_short_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short read() is not the end: only a read returning nothing is."""
    content = os.urandom(3000)
    fd = open_file(tmp_path / "f", content)
    reader = FileReader(fd)
    calls = record_preads(monkeypatch, cap=100)
    chunks = read_all(reader, 1000)
    monkeypatch.undo()
    assert [len(c) for c in chunks] == [1000, 1000, 1000, 0]
    assert b"".join(chunks) == content
    assert len(calls) > 30  # many short reads behind each full one
    reader.finish()


def test_file_reader_ends_a_regular_file_at_its_size_without_a_confirming_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At the size fstat gave (what tsize told the client) a short read is the end: one pread, not two."""
    content = os.urandom(1024)
    fd = open_file(tmp_path / "f", content)
    reader = FileReader(fd)
    calls = record_preads(monkeypatch)
    assert reader.read(32768) == content
    monkeypatch.undo()
    assert [offset for _, offset in calls] == [0]
    reader.finish()


def test_file_reader_on_a_pipe_has_no_size(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"streamed")
    os.close(write_end)
    reader = FileReader(read_end)
    assert reader.size is None
    assert reader.read(100) == b"streamed"
    reader.finish()


def test_file_reader_finish_closes_once(tmp_path: Path) -> None:
    fd = open_file(tmp_path / "f", b"abc")
    reader = FileReader(fd)
    reader.finish()
    with pytest.raises(OSError):
        os.fstat(fd)
    reader.finish()  # twice is harmless
    with pytest.raises(ValueError):
        reader.read(1)


# -- BytesReader ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 2000])
def test_bytes_reader(size: int) -> None:
    content = os.urandom(size)
    reader = BytesReader(content)
    verifyObject(IReader, reader)
    assert reader.size == size
    chunks = read_all(reader, 512)
    assert b"".join(chunks) == content
    assert all(len(c) == 512 for c in chunks[:-1]) and len(chunks[-1]) < 512
    assert reader.read(512) == b""  # past the end stays empty
    reader.finish()


def test_bytes_reader_copies_its_input() -> None:
    data = bytearray(b"abcdef")
    reader = BytesReader(bytes(data))
    other = BytesReader(data)  # type: ignore[arg-type]
    data[:] = b"zzzzzz"
    assert reader.read(6) == b"abcdef"
    assert other.read(6) == b"abcdef"


def test_bytes_reader_finish_releases() -> None:
    reader = BytesReader(b"x" * 100)
    reader.read(10)
    reader.finish()
    assert reader.read(10) == b""


# -- to_netascii ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, converted",
    [
        (b"", b""),
        (b"plain", b"plain"),
        (b"line\n", b"line\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"bare\rcr", b"bare\r\0cr"),
        (b"dos\r\n", b"dos\r\0\r\n"),
        (b"\n\r\n\r", b"\r\n\r\0\r\n\r\0"),
        (b"\0nul", b"\0nul"),
    ],
)
def test_to_netascii(raw: bytes, converted: bytes) -> None:
    assert to_netascii(raw) == converted


@QUICK
@given(st.binary(max_size=300))
def test_to_netascii_is_reversible_and_stateless(raw: bytes) -> None:
    converted = to_netascii(raw)
    assert from_netascii(converted) == raw
    for cut in range(0, len(raw), 37):
        assert to_netascii(raw[:cut]) + to_netascii(raw[cut:]) == converted


# -- NetasciiReader -------------------------------------------------------------------------------


@implementer(IReader)
class SpyReader:
    """Wraps a reader, recording read sizes and whether finish() was called."""

    def __init__(self, inner: Any, as_deferred: bool = False) -> None:
        self.inner = inner
        self.as_deferred = as_deferred
        self.sizes: List[int] = []
        self.finished = False
        self.size: Optional[int] = inner.size

    def read(self, size: int) -> Result:
        self.sizes.append(size)
        data = self.inner.read(size)
        return succeed(data) if self.as_deferred else data

    def finish(self) -> None:
        self.finished = True
        self.inner.finish()


@implementer(IReader)
class HandFiredReader:
    """Each read returns a Deferred the test fires by hand (a backend answering later)."""

    size = None

    def __init__(self, data: bytes) -> None:
        self.source = BytesReader(data)
        self.waiting: List[tuple[Deferred[bytes], int]] = []

    def read(self, size: int) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self.waiting.append((d, size))
        return d

    def answer(self) -> None:
        d, size = self.waiting.pop(0)
        d.callback(self.source.read(size))

    def finish(self) -> None:
        pass


@pytest.mark.parametrize("as_deferred", [False, True])
@pytest.mark.parametrize("blksize", [1, 2, 8, 512])
def test_netascii_reader(as_deferred: bool, blksize: int) -> None:
    raw = b"first line\nsecond\r\nthird\rfourth\n" * 50
    inner = SpyReader(BytesReader(raw), as_deferred)
    reader = NetasciiReader(inner)
    verifyObject(IReader, reader)
    assert reader.size is None  # the length on the wire is not the file's
    chunks = read_all(reader, blksize)
    assert b"".join(chunks) == to_netascii(raw)
    assert all(len(c) == blksize for c in chunks[:-1])
    assert all(size == blksize for size in inner.sizes)
    assert not inner.finished
    reader.finish()
    assert inner.finished


@pytest.mark.parametrize("as_deferred", [False, True])
def test_netascii_reader_exact_multiple_ends_with_an_empty_read(as_deferred: bool) -> None:
    reader = NetasciiReader(SpyReader(BytesReader(b"ab\ncd"), as_deferred))  # 6 bytes on the wire
    assert read_all(reader, 3) == [b"ab\r", b"\ncd", b""]


def test_netascii_reader_empty() -> None:
    assert read_all(NetasciiReader(BytesReader(b"")), 512) == [b""]


def test_netascii_reader_with_deferreds_fired_later() -> None:
    raw = b"\n" * 10 + b"tail"  # 24 bytes on the wire
    inner = HandFiredReader(raw)
    reader = NetasciiReader(inner)
    first = reader.read(8)
    assert isinstance(first, Deferred)
    assert not first.called
    inner.answer()  # 8 raw bytes: 16 on the wire
    assert resolved(first) == b"\r\n" * 4
    assert reader.read(8) == b"\r\n" * 4  # from the buffer: no read, no Deferred
    assert inner.waiting == []
    third = reader.read(8)
    assert isinstance(third, Deferred) and not third.called
    inner.answer()  # the last 6 raw bytes: a short read, the end
    assert resolved(third) == b"\r\n\r\ntail"
    assert reader.read(8) == b""


def test_netascii_reader_passes_failures_on() -> None:
    inner = HandFiredReader(b"data")
    reader = NetasciiReader(inner)
    result = reader.read(8)
    assert isinstance(result, Deferred)
    d, _ = inner.waiting.pop()
    d.errback(RuntimeError("backend gone"))
    with pytest.raises(RuntimeError, match="backend gone"):
        resolved(result)


@QUICK
@given(raw=st.binary(max_size=2000), blksize=st.integers(1, 600), as_deferred=st.booleans())
def test_netascii_reader_property(raw: bytes, blksize: int, as_deferred: bool) -> None:
    chunks = read_all(NetasciiReader(SpyReader(BytesReader(raw), as_deferred)), blksize)
    assert b"".join(chunks) == to_netascii(raw)
    assert all(len(c) == blksize for c in chunks[:-1]) and len(chunks[-1]) < blksize
