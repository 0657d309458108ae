"""systemd socket activation: the listening sockets a service manager hands over.

With a `.socket` unit (`ListenDatagram=69`), systemd binds port 69 itself and
starts us with the descriptors from 3 up (`LISTEN_FDS`, `LISTEN_PID`); we need
no privilege to bind. The protocol is simple enough that reading it here beats
depending on a library for it (and Twisted 22.4 has no named-descriptor API).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from twisted.logger import Logger

log = Logger(namespace="tftp_offload")

SD_LISTEN_FDS_START = 3


def inherited_datagram_sockets(environ: Optional[Mapping[str, str]] = None) -> List[Tuple[int, int]]:
    """(fd, address family) of each UDP socket passed to this process, and clear the variables.

    The variables are cleared (as sd_listen_fds(unset=1) does) so that a child
    process does not try to adopt the same descriptors.
    """
    env: Dict[str, str] = dict(os.environ if environ is None else environ)
    if environ is None:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if "LISTEN_FDS" not in env:
        return _udp_sockets(_taken_by_twisted()) if environ is None else []
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


def _taken_by_twisted() -> List[int]:
    """The descriptors Twisted's `systemd:` endpoint parser took, with the variables, on import.

    Importing twisted.internet.endpoints reads LISTEN_FDS and removes it from
    the environment (Twisted 23 and later), and twistd imports it before our
    options are parsed whenever it rebuilds its plugin cache. What it read is
    kept on the parser class (a private name, hence the care).
    """
    endpoints = sys.modules.get("twisted.internet.endpoints")
    daemon = getattr(getattr(endpoints, "_SystemdParser", None), "_sddaemon", None)
    try:
        return list(daemon.inheritedDescriptors()) if daemon is not None else []
    except Exception:
        return []


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
