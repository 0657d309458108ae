"""Serve files from a directory, confined to it."""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import stat
from functools import lru_cache
from typing import List, Optional, Tuple, Union

from twisted.logger import Logger
from twisted.python import context
from zope.interface import implementer

from ..errors import AccessViolation, FileNotFound, Unsupported
from ..interfaces import IBackend
from ..neighbours import NeighbourTable
from ..readers import BytesReader, FileReader, open_checked, open_regular
from ..remap import MapFileError, RuleSet
from .small_files import SmallFiles

log = Logger(namespace="tftp_offload")

_ADDRESS_LIKE = re.compile(r"[0-9A-Fa-f.:]+(%|$)")
_MAC = re.compile(r"[0-9a-f]{2}(-[0-9a-f]{2}){5}$")
_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG)
"""A walk that stops at one of these has found no file: `open_regular` answers them with File not found."""

Found = Optional[os.stat_result]
"""The `lstat` of the file a walk found (None: none found, or a symlink on the way)."""

PER_CLIENT = ("ip", "mac")
"""What `per_client` may name: the client's address or its MAC (dnsmasq's `--tftp-unique-root`)."""


@implementer(IBackend)
class DirectoryBackend:
    """Files under `root`, the way tftpd-hpa's `--secure` serves them.

    A leading `/` means the root (ROMs often ask for `/pxelinux.0`), `\\` is a
    path separator (Windows boot files ask for `boot\\bcd`), and the check
    against the root is made on the canonical path, component by component,
    so `..`, symlinks pointing out and absolute escapes are all refused alike.
    """

    def __init__(self, root: str, map_file: Optional[str] = None, per_client: Optional[str] = None) -> None:
        """`map_file`: tftpd-hpa-style rewrite rules (`tftp_offload.remap`), applied to each name
        first; `per_client`: look in `root/<client address>/` ("ip") or `root/<client MAC>/`
        ("mac", `52-54-00-12-34-56`) before `root/`."""
        self.root = os.path.realpath(root)
        self._prefix = self.root.rstrip("/") + "/"
        if not os.path.isdir(self.root):
            raise ValueError(f"not a directory: {root}")
        if per_client not in (None, *PER_CLIENT):
            raise ValueError(f"per_client must be one of {', '.join(PER_CLIENT)}, not {per_client!r}")
        self.per_client = per_client
        self.neighbours = NeighbourTable() if per_client == "mac" else None
        self.map_file = os.path.abspath(map_file) if map_file else None  # reread (SIGHUP) wherever we run
        self.rules: Optional[RuleSet] = RuleSet.load(self.map_file) if self.map_file else None
        self.small_files = SmallFiles()
        """Small files' bytes, served while the walk's `lstat` says they are unchanged (`small_files`)."""
        self.reads_context = self.rules is not None or per_client is not None
        """Only rewrite rules and per-client roots need the client's address (`IBackend.reads_context`).
        An attribute, not a property: read twice per request, and neither changes after this (a reload
        replaces the rules, never removes them)."""

    def reload(self) -> bool:
        """Read `map_file` again (on SIGHUP); a file that fails keeps the rules in force, with one line why."""
        if self.map_file is None:
            return False
        try:
            self.rules = RuleSet.load(self.map_file)
        except MapFileError as e:
            log.warn("Kept the previous rewrite rules: {error}", error=str(e))
            return False
        log.info("Loaded {count} rewrite rules from {map_file}", count=len(self.rules.rules), map_file=self.map_file)
        return True

    def locate(self, file_name: bytes, client: Optional[str] = None, local: Optional[str] = None) -> str:
        """The canonical path a request from `client` (to `local`) for `file_name` gets, or raise.

        Rules rewrite the name first; the result is confined like any name.
        With per-client roots, a file missing from the client's directory is
        looked for in the root, where other clients' directories are not served.
        """
        return self._locate(file_name, client, local)[0]

    def _locate(self, file_name: bytes, client: Optional[str], local: Optional[str]) -> Tuple[str, bool, Found]:
        """`locate`, whether the walk found the path missing (then there is nothing to open), and
        the found file's `lstat` (see `_walk`)."""
        if self.rules is not None:
            file_name = self.rules.rewrite(file_name, client or "")
        if self.per_client is None or not client:
            return self._resolve(file_name)
        if self.neighbours is not None:
            mac = self.neighbours.hardware_address(client, local)
            directories = [mac] if mac else []
        else:
            directories = client_directories(client, local)
        for directory in directories:
            if not os.path.isdir(os.path.join(self.root, directory)):
                continue  # one stat: most clients of a shared root have no directory of their own
            path, missing, info = self._resolve(file_name, directory)
            if not missing and (info is not None or os.path.lexists(path)):
                return path, False, info
        path, missing, info = self._resolve(file_name)
        first = path[len(self.root):].lstrip("/").split("/", 1)[0]
        if _MAC.match(first) or client_directories(first, None):
            raise FileNotFound("File not found")  # another client's directory
        return path, missing, info

    def resolve(self, file_name: bytes, directory: Optional[str] = None) -> str:
        """The canonical path `file_name` names inside the root (in its `directory`, if given), or raise."""
        return self._resolve(file_name, directory)[0]

    def _resolve(self, file_name: bytes, directory: Optional[str] = None) -> Tuple[str, bool, Found]:
        """`resolve`, whether a component of the path was found missing on the way, and the found
        file's `lstat` (see `_walk`)."""
        parts = name_parts(file_name)
        path, missing, info = self._walk((directory, *parts) if directory else parts)
        if not self._inside(path):
            raise AccessViolation("Access violation: path leaves the served directory")
        return path, missing, info

    def _walk(self, parts: Tuple[str, ...]) -> Tuple[str, bool, Found]:
        """`os.path.realpath(root/parts...)`, walked from the root; whether a component is missing;
        and the `lstat` of the path it found, when no symlink was on the way.

        realpath would look at every component of the root again on every request (a third of a
        missing file's cost): here one `lstat` per component below the root, which is canonical
        already, and realpath itself only from the first symlink on. Like realpath, a missing
        component (ENOENT, or a file where a directory should be) ends the walk and the rest is
        joined as it is. `parts` have no "", "." or "..". The last `lstat` is what `get_reader`
        needs to know before it opens: no second look at the same file.
        """
        path = self.root if self.root != "/" else ""
        info = None
        for i, part in enumerate(parts):
            path = f"{path}/{part}"
            try:
                info = os.lstat(path)
            except OSError as e:
                return "/".join((path, *parts[i + 1:])), e.errno in _MISSING, None
            if stat.S_ISLNK(info.st_mode):
                return os.path.realpath(os.path.join(path, *parts[i + 1:])), False, None
        return path or "/", False, info

    def get_reader(self, file_name: bytes) -> Union[FileReader, BytesReader]:
        if not self.reads_context:
            path, missing, info = self._resolve(file_name)  # the request's context changes nothing: not read
        else:
            remote = context.get("remote")
            local = context.get("local")
            path, missing, info = self._locate(file_name, remote[0] if remote else None,
                                               local[0] if local else None)
        if missing:
            raise FileNotFound("File not found")  # what opening it would say, without a second failing call
        # The canonical path has no link left unless one was swapped in since: do not follow one,
        # and check that the descriptor is what the walk found inside the root.
        opened: Found = None
        if info is None:
            fd, seen = open_regular(path, follow_symlinks=False), False
        else:
            data = self.small_files.get(path, info)
            if data is not None:
                return self._kept(data)  # the walk's lstat is the file these bytes were read from
            fd, opened = open_checked(path, info.st_mode)
            seen = (opened.st_ino, opened.st_dev) == (info.st_ino, info.st_dev)
            if seen:
                try:
                    data = self.small_files.keep(path, opened, fd)
                except BaseException:
                    os.close(fd)
                    raise
                if data is not None:
                    os.close(fd)
                    return self._kept(data)
        if not seen:
            # Not the file the walk saw (none was seen, or it was replaced since, a directory
            # on the way perhaps swapped for a link out): where is the descriptor really?
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                real = path  # no /proc: the checks above are all there is
            if not self._inside(real):
                os.close(fd)
                raise AccessViolation("Access violation: path leaves the served directory")
        reader = FileReader(fd, opened)
        reader.kind = "directory"
        return reader

    @staticmethod
    def _kept(data: bytes) -> BytesReader:
        reader = BytesReader(data)
        reader.kind = "directory"
        return reader

    def _inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self._prefix)

    def get_writer(self, file_name: bytes) -> None:
        raise Unsupported("Write requests are not supported")


CACHED_NAMES = 1024
CACHED_NAME_BYTES = 256
"""`name_parts` remembers this many names of up to this many bytes (256 KB at most; a longer name,
which no ROM asks for, is split afresh each time)."""


def name_parts(file_name: bytes) -> Tuple[str, ...]:
    """A request's file name as path components below the root, or raise: `\\` is `/`, and empty
    and `.` components go; a NUL or `..` is an access violation, nothing left is File not found.

    Remembered per name (refusals are not): a storm asks for a handful of names over and over,
    and only the `lstat` walk that follows depends on what is on disk."""
    if len(file_name) <= CACHED_NAME_BYTES:
        return _remembered_parts(file_name)
    return _split_name(file_name)


def _split_name(file_name: bytes) -> Tuple[str, ...]:
    if b"\0" in file_name:
        raise AccessViolation("Access violation: NUL in filename")
    name = os.fsdecode(file_name.replace(b"\\", b"/"))
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise AccessViolation("Access violation: '..' in filename")
    if not parts:
        raise FileNotFound("File not found")
    return parts


_remembered_parts = lru_cache(maxsize=CACHED_NAMES)(_split_name)


def client_directories(client: str, local: Optional[str]) -> List[str]:
    """The names a client's directory may have, most specific first; none if `client` is no address.

    IPv4 as dotted quad (an IPv4-mapped IPv6 peer included), IPv6 compressed.
    A link-local address is unique only on its link: `fe80::1%eth0` (the
    interface the request came in on) is tried before `fe80::1`.
    """
    if not _ADDRESS_LIKE.match(client):  # most names are not: skip ipaddress's slower refusal
        return []
    try:
        address = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return []
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    names = [str(address)]
    if address.is_link_local and isinstance(address, ipaddress.IPv6Address) and local and "%" in local:
        names.insert(0, f"{address}%{local.split('%', 1)[1]}")
    return names
