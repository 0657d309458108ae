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

from .engine import Outcome, ReadTransfer
from .errors import error_for
from .interfaces import IBackend
from .mux import ListenerTransfer, PortsExhausted, TransferSocket, TransferSockets
from .options import Limits, negotiate
from .packets import (
    ErrorCode,
    MalformedPacket,
    Opcode,
    Request,
    decode,
    encode_error,
    encode_oack,
)
from .readers import NetasciiReader
from .udp import Address, RequestPort, is_ipv6, path_mtu, plain_host

log = Logger(namespace="tftp_offload")

DUPLICATE_WINDOW = 2.0
"""Seconds during which an identical RRQ from the same (address, port) is a retransmission.

PXE ROMs resend an RRQ within milliseconds and race the duplicates; a
second transfer would make two sessions fight over one client port."""

LOOKUP_TIMEOUT = 4.0
"""Seconds a backend may take to answer; well under a PXE ROM's RRQ retry budget."""

UNKNOWN_TID = encode_error(ErrorCode.UNKNOWN_TID, "Unknown transfer ID")

MTU_CACHE_SIZE = 4096

REFUSALS_PER_SECOND = 100
"""ERROR replies to malformed requests sent at most per second."""

REMEMBER_COMPLETED = 5.0
"""Seconds a completed transfer's request is kept to recognise a duplicate read after it ended."""
MAX_REMEMBERED = 100_000
"""Completed transfers remembered at most (a few MB at worst)."""


class _LogBudget:
    """At most `per_second` events of one kind a second: bad traffic must not flood the log."""

    def __init__(self, per_second: int = 10) -> None:
        self.per_second = per_second
        self._second = 0
        self._count = 0
        self.suppressed = 0

    def allow(self, now: float) -> bool:
        second = int(now)
        if second != self._second:
            self._second, self._count = second, 0
        self._count += 1
        if self._count > self.per_second:
            self.suppressed += 1
            return False
        return True


class TFTPServer:
    """What all listening ports share: the backend, the limits and the table of sessions."""

    def __init__(
        self,
        backend: IBackend,
        limits: Limits = Limits(),
        max_sessions: int = 1000,
        lookup_timeout: float = LOOKUP_TIMEOUT,
        reactor: Any = None,
        quiet: bool = False,
        port_range: Optional[Tuple[int, int]] = None,
        single_port: bool = False,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.backend = backend
        self.limits = limits
        self.max_sessions = max_sessions
        self.lookup_timeout = lookup_timeout
        self.reactor = reactor
        self.sessions: Dict[Address, Session] = {}
        self._mtus: Dict[Tuple[str, str], Optional[int]] = {}
        self._bad = _LogBudget()
        self._refusals = _LogBudget(REFUSALS_PER_SECOND)
        self.accepting = True
        self._drained: Optional[Deferred] = None
        self._completed: Dict[Address, Tuple[bytes, float]] = {}
        self.quiet = quiet
        """Log only transfers that did not complete (a boot storm's worth of lines costs CPU)."""
        self.transfers = TransferSockets(reactor, port_range)
        """Every transfer's socket, read through one reactor reader."""
        self.single_port = single_port
        """Serve every transfer from the listening port, told apart by the client's address."""

    # -- requests ---------------------------------------------------------------------------

    def request_received(self, listener: RequestPort, data: bytes, wire_client: Address, local: str,
                         arrived: float) -> None:
        """A datagram on a listening port.

        `wire_client` is the address as the socket saw it; `arrived` the kernel's
        receive time (time.time() scale), which tells a duplicate that arrived
        while its transfer still ran from a new request made after it ended.
        """
        client = (plain_host(wire_client[0]), wire_client[1])
        local = plain_host(local)
        if self.single_port and data[:2] not in (b"\0\1", b"\0\2") and self._for_transfer(
                listener, data, client, wire_client, local, arrived):
            return
        try:
            packet = decode(data)
        except MalformedPacket as e:
            is_request = data[:2] in (b"\0\1", b"\0\2")
            if self._bad.allow(self.reactor.seconds()):
                log.info("Malformed datagram from {client}: {reason}", client=client, reason=str(e),
                         outcome="malformed")
            if is_request and self._refusals.allow(self.reactor.seconds()):
                # Someone meant to ask for a file: tell them why not (within a budget, since the
                # ERROR is larger than the smallest malformed request: no amplifier for spoofers).
                listener.reply(encode_error(ErrorCode.ILLEGAL_OPERATION, f"Malformed request: {e}"),
                               wire_client, local)
            return
        if not isinstance(packet, Request):
            if self._bad.allow(self.reactor.seconds()):
                log.info("Ignored {opcode} from {client} on the request port", client=client,
                         opcode=Opcode(data[1]).name, outcome="ignored")
            return
        if packet.opcode == Opcode.WRQ:
            if self._bad.allow(self.reactor.seconds()):
                log.info("Refused write request for {file!r} from {client}", client=client,
                         file=packet.filename, outcome="refused")
            listener.reply(encode_error(ErrorCode.ACCESS_VIOLATION,
                                        "Write requests are not supported: this server is read-only"),
                           wire_client, local)
            return
        if not self.accepting:
            return
        now = self.reactor.seconds()
        existing = self.sessions.get(client)
        if existing is None:
            done = self._completed.get(client)
            if done is not None and done[0] == data and arrived < done[1]:
                # It arrived while its transfer ran (the reactor just handled the final ACK first):
                # a small file is often sent and ACKed before the ROM's duplicate RRQ is read.
                if self._bad.allow(now):
                    log.debug("Duplicate request from {client} ignored (already served)", client=client)
                return
        else:
            if existing.raw == data and now - existing.started < DUPLICATE_WINDOW:
                if self._bad.allow(now):
                    log.debug("Duplicate request from {client} ignored", client=client)
                return
            # The client has moved on (a UEFI probe's follow-up RRQ, or a restart): so do we.
            existing.close("superseded")
        if len(self.sessions) >= self.max_sessions:
            if self._bad.allow(now):
                log.warn("Dropped request for {file!r} from {client}: {sessions} transfers running "
                         "(--max-sessions); the client will retry", client=client, file=packet.filename,
                         sessions=len(self.sessions), outcome="busy")
            return
        if self.transfers.exhausted():
            self.ports_exhausted(packet.filename, client, now)
            return
        session = Session(self, packet, data, client, wire_client, local, listener, now)
        self.sessions[client] = session
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
            if self._refusals.allow(self.reactor.seconds()):
                listener.reply(UNKNOWN_TID, wire_client, local)
            return True
        return False

    def ports_exhausted(self, filename: bytes, client: Address, now: float) -> None:
        if self._bad.allow(now):
            log.warn("Dropped request for {file!r} from {client}: every port of --port-range is in use; "
                     "the client will retry", client=client, file=filename, outcome="busy")

    def path_mtu(self, local: str, peer: str) -> Optional[int]:
        key = (local, peer)
        try:
            return self._mtus[key]
        except KeyError:
            pass
        if len(self._mtus) >= MTU_CACHE_SIZE:
            self._mtus.clear()
        mtu = self._mtus[key] = path_mtu(local.split("%", 1)[0], peer)
        return mtu

    def forget(self, session: "Session") -> None:
        if self.sessions.get(session.client) is session:
            del self.sessions[session.client]
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

        Requests still waiting for the backend are refused at once: their
        transfers have not begun, and the ROM will retry (perhaps elsewhere).
        Every session, however it ends, finishes its reader, which is where
        ephemeral files are removed. Fires when no session is left.
        """
        self.accepting = False
        drained = self._drained = Deferred()
        for session in list(self.sessions.values()):
            if session.engine is None:
                session.close("aborted", "Server shutting down")
        if not self.sessions:  # the last close above (or none at all) has fired it
            self._check_drained()
            return drained
        if grace > 0:
            log.info("Letting {count} transfers finish (up to {grace}s)", count=len(self.sessions), grace=grace)
        timer = self.reactor.callLater(grace, self.abort_all)
        drained.addBoth(lambda result: timer.cancel() if timer.active() else None)
        return drained

    def abort_all(self) -> None:
        for session in list(self.sessions.values()):
            session.close("aborted", "Server shutting down")
        self._check_drained()

    def _check_drained(self) -> None:
        """Fire the Deferred `drain()` returned once the last session is gone."""
        if self._drained is not None and not self.sessions:
            drained, self._drained = self._drained, None
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
        self.engine: Optional[ReadTransfer] = None
        self.reader: Any = None
        self._backend_reader: Any = None
        self.last_arrival: Optional[float] = None
        """Kernel arrival time of the final ACK of a completed transfer."""
        self.outcome: Optional[str] = None
        self._timer: Optional[IDelayedCall] = None
        self._reading = False
        self._port: Union[TransferSocket, ListenerTransfer, None] = None

    # -- phase 1: ask the backend -------------------------------------------------------------

    def lookup(self) -> None:
        request = self.request
        ctx = {
            "local": (self.local, self.listener.getHost().port),
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
        """An ERROR before the transfer has a port of its own: from the listener, from the RRQ's address."""
        self.listener.reply(encode_error(code, message), self.wire_client, self.local)

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
        if expected:
            log.info("Request for {file!r} from {client} refused: {message}", file=self.request.filename,
                     client=self.client, message=message, code=int(code), outcome="refused")
        else:
            log.failure("Backend failed on {file!r} from {client}", failure=failure,
                        file=self.request.filename, client=self.client, outcome="backend-error")
        self._reply_error(code, message)
        self._end("refused")

    def _got_reader(self, reader: Any) -> None:
        if self.outcome is not None:  # closed (or timed out) while the backend was thinking
            _finish_reader(reader)
            return
        if self._timer is not None:
            self._timer.cancel()  # the lookup's
            self._timer = None
        request = self.request
        self._backend_reader = reader
        self.reader = reader = NetasciiReader(reader) if request.mode == "netascii" else reader
        try:
            size = reader.size
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
            self._end("busy")
            return
        except Exception:
            log.failure("Could not start a transfer of {file!r} to {client}", file=request.filename,
                        client=self.client)
            self._reply_error(ErrorCode.NOT_DEFINED, "Internal server error")
            self._end("aborted")
            return
        self._port = port
        self.engine = engine = ReadTransfer(negotiated, self.server.limits,
                                            encode_oack(negotiated.oack) if negotiated.oack else None)
        now = self.server.reactor.seconds()
        self._send(engine.start(now))
        self._pump(now)
        self._timer = self.server.reactor.callLater(max(engine.deadline - now, 0), self._timed_out)

    # -- phase 2: the transfer (the hot path) ---------------------------------------------------

    def datagramReceived(self, datagram: bytes, addr: Address) -> None:
        engine = self.engine
        if engine is None or self.outcome is not None:
            return
        if addr != self.client:
            # RFC 1350: answer a stranger with ERROR 5 and carry on with the real peer.
            self._port.send(UNKNOWN_TID, addr)  # type: ignore[union-attr]
            return
        now = self.server.reactor.seconds()
        out = engine.datagram(datagram, now)
        if out:
            self._send(out)
        if engine.need and not self._reading:
            self._pump(now)
        if engine.outcome is not None:
            self._end(engine.outcome)

    def _send(self, datagrams: List[bytes]) -> None:
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

    def _read_failed(self, failure: Failure) -> None:
        self._reading = False
        if self.outcome is not None:
            return
        log.failure("Reading {file!r} for {client} failed", failure=failure, file=self.request.filename,
                    client=self.client)
        self.close("aborted", "Error reading the file")

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
            self._timer = self.server.reactor.callLater(max(engine.deadline - now, 0), self._timed_out)

    # -- the end ----------------------------------------------------------------------------

    def close(self, outcome: str, message: Optional[str] = None) -> None:
        """End from our side; `message`, if given, is sent to the client as ERROR 0."""
        if self.outcome is not None:
            return
        if message is not None:
            if self.engine is not None:
                self._send([self.engine.abort(message)])
            else:
                self._reply_error(ErrorCode.NOT_DEFINED, message)
        # A lookup still running is left to finish: _got_reader finishes a late reader, and
        # _lookup_failed sees the outcome and stays quiet.
        self._end(outcome)

    def _end(self, outcome: str) -> None:
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
        report = self.report() if self.engine is not None else None
        if self.reader is not None:
            # A reader that wants to know how it went (the AMP backend tells its peer) says so
            # with transfer_finished(); it is told before finish() releases it.
            told = getattr(self._backend_reader, "transfer_finished", None)
            if told is not None and report is not None:
                try:
                    told(report)
                except Exception:
                    log.failure("reader.transfer_finished() failed")
            _finish_reader(self.reader)
        if report is not None and not (outcome == Outcome.COMPLETE and self.server.quiet):
            log.info("{outcome} {file!r} to {client}: {bytes} bytes in {duration:.3f}s", **report)
        # Last: forgetting the last session fires drain()'s Deferred, by which time the reader
        # must be finished (ephemeral files removed, the backend told).
        self.server.forget(self)

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
