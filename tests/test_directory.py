"""The directory backend: what it serves, and every way out of the root it refuses."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import List

import pytest
from zope.interface.verify import verifyObject

from tftp_offload.backends.directory import DirectoryBackend
from tftp_offload.errors import AccessViolation, FileNotFound, Unsupported, error_for
from tftp_offload.interfaces import IBackend, IReader
from tftp_offload.readers import FileReader


def content_of(reader: FileReader) -> bytes:
    try:
        return reader.read(1 << 20)
    finally:
        reader.finish()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    served = tmp_path / "root"
    served.mkdir()
    (served / "pxelinux.0").write_bytes(b"bootloader")
    (served / "boot").mkdir()
    (served / "boot" / "bcd").write_bytes(b"windows bcd")
    (served / "boot" / "deep").mkdir()
    (served / "boot" / "deep" / "file").write_bytes(b"deep")
    (tmp_path / "secret").write_bytes(b"outside the root")
    return served


@pytest.fixture
def backend(root: Path) -> DirectoryBackend:
    return DirectoryBackend(str(root))


def test_provides_the_interface(backend: DirectoryBackend) -> None:
    verifyObject(IBackend, backend)


def test_serves_a_file(backend: DirectoryBackend) -> None:
    reader = backend.get_reader(b"pxelinux.0")
    verifyObject(IReader, reader)
    assert reader.size == len(b"bootloader")
    assert content_of(reader) == b"bootloader"


@pytest.mark.parametrize("name", [b"/pxelinux.0", b"//pxelinux.0", b"./pxelinux.0", b"/./pxelinux.0"])
def test_leading_slash_and_dots_mean_the_root(backend: DirectoryBackend, name: bytes) -> None:
    assert content_of(backend.get_reader(name)) == b"bootloader"


@pytest.mark.parametrize("name", [b"boot\\bcd", b"\\boot\\bcd", b"boot/bcd", b"boot\\\\bcd", b".\\boot/.\\bcd"])
def test_backslash_is_a_separator(backend: DirectoryBackend, name: bytes) -> None:
    assert content_of(backend.get_reader(name)) == b"windows bcd"


def test_subdirectories(backend: DirectoryBackend) -> None:
    assert content_of(backend.get_reader(b"boot/deep/file")) == b"deep"
    assert content_of(backend.get_reader(b"boot\\deep\\file")) == b"deep"


@pytest.mark.parametrize(
    "name",
    [
        b"..",
        b"../secret",
        b"/../secret",
        b"boot/../../secret",
        b"boot/../pxelinux.0",  # even when it would stay inside: '..' is refused outright
        b"..\\secret",
        b"boot\\..\\..\\secret",
        b"boot/deep/../../../secret",
    ],
)
def test_dot_dot_is_an_access_violation(backend: DirectoryBackend, name: bytes) -> None:
    with pytest.raises(AccessViolation):
        backend.get_reader(name)


def test_absolute_names_stay_inside_the_root(backend: DirectoryBackend, tmp_path: Path) -> None:
    with pytest.raises(FileNotFound):
        backend.get_reader(os.fsencode(tmp_path / "secret"))
    with pytest.raises(FileNotFound):
        backend.get_reader(b"/etc/passwd")


def test_symlink_out_of_the_root_is_an_access_violation(root: Path, backend: DirectoryBackend, tmp_path: Path) -> None:
    (root / "escape").symlink_to(tmp_path / "secret")
    (root / "escape-dir").symlink_to(tmp_path)
    (root / "boot" / "relative-escape").symlink_to("../../secret")
    for name in (b"escape", b"escape-dir/secret", b"boot/relative-escape"):
        with pytest.raises(AccessViolation):
            backend.get_reader(name)


def test_symlink_inside_the_root_is_served(root: Path, backend: DirectoryBackend) -> None:
    (root / "link").symlink_to("pxelinux.0")
    (root / "boot" / "up").symlink_to("../pxelinux.0")
    (root / "boot-link").symlink_to("boot")
    assert content_of(backend.get_reader(b"link")) == b"bootloader"
    assert content_of(backend.get_reader(b"boot/up")) == b"bootloader"
    assert content_of(backend.get_reader(b"boot-link/bcd")) == b"windows bcd"


def test_root_given_through_a_symlink(root: Path, tmp_path: Path) -> None:
    (tmp_path / "root-link").symlink_to(root)
    backend = DirectoryBackend(str(tmp_path / "root-link"))
    assert content_of(backend.get_reader(b"pxelinux.0")) == b"bootloader"
    with pytest.raises(AccessViolation):
        backend.get_reader(b"../secret")


@pytest.mark.parametrize("name", [b"missing", b"boot/missing", b"missing/deeper", b"/", b".", b"", b"\\"])
def test_missing_is_file_not_found(backend: DirectoryBackend, name: bytes) -> None:
    with pytest.raises(FileNotFound):
        backend.get_reader(name)


def test_file_used_as_a_directory_is_file_not_found(backend: DirectoryBackend) -> None:
    """ENOTDIR: what a client gets should be 'not found', not an internal error."""
    with pytest.raises(FileNotFound):
        backend.get_reader(b"pxelinux.0/default")


def test_overlong_name_is_file_not_found(backend: DirectoryBackend) -> None:
    """ENAMETOOLONG (a client can send ~500 bytes of name): a plain 'not found'."""
    with pytest.raises(FileNotFound):
        backend.get_reader(b"x" * 300)
    with pytest.raises(FileNotFound):
        backend.get_reader(b"/".join([b"d" * 200] * 30))


@pytest.mark.parametrize("name", [b"boot", b"boot/", b"boot/deep"])
def test_directory_is_an_access_violation(backend: DirectoryBackend, name: bytes) -> None:
    with pytest.raises(AccessViolation, match="directory"):
        backend.get_reader(name)


def test_fifo_is_an_access_violation_and_does_not_hang(root: Path, backend: DirectoryBackend) -> None:
    os.mkfifo(root / "fifo")
    outcome: List[BaseException] = []

    def attempt() -> None:
        try:
            backend.get_reader(b"fifo")
        except BaseException as e:  # handed over to the test's thread
            outcome.append(e)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():  # unblock it, so the process can end
        fd = os.open(root / "fifo", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("opening a FIFO blocked")
    assert len(outcome) == 1 and isinstance(outcome[0], AccessViolation)


def test_device_is_an_access_violation() -> None:
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    backend = DirectoryBackend("/dev")
    with pytest.raises(AccessViolation, match="not a regular file"):
        backend.get_reader(b"null")


@pytest.mark.parametrize("name", [b"pxelinux.0\x00", b"\x00", b"boot/\x00../../secret", b"pxe\x00linux.0"])
def test_nul_byte_is_an_access_violation(backend: DirectoryBackend, name: bytes) -> None:
    with pytest.raises(AccessViolation):
        backend.get_reader(name)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file whatever its mode")
def test_unreadable_file_is_an_access_violation(root: Path, backend: DirectoryBackend) -> None:
    (root / "locked").write_bytes(b"no")
    (root / "locked").chmod(0)
    with pytest.raises(AccessViolation):
        backend.get_reader(b"locked")


def test_non_utf8_filename(root: Path, backend: DirectoryBackend) -> None:
    name = b"caf\xe9-\xff.bin"
    with open(os.path.join(os.fsencode(root), name), "wb") as f:
        f.write(b"latin-1 name")
    os.mkdir(os.path.join(os.fsencode(root), b"d\xfcr"))
    with open(os.path.join(os.fsencode(root), b"d\xfcr", name), "wb") as f:
        f.write(b"nested")
    assert content_of(backend.get_reader(name)) == b"latin-1 name"
    assert content_of(backend.get_reader(b"/d\xfcr\\" + name)) == b"nested"
    with pytest.raises(FileNotFound):
        backend.get_reader(b"caf\xe9-\xfe.bin")


def test_resolve_gives_the_canonical_path(root: Path, backend: DirectoryBackend) -> None:
    assert backend.resolve(b"\\boot//deep/./file") == str(root.resolve() / "boot" / "deep" / "file")


def test_errors_map_to_tftp_codes(backend: DirectoryBackend) -> None:
    for name, code in ((b"missing", 1), (b"../x", 2), (b"boot", 2), (b"a\x00", 2), (b"pxelinux.0/x", 1)):
        with pytest.raises(Exception) as caught:
            backend.get_reader(name)
        assert error_for(caught.value)[0] == code, name
        assert error_for(caught.value)[2] is True


def test_writes_are_refused(backend: DirectoryBackend) -> None:
    with pytest.raises(Unsupported):
        backend.get_writer(b"upload")


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        DirectoryBackend(str(tmp_path / "missing"))
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ValueError):
        DirectoryBackend(str(tmp_path / "file"))


def test_filesystem_root_as_the_root(tmp_path: Path) -> None:
    """With '/' served, the prefix check must not demand '//'."""
    (tmp_path / "f").write_bytes(b"anywhere")
    backend = DirectoryBackend("/")
    assert content_of(backend.get_reader(os.fsencode(tmp_path / "f"))) == b"anywhere"


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.ELOOP])
def test_permission_errors_are_access_violations(
    backend: DirectoryBackend, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """The errno mapping itself, which the chmod test cannot reach when the tests run as root."""

    def refuse(*args: object) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(AccessViolation):
        backend.get_reader(b"pxelinux.0")


def test_other_os_errors_are_not_disguised(backend: DirectoryBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error is the operator's problem: it propagates (and becomes a generic error 0)."""

    def broken(*args: object) -> int:
        raise OSError(errno.EIO, "Input/output error", "/srv/tftp/secret/path")

    monkeypatch.setattr(os, "open", broken)
    with pytest.raises(OSError) as caught:
        backend.get_reader(b"pxelinux.0")
    code, message, expected = error_for(caught.value)
    assert (code, expected) == (0, False)
    assert "secret" not in message
