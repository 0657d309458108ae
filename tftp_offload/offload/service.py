"""Offer any `IBackend` to TFTP servers over a UNIX socket: the service a backend's host process runs.

A host process (the MAAS rack controller, a provisioning service, the reference
backend) keeps its python-tx-tftp style backend and adds, in a few lines:

    from tftp_offload.offload.service import offload_service
    offload_service(backend, "/run/tftp-offload/backend.sock").setServiceParent(application)

Each server connection is answered by a `responder.OffloadResponder`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from typing import Any, List, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..interfaces import IBackend
from .responder import OffloadResponderFactory

log = Logger(namespace="tftp_offload.responder")


class OffloadService(Service):
    """Offers a backend on a UNIX socket while running; see `offload_service`."""

    def __init__(self, backend: IBackend, socket_path: str, mode: int = 0o660, reactor: Any = None,
                 **responder_options: Any) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.socket_path = socket_path
        self.mode = mode
        self.reactor = reactor
        self.factory = OffloadResponderFactory(backend, reactor, **responder_options)
        self.port: Any = None

    def startService(self) -> None:
        _remove_stale_socket(self.socket_path)
        endpoint = UNIXServerEndpoint(self.reactor, self.socket_path, mode=self.mode)
        # The socket is chmod()ed to `mode` after bind(); a restrictive umask closes the gap between.
        umask = os.umask(0o177)
        try:
            listening = endpoint.listen(self.factory)
        finally:
            os.umask(umask)
        result: List[Any] = []
        listening.addBoth(result.append)  # a UNIX listen is synchronous: this has fired
        if isinstance(result[0], Failure):
            result[0].raiseException()
        self.port = result[0]
        log.info("Offering the tftp-offload protocol on {path} (mode {mode:o})", path=self.socket_path,
                 mode=self.mode)
        super().startService()

    def stopService(self) -> Optional[Deferred]:
        super().stopService()
        port, self.port = self.port, None
        for connection in list(self.factory.connections):
            connection.transport.loseConnection()  # type: ignore[union-attr]
        return port.stopListening() if port is not None else None


def _remove_stale_socket(path: str) -> None:
    """Delete a socket file nobody listens on (left by a process that died), so that we can listen.

    A live listener is left alone (listening then fails with "address in use"), and so is
    anything that is not a socket.
    """
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("Removing stale socket {path}", path=path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


def offload_service(backend: IBackend, socket_path: str, mode: int = 0o660, reactor: Any = None,
                    **responder_options: Any) -> OffloadService:
    """An `IService` offering `backend` to tftp-offload servers on the UNIX socket `socket_path`.

    `mode` is the socket's permission bits: who may connect is who may ask for files. A stale
    socket left by a dead process is replaced; a live one is not.
    `responder_options`: `lookup_timeout`, `idle_timeout`, `max_streams` (see this module).
    """
    return OffloadService(backend, socket_path, mode, reactor, **responder_options)
