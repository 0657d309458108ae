"""Ask a backend process what each RRQ gets, over the offload protocol (AMP on a UNIX socket).

`twistd tftp-offload --socket PATH` uses this. One persistent connection
(`connection.Connector`) carries every lookup (many in flight); it is made with
backoff, so the server may start before the backend, and remade after the
backend restarts, with lookups that were cut off resent on the new connection
while their time lasts.

Lookups that ask the same thing share one backend call (a `Question`), and an
answer is reused for a few seconds (`cache.AnswerCache`), so a ROM's
retransmitted RRQs and a UEFI size probe followed by the real RRQ cost one
lookup. A backend whose answers depend on the client's port or options can say
`max_age` 0 (never reused nor shared). Each caller gets a reader of its own
(`answers`); each waits at most `timeout` (`lookup.BoundedLookup`).
"""

from __future__ import annotations

import os
import stat
import time
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectionClosed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..backends.outage import Outage, explain
from ..config import LOOKUP_TIMEOUT
from ..context import RequestContext
from ..errors import BackendError, TFTPError, Unsupported
from ..interfaces import IBackend
from . import commands
from .answers import answer_from
from .cache import CACHE_TTL, AnswerCache, Key
from .connection import RETRY_MAX_DELAY, ClientFactory, ClientProtocol, Connector
from .questions import UNAVAILABLE, Question, Reported, Request, Waiter
from .streams import StreamSource, log_bug

log = Logger(namespace="tftp_offload.amp")

NUDGE_INTERVAL = 0.1
"""While the backend is down, a request may try a connection at once, at most this often: a backend that
is back is found by the next request, a flood of requests does not become a flood of attempts."""

STOP_GRACE = 3600.0
"""On stop, seconds to wait for stream readers (running transfers) before closing the connection. In
practice the TFTP service's drain timeout ends them sooner."""

_NOWHERE = RequestContext(("", 0), ("", 0))
"""The context of a lookup made outside a TFTP request (a backend called directly)."""


@implementer(IBackend)
class AMPBackend(Service):
    """The TFTP server's backend when another process decides: `twistd tftp-offload --socket PATH`.

    A service: while running it keeps one connection to the backend listening on
    `socket_path` (reconnecting with backoff). `timeout` bounds each lookup: then the
    client gets TFTP error 0 "Backend did not answer in time" (or "Backend unavailable"
    when there was no connection to ask on) and the listener carries on.
    """

    def __init__(self, socket_path: str, timeout: float = LOOKUP_TIMEOUT, reactor: Any = None,
                 cache_ttl: float = CACHE_TTL, retry_max_delay: float = RETRY_MAX_DELAY) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.socket_path = socket_path
        self.timeout = timeout
        self.reactor = reactor
        self.cache_ttl = cache_ttl
        self.retry_max_delay = retry_max_delay
        self.stats: Dict[str, int] = dict.fromkeys(
            ("lookups", "answers", "coalesced", "cache_hits", "errors", "resent", "reports", "connections"), 0)
        """Counters, for tests and the operator's curiosity: lookups sent, and how many were saved."""
        self._protocol: Optional[ClientProtocol] = None
        self._connector: Optional[Connector] = None
        self._inflight: Dict[Key, Question] = {}
        self._queued: List[Question] = []
        self._cache = AnswerCache(reactor)
        self._request_ids = 0
        self._open_streams = 0
        self._streams_closed: List[Deferred] = []
        self._awaiting = 0
        """ReadRequests sent and not yet answered: stopping waits for them (their files must go)."""
        self._answers_in: List[Deferred] = []
        self._last_error = "not connected yet"
        self._last_failure = -NUDGE_INTERVAL
        self._last_failure_wall = 0.0
        self.outage = Outage(log, "the backend", socket_path, reactor)

    # -- IService --------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        endpoint = UNIXClientEndpoint(self.reactor, self.socket_path, timeout=self.timeout)
        factory = ClientFactory(self.socket_path, self._connected, self._greeting_refused, self._lost)
        self._connector = Connector(endpoint, factory, self.reactor, self.retry_max_delay, self._connect_failed)
        log.info("Asking the backend at {path} what to serve", path=self.socket_path)
        self._connector.start()

    def stopService(self) -> Deferred:
        """Refuse new lookups now; close the connection once no transfer is still pulling a stream and
        the answers still on their way have come (at most `timeout`): a late ephemeral file is deleted,
        a late descriptor closed."""
        super().stopService()
        shutting = Failure(BackendError("Server shutting down"))
        for question in [*self._inflight.values(), *self._queued]:
            for waiter in question.take_waiters():
                waiter.fail(shutting)
        self._inflight.clear()
        self._queued.clear()
        self._cache.clear()
        waits: List[Deferred] = []
        if self._open_streams:
            streams: Deferred = Deferred()
            self._streams_closed.append(streams)
            timer = self.reactor.callLater(STOP_GRACE, self._stream_closed, force=True)
            streams.addBoth(_cancel_timer, timer)
            waits.append(streams)
        if self._awaiting:
            answers: Deferred = Deferred()
            self._answers_in.append(answers)
            timer = self.reactor.callLater(self.timeout, self._answer_in, force=True)
            answers.addBoth(_cancel_timer, timer)
            waits.append(answers)
        done: Deferred = DeferredList(waits) if waits else succeed(None)
        connector = self._connector  # kept: it hears of the connection's end through _lost
        if connector is not None:
            done.addCallback(lambda _: connector.stop())
        return done

    def _answer_in(self, force: bool = False) -> None:
        if not force:
            self._awaiting -= 1
        if self._awaiting <= 0 or force:
            waiting, self._answers_in = self._answers_in, []
            for d in waiting:
                if not d.called:
                    d.callback(None)

    # -- IBackend ---------------------------------------------------------------------------

    def get_reader(self, file_name: bytes) -> Union[Any, Deferred]:
        if not self.running:
            raise BackendError("Backend connection is not running")
        request = Request(file_name, RequestContext.current() or _NOWHERE)
        key = request.key
        cached = self._cache.get(key)
        if cached is not None:
            answer, request_id = cached
            reader = answer.new_reader()  # a path answer may raise FileNotFound here: the caller's answer
            if reader is not None:
                self.stats["cache_hits"] += 1
                return self._reported(reader, request, request_id, answer.kind)
        fail_fast = self._protocol is None and self.outage.down
        if fail_fast and self._connector is not None and self._connector.connecting is None:
            if self.reactor.seconds() - self._last_failure < NUDGE_INTERVAL and not self._socket_is_new():
                self.outage.refused += 1  # known down a moment ago: say so now, not after the timeout
                self._connector.within(NUDGE_INTERVAL)  # and have the next attempt soon: it is wanted
                raise BackendError(UNAVAILABLE)
            self._connector.now()  # it may be back: the attempt decides (on a UNIX socket, within a ms)
        waiter = Waiter(self, request, fail_fast)
        question = self._inflight.get(key)
        if question is not None:
            self.stats["coalesced"] += 1
            question.add(waiter)
        else:
            self._start(Question(request, True, self._abandon), [waiter])
        return waiter.deferred

    def get_writer(self, file_name: bytes) -> None:
        raise Unsupported("Write requests are not supported")

    # -- questions --------------------------------------------------------------------------

    def _start(self, question: Question, waiters: List[Waiter]) -> None:
        for waiter in waiters:
            question.add(waiter)
        if question.key is not None:
            self._inflight[question.key] = question
        protocol = self._protocol
        if protocol is None:
            self._queued.append(question)
        else:
            self._send(question, protocol)

    def _abandon(self, question: Question) -> None:
        if question.key is not None and self._inflight.get(question.key) is question:
            del self._inflight[question.key]
        if question in self._queued:
            self._queued.remove(question)

    def _send(self, question: Question, protocol: ClientProtocol) -> None:
        self._request_ids += 1
        question.request_id = request_id = self._request_ids
        request = question.request
        self.stats["lookups"] += 1
        try:
            d = protocol.callRemote(
                commands.ReadRequest, request_id=request_id, local_ip=request.local[0], local_port=request.local[1],
                remote_ip=request.remote[0], remote_port=request.remote[1], filename=request.filename,
                mode=request.mode, options=[{"name": k, "value": v} for k, v in request.options.items()])
        except Exception:  # amp.TooLong for an absurd filename or option list, mostly
            self._failed(Failure(), question, protocol)
            return
        self._awaiting += 1
        d.addBoth(_passing, self._answer_in)
        d.addCallbacks(self._answered, self._failed, (question, protocol), None, (question, protocol))
        d.addErrback(log_bug, "a backend answer")

    def _answered(self, response: Dict[str, Any], question: Question, protocol: ClientProtocol) -> None:
        if question.key is not None and self._inflight.get(question.key) is question:
            del self._inflight[question.key]
        self.stats["answers"] += 1
        try:
            answer = answer_from(response, self.socket_path, partial(self._open_stream, protocol), protocol.claim)
        except Exception:
            self._failed(Failure(), question, protocol)
            return
        max_age = response.get("max_age")
        shared = max_age is None or max_age > 0
        ttl = self.cache_ttl if max_age is None else min(self.cache_ttl, max_age)
        cached = ttl > 0 and question.key is not None and self.running
        if cached:  # before any waiter runs on: what it does next may already ask again
            self._cache.put(question.key, answer, ttl, question.request_id or 0)  # type: ignore[arg-type]
        given: List[Tuple[Waiter, Any]] = []
        alone: List[Waiter] = []
        for waiter in question.take_waiters():
            if given and not shared:
                alone.append(waiter)
                continue
            try:
                reader = answer.new_reader()
            except Exception:
                given.append((waiter, Failure()))
                continue
            if reader is None:  # a stream already has its reader: this caller needs a stream of its own
                alone.append(waiter)
            else:
                given.append((waiter, self._reported(reader, waiter.request, question.request_id or 0, answer.kind)))
        if not cached:
            answer.release()  # readers already given keep what they need
        for waiter in alone:
            self._start(Question(waiter.request, False, self._abandon), [waiter])
        for waiter, result in given:
            if isinstance(result, Failure):
                waiter.fail(result)
            else:
                waiter.succeed(result)

    def _failed(self, failure: Failure, question: Question, protocol: ClientProtocol) -> None:
        cut_off = bool(failure.check(ConnectionClosed)) or protocol.gone  # gone: dropped over a protocol error
        if cut_off and question.waiters and self.running:
            # Cut off by a backend restart: ask again on the next connection, while time lasts.
            self.stats["resent"] += 1
            question.request_id = None
            if self._protocol is None:
                self._queued.append(question)
            else:
                self._send(question, self._protocol)
            return
        if question.key is not None and self._inflight.get(question.key) is question:
            del self._inflight[question.key]
        self.stats["errors"] += 1
        if not failure.check(TFTPError):
            if cut_off:
                failure = Failure(BackendError("Lost the connection to the backend"))
            else:
                log.failure("Lookup of {file!r} failed", failure=failure, file=question.request.filename)
                failure = Failure(BackendError("Backend error"))
        for waiter in question.take_waiters():
            waiter.fail(failure)

    # -- the connection ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """A greeted connection to the backend is up (the `tftp_backend_up` metric)."""
        return self._protocol is not None

    def _connected(self, protocol: ClientProtocol, software: Optional[str]) -> None:
        self._protocol = protocol
        self.stats["connections"] += 1
        refused = self.outage.refused
        away = self.outage.back(quiet=True)
        log.info("Connected to the backend at {path} ({software}, protocol {version}){after}", path=self.socket_path,
                 software=software or "unknown software", version=protocol.version,
                 after="" if away is None else f", after {away:.1f} s without it ({refused} requests refused)",
                 )
        queued, self._queued = self._queued, []
        for question in queued:
            if question.waiters:
                self._send(question, protocol)
            else:
                self._abandon(question)

    def _lost(self, protocol: ClientProtocol, reason: Failure) -> None:
        if self._connector is not None:
            self._connector.lost(protocol)
        if self._protocol is not protocol:
            if self.running and protocol.version is None:  # it hung up before settling the greeting
                self._last_failure = self.reactor.seconds()
                self.outage.went(f"the connection closed before the greeting: {reason.getErrorMessage()}")
            return
        self._protocol = None
        self._last_error = f"connection lost: {reason.getErrorMessage()}"
        if self.running:
            self.outage.went(reason.getErrorMessage(),
                             "Lost the connection to {what} at {path}: {reason}; reconnecting")
        else:  # we closed it: shutting down is not news
            log.info("Closed the connection to the backend at {path}", path=self.socket_path)
        # Streams of that connection are gone with it; other answers are local and stay good.
        self._cache.drop_streams()

    def _connect_failed(self, failure: Failure) -> None:
        self._last_error = failure.getErrorMessage()
        self._last_failure = self.reactor.seconds()
        self._last_failure_wall = time.time()
        self.outage.went(explain(self.socket_path, failure))
        # Those who asked while it was known down are told now; earlier ones wait out their timeout.
        for question in list(self._queued):
            for waiter in [w for w in question.waiters if w.fail_fast]:
                question.forget(waiter)
                self.outage.refused += 1
                waiter.fail(Failure(BackendError(UNAVAILABLE)))

    def _socket_is_new(self) -> bool:
        """A socket made since the last failed attempt: a backend just started, worth trying at once."""
        try:
            info = os.stat(self.socket_path)
        except OSError:
            return False
        return stat.S_ISSOCK(info.st_mode) and info.st_ctime >= self._last_failure_wall

    def _greeting_refused(self, reason: str) -> None:
        self._last_error = f"greeting refused: {reason}"
        self._last_failure = self.reactor.seconds()
        self.outage.went(self._last_error)

    def unavailable_reason(self) -> str:
        return self._last_error

    def _stream_closed(self, force: bool = False) -> None:
        if not force:
            self._open_streams -= 1
        if self._open_streams <= 0 or force:
            waiting, self._streams_closed = self._streams_closed, []
            for d in waiting:
                if not d.called:
                    d.callback(None)

    def _open_stream(self, protocol: ClientProtocol, stream_id: int, size: Optional[int], head: bytes) -> StreamSource:
        self._open_streams += 1
        return StreamSource(protocol, stream_id, size, head, self.reactor, self.timeout, self._stream_closed)

    # -- reports ----------------------------------------------------------------------------

    def _reported(self, reader: Any, request: Request, request_id: int, kind: str) -> Reported:
        return Reported(reader, partial(self._report, request, request_id), kind)

    def _report(self, request: Request, request_id: int, report: Dict[str, Any]) -> None:
        protocol = self._protocol
        if protocol is None or commands.TRANSFER_FINISHED not in protocol.capabilities:
            return
        client = report.get("client") or request.remote
        try:
            protocol.callRemote(
                commands.TransferFinished, request_id=request_id, outcome=str(report["outcome"]),
                filename=request.filename, local_ip=request.local[0], local_port=request.local[1],
                remote_ip=str(client[0]), remote_port=int(client[1]), bytes=int(report["bytes"]),
                duration=float(report["duration"]), blksize=int(report["blksize"]),
                windowsize=int(report["windowsize"]), retransmits=int(report["retransmits"]),
                client_error=report.get("client_error"))
        except Exception:
            log.failure("Could not report a transfer to the backend")
            return
        self.stats["reports"] += 1


def _passing(result: Any, call: Any) -> Any:
    call()
    return result


def _cancel_timer(result: Any, timer: Any) -> Any:
    if timer.active():
        timer.cancel()
    return result
