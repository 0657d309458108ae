"""`LegacyBackend`: ask a MAAS 2.2-3.4 rack controller (rackd) what to serve, over its legacy offload socket.

With `tftp_port: 0`, rackd serves no TFTP itself: it listens on a UNIX stream socket
(`/var/lib/maas/tftp-offload.sock`) and answers one request per connection in the format
`legacy_wire` encodes and parses (see docs/legacy.md).

Everything here follows from that format's sharp edges:

- rackd parses a request as soon as it has seen three NULs, so the request
  is written in one `write()` (one `send()`): a `$` arriving later gets a
  closed connection instead of an answer.
- rackd sets no timeout, so every exchange here has one, and it runs on the
  reactor, never blocking other requests.
- The reply is read to EOF and parsed strictly: anything empty, truncated,
  oversized or oddly shaped is a TFTP error 0 for the client and a warning
  with the raw reply for the operator, never a guess.
- An `EPH` file is opened and then unlinked at once, before a single block
  is sent: the open descriptor serves the transfer, and nothing is left
  behind however the transfer ends, even if this process dies.
- rackd writes an `EPH` file before it answers, and nobody but us deletes
  it. So when the timeout fires the client is told at once, but the
  connection stays open `late_grace` seconds more: a late answer is still
  read, and its file deleted. Stopping the service waits for those
  exchanges (each bounded by `timeout + late_grace`), so a lookup in flight
  at shutdown leaves nothing behind either.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Set

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..backends.outage import Outage, explain
from ..config import LOOKUP_TIMEOUT
from ..context import RequestContext
from ..errors import AccessViolation, BackendError, FileNotFound, TFTPError, Unsupported
from ..interfaces import IBackend
from ..readers import FileReader, discard_ephemeral, open_ephemeral, open_regular
from .legacy_wire import (
    MAX_REPLY,
    TERMINATOR,
    ErrorAnswer,
    FileAnswer,
    MalformedReply,
    encode_request,
    error_for_answer,
    parse_reply,
    quote,
)

log = Logger()

LATE_GRACE = 10.0
"""Seconds after the timeout a late answer is still read, so that its ephemeral file is deleted."""

# What the client is told when rackd's answer is unusable; the log line says why in detail.
NO_ANSWER = "Backend did not answer in time"
UNREACHABLE = "Backend unavailable"
INVALID = "Backend sent an invalid answer"


class _Exchange(Protocol):
    """One connection: the request in one write, then everything rackd sends until it closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = bytearray()
        self.oversized = False
        self.finished: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        # One write() is one send() on a fresh connection: rackd sees the whole request at once.
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.oversized:
            return
        self.received += data
        if len(self.received) > MAX_REPLY:
            self.oversized = True
            self.abort()

    def abort(self) -> None:
        """Drop the connection now (no lingering close): rackd gets no say in when we stop."""
        transport: Any = self.transport  # a UNIX socket transport, which has abortConnection()
        if transport is not None:
            transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.finished.callback(bytes(self.received))


class _OneExchange(Factory):
    """Hands the endpoint our one `_Exchange`; quiet, unlike `connectProtocol`'s factory, which logs
    two lines ("Starting factory", "Stopping factory") per request."""

    noisy = False

    def __init__(self, exchange: _Exchange) -> None:
        self.exchange = exchange

    def buildProtocol(self, addr: Any) -> _Exchange:
        return self.exchange


class _Asking:
    """One request to rackd, from connecting to a reader (or an error), bounded by `timeout`.

    `result` is what the server waits for: it fails at `timeout` (the client
    is told at once), but the exchange goes on up to `late_grace` seconds
    more, so that a late answer is still read and its `EPH` file deleted
    (rackd wrote it, and nobody else would). `result` has no canceller on
    purpose: when the server gives up first (its own timeout, the client
    moved on, shutdown), the exchange still runs to its end for the same
    reason. `done` fires when the exchange is over, whatever its outcome.
    """

    def __init__(self, backend: LegacyBackend, file_name: bytes, request: bytes) -> None:
        self.backend = backend
        self.file_name = file_name
        self.result: Deferred[FileReader] = Deferred()
        self.done: Deferred[None] = Deferred()
        self.timed_out = False
        self.closed_by_us: Optional[str] = None
        """Why we closed the connection ourselves, if we did: rackd did not simply close without answering."""
        self.started = backend.reactor.seconds()
        reactor = backend.reactor
        self.exchange = _Exchange(request)
        self.exchange.finished.addCallback(self._replied)
        self.timer: IDelayedCall = reactor.callLater(backend.timeout, self._time_out)
        self.connecting = UNIXClientEndpoint(reactor, backend.socket_path).connect(_OneExchange(self.exchange))
        self.connecting.addErrback(self._not_connected)

    def _time_out(self) -> None:
        self.timed_out = True
        if not self.connecting.called:
            self.connecting.cancel()  # -> _not_connected
            return
        grace = self.backend.late_grace
        log.warn("rackd at {socket} did not answer {name} within {timeout}s{waiting}", socket=self.backend.socket_path,
                 **_names(self.file_name), timeout=self.backend.timeout,
                 waiting=f"; a late answer is still taken for {grace:g}s, and its file deleted" if grace > 0 else "",
                 outcome="backend-timeout")
        self._fail(BackendError(NO_ANSWER))
        if grace > 0:
            self.timer = self.backend.reactor.callLater(grace, self.close, f"no answer within {self.waited()}")
        else:
            self.close(f"no answer within {self.backend.timeout:g}s")

    def waited(self) -> str:
        return f"{self.backend.reactor.seconds() - self.started:.1f}s"

    def close(self, why: str) -> None:
        """Stop waiting: drop the connection now (no lingering close), saying why in the log."""
        if self.closed_by_us is None and not self.exchange.finished.called:
            self.closed_by_us = why
            self.exchange.abort()  # -> _replied, with what came so far

    def _stop_timer(self) -> None:
        if self.timer.active():
            self.timer.cancel()

    def _fail(self, exception: TFTPError) -> None:
        if not self.result.called:  # else the server has already given up (cancelled it) or we timed out
            self.result.errback(exception)

    def _end(self) -> None:
        self.backend.exchange_over(self)
        if not self.done.called:
            self.done.callback(None)

    def _not_connected(self, failure: Failure) -> None:
        self._stop_timer()
        self.backend.note_connection(False)
        try:
            if self.timed_out:
                log.warn("rackd at {socket} did not accept a connection within {timeout}s (request for {name})",
                         socket=self.backend.socket_path, timeout=self.backend.timeout, **_names(self.file_name),
                         outcome="backend-timeout")
                self._fail(BackendError(NO_ANSWER))
                return
            self.backend.unreachable(self.file_name, failure)
            self._fail(BackendError(UNREACHABLE))
        finally:
            self._end()

    def _replied(self, reply: bytes) -> None:
        self._stop_timer()
        self.backend.note_connection(True)
        try:
            self._handle(reply)
        finally:
            self._end()

    def _handle(self, reply: bytes) -> None:
        socket_path = self.backend.socket_path
        late = self.timed_out or self.result.called
        if self.exchange.oversized:
            log.warn("Reply from rackd at {socket} for {name} exceeds {limit} bytes: {reply}", socket=socket_path,
                     **_names(self.file_name), limit=MAX_REPLY, reply=quote(reply), outcome="backend-error")
            self._fail(BackendError(INVALID))
            return
        if self.closed_by_us is not None and not reply.endswith(TERMINATOR):
            # Our doing, not rackd's: say so, not "the connection closed without an answer".
            log.info("Stopped waiting for rackd at {socket} over {name}: {why} (got {reply})", socket=socket_path,
                     **_names(self.file_name), why=self.closed_by_us, reply=quote(reply))
            self._fail(BackendError(NO_ANSWER))
            return
        try:
            answer = parse_reply(reply)
        except MalformedReply as e:
            log.warn("Invalid reply from rackd at {socket} for {name}: {reason}; reply {reply}",
                     socket=socket_path, **_names(self.file_name), reason=str(e), reply=quote(reply),
                     outcome="backend-error")
            self._fail(BackendError(INVALID))
            return
        self.backend.reachable()
        if isinstance(answer, ErrorAnswer):
            log.debug("rackd refused {name}: {code} {message}", **_names(self.file_name), code=answer.code,
                      message=answer.message)
            self._fail(error_for_answer(answer))
            return
        if late:
            # Nobody will serve it: delete what rackd made for us, which nobody else would.
            if answer.ephemeral:
                discard_ephemeral(answer.path)
            log.info("Late answer from rackd for {name} after {waited}{deleted}", **_names(self.file_name),
                     waited=self.waited(), deleted=": its ephemeral file is deleted" if answer.ephemeral else "")
            self._fail(BackendError(NO_ANSWER))
            return
        try:
            reader = open_answer(answer)
        except TFTPError as e:
            self._fail(e)
            return
        self.result.callback(reader)


def _names(file_name: bytes) -> Dict[str, Any]:
    """A filename's log fields: `file` as the client sent it, `name` as an operator writes it (text,
    undecodable bytes escaped), which is what the lines show."""
    return {"file": file_name, "name": file_name.decode("utf-8", "backslashreplace")}


def open_answer(answer: FileAnswer) -> FileReader:
    """A reader for rackd's file; an ephemeral one is unlinked now, whether or not it opens.

    From here on the open descriptor is the file: the transfer reads it while
    no name points at it, so nothing is left to clean up however it ends.
    A file rackd named that cannot be opened is a setup problem, not the
    client's: the client gets the usual error, the operator a warning.
    """
    path = answer.path
    try:
        # rackd's static files are often symlinks (boot-resources/current/...); the ephemeral ones
        # it writes itself, so a symlink there is not one of them.
        fd = open_ephemeral(path) if answer.ephemeral else open_regular(path, follow_symlinks=True)
    except AccessViolation as e:
        log.warn("Cannot serve {path!r} that rackd named: {reason} (this process runs as uid {uid}; to read "
                 "rackd's files it must run as the user rackd runs as, maas)", path=path, reason=str(e),
                 uid=os.geteuid(), outcome="backend-error")
        raise
    except FileNotFound:
        log.warn("rackd named {path!r}, which does not exist", path=path, outcome="backend-error")
        raise
    except OSError as e:
        log.warn("Cannot open {path!r} that rackd named: {error}", path=path, error=e, outcome="backend-error")
        raise BackendError("Backend error: cannot open the file") from None
    reader = FileReader(fd)
    reader.kind = "ephemeral" if answer.ephemeral else "path"
    return reader


@implementer(IBackend)
class LegacyBackend(Service):
    """Asks a MAAS 2.2-3.4 rack controller what to serve, over its legacy offload socket.

    Stateless: one short-lived connection per request, so rackd restarting
    (or not running yet) costs the requests of that moment a TFTP error 0 at
    once, and the next request simply connects again. That it is down is
    logged once, then every minute at most, and once more when it is back.
    The request's addresses come from `twisted.python.context` ("local" and
    "remote", as the server sets them); their ports are not part of the format.

    A service only so that stopping waits for exchanges still running (their
    late answers' files are deleted); `get_reader` works without starting it.
    """

    def __init__(self, socket_path: str, timeout: float = LOOKUP_TIMEOUT, reactor: Any = None,
                 late_grace: float = LATE_GRACE) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.socket_path = socket_path
        self.timeout = timeout
        self.late_grace = late_grace
        self.reactor = reactor
        self.connected: Optional[bool] = None
        """Whether the last request reached rackd (None before the first): one connection per request,
        so this is as near as the legacy format comes to a connection state (`tftp_backend_up`)."""
        self.lookups: Set[_Asking] = set()
        """Exchanges with rackd not yet over."""
        self.outage = Outage(log, "rackd", socket_path, reactor)

    def get_reader(self, file_name: bytes) -> Deferred[FileReader]:
        asked = RequestContext.current()
        if asked is None:
            raise BackendError("Backend error: no request addresses (called outside a TFTP request)")
        request = encode_request(asked.local[0], asked.remote[0], file_name)
        lookup = _Asking(self, file_name, request)
        if not lookup.done.called:
            self.lookups.add(lookup)
        return lookup.result

    def get_writer(self, file_name: bytes) -> None:
        raise Unsupported("Write requests are not supported")

    def stopService(self) -> Deferred:
        """Fires once every exchange still running is over (each ends within `timeout + late_grace`)."""
        super().stopService()
        running = [lookup.done for lookup in self.lookups]
        if not running:
            return succeed(None)
        log.info("Waiting for {count} answers from rackd (at most {seconds:g}s), to delete their files",
                 count=len(running), seconds=self.timeout + self.late_grace)
        return DeferredList(running)

    def note_connection(self, made: bool) -> None:
        """An exchange did (or could not) connect to rackd: what `connected` reports."""
        self.connected = made

    def exchange_over(self, lookup: _Asking) -> None:
        """An exchange is over, whatever its outcome: stopping no longer waits for it."""
        self.lookups.discard(lookup)

    def unreachable(self, file_name: bytes, failure: Failure) -> None:
        """An exchange could not reach rackd: the outage is told (it logs once, then rarely)."""
        self.outage.went(explain(self.socket_path, failure))
        self.outage.refused += 1
        log.debug("Refused {name}: rackd at {socket} is unavailable ({error})", socket=self.socket_path,
                  **_names(file_name), error=failure.getErrorMessage(), outcome="backend-unavailable")

    def reachable(self) -> None:
        """rackd answered in its format: if it was down, it is back."""
        self.outage.back()
