"""systemd socket activation: the listening sockets a service manager hands over.

With a `.socket` unit (`ListenDatagram=69`), systemd binds port 69 itself and
starts us with the descriptors from 3 up (`LISTEN_FDS`, `LISTEN_PID`, see
sd_listen_fds(3)); we need no privilege to bind. The protocol is simple enough
that reading it here beats depending on a library for it (Twisted's
`twisted.python.systemd.ListenFDs` reads the same variables, but only from
`os.environ`, where they may already be gone: see `_as_executed`).
"""

from __future__ import annotations

import os
import socket
from typing import Dict, Iterable, List, Mapping, Optional, Set, Tuple

from twisted.logger import Logger

log = Logger(namespace="tftp_offload")

SD_LISTEN_FDS_START = 3
VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

_taken_by: Set[int] = set()
"""The process (its PID) that already took the sockets it was started with: a second look finds none."""


def inherited_datagram_sockets(environ: Optional[Mapping[str, str]] = None) -> List[Tuple[int, int]]:
    """(fd, address family) of each UDP socket passed to this process, and clear the variables.

    The variables are cleared (as sd_listen_fds(unset=1) does) so that a child
    process does not try to adopt the same descriptors, nor this one twice.
    `environ` (for tests) is read instead of the process's environment.
    """
    if environ is None:
        env: Dict[str, str] = {name: os.environ[name] for name in VARIABLES if name in os.environ}
        if "LISTEN_FDS" not in env and os.getpid() not in _taken_by:
            env = _as_executed()
        _taken_by.add(os.getpid())
        for name in VARIABLES:
            os.environ.pop(name, None)
    else:
        env = dict(environ)
    if "LISTEN_FDS" not in env:
        return []
    if env.get("LISTEN_PID") not in (None, str(os.getpid())):
        # Meant for another process (we were started by the one they were for).
        log.info("Not adopting sockets passed to process {listen_pid} (this is {pid})",
                 listen_pid=env.get("LISTEN_PID"), pid=os.getpid())
        return []
    try:
        count = int(env["LISTEN_FDS"])
    except ValueError:
        log.warn("Ignored LISTEN_FDS={value!r}: not a number", value=env["LISTEN_FDS"])
        return []
    return _udp_sockets(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))


def _as_executed(path: str = "/proc/self/environ") -> Dict[str, str]:
    """The LISTEN_* variables this process was started with, even where something has removed them since.

    Importing twisted.internet.endpoints removes LISTEN_FDS and LISTEN_PID from
    `os.environ` (Twisted 23 and later: its `systemd:` endpoint parser takes
    them, and keeps what it read on a private attribute only), and twistd
    imports it before our options are parsed whenever it rebuilds its plugin
    cache. /proc/self/environ is the environment execve(2) gave the process,
    which later changes to the environment do not alter (proc(5)): there the
    variables are still ours to read. Elsewhere than Linux there is no such
    file, and nothing found.
    """
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError:
        return {}
    found = {}
    for entry in data.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep and name.decode("ascii", "replace") in VARIABLES:
            found[name.decode("ascii")] = value.decode("utf-8", "replace")
    return found


def _udp_sockets(fds: Iterable[int]) -> List[Tuple[int, int]]:
    """The UDP sockets among `fds`, with their address family; anything else is logged and left."""
    found = []
    for fd in fds:
        try:
            probe = socket.socket(fileno=fd)  # learns family and type from the descriptor
        except OSError as e:
            log.warn("Ignored inherited descriptor {fd}: {error}", fd=fd, error=str(e))
            continue
        try:
            if probe.type == socket.SOCK_DGRAM and probe.family in (socket.AF_INET, socket.AF_INET6):
                found.append((fd, int(probe.family)))
            else:
                log.warn("Ignored inherited descriptor {fd}: not a UDP socket (check the .socket unit: "
                         "ListenDatagram=)", fd=fd)
        finally:
            probe.detach()  # the descriptor stays open: it is the service's to adopt
    return found
