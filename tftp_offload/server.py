"""The Twisted driver: requests in on the listening ports, one session per transfer.

Everything protocol-shaped is decided elsewhere (`packets`, `options`,
`engine`); this module only moves datagrams, time and Deferreds between them,
the backend and the reactor. The chain for one request:

    RRQ decoded -> duplicate / capacity checks -> backend.get_reader (in a
    twisted.python.context with local, remote, mode, options; timed out) ->
    negotiate (tsize from reader.size, blksize clamped to the path MTU) ->
    a UDP port of its own, bound to the address the RRQ was sent to ->
    the engine runs -> reader.finish() -> one log line with the outcome.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple, Union, cast

from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python import context
from twisted.python.failure import Failure

from . import logs
from .config import LOOKUP_TIMEOUT, ServerConfig  # noqa: F401  (LOOKUP_TIMEOUT: backends/legacy.py imports it from here)
from .engine import Outcome, ReadTransfer
from .errors import error_for
from .guard import Guard
from .interfaces import IBackend
from .mux import ListenerTransfer, PortsExhausted, TransferSocket, TransferSockets
from .options import negotiate
from .packets import (
    ErrorCode,
    MalformedPacket,
    Opcode,
    Request,
    decode,
    encode_error,
)
from .readers import NetasciiReader
from .stats import Stats, report_outcome
from .udp import Address, RequestPort, is_ipv6, path_mtu, plain_host

log = Logger(namespace="tftp_offload")

DUPLICATE_WINDOW = 2.0
"""Seconds during which an identical RRQ from the same (address, port) is a retransmission.

PXE ROMs resend an RRQ within milliseconds and race the duplicates; a
second transfer would make two sessions fight over one client port."""

UNKNOWN_TID = encode_error(ErrorCode.UNKNOWN_TID, "Unknown transfer ID")
WRITE_REFUSED = encode_error(ErrorCode.ACCESS_VIOLATION, "Write requests are not supported: this server is read-only")

MTU_CACHE_SIZE = 4096

REMEMBER_COMPLETED = 5.0
"""Seconds a completed transfer's request is kept to recognise a duplicate read after it ended."""
MAX_REMEMBERED = 100_000
"""Completed transfers remembered at most (a few MB at worst)."""


_PER_CLIENT = {
    "client-busy": "it has {sessions} transfers running (--max-sessions-per-client)",
    "rate-limited": "too many requests a second from it (--max-requests-per-second-per-client)",
}


class TFTPServer:
    """What all listening ports share: the backend, the limits and the table of sessions."""

    def __init__(self, backend: IBackend, config: ServerConfig = ServerConfig(), reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.backend = backend
        self.config = config
        self.limits = config.limits
        self.max_sessions = config.max_sessions
        self.lookup_timeout = config.lookup_timeout
        self.reactor = reactor
        self.sessions: Dict[Address, Session] = {}
        self._mtus: Dict[Tuple[str, str], Optional[int]] = {}
        self.guard = Guard(config.guard, reactor)
        """Per-client limits, the --allow list, and the budgets for ERROR replies and refusal log lines."""
        self._full = False
        """Whether --max-sessions was reached (logged once, until a session ends)."""
        self._dropped = 0
        """Requests dropped since it was."""
        self.accepting = True
        self._drained: Optional[Deferred] = None
        self._completed: Dict[Address, Tuple[bytes, float]] = {}
        self.quiet = config.quiet
        """Log only transfers that did not complete (a boot storm's worth of lines costs CPU)."""
        self.log_starts = config.log_starts
        """Also log a transfer-start event per transfer (on with --log-format json; the text end line says it all)."""
        self.stats = Stats()
        self.transfers = TransferSockets(reactor, config.port_range)
        """Every transfer's socket, read through one reactor reader."""
        self.single_port = config.single_port
        """Serve every transfer from the listening port, told apart by the client's address."""

    # -- requests ---------------------------------------------------------------------------

    def request_received(self, listener: RequestPort, data: bytes, wire_client: Address, local: str,
                         arrived: float) -> None:
        """A datagram on a listening port.

        `wire_client` is the address as the socket saw it; `arrived` the kernel's
        receive time (time.time() scale), which tells a duplicate that arrived
        while its transfer still ran from a new request made after it ended.
        """
        if not self.accepting:
            self.stats.refuse("draining")
            return  # draining: nothing new is taken
        client = (plain_host(wire_client[0]), wire_client[1])
        guard = self.guard
        if not guard.permitted(client[0]):
            if guard.may_log(self.reactor.seconds()):
                log.info("Ignored a datagram from {client}: not on an --allow network", client=logs.address(*client),
                         event="dropped", reason="not-allowed")
            self.stats.refuse("not-allowed")
            return
        local = plain_host(local)
        if self.single_port and data[:2] not in (b"\0\1", b"\0\2") and self._for_transfer(
                listener, data, client, wire_client, local, arrived):
            return
        try:
            packet = decode(data)
        except MalformedPacket as e:
            is_request = data[:2] in (b"\0\1", b"\0\2")
            if guard.may_log(self.reactor.seconds()):
                log.info("Malformed datagram from {client}: {reason}", client=logs.address(*client),
                         reason=str(e), event="malformed", outcome=logs.REFUSED if is_request else None)
            refusal = encode_error(ErrorCode.ILLEGAL_OPERATION, f"Malformed request: {e}") if is_request else b""
            if is_request and guard.may_reply(self.reactor.seconds(), len(refusal), len(data)):
                # Someone meant to ask for a file: tell them why not (within a budget where the
                # ERROR is larger than the malformed request: no amplifier for spoofers).
                listener.reply(refusal, wire_client, local)
                self.stats.error_sent(ErrorCode.ILLEGAL_OPERATION)
            self.stats.refuse("malformed")
            return
        if not isinstance(packet, Request):
            # An ACK or ERROR here is the normal aftermath of an ERROR sent from this port (tftp-hpa
            # acknowledges a refusal): not worth a line. Anything else is odd.
            if data[1] not in (Opcode.ACK, Opcode.ERROR) and guard.may_log(self.reactor.seconds()):
                log.info("Ignored {opcode} from {client} on the request port", client=logs.address(*client),
                         opcode=Opcode(data[1]).name, event="ignored")
            self.stats.refuse("not-request")
            return
        if packet.opcode == Opcode.WRQ:
            if guard.may_log(self.reactor.seconds()):
                log.info("refused write request for {file} from {client}: this server is read-only",
                         client=logs.address(*client), file=logs.filename(packet.filename), event="write-request",
                         outcome=logs.REFUSED, error_code=int(ErrorCode.ACCESS_VIOLATION))
            if guard.may_reply(self.reactor.seconds(), len(WRITE_REFUSED), len(data)):
                listener.reply(WRITE_REFUSED, wire_client, local)
                self.stats.refuse("wrq", ErrorCode.ACCESS_VIOLATION)
            else:
                self.stats.refuse("wrq")
            return
        now = self.reactor.seconds()
        existing = self.sessions.get(client)
        if existing is None:
            done = self._completed.get(client)
            if done is not None and done[0] == data and arrived < done[1]:
                # It arrived while its transfer ran (the reactor just handled the final ACK first):
                # a small file is often sent and ACKed before the ROM's duplicate RRQ is read.
                return
        else:
            if existing.raw == data and now - existing.started < DUPLICATE_WINDOW:
                # The UEFI size probe's ERROR 8 may wait, unread, at the transfer port while its
                # follow-up (this same request) is read here: handle it first, then judge.
                existing.catch_up()
            if existing.outcome == Outcome.COMPLETE and existing.raw == data \
                    and arrived < (existing.last_arrival or arrived + 1):
                return  # its final ACK was waiting too: a duplicate of a transfer now complete
            if existing.outcome is None:
                if existing.raw == data and now - existing.started < DUPLICATE_WINDOW:
                    return  # a ROM's retransmission: its transfer runs
                # The client has moved on (a restart, another file): so do we.
                existing.close(Outcome.ABORTED)
        refused = guard.admit(client[0], now)
        if refused is not None:
            if guard.may_log(now):
                log.info("Dropped request for {file} from {client}: {why}; the client will retry",
                         client=logs.address(*client), file=logs.filename(packet.filename), event="dropped",
                         reason=refused, why=_PER_CLIENT[refused].format(sessions=guard.sessions_of(client[0])))
            self.stats.refuse("limit")
            return
        if len(self.sessions) >= self.max_sessions:
            self._dropped += 1
            if not self._full:
                # Once when it fills, not per request (a storm would write a line per retry), and within
                # the log budget (a server at its limit fills and frees a slot many times a second).
                self._full = True
                self._dropped = 1
                if guard.may_log(now):
                    log.warn("Dropping requests: {sessions} transfers running (--max-sessions); clients "
                             "will retry, and are served as transfers end", sessions=len(self.sessions),
                             client=logs.address(*client), event="dropped", reason="capacity")
            self.stats.refuse("capacity")
            return
        if self.transfers.exhausted():
            self.ports_exhausted(packet.filename, client, now)
            return
        session = Session(self, packet, data, client, wire_client, local, listener, now)
        self.sessions[client] = session
        guard.opened(client[0])
        session.lookup()

    def _for_transfer(self, listener: RequestPort, data: bytes, client: Address, wire_client: Address, local: str,
                      arrived: float) -> bool:
        """--single-port: a datagram that is not a request goes to the client's transfer, if it has one.

        An ACK that belongs to no transfer gets ERROR 5 (RFC 1350's unknown
        transfer ID), unless it is the client whose transfer just completed
        (a repeated final ACK). Anything else takes the listener's usual path.
        """
        session = self.sessions.get(client)
        port = session._port if session is not None else None
        if isinstance(port, ListenerTransfer):
            port.arrived = arrived
            session.datagramReceived(data, client)  # type: ignore[union-attr]
            return True
        if data[:2] == b"\0\4" and client not in self._completed:
            if self.guard.may_reply(self.reactor.seconds(), len(UNKNOWN_TID), len(data)):
                listener.reply(UNKNOWN_TID, wire_client, local)
                self.stats.error_sent(ErrorCode.UNKNOWN_TID)
            self.stats.refuse("stranger")
            return True
        return False

    def ports_exhausted(self, filename: bytes, client: Address, now: float) -> None:
        self.stats.refuse("capacity")
        if self.guard.may_log(now):
            log.warn("Dropped request for {file} from {client}: every port of --port-range is in use; "
                     "the client will retry", client=logs.address(*client), file=logs.filename(filename),
                     event="dropped", reason="port-range")

    def path_mtu(self, local: str, peer: str) -> Optional[int]:
        key = (local, peer)
        try:
            return self._mtus[key]
        except KeyError:
            pass
        if len(self._mtus) >= MTU_CACHE_SIZE:
            self._mtus.clear()
        mtu = self._mtus[key] = path_mtu(local, peer)  # a link-local local keeps its %scope
        return mtu

    def forget(self, session: "Session") -> None:
        if self.sessions.get(session.client) is session:
            del self.sessions[session.client]
            self.guard.closed(session.client[0])
            if self._full:
                self._full = False
                if self.guard.may_log(self.reactor.seconds()):
                    log.info("Accepting requests again after dropping {dropped} (--max-sessions {limit})",
                             dropped=self._dropped, limit=self.max_sessions, event="accepting")
        if session.outcome == Outcome.COMPLETE:
            self._remember_completed(session, session.last_arrival or time.time())
        self._check_drained()

    def _remember_completed(self, session: "Session", ended: float) -> None:
        """Keep (request, final ACK's arrival) of a completed transfer a moment, to spot late duplicates.

        Only completed ones: after a client's ERROR (the UEFI size probe) the
        same request again is a new one and must be served. A request that
        arrived after the final ACK is new too (the client had its file: it
        reuses its port for another request), which the kernel's arrival times
        tell apart, whatever order the reactor read the two sockets in; the
        memory only needs to outlast the reactor's backlog.
        """
        completed = self._completed
        completed.pop(session.client, None)
        completed[session.client] = (session.raw, ended)
        horizon = ended - REMEMBER_COMPLETED
        while completed:  # oldest first (dicts keep insertion order)
            oldest = next(iter(completed))
            if completed[oldest][1] >= horizon and len(completed) <= MAX_REMEMBERED:
                break
            del completed[oldest]

    def drain(self, grace: float) -> Deferred:
        """Take no new requests, give running transfers `grace` seconds to end, then abort the rest.

        Requests still waiting for the backend are waited for too: the backend
        may be making a file for them (an ephemeral one that only finishing its
        reader removes), and an answer within the grace is served. Every
        session, however it ends, finishes its reader, which is where
        ephemeral files are removed. Fires when no session is left.
        """
        self.accepting = False
        drained = self._drained = Deferred()
        if not self.sessions:
            self._check_drained()
            return drained
        if grace > 0:
            log.info("Letting {count} transfers finish (up to {grace}s)", count=len(self.sessions), grace=grace)
        timer = self.reactor.callLater(grace, self.abort_all)
        drained.addBoth(lambda result: timer.cancel() if timer.active() else None)
        return drained

    def abort_all(self) -> None:
        for session in list(self.sessions.values()):
            session.close(Outcome.ABORTED, "Server shutting down")
        self._check_drained()

    def _check_drained(self) -> None:
        """Fire the Deferred `drain()` returned once the last session is gone."""
        if self._drained is not None and not self.sessions:
            drained, self._drained = self._drained, None
            self.guard.stop()
            drained.callback(None)


class ListenerProtocol(DatagramProtocol):
    """The protocol of one listening port; all of them hand requests to one `TFTPServer`."""

    noisy = False

    def __init__(self, server: TFTPServer) -> None:
        self.server = server

    def requestReceived(self, data: bytes, client: Address, local: str, arrived: float) -> None:
        self.server.request_received(cast(RequestPort, self.transport), data, client, local, arrived)


class Session(DatagramProtocol):
    """One RRQ, from the backend lookup to the end of its transfer."""

    noisy = False

    def __init__(self, server: TFTPServer, request: Request, raw: bytes, client: Address,
                 wire_client: Address, local: str, listener: RequestPort, now: float) -> None:
        self.server = server
        self.request = request
        self.raw = raw
        self.client = client
        self.wire_client = wire_client
        self.local = local
        self.listener = listener
        self.started = now
        self.local_port = 0
        self.size: Optional[int] = None
        """The reader's size, once the backend has answered (None for a stream of unknown length)."""
        self.engine: Optional[ReadTransfer] = None
        self.reader: Any = None
        self._backend_reader: Any = None
        self.last_arrival: Optional[float] = None
        """Kernel arrival time of the final ACK of a completed transfer."""
        self.outcome: Optional[str] = None
        self._error: Optional[Tuple[int, str, str]] = None
        """(code, message, "server") of an ERROR we sent, for the log."""
        self._timer: Optional[IDelayedCall] = None
        self._armed = 0.0
        """When the transfer's timer is set to fire (compared with the engine's deadline)."""
        self._reading = False
        self._port: Union[TransferSocket, ListenerTransfer, None] = None
        self.sent = 0
        """Datagrams sent to the client on the transfer port."""
        self.first_sent: Optional[float] = None
        self.answered_at: Optional[float] = None

    # -- phase 1: ask the backend -------------------------------------------------------------

    def lookup(self) -> None:
        request = self.request
        self.local_port = self.listener.getHost().port  # once: the listener may be closed when we log the end
        ctx = {
            "local": (self.local, self.local_port),
            "remote": self.client,
            "mode": request.mode,
            "options": dict(request.options),
        }
        try:
            result = context.call(ctx, self.server.backend.get_reader, request.filename)
        except Exception:
            self._lookup_failed(Failure())
            return
        if isinstance(result, Deferred):
            # A timer of our own, not result.addTimeout(): cancelling a Deferred that cannot really
            # be cancelled (deferToThread's) drops the reader it produces later, unfinished. Left
            # to fire, a late reader reaches _got_reader, which finishes it.
            self._timer = self.server.reactor.callLater(self.server.lookup_timeout, self._lookup_timed_out)
            result.addCallbacks(self._got_reader, self._lookup_failed)
        else:
            self._got_reader(result)

    def _reply_error(self, code: int, message: str) -> None:
        """An ERROR before the transfer has a port of its own: from the listener, from the RRQ's address.

        Within the listeners' one reply budget (`Guard.may_reply`), like every ERROR sent from there.
        """
        error = encode_error(code, message)
        if self.server.guard.may_reply(self.server.reactor.seconds(), len(error), len(self.raw)):
            self.listener.reply(error, self.wire_client, self.local)
            self.server.stats.error_sent(code)

    def _lookup_timed_out(self) -> None:
        self._timer = None
        if self.outcome is None:
            self._lookup_failed(Failure(DeferredTimeout(self.server.lookup_timeout, "backend lookup")))

    def _lookup_failed(self, failure: Failure) -> None:
        if self.outcome is not None:
            return
        code: int
        if failure.check(DeferredTimeout):
            code, message, expected = ErrorCode.NOT_DEFINED, "Backend did not answer in time", True
        else:
            code, message, expected = error_for(failure.value)
        if not expected:
            log.failure("Backend failed on {file} for {client}", failure=failure,
                        file=logs.filename(self.request.filename), client=logs.address(*self.client),
                        event="backend-error")
        self.server.stats.lookup_failed(self, self.server.reactor.seconds())
        self._reply_error(code, message)
        self._error = (int(code), message, "server")
        self._end(logs.REFUSED)

    def _got_reader(self, reader: Any) -> None:
        if self.outcome is not None:  # closed (or timed out) while the backend was thinking
            _finish_reader(reader)
            return
        if self._timer is not None:
            self._timer.cancel()  # the lookup's
            self._timer = None
        request = self.request
        self._backend_reader = reader
        self.server.stats.answered(self, reader, self.server.reactor.seconds())
        self.reader = reader = NetasciiReader(reader) if request.mode == "netascii" else reader
        try:
            size = self.size = reader.size
            ipv6 = is_ipv6(self.client[0])
            negotiated = negotiate(request.options, request.mode, size, self.server.limits,
                                   self.server.path_mtu(self.local, self.client[0]), ipv6)
            port: Union[TransferSocket, ListenerTransfer]
            if self.server.single_port:
                port = ListenerTransfer(self.listener, self.wire_client, self.local)
            else:
                port = self.server.transfers.open(self.local, self)
        except PortsExhausted:
            self.server.ports_exhausted(request.filename, self.client, self.server.reactor.seconds())
            self._end(Outcome.REFUSED)
            return
        except Exception:
            log.failure("Could not start a transfer of {file} to {client}", file=logs.filename(request.filename),
                        client=logs.address(*self.client))
            self._reply_error(ErrorCode.NOT_DEFINED, "Internal server error")
            self._error = (int(ErrorCode.NOT_DEFINED), "Internal server error", "server")
            self._end(Outcome.ABORTED)
            return
        self._port = port
        self.engine = engine = ReadTransfer(negotiated, self.server.limits)
        now = self.server.reactor.seconds()
        if self.server.log_starts:
            log.info("Sending {file} to {client}", **self.fields(), event="transfer-start")
        self.server.stats.transfers_started += 1
        self._send(engine.start(now))
        self._pump(now)
        self._arm(now)

    # -- phase 2: the transfer (the hot path) ---------------------------------------------------

    def datagramReceived(self, datagram: bytes, addr: Address) -> None:
        engine = self.engine
        if engine is None or self.outcome is not None:
            return
        if addr != self.client:
            # RFC 1350: answer a stranger with ERROR 5 and carry on with the real peer.
            self._port.send(UNKNOWN_TID, addr)  # type: ignore[union-attr]
            self.server.stats.refuse("stranger", ErrorCode.UNKNOWN_TID)
            return
        now = self.server.reactor.seconds()
        out = engine.datagram(datagram, now)
        if out:
            self._send(out)
        if engine.need and not self._reading:
            self._pump(now)
        if engine.outcome is not None:
            self._end(engine.outcome)
        elif engine.deadline < self._armed:
            self._rearm(now)

    def _rearm(self, now: float) -> None:
        """The deadline moved earlier than the timer (rare: an ACK after a backed-off timeout, a
        shorter learnt timeout, data after a slow read); usually it moves later, and the timer,
        firing early, follows it."""
        self._timer.cancel()  # type: ignore[union-attr]
        self._arm(now)

    def _arm(self, now: float) -> None:
        """Set the transfer's one timer for the engine's deadline (cancel and callLater: moving a
        DelayedCall sooner searches the reactor's whole heap)."""
        deadline = self.engine.deadline  # type: ignore[union-attr]
        self._armed = deadline
        self._timer = self.server.reactor.callLater(max(deadline - now, 0), self._timed_out)

    def _send(self, datagrams: List[bytes]) -> None:
        if self.first_sent is None and datagrams:  # metrics: RRQ to first datagram
            self.first_sent = self.server.reactor.seconds()
        self.sent += len(datagrams)
        self._port.send_all(datagrams, self.client)  # type: ignore[union-attr]

    def _pump(self, now: float) -> None:
        """Feed the engine what it needs; synchronous readers loop here, Deferred ones call back."""
        engine = self.engine
        assert engine is not None
        while engine.need and self.outcome is None:
            try:
                chunk = self.reader.read(engine.need)
            except Exception:
                self._read_failed(Failure())
                return
            if chunk.__class__ is not bytes and isinstance(chunk, Deferred):  # cheap test first
                self._reading = True
                chunk.addCallbacks(self._read_done, self._read_failed)
                return
            if not self._feed(chunk, now):
                return

    def _feed(self, chunk: bytes, now: float) -> bool:
        engine = self.engine
        assert engine is not None
        if len(chunk) > engine.need:
            self._read_failed(Failure(ValueError(f"reader returned {len(chunk)} bytes for {engine.need}")))
            return False
        self._send(engine.data(chunk, now))
        return True

    def _read_done(self, chunk: bytes) -> None:
        self._reading = False
        if self.outcome is None and self.engine is not None:
            now = self.server.reactor.seconds()
            if self._feed(chunk, now):
                self._pump(now)
            if self.outcome is None and self.engine.deadline < self._armed:
                self._rearm(now)

    def _read_failed(self, failure: Failure) -> None:
        self._reading = False
        if self.outcome is not None:
            return
        log.failure("Reading {file} for {client} failed", failure=failure, file=logs.filename(self.request.filename),
                    client=logs.address(*self.client))
        self.close(Outcome.ABORTED, "Error reading the file")

    def _timed_out(self) -> None:
        self._timer = None
        engine = self.engine
        if engine is None or self.outcome is not None:
            return
        now = self.server.reactor.seconds()
        out = engine.timer(now)
        if out:
            self._send(out)
        if engine.outcome is not None:
            self._end(engine.outcome)
        else:
            self._arm(now)

    # -- the end ----------------------------------------------------------------------------

    def close(self, outcome: Outcome, message: Optional[str] = None) -> None:
        """End from our side; `message`, if given, is sent to the client as ERROR 0."""
        if self.outcome is not None:
            return
        if message is not None:
            self._error = (int(ErrorCode.NOT_DEFINED), message, "server")
            if self.engine is not None:
                self._send(self.engine.abort(message))
                self.server.stats.error_sent(ErrorCode.NOT_DEFINED)
            else:
                self._reply_error(ErrorCode.NOT_DEFINED, message)
        # A lookup still running is left to finish: _got_reader finishes a late reader, and
        # _lookup_failed sees the outcome and stays quiet.
        self._end(outcome)

    def _end(self, outcome: Outcome) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._port is not None:
            if outcome == Outcome.COMPLETE:
                self.last_arrival = self._port.last_arrival()
            self._port.stopListening()
            self._port = None  # the port keeps us as its protocol: no cycle, so both are freed at once
        report = self.report() if self.engine is not None else None
        if report is None:  # refused before a transfer began: the end event still says how it went
            report = {"outcome": outcome, "bytes": 0, "duration": self.server.reactor.seconds() - self.started,
                      "retransmits": 0, "client_error": None}
        if self.reader is not None:
            # A reader that wants to know how it went (the AMP backend tells its peer) says so
            # with transfer_finished(); it is told before finish() releases it.
            told = getattr(self._backend_reader, "transfer_finished", None)
            if told is not None and self.engine is not None:
                try:
                    told({**report, "outcome": report_outcome(outcome)})  # documented values only
                except Exception:
                    log.failure("reader.transfer_finished() failed")
            _finish_reader(self.reader)
        if self.engine is None and not self.server.guard.may_log(self.server.reactor.seconds()):
            pass  # a refusal before any transfer: its line is within the log budget (a flood is not a log)
        elif not (self.server.quiet and self._shown_outcome(report) in (logs.COMPLETE, logs.PROBE)):
            fields = self.fields(report)
            log.info("{log_text}", log_text=logs.end_text(fields), **fields, event="transfer-end")
        if self.engine is not None:
            self.server.stats.transfer_ended(self, self.server.reactor.seconds())
        # Last: forgetting the last session fires drain()'s Deferred, by which time the reader
        # must be finished (ephemeral files removed, the backend told).
        self.server.forget(self)

    def catch_up(self) -> None:
        """Handle the datagrams already waiting at the transfer port, now rather than at the reactor's next turn."""
        port = self._port
        if not isinstance(port, TransferSocket):
            return  # none yet, or --single-port: what the client sent since is read in order behind this request
        for _ in range(64):  # a window's worth of ACKs at most: this is not the hot path
            if self.outcome is not None or not port.read_one():
                return

    def fields(self, report: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The structured fields of this request's log events: plain strings and numbers (docs/operations.md)."""
        request, engine = self.request, self.engine
        size = self.size
        fields: Dict[str, Any] = {
            "client": logs.address(*self.client),
            "client_host": self.client[0],
            "client_port": self.client[1],
            "local": self.local,
            "local_port": self.local_port,
            "file": logs.filename(request.filename),
            "kind": getattr(self._backend_reader, "kind", None) or None,
            "size": size if isinstance(size, int) else None,
            "blksize": engine.blksize if engine is not None else None,
            "windowsize": engine.windowsize if engine is not None else None,
        }
        if report is None:
            return fields
        code, message = logs.client_error(report["client_error"]) if report["client_error"] else (None, None)
        by = "client" if code is not None or message is not None else None
        if by is None and self._error is not None:
            code, message, by = self._error
        fields.update(outcome=self._shown_outcome(report), bytes=report["bytes"], duration=round(report["duration"], 6),
                      retransmits=report["retransmits"], error_code=code, error_message=message, error_by=by)
        return fields

    def _shown_outcome(self, report: Dict[str, Any]) -> str:
        outcome = report["outcome"]
        return str(getattr(outcome, "value", outcome))  # the plain string: a str Enum hashes by name

    def report(self) -> Dict[str, Any]:
        """How the transfer went: the fields of its log line and of the backend's report."""
        engine = self.engine
        assert engine is not None
        return {
            "outcome": self.outcome,
            "file": self.request.filename,
            "client": self.client,
            "local": self.local,
            "bytes": engine.bytes_acked,
            "duration": self.server.reactor.seconds() - self.started,
            "blksize": engine.blksize,
            "windowsize": engine.windowsize,
            "retransmits": engine.retransmits,
            "client_error": engine.client_error,
        }


def _finish_reader(reader: Any) -> None:
    try:
        reader.finish()
    except Exception:
        log.failure("reader.finish() failed")
