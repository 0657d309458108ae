"""The reference backend: a directory plus files made per request, offered over the offload protocol.

    twistd -n tftp-offload-backend --socket PATH --root DIR

It is what demos and tests run against, and a worked example of a backend: an
ordinary `IBackend` (the tx-tftp contract) handed to `responder.offload_service`.
What it serves, by name (a leading `/` and `\\` separators are accepted, as in
the directory backend):

    pxelinux.cfg/<anything>        a PXELINUX config rendered for the client and
                                   the server address it asked (inline answer)
    grub/grub.cfg-<anything>       the same for GRUB
    generated/big<N>[-<tag>]       N bytes of a fixed pseudo-random pattern
                                   (`pattern`), size known: a stream when N is
                                   over 60 KiB
    generated/nosize<N>[-<tag>]    the same without a size (no tsize)
    ephemeral/<N>[-<tag>]          N pattern bytes written to a fresh file,
                                   answered as an ephemeral path (at most 64 MiB)
    path/<file>                    <file> of the root, answered as a static path
    slow/<seconds>/<name>          <name>, answered after a delay (at most 30 s)
    anything else                  the file of that name under the root (inline up
                                   to 60 KiB, else its descriptor)

Rendered content depends on the client's address, never on its port: the
server reuses an answer for the same client address whatever port it asks from.
It injects no failures (this is a production twistd plugin): the tests add theirs
in tests/support/faulty_reference.tac.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import tempfile
from typing import Any, Dict, Optional, Tuple, Type

from twisted.application.service import IService, MultiService, Service
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from .backends.directory import DirectoryBackend
from .context import RequestContext
from .errors import AccessViolation, FileNotFound, Unsupported
from .interfaces import IBackend
from .offload.responder import IDLE_TIMEOUT
from .offload.service import offload_service
from .readers import BytesReader, PathReader

log = Logger(namespace="tftp_offload.reference")

PATTERN_PERIOD = 1_048_573
"""A prime just under 1 MiB: no read or chunk size divides it, so a chunk served at the wrong offset
(or twice) changes the bytes and a byte-for-byte check catches it."""

GENERATED_MAX = 1 << 40
EPHEMERAL_MAX = 64 << 20
SLOW_MAX = 30.0
EPHEMERAL_GRACE = 120.0
"""Seconds after which an ephemeral file the server never took (it deletes it on receipt) is removed here."""

_NOWHERE = RequestContext(("", 0), ("", 0))
"""The context of a lookup made outside a TFTP request (the backend called directly)."""

_GENERATED = re.compile(r"generated/(big|nosize)(\d{1,13})(?:-[\w.]{0,64})?")
_EPHEMERAL = re.compile(r"ephemeral/(\d{1,9})(?:-[\w.]{0,64})?")
_SLOW = re.compile(r"slow/(\d{1,2}(?:\.\d{1,3})?)/(.+)", re.DOTALL)


@functools.lru_cache(maxsize=1)
def _doubled_pattern() -> bytes:
    period = hashlib.shake_256(b"tftp-offload reference pattern").digest(PATTERN_PERIOD)
    return period + period


def pattern(offset: int, length: int) -> bytes:
    """Bytes `offset` to `offset + length` of the endless pattern `generated/` files are cut from."""
    doubled = _doubled_pattern()
    parts = []
    while length > 0:
        start = offset % PATTERN_PERIOD
        n = min(length, PATTERN_PERIOD)
        parts.append(doubled[start : start + n])
        offset += n
        length -= n
    return b"".join(parts)


class GeneratedReader:
    """`size` bytes of `pattern`, made as they are read: a large file that never exists anywhere."""

    def __init__(self, size: int, sized: bool = True) -> None:
        self._total = size
        self._offset = 0
        self.size: Optional[int] = size if sized else None

    def read(self, n: int) -> bytes:
        n = max(0, min(n, self._total - self._offset))
        data = pattern(self._offset, n)
        self._offset += n
        return data

    def finish(self) -> None:
        self._offset = self._total


def render_pxelinux(name: str, local: Tuple[str, int], remote: Tuple[str, int]) -> bytes:
    """A PXELINUX config for one client: boots the local disk, and says who it was made for."""
    return (
        f"# {name}: made by the tftp-offload reference backend\n"
        f"# for client {remote[0]}, asked at {local[0]}:{local[1]}\n"
        "DEFAULT local\nPROMPT 0\nTIMEOUT 0\n\n"
        "LABEL local\n"
        "  LOCALBOOT 0\n"
        f"  APPEND tftp-server={local[0]} client={remote[0]}\n"
    ).encode()


def render_grub(name: str, local: Tuple[str, int], remote: Tuple[str, int]) -> bytes:
    """A GRUB config for one client, as MAAS would render a per-machine grub.cfg."""
    return (
        f"# {name}: made by the tftp-offload reference backend\n"
        "set default=0\nset timeout=0\n"
        f'menuentry "Local disk (client {remote[0]}, server {local[0]}:{local[1]})" {{\n'
        "  exit\n}\n"
    ).encode()


@implementer(IBackend)
class ReferenceBackend:
    """A directory, plus the generated names listed in this module's docstring."""

    def __init__(self, root: str, ephemeral_dir: str, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.directory = DirectoryBackend(root)
        self.ephemeral_dir = ephemeral_dir
        self.reactor = reactor
        self.lookups = 0

    def get_reader(self, file_name: bytes) -> Any:
        self.lookups += 1
        asked = RequestContext.current() or _NOWHERE
        local, remote = asked.local, asked.remote
        log.info("Lookup {file!r} for {client} at {local}", file=file_name, client=remote, local=local,
                 lookups=self.lookups)
        raw = file_name.replace(b"\\", b"/").lstrip(b"/")
        name = raw.decode("utf-8", "replace")
        if name.startswith("pxelinux.cfg/") and len(name) > len("pxelinux.cfg/"):
            return BytesReader(render_pxelinux(name, local, remote))
        if name.startswith("grub/grub.cfg-"):
            return BytesReader(render_grub(name, local, remote))
        match = _GENERATED.fullmatch(name)
        if match:
            size = int(match.group(2))
            if size > GENERATED_MAX:
                raise FileNotFound("File not found")
            return GeneratedReader(size, sized=match.group(1) == "big")
        match = _EPHEMERAL.fullmatch(name)
        if match:
            return self._ephemeral(int(match.group(1)))
        if name.startswith("path/"):
            return PathReader(self.directory.resolve(raw[len(b"path/"):]))
        match = _SLOW.fullmatch(name)
        if match:
            delay = min(float(match.group(1)), SLOW_MAX)
            return deferLater(self.reactor, delay, asked.call, self.get_reader, match.group(2).encode())
        return self.directory.get_reader(file_name)

    def _ephemeral(self, size: int) -> PathReader:
        if size > EPHEMERAL_MAX:
            raise AccessViolation(f"Ephemeral files are at most {EPHEMERAL_MAX} bytes here")
        fd, path = tempfile.mkstemp(prefix="answer-", dir=self.ephemeral_dir)
        try:
            for offset in range(0, size, 1 << 20):
                os.write(fd, pattern(offset, min(1 << 20, size - offset)))
        finally:
            os.close(fd)
        # The server deletes the file the moment it has it open; if the answer never reaches
        # a server (it hung up first), the file would stay: remove it after a while.
        self.reactor.callLater(EPHEMERAL_GRACE, _remove, path)
        return PathReader(path, ephemeral=True)

    def transfer_finished(self, report: Dict[str, Any]) -> None:
        """The server's report of one transfer (TransferFinished): the reference backend logs it, one line."""
        name = report["filename"].decode("utf-8", "backslashreplace")
        remote = f"[{report['remote_ip']}]" if ":" in report["remote_ip"] else report["remote_ip"]
        error = f"; client said {report['client_error']}" if report.get("client_error") else ""
        log.info("Transfer of '{name}' to {remote}:{remote_port}: {outcome}, {bytes} bytes in {duration:.3f} s "
                 "(blksize {blksize}, window {windowsize}, {retransmits} retransmits{error})",
                 name=name, remote=remote, error=error, **report)

    def get_writer(self, file_name: bytes) -> None:
        raise Unsupported("Write requests are not supported")


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class _EphemeralDirectory(Service):
    """A private directory for ephemeral answers that exists while the service runs."""

    def __init__(self, path: str) -> None:
        self.path = path

    def stopService(self) -> None:
        super().stopService()
        shutil.rmtree(self.path, ignore_errors=True)


def _socket_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"--mode must be octal permission bits such as 0600 or 0660, not {text!r}") from None
    if mode & ~0o770 or (mode & 0o600) != 0o600:
        raise ValueError(f"--mode {text}: the owner needs rw, others no access at all (0600 or 0660)")
    return mode


_socket_mode.coerceDoc = "Octal, owner rw and no access for others: 0600 or 0660."  # type: ignore[attr-defined]


class Options(usage.Options):
    synopsis = "--socket PATH --root DIR [options]"
    longdesc = (
        "The reference backend for tftp-offload: serves DIR and generates per-request files "
        "(pxelinux.cfg/*, grub/grub.cfg-*, generated/big<N>, ephemeral/<N>, ...) to the "
        "tftp-offload servers that connect to the UNIX socket PATH (twistd tftp-offload --socket PATH)."
    )
    optParameters = [
        ["socket", "s", None, "The UNIX socket to listen on."],
        ["root", "r", None, "The directory to serve."],
        ["mode", "m", 0o600, "Permission bits of the socket: who may connect may ask for any file.", _socket_mode],
        ["ephemeral-dir", None, None, "Where ephemeral answers are written; the TFTP server must be able to "
         "delete files there (default: a private temporary directory, removed on exit)."],
        ["idle-timeout", None, IDLE_TIMEOUT, "Seconds an unread stream is kept open.", float],
    ]

    def postOptions(self) -> None:
        if not self["socket"] or not self["root"]:
            raise usage.UsageError("give both --socket PATH and --root DIR")
        if not os.path.isdir(self["root"]):
            raise usage.UsageError(f"--root {self['root']!r} is not a directory")
        if self["ephemeral-dir"] is not None and not os.path.isdir(self["ephemeral-dir"]):
            raise usage.UsageError(f"--ephemeral-dir {self['ephemeral-dir']!r} is not a directory")


def makeService(options: Options, backend_type: Type[ReferenceBackend] = ReferenceBackend) -> IService:
    """The backend on its socket; `backend_type` lets the tests serve a subclass that injects failures."""
    top = MultiService()
    ephemeral_dir = options["ephemeral-dir"]
    if ephemeral_dir is None:
        ephemeral_dir = tempfile.mkdtemp(prefix="tftp-offload-ephemeral-")
        _EphemeralDirectory(ephemeral_dir).setServiceParent(top)
    backend = backend_type(options["root"], ephemeral_dir)
    offload_service(backend, options["socket"], mode=options["mode"],
                    idle_timeout=options["idle-timeout"]).setServiceParent(top)
    return top
