"""Small files held in memory by the directory backend: served from memory only while unchanged on disk."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import List

import pytest
from zope.interface.verify import verifyObject

from tftp_offload.backends import small_files
from tftp_offload.backends.directory import DirectoryBackend
from tftp_offload.backends.small_files import SmallFiles
from tftp_offload.interfaces import IReader

LATER = 10.0
"""Seconds a test's clock runs ahead, so a file just written counts as settled."""

TICK = 0.05
"""Seconds a test waits before changing a file it made: past a tick of the file system's clock, as the
real SETTLED wait is (a change inside the tick that made the file can leave its times as they were)."""


def read_all(backend: DirectoryBackend, name: bytes) -> bytes:
    reader = backend.get_reader(name)
    try:
        return bytes(reader.read(1 << 20))
    finally:
        reader.finish()


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """The paths os.open is called with, from here on."""
    seen: List[str] = []
    real = os.open

    def counting(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(os.fsdecode(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting)
    return seen


@pytest.fixture
def backend(tmp_path: Path) -> DirectoryBackend:
    (tmp_path / "pxelinux.cfg").mkdir()
    (tmp_path / "pxelinux.cfg" / "default").write_bytes(b"DEFAULT local\n")
    served = DirectoryBackend(str(tmp_path))
    served.small_files = SmallFiles(clock=lambda: time.time() + LATER)
    return served


def test_a_settled_small_file_is_read_from_disk_once(backend: DirectoryBackend, opens: List[str]) -> None:
    for _ in range(3):
        assert read_all(backend, b"pxelinux.cfg/default") == b"DEFAULT local\n"
    assert len(opens) == 1
    assert len(backend.small_files) == 1 and backend.small_files.size == len(b"DEFAULT local\n")


def test_a_kept_file_reads_as_the_file(backend: DirectoryBackend) -> None:
    read_all(backend, b"pxelinux.cfg/default")
    reader = backend.get_reader(b"/pxelinux.cfg/default")
    verifyObject(IReader, reader)
    assert reader.size == 14 and reader.kind == "directory"
    assert reader.read(5) == b"DEFAU" and reader.read(100) == b"LT local\n" and reader.read(100) == b""
    reader.finish()


def test_a_change_of_the_same_size_and_mtime_is_served_new(backend: DirectoryBackend, tmp_path: Path) -> None:
    """The change time gives it away, though size and modification time were put back."""
    path = tmp_path / "pxelinux.cfg" / "default"
    read_all(backend, b"pxelinux.cfg/default")
    before = path.stat()
    time.sleep(TICK)
    path.write_bytes(b"DEFAULT linux\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    assert read_all(backend, b"pxelinux.cfg/default") == b"DEFAULT linux\n"


def test_a_file_renamed_over_is_served_new(backend: DirectoryBackend, tmp_path: Path) -> None:
    read_all(backend, b"pxelinux.cfg/default")
    (tmp_path / "new").write_bytes(b"DEFAULT other\n")
    os.rename(tmp_path / "new", tmp_path / "pxelinux.cfg" / "default")
    assert read_all(backend, b"pxelinux.cfg/default") == b"DEFAULT other\n"


def test_a_file_gone_is_not_found(backend: DirectoryBackend, tmp_path: Path) -> None:
    from tftp_offload.errors import FileNotFound

    read_all(backend, b"pxelinux.cfg/default")
    (tmp_path / "pxelinux.cfg" / "default").unlink()
    with pytest.raises(FileNotFound):
        backend.get_reader(b"pxelinux.cfg/default")


def test_a_file_changed_lately_is_read_from_disk_every_time(tmp_path: Path, opens: List[str]) -> None:
    (tmp_path / "fresh").write_bytes(b"just written")
    backend = DirectoryBackend(str(tmp_path))  # the real clock: the file changed under SETTLED seconds ago
    for _ in range(2):
        assert read_all(backend, b"fresh") == b"just written"
    assert len(opens) == 2 and len(backend.small_files) == 0


def test_a_large_file_is_not_kept(backend: DirectoryBackend, tmp_path: Path, opens: List[str]) -> None:
    (tmp_path / "big").write_bytes(b"x" * (small_files.SMALL_FILE + 1))
    for _ in range(2):
        assert len(read_all(backend, b"big")) == small_files.SMALL_FILE + 1
    assert len(opens) == 2 and len(backend.small_files) == 0


def test_a_symlinked_name_is_not_kept(backend: DirectoryBackend, tmp_path: Path, opens: List[str]) -> None:
    """A name through a link has no walk `lstat` to check a kept copy against: it is opened each time."""
    os.symlink("pxelinux.cfg/default", tmp_path / "link")
    for _ in range(2):
        assert read_all(backend, b"link") == b"DEFAULT local\n"
    assert len(opens) == 2


def test_the_oldest_kept_go_first_within_the_limit(tmp_path: Path) -> None:
    kept = SmallFiles(limit=10, clock=lambda: time.time() + LATER)
    for name in ("a", "b", "c"):
        path = tmp_path / name
        path.write_bytes(name.encode() * 4)
        fd = os.open(path, os.O_RDONLY)
        try:
            assert kept.keep(str(path), os.fstat(fd), fd) == name.encode() * 4
        finally:
            os.close(fd)
    assert kept.size == 8 and len(kept) == 2
    assert kept.get(str(tmp_path / "a"), os.lstat(tmp_path / "a")) is None
    assert kept.get(str(tmp_path / "c"), os.lstat(tmp_path / "c")) == b"cccc"


def test_chmod_makes_a_kept_copy_stale(tmp_path: Path) -> None:
    """A file made unreadable is opened again (and refused, for a server not running as root)."""
    path = tmp_path / "f"
    path.write_bytes(b"data")
    kept = SmallFiles(clock=lambda: time.time() + LATER)
    fd = os.open(path, os.O_RDONLY)
    try:
        kept.keep(str(path), os.fstat(fd), fd)
    finally:
        os.close(fd)
    assert kept.get(str(path), os.lstat(path)) == b"data"
    time.sleep(TICK)
    os.chmod(path, 0)
    assert kept.get(str(path), os.lstat(path)) is None


def test_the_bounds_docs_operations_states() -> None:
    """docs/operations.md tells operators these figures: 60 KiB a file, 8 MiB in all, 2 s to settle."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    assert small_files.SMALL_FILE == 60 * 1024 and "Files of 60 KiB or less" in text
    assert small_files.KEPT_BYTES == 8 << 20 and "8 MiB of them at most" in text
    assert small_files.SETTLED == 2.0 and "changed in the last\n2 seconds" in text


def test_a_kept_file_is_one_inline_answer_of_the_offload_protocol() -> None:
    """Through the responder a kept file (bytes, no descriptor) is answered inline: it must fit one."""
    from tftp_offload.offload.commands import INLINE_MAX

    assert small_files.SMALL_FILE <= INLINE_MAX
