"""One transfer, once the backend has answered: the engine between a reader and a socket.

`Session` (server.py) owns a request from its RRQ to its log line; once its
lookup brings a reader and the options are negotiated, it hands the transfer
phase to a `Transfer`: the socket's datagrams and the reader's data go into
the engine (`engine.ReadTransfer`), what the engine returns goes out, one
timer follows the engine's deadline, and at the end the reader hears how it
went (`transfer_finished`) and is finished. The session then writes the log
line and forgets the request.

This is the hot path (an ACK in, the next DATA out): `datagramReceived` reads
the clock once, makes one engine call and one send, and compares two floats
for the timer, which is left alone unless the deadline moved earlier (the
engine moves it on every ACK; a timer firing early just follows it). What one
datagram allocates end to end is listed in docs/architecture.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import logs
from .engine import Outcome, ReadTransfer
from .lookup import finish_reader
from .packets import ErrorCode, encode_error
from .stats import report_outcome
from .udp import Address

if TYPE_CHECKING:
    from .session import Session

log = Logger(namespace="tftp_offload")

UNKNOWN_TID = encode_error(ErrorCode.UNKNOWN_TID, "Unknown transfer ID")


class Transfer:
    """The transfer phase of one session: engine, port, reader, deadline, and the end.

    `port` is what the server's transfer-socket factory opened for it (a
    `transfer_socket.TransferSocket`, or a `transfer_socket.ListenerTransfer` with --single-port):
    anything with `send`, `send_all`, `last_arrival` and `stopListening`, whose
    datagrams come to `datagramReceived`. It is set by the session right after
    construction (the factory needs this object as the port's protocol).
    """

    __slots__ = ("session", "engine", "reader", "port", "client", "outcome", "sent", "first_sent",
                 "deadline_ticket", "_backend_reader", "_deadlines", "_seconds", "_stats", "_armed", "_reading")

    def __init__(self, session: "Session", engine: ReadTransfer, reader: Any, backend_reader: Any) -> None:
        server = session.server
        self.session: Optional["Session"] = session
        """Cleared at the end: the session keeps this object for its log line, not the other way round."""
        self.engine = engine
        self.reader = reader
        """What the engine reads from (the backend's reader, behind a netascii translation if asked)."""
        self._backend_reader = backend_reader
        self.port: Any = None
        self.client: Address = session.client
        self.outcome: Optional[Outcome] = None
        self.sent = 0
        """Datagrams sent to the client on the transfer port."""
        self.first_sent: Optional[float] = None
        """When the first datagram left (metrics: RRQ to first datagram)."""
        self._deadlines = server.deadlines
        self._seconds = server.reactor.seconds
        self._stats = server.stats
        self.deadline_ticket = 0
        """Our entry in the server's `Deadlines` (0: none)."""
        self._armed = 0.0
        """When our deadline is set to pass (compared with the engine's deadline)."""
        self._reading = False
        """A Deferred read is in flight: the engine's `need` is being fetched."""

    def start(self) -> None:
        """Send what the engine starts with (an OACK, or DATA once read), and arm the timer."""
        now = self._seconds()
        self._send(self.engine.start(now))
        self._pump(now)
        if self.outcome is None:
            self._arm()

    # -- the hot path -----------------------------------------------------------------------

    def datagramReceived(self, datagram: bytes, addr: Address) -> None:
        """A datagram at the transfer port: the client's goes to the engine, a stranger's gets ERROR 5."""
        if self.outcome is not None:
            return
        if addr != self.client:
            # RFC 1350: answer a stranger with ERROR 5 and carry on with the real peer.
            self.port.send(UNKNOWN_TID, addr)
            self._stats.refuse("stranger", ErrorCode.UNKNOWN_TID)
            return
        engine = self.engine
        now = self._seconds()
        out = engine.datagram(datagram, now)
        if out:
            self._send(out)
        if engine.need and not self._reading:
            self._pump(now)
        if engine.outcome is not None:
            self._end(engine.outcome)
        elif engine.deadline < self._armed:
            self._arm()

    def _send(self, datagrams: List[bytes]) -> None:
        if self.first_sent is None and datagrams:
            self.first_sent = self._seconds()
        self.sent += len(datagrams)
        self.port.send_all(datagrams, self.client)

    def _pump(self, now: float) -> None:
        """Feed the engine what it needs; synchronous readers loop here, Deferred ones call back."""
        engine = self.engine
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
        """One read's bytes to the engine; a reader that returns more than asked is broken."""
        engine = self.engine
        if len(chunk) > engine.need:
            self._read_failed(Failure(ValueError(f"reader returned {len(chunk)} bytes for {engine.need}")))
            return False
        self._send(engine.data(chunk, now))
        return True

    def _read_done(self, chunk: bytes) -> None:
        self._reading = False
        if self.outcome is None:
            now = self._seconds()
            if self._feed(chunk, now):
                self._pump(now)
            if self.outcome is None and self.engine.deadline < self._armed:
                self._arm()

    def _read_failed(self, failure: Failure) -> None:
        self._reading = False
        if self.outcome is not None or self.session is None:
            return
        log.failure("Reading {file} for {client} failed", failure=failure,
                    file=logs.filename(self.session.request.filename), client=logs.address(*self.client))
        self.close(Outcome.ABORTED, "Error reading the file")

    # -- the timer ----------------------------------------------------------------------------

    def _arm(self) -> None:
        """Set the transfer's one deadline in the server's heap (`deadlines.py`) for the engine's.

        Called at the start, when the deadline passes, and when the engine's deadline moves
        earlier (an ACK after a backed-off timeout, a shorter learnt timeout: every small file's
        after its first round trip, data after a slow read). Usually it moves later, and the
        deadline, passing early, follows it.
        """
        deadline = self._armed = self.engine.deadline
        self._deadlines.arm(self, deadline)

    def deadline_passed(self) -> None:
        """Our deadline passed (perhaps early: the engine then does nothing, and we follow its new one)."""
        if self.outcome is not None:
            return
        engine = self.engine
        now = self._seconds()
        out = engine.timer(now)
        if out:
            self._send(out)
        if engine.outcome is not None:
            self._end(engine.outcome)
        else:
            self._arm()

    # -- the end ------------------------------------------------------------------------------

    def catch_up(self) -> None:
        """Handle the datagrams already waiting at the transfer port, now rather than at the reactor's next turn."""
        read_one = getattr(self.port, "read_one", None)
        if read_one is None:
            return  # --single-port: what the client sent since is read in order behind this request
        for _ in range(64):  # a window's worth of ACKs at most: this is not the hot path
            if self.outcome is not None or not read_one():
                return

    def close(self, outcome: Outcome, message: Optional[str] = None) -> None:
        """End from our side; `message`, if given, is sent to the client as ERROR 0."""
        if self.outcome is not None:
            return
        if message is not None and self.session is not None:
            self.session.error = (int(ErrorCode.NOT_DEFINED), message, "server")
            self._send(self.engine.abort(message))
            self._stats.error_sent(ErrorCode.NOT_DEFINED)
        self._end(outcome)

    def _end(self, outcome: Outcome) -> None:
        """Stop the timer and the port, tell and finish the reader, then hand the session its report."""
        session = self.session
        if self.outcome is not None or session is None:
            return
        self.outcome = session.outcome = outcome
        self._deadlines.disarm(self)
        port, self.port = self.port, None  # the port keeps us as its protocol: dropping it breaks the cycle
        if port is not None:
            if outcome == Outcome.COMPLETE:
                session.last_arrival = port.last_arrival()
            port.stopListening()
        report = self.report(session)
        # A reader that wants to know how it went (the AMP backend tells its peer) says so with
        # transfer_finished(); it is told before finish() releases it.
        told = getattr(self._backend_reader, "transfer_finished", None)
        if told is not None:
            try:
                told({**report, "outcome": report_outcome(outcome)})  # documented values only
            except Exception:
                log.failure("reader.transfer_finished() failed")
        finish_reader(self.reader)
        self.session = None
        session.ended(report)

    def report(self, session: "Session") -> Dict[str, Any]:
        """How the transfer went: the fields of its log line and of the backend's report."""
        engine = self.engine
        return {
            "outcome": self.outcome,
            "file": session.request.filename,
            "client": self.client,
            "local": session.local,
            "bytes": engine.bytes_acked,
            "duration": self._seconds() - session.started,
            "blksize": engine.blksize,
            "windowsize": engine.windowsize,
            "retransmits": engine.retransmits,
            "client_error": engine.client_error,
        }
