"""Serve files from a directory, confined to it."""

from __future__ import annotations

import errno
import os
import stat

from twisted.logger import Logger
from zope.interface import implementer

from ..errors import AccessViolation, FileNotFound, Unsupported
from ..interfaces import IBackend
from ..readers import FileReader

log = Logger()


@implementer(IBackend)
class DirectoryBackend:
    """Files under `root`, the way tftpd-hpa's `--secure` serves them.

    A leading `/` means the root (ROMs often ask for `/pxelinux.0`), `\\` is a
    path separator (Windows boot files ask for `boot\\bcd`), and the check
    against the root is made on the canonical path, component by component,
    so `..`, symlinks pointing out and absolute escapes are all refused alike.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise ValueError(f"not a directory: {root}")

    def resolve(self, file_name: bytes) -> str:
        """The canonical path `file_name` names inside the root, or raise."""
        if b"\0" in file_name:
            raise AccessViolation("Access violation: NUL in filename")
        name = os.fsdecode(file_name.replace(b"\\", b"/"))
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise AccessViolation("Access violation: '..' in filename")
        if not parts:
            raise FileNotFound("File not found")
        path = os.path.realpath(os.path.join(self.root, *parts))
        if path != self.root and not path.startswith(self.root.rstrip("/") + "/"):
            raise AccessViolation("Access violation: path leaves the served directory")
        return path

    def get_reader(self, file_name: bytes) -> FileReader:
        path = self.resolve(file_name)
        try:
            # O_NOFOLLOW: the canonical path has no link left unless one was swapped in since;
            # O_NONBLOCK: a FIFO planted in the root must not hang the reactor.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            # ENOTDIR: a file used as a directory; ENAMETOOLONG: a name no file here can have.
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
                raise FileNotFound("File not found") from None
            if e.errno in (errno.EACCES, errno.EPERM, errno.ELOOP):
                raise AccessViolation("Access violation: permission denied") from None
            raise
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise AccessViolation(f"Access violation: {kind}")
        return FileReader(fd)

    def get_writer(self, file_name: bytes) -> None:
        raise Unsupported("Write requests are not supported")
