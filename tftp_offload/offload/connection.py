"""The server's one connection to its backend: made with backoff, remade after a restart, greeted with `Hello`.

`Connector` keeps the connection; `ClientProtocol` is the connection, usable once `Hello` has
settled the version. What the connection's owner (`client.AMPBackend`) hears of it comes
through the callbacks it hands `ClientFactory`: greeted, refused, lost.
"""

from __future__ import annotations

import os
import random
from typing import Any, Callable, Dict, List, Optional, Set

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from .. import __version__
from . import commands
from .streams import log_bug

log = Logger(namespace="tftp_offload.amp")

RETRY_MAX_DELAY = 2.0
"""Seconds between connection attempts at most: a restarted backend is found again within this."""

RETRY_FIRST_DELAY = 0.05
"""Seconds before the first reconnection attempt; each failure doubles it, up to `retry_max_delay`."""


class ClientProtocol(amp.AMP):
    """The connection to the backend; usable once `Hello` has settled the version."""

    def __init__(self, factory: "ClientFactory") -> None:
        super().__init__()
        self.factory = factory
        self.version: Optional[int] = None
        self.capabilities: frozenset = frozenset()
        self.gone = False
        self._unclaimed: Set[int] = set()
        """Descriptors received and not yet taken by an answer: closed if the connection ends first."""

    def connectionMade(self) -> None:
        super().connectionMade()
        try:
            d = self.callRemote(commands.Hello, version=commands.PROTOCOL_VERSION,
                                min_version=commands.MIN_PROTOCOL_VERSION, capabilities=list(commands.CAPABILITIES),
                                software=f"tftp-offload {__version__}")
        except Exception:
            log.failure("Could not greet the backend")
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        d.addCallbacks(self._greeted, self._refused)
        d.addErrback(log_bug, "the backend's greeting")

    def _greeted(self, response: Dict[str, Any]) -> None:
        version = response["version"]
        if not commands.MIN_PROTOCOL_VERSION <= version <= commands.PROTOCOL_VERSION:
            self._refused(Failure(commands.IncompatibleVersion(f"backend chose version {version}")))
            return
        self.version = version
        self.capabilities = frozenset(response["capabilities"])
        self.factory.greeted(self, response.get("software"))

    def _refused(self, failure: Failure) -> None:
        if self.gone:
            return
        log.error("Backend at {path} refused our greeting: {error}", path=self.factory.socket_path,
                  error=failure.getErrorMessage())
        self.factory.refused(failure.getErrorMessage())
        self.transport.loseConnection()  # type: ignore[union-attr]

    def fileDescriptorReceived(self, descriptor: int) -> None:
        """Kept track of until an answer claims it (`claim`), so that none leaks with the connection."""
        self._unclaimed.add(descriptor)
        super().fileDescriptorReceived(descriptor)

    def claim(self, descriptor: int) -> None:
        """An answer took `descriptor`: closing it is now the answer's business."""
        self._unclaimed.discard(descriptor)

    def dataReceived(self, data: bytes) -> None:
        """AMP raises on bytes that are not AMP (a box too long, an empty box...); the reactor would log a
        traceback for that. One line instead, and the connection is dropped (calls on it are resent)."""
        try:
            super().dataReceived(data)
        except Exception as e:
            log.error("Backend at {path} sent something that is not the offload protocol ({error}); dropping "
                      "the connection", path=self.factory.socket_path, error=f"{type(e).__name__}: {e}"[:200],
                      outcome="backend-error")
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True
        self.factory.lost(self, reason)
        # Descriptors that arrived with a box never decoded, or an answer never taken, must not leak.
        unclaimed, self._unclaimed = self._unclaimed, set()
        for fd in unclaimed:
            os.close(fd)
        super().connectionLost(reason)  # fails the calls still outstanding


class ClientFactory(Factory):
    """Builds the `ClientProtocol`, and tells the owner what becomes of each connection."""

    noisy = False

    def __init__(self, socket_path: str, greeted: Callable[[ClientProtocol, Optional[str]], object],
                 refused: Callable[[str], object], lost: Callable[[ClientProtocol, Failure], object]) -> None:
        self.socket_path = socket_path
        self.greeted = greeted
        """`greeted(protocol, software)`: the connection is usable."""
        self.refused = refused
        """`refused(reason)`: the backend refused our greeting (the connection is being closed)."""
        self.lost = lost
        """`lost(protocol, reason)`: the connection ended (greeted or not)."""

    def buildProtocol(self, addr: Any) -> ClientProtocol:
        return ClientProtocol(self)


class Connector:
    """Keeps one connection to the backend: connects, and after a failed attempt or a lost connection
    tries again with backoff (`RETRY_FIRST_DELAY`, doubling up to `max_delay`, jittered), or at once
    when asked (`now()`).

    Instead of `ClientService`, which logs every retry ("Scheduling retry 7 to connect ... in
    2.108 seconds", every 2 s for as long as the backend is away) and cannot be told to try now.
    What an operator hears of an outage is `Outage`'s business.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, factory: Factory, clock: Any, max_delay: float,
                 failed: Any) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.clock = clock
        self.max_delay = max_delay
        self.failed = failed
        self.protocol: Optional[Any] = None
        self.connecting: Optional[Deferred] = None
        self._timer: Optional[Any] = None
        self._failures = 0
        self._stopped = True
        self._on_lost: List[Deferred] = []

    def start(self) -> None:
        self._stopped = False
        self._attempt()

    def now(self) -> None:
        """Try at once, unless connected, connecting, or stopped."""
        if self._stopped or self.protocol is not None or self.connecting is not None:
            return
        self._attempt()

    def within(self, delay: float) -> None:
        """Make the next attempt no later than `delay` seconds from now (while waiting to retry)."""
        timer = self._timer
        if timer is not None and timer.active() and timer.getTime() - self.clock.seconds() > delay:
            timer.reset(delay)

    def _attempt(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.connecting = d = self.endpoint.connect(self.factory)
        d.addCallbacks(self._made, self._not_made)

    def _made(self, protocol: Any) -> None:
        self.connecting = None
        self._failures = 0
        self.protocol = protocol

    def _not_made(self, failure: Failure) -> None:
        self.connecting = None
        if self._stopped:
            return
        self._failures += 1
        self._later()
        self.failed(failure)

    def lost(self, protocol: Any) -> None:
        """The connection `protocol` had is gone (its connectionLost)."""
        if protocol is not self.protocol:
            return
        self.protocol = None
        waiting, self._on_lost = self._on_lost, []
        for d in waiting:
            d.callback(None)
        if not self._stopped:
            self._later()

    def _later(self) -> None:
        delay = min(self.max_delay, RETRY_FIRST_DELAY * 2 ** max(self._failures - 1, 0)) + _jitter()
        self._timer = self.clock.callLater(delay, self._attempt)

    def stop(self) -> Deferred:
        """No more attempts; close the connection. Fires once it is closed."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.connecting is not None:
            self.connecting.cancel()
        if self.protocol is None or self.protocol.transport is None:
            return succeed(None)
        d: Deferred = Deferred()
        self._on_lost.append(d)
        self.protocol.transport.loseConnection()
        return d


def _jitter() -> float:
    """Up to 0.2 s added to each retry delay, so servers restarted together do not knock in step."""
    return random.random() * 0.2
