"""Serve files from a directory, confined to it."""

from __future__ import annotations

import os

from twisted.logger import Logger
from zope.interface import implementer

from ..errors import AccessViolation, FileNotFound, Unsupported
from ..interfaces import IBackend
from ..readers import FileReader, open_regular

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
        if not self._inside(path):
            raise AccessViolation("Access violation: path leaves the served directory")
        return path

    def get_reader(self, file_name: bytes) -> FileReader:
        path = self.resolve(file_name)
        # The canonical path has no link left unless one was swapped in since: do not follow one,
        # and check where the descriptor really is (a directory on the way swapped for a link out).
        fd = open_regular(path, follow_symlinks=False)
        try:
            opened = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            opened = path  # no /proc: the checks above are all there is
        if not self._inside(opened):
            os.close(fd)
            raise AccessViolation("Access violation: path leaves the served directory")
        return FileReader(fd)

    def _inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root.rstrip("/") + "/")

    def get_writer(self, file_name: bytes) -> None:
        raise Unsupported("Write requests are not supported")
