"""The directory backend: what it serves, every way out of the root it refuses, rewrite rules
(--map-file) and per-client roots (--root-per-client), in the backend and on a real twistd."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import List

import pytest
from twisted.python import context, usage
from zope.interface.verify import verifyObject

from tests.support import tftp_client
from tests.support.harness import StartServer
from tftp_offload.backends import directory
from tftp_offload.backends.directory import DirectoryBackend
from tftp_offload.errors import AccessViolation, FileNotFound, Unsupported, error_for
from tftp_offload.interfaces import IBackend, IReader
from tftp_offload.readers import FileReader
from tftp_offload.tap import Options


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


def test_resolve_walks_like_realpath(root: Path, backend: DirectoryBackend, tmp_path: Path) -> None:
    """The walk below the root gives what os.path.realpath gives, for every kind of component."""
    (root / "boot-link").symlink_to("boot")  # a directory link inside
    (root / "boot" / "up").symlink_to("../pxelinux.0")  # a file link inside, relative
    (root / "chain").symlink_to("boot-link/up")  # a link to a link
    (root / "out").symlink_to(tmp_path)  # a directory link out
    (root / "dangling").symlink_to("nowhere/at/all")
    names = ["pxelinux.0", "boot/deep/file", "boot-link/deep/file", "boot-link/up", "chain", "missing",
             "missing/deeper/still", "pxelinux.0/x/y", "boot-link/missing/x", "dangling", "dangling/x", "boot/deep"]
    for name in names:
        assert backend.resolve(name.encode()) == os.path.realpath(os.path.join(root, name)), name
    for name in ("out/secret", "out/missing/x", "boot-link/up/../../.."):
        with pytest.raises(AccessViolation):
            backend.resolve(name.encode())


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


# ------------------------------------------------------- rewrite rules and per-client roots --


def served_to(backend: DirectoryBackend, name: bytes, client: str, local: str = "192.0.2.10") -> bytes:
    """What `backend` sends a request from `client`, in the context the server gives get_reader."""
    ctx = {"remote": (client, 1024), "local": (local, 69), "mode": "octet", "options": {}}
    return content_of(context.call(ctx, backend.get_reader, name))


@pytest.fixture
def per_client(root: Path) -> DirectoryBackend:
    (root / "192.0.2.5").mkdir()
    (root / "192.0.2.5" / "pxelinux.0").write_bytes(b"for 192.0.2.5")
    (root / "2001:db8::5").mkdir()
    (root / "2001:db8::5" / "pxelinux.0").write_bytes(b"for 2001:db8::5")
    (root / "fe80::5%eth1").mkdir()
    (root / "fe80::5%eth1" / "pxelinux.0").write_bytes(b"for fe80::5 on eth1")
    (root / "fe80::5").mkdir()
    (root / "fe80::5" / "pxelinux.0").write_bytes(b"for fe80::5 on any link")
    return DirectoryBackend(str(root), per_client="ip")


def test_per_client_directory_first(per_client: DirectoryBackend) -> None:
    assert served_to(per_client, b"pxelinux.0", "192.0.2.5") == b"for 192.0.2.5"
    assert served_to(per_client, b"/pxelinux.0", "2001:db8::5", "2001:db8::1") == b"for 2001:db8::5"
    assert served_to(per_client, b"pxelinux.0", "::ffff:192.0.2.5") == b"for 192.0.2.5"  # as IPv4


def test_per_client_falls_back_to_the_root(per_client: DirectoryBackend) -> None:
    assert served_to(per_client, b"pxelinux.0", "192.0.2.6") == b"bootloader"
    assert served_to(per_client, b"boot\\bcd", "192.0.2.5") == b"windows bcd"  # not in its directory


def test_per_client_link_local_by_interface_then_address(per_client: DirectoryBackend) -> None:
    assert served_to(per_client, b"pxelinux.0", "fe80::5", "fe80::1%eth1") == b"for fe80::5 on eth1"
    assert served_to(per_client, b"pxelinux.0", "fe80::5", "fe80::1%eth2") == b"for fe80::5 on any link"


def test_per_client_other_clients_directories_are_not_served(per_client: DirectoryBackend) -> None:
    for name in (b"192.0.2.5/pxelinux.0", b"/2001:db8::5/pxelinux.0", b"fe80::5%eth1\\pxelinux.0"):
        with pytest.raises(FileNotFound):
            served_to(per_client, name, "192.0.2.6")


def test_per_client_directory_confined_to_the_root(root: Path, tmp_path: Path) -> None:
    """A client directory that is a link out of the root is refused, not followed (nor skipped)."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "pxelinux.0").write_bytes(b"outside")
    (root / "192.0.2.7").symlink_to(tmp_path / "elsewhere")
    (root / "group").mkdir()
    (root / "group" / "pxelinux.0").write_bytes(b"the group's")
    (root / "192.0.2.8").symlink_to("group")
    backend = DirectoryBackend(str(root), per_client="ip")
    with pytest.raises(AccessViolation):
        served_to(backend, b"pxelinux.0", "192.0.2.7")
    assert served_to(backend, b"pxelinux.0", "192.0.2.8") == b"the group's"
    with pytest.raises(AccessViolation):
        served_to(backend, b"../secret", "192.0.2.8")


def test_per_client_mac(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """By the MAC the neighbour table gives (tests/test_linklocal.py reads a real one)."""
    (root / "52-54-00-12-34-56").mkdir()
    (root / "52-54-00-12-34-56" / "pxelinux.0").write_bytes(b"for 52:54:00:12:34:56")
    backend = DirectoryBackend(str(root), per_client="mac")
    assert backend.neighbours is not None
    known = {"192.0.2.5": "52-54-00-12-34-56"}
    monkeypatch.setattr(backend.neighbours, "hardware_address", lambda client, local=None: known.get(client))
    assert served_to(backend, b"pxelinux.0", "192.0.2.5") == b"for 52:54:00:12:34:56"
    assert served_to(backend, b"pxelinux.0", "192.0.2.6") == b"bootloader"  # MAC unknown: the root
    with pytest.raises(FileNotFound):  # another client's directory, through the root
        served_to(backend, b"52-54-00-12-34-56/pxelinux.0", "192.0.2.6")


def test_per_client_without_a_request_context_serves_the_root(per_client: DirectoryBackend) -> None:
    assert content_of(per_client.get_reader(b"pxelinux.0")) == b"bootloader"


def test_per_client_mode_must_be_known(root: Path) -> None:
    with pytest.raises(ValueError, match="per_client"):
        DirectoryBackend(str(root), per_client="hostname")


def test_map_file_rewrites_before_confinement(root: Path, tmp_path: Path) -> None:
    rules = tmp_path / "tftp.map"
    rules.write_bytes(b"rg \\\\ /\nr ^up$ ../secret\nr ^link$ /etc/passwd\nr ^(.*)\\.cfg$ \\i/\\1\n")
    backend = DirectoryBackend(str(root), map_file=str(rules))
    assert served_to(backend, b"boot\\deep\\file", "192.0.2.5") == b"deep"
    with pytest.raises(AccessViolation):  # the rewritten name is confined like a requested one
        served_to(backend, b"up", "192.0.2.5")
    with pytest.raises(FileNotFound):
        served_to(backend, b"link", "192.0.2.5")
    (root / "192.0.2.5").mkdir()
    (root / "192.0.2.5" / "x").write_bytes(b"by \\i")
    assert served_to(backend, b"x.cfg", "192.0.2.5") == b"by \\i"


def test_map_file_with_per_client_roots(per_client: DirectoryBackend, root: Path, tmp_path: Path) -> None:
    rules = tmp_path / "tftp.map"
    rules.write_bytes(b"r ^boot.0$ pxelinux.0\n")
    backend = DirectoryBackend(str(root), map_file=str(rules), per_client="ip")
    assert served_to(backend, b"boot.0", "192.0.2.5") == b"for 192.0.2.5"
    assert served_to(backend, b"boot.0", "192.0.2.9") == b"bootloader"


def test_reload_keeps_the_rules_when_the_new_file_is_bad(root: Path, tmp_path: Path) -> None:
    rules = tmp_path / "tftp.map"
    rules.write_bytes(b"r ^a$ pxelinux.0\n")
    backend = DirectoryBackend(str(root), map_file=str(rules))
    rules.write_bytes(b"r ^b$ pxelinux.0\n")
    assert backend.reload() is True
    assert served_to(backend, b"b", "192.0.2.5") == b"bootloader"
    rules.write_bytes(b"r ^c$ pxelinux.0\nr [ x\n")
    assert backend.reload() is False
    assert served_to(backend, b"b", "192.0.2.5") == b"bootloader"
    rules.unlink()
    assert backend.reload() is False
    assert served_to(backend, b"b", "192.0.2.5") == b"bootloader"


def test_twistd_root_per_client(twistd_factory: StartServer, tmp_path: Path) -> None:
    """On the wire: 127.0.0.1 gets its directory's file, ::1 its own, 127.0.0.2 the root's."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "hello.txt").write_bytes(b"hello\n")
    (served / "who.txt").write_bytes(b"anyone\n")
    for address in ("127.0.0.1", "::1"):
        (served / address).mkdir()
        (served / address / "who.txt").write_bytes(f"{address}\n".encode())
    server = twistd_factory("--root-per-client", "ip", hosts=("127.0.0.1", "::1"), root=served)
    assert tftp_client.get("127.0.0.1", server.port, b"who.txt").data == b"127.0.0.1\n"
    assert tftp_client.get("::1", server.port, b"who.txt").data == b"::1\n"
    assert tftp_client.get("127.0.0.1", server.port, b"hello.txt").data == b"hello\n"
    assert tftp_client.get("127.0.0.1", server.port, b"::1/who.txt").error == (1, "File not found")
    server.assert_healthy()


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--root-per-client", "hostname"], "--root-per-client must be ip or mac, not 'hostname'"),
        (["--socket", "/run/x.sock", "--root-per-client", "ip"], "--root-per-client works with --root only"),
        (["--socket", "/run/x.sock", "--map-file", "/etc/tftp.map"], "--map-file works with --root only"),
    ],
)
def test_per_client_and_map_file_option_errors(tmp_path: Path, args: List[str], complaint: str) -> None:
    options = Options()
    root_args = [] if "--socket" in args else ["--root", str(tmp_path)]
    with pytest.raises(usage.UsageError) as caught:
        options.parseOptions([*root_args, *args])
    assert complaint in str(caught.value)
    assert "\n" not in str(caught.value)


def test_file_names_split_the_same_remembered_or_not() -> None:
    """`name_parts` remembers short names only; long ones split afresh, alike; refusals raise each time."""
    assert directory.name_parts(b"\\boot\\/./bcd") == ("boot", "bcd")
    assert directory.name_parts(b"\\boot\\/./bcd") is directory.name_parts(b"\\boot\\/./bcd")
    long = b"/".join([b"d" * 100] * 4)
    assert len(long) > directory.CACHED_NAME_BYTES
    assert directory.name_parts(long) == ("d" * 100,) * 4
    assert directory.name_parts(long) is not directory.name_parts(long)
    for _ in range(2):
        with pytest.raises(AccessViolation):
            directory.name_parts(b"a/../b")
        with pytest.raises(FileNotFound):
            directory.name_parts(b"/./")


def test_only_rules_and_per_client_roots_read_the_request_context(root: Path, tmp_path: Path) -> None:
    """The server skips building a RequestContext for a backend that reads none; after a reload too."""
    rules = tmp_path / "tftp.map"
    rules.write_bytes(b"r ^a$ pxelinux.0\n")
    assert DirectoryBackend(str(root)).reads_context is False
    assert DirectoryBackend(str(root), per_client="ip").reads_context is True
    mapped = DirectoryBackend(str(root), map_file=str(rules))
    assert mapped.reads_context is True
    rules.write_bytes(b"r ^b$ pxelinux.0\n")
    assert mapped.reload() is True and mapped.reads_context is True
    assert served_to(mapped, b"b", "192.0.2.5") == b"bootloader"
