"""One read request, from its RRQ to its log line: a bounded backend lookup, then a `Transfer`.

The server's table of running requests holds `Session`s (the duplicate and
per-client rules are about requests, whether their backend has answered or
not). A session asks the backend for a reader: a synchronous answer (the
directory backend's) costs no Deferred, no timer and no lookup object; a
Deferred one is waited for through one `BoundedLookup`, bounded by the lookup
timeout and never cancelled. It then negotiates the options, opens the
transfer's port and hands the rest to a `Transfer` (transfer.py). However it
ends (refused, failed, superseded, transferred), it writes one log line and the
server forgets it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from twisted.logger import Logger
from twisted.python.failure import Failure

from . import logs
from .context import RequestContext
from .engine import Outcome, ReadTransfer, outcome_text
from .errors import error_for
from .lookup import BoundedLookup, LookupTimeout, as_failure, ask, finish_reader
from .mux import PEER_SOCKET_BLOCKS, PortsExhausted
from .options import negotiate
from .packets import ErrorCode, Request
from .readers import NetasciiReader
from .transfer import Transfer
from .transfer_socket import ListenerTransfer
from .udp import Address, RequestPort, is_ipv6

if TYPE_CHECKING:
    from .server import TFTPServer

log = Logger(namespace="tftp_offload")


class Session:
    """One RRQ: the lookup phase here, the transfer phase in `self.transfer`, one end."""

    __slots__ = ("server", "request", "raw", "client", "wire_client", "local", "listener", "started", "local_port",
                 "size", "transfer", "outcome", "last_arrival", "error", "answered_at", "_backend_reader", "_lookup")

    def __init__(self, server: "TFTPServer", request: Request, raw: bytes, client: Address,
                 wire_client: Address, local: str, listener: RequestPort, now: float) -> None:
        self.server = server
        self.request = request
        self.raw = raw
        """The RRQ as it arrived: a duplicate is the same bytes from the same client."""
        self.client = client
        self.wire_client = wire_client
        self.local = local
        self.listener = listener
        self.started = now
        self.local_port = 0
        self.size: Optional[int] = None
        """The reader's size, once the backend has answered (None for a stream of unknown length)."""
        self.transfer: Optional[Transfer] = None
        """The transfer phase, once the backend has answered and the port is open."""
        self.outcome: Optional[Outcome] = None
        self.last_arrival: Optional[float] = None
        """Kernel arrival time of the final ACK of a completed transfer."""
        self.error: Optional[Tuple[int, str, str]] = None
        """(code, message, "server") of an ERROR we sent, for the log."""
        self.answered_at: Optional[float] = None
        self._backend_reader: Any = None
        self._lookup: Optional[BoundedLookup] = None

    # -- phase 1: ask the backend -------------------------------------------------------------

    def lookup(self) -> None:
        """Ask the backend for a reader, in the request's `twisted.python.context` (unless the backend
        reads none, `IBackend.reads_context`), within the lookup timeout."""
        server, request = self.server, self.request
        self.local_port = self.listener.getHost().port  # once: the listener may be closed when we log the end
        backend = server.backend
        context = RequestContext((self.local, self.local_port), self.client, request.mode, request.options) \
            if getattr(backend, "reads_context", True) else None
        self._lookup = ask(server.reactor, server.lookup_timeout, backend.get_reader, request.filename, context,
                           self._got_reader, self._refused)

    def _refused(self, error: BaseException, failure: Optional[Failure]) -> None:
        """The backend refused, failed or did not answer in time: ERROR to the client, and the end.

        `failure` is the Deferred's, if the answer came as one (`lookup.ask`).
        """
        self._lookup = None
        code: int
        if isinstance(error, LookupTimeout):  # not failure.check(): it walks the MRO by name, per refusal
            code, message, expected = ErrorCode.NOT_DEFINED, "Backend did not answer in time", True
        else:
            code, message, expected = error_for(error)
        if not expected:
            log.failure("Backend failed on {file} for {client}",
                        failure=as_failure(error, failure),
                        file=logs.filename(self.request.filename), client=logs.address(*self.client),
                        event="backend-error")
        self.server.stats.lookup_failed(self, self.server.reactor.seconds())
        self._reply_error(code, message)
        self.error = (int(code), message, "server")
        self._end(Outcome.REFUSED)

    def _got_reader(self, reader: Any) -> None:
        """The backend's reader: negotiate, open the port, and start the transfer."""
        self._lookup = None
        server = self.server
        self._backend_reader = reader
        server.stats.answered(self, reader, server.reactor.seconds())
        if self.request.mode == "netascii":
            reader = NetasciiReader(reader)
        try:
            transfer = self._open_transfer(reader)
        except PortsExhausted:
            server.ports_exhausted(self.request.filename, self.client, server.reactor.seconds())
            self._end(Outcome.REFUSED, reader)
            return
        except Exception:
            log.failure("Could not start a transfer of {file} to {client}", file=logs.filename(self.request.filename),
                        client=logs.address(*self.client))
            self._reply_error(ErrorCode.NOT_DEFINED, "Internal server error")
            self.error = (int(ErrorCode.NOT_DEFINED), "Internal server error", "server")
            self._end(Outcome.ABORTED, reader)
            return
        self.transfer = transfer
        if server.log_starts:
            log.info("Sending {file} to {client}", **self.fields(), event="transfer-start")
        server.stats.transfers_started += 1
        transfer.start()

    def _open_transfer(self, reader: Any) -> Transfer:
        """Negotiate (tsize from the reader's size, blksize within the path MTU) and open the port.

        --single-port serves from the listener, from the address the RRQ was sent to; otherwise
        the server's transfer-socket factory opens a port of its own on that address.
        """
        server, request = self.server, self.request
        size = self.size = reader.size
        negotiated = negotiate(request.options, request.mode, size, server.limits,
                               server.path_mtu(self.local, self.client[0]), is_ipv6(self.client[0]))
        transfer = Transfer(self, ReadTransfer(negotiated, server.limits), reader, self._backend_reader)
        if server.single_port:
            transfer.port = ListenerTransfer(self.listener, self.wire_client, self.local)
        else:
            long = size is None or size >= PEER_SOCKET_BLOCKS * negotiated.blksize
            transfer.port = server.transfers.open(self.local, transfer, self.client, connect=long)
        return transfer

    def _reply_error(self, code: int, message: str) -> None:
        """An ERROR before the transfer has a port of its own: from the listener, from the RRQ's address.

        Within the listeners' one reply budget (`Guard.may_reply`), like every ERROR sent from there.
        """
        self.server.reply_error(self.listener, code, message, self.wire_client, self.local, len(self.raw))

    # -- the end ----------------------------------------------------------------------------

    def catch_up(self) -> None:
        """Handle the datagrams already waiting at the transfer port (see `Transfer.catch_up`)."""
        if self.transfer is not None:
            self.transfer.catch_up()

    def close(self, outcome: Outcome, message: Optional[str] = None) -> None:
        """End from our side; `message`, if given, is sent to the client as ERROR 0.

        A lookup still running is abandoned, not cancelled: a reader it brings later is finished.
        """
        if self.outcome is not None:
            return
        if self.transfer is not None:
            self.transfer.close(outcome, message)
            return
        if message is not None:
            self.error = (int(ErrorCode.NOT_DEFINED), message, "server")
            self._reply_error(ErrorCode.NOT_DEFINED, message)
        self._end(outcome)

    def _end(self, outcome: Outcome, reader: Any = None) -> None:
        """The end of a request that never became a transfer; `reader`, if it got one, is finished."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        lookup, self._lookup = self._lookup, None
        if lookup is not None:
            lookup.abandon()
        if reader is not None:
            finish_reader(reader)
        self.ended({"outcome": outcome, "bytes": 0, "duration": self.server.reactor.seconds() - self.started,
                    "retransmits": 0, "client_error": None})

    def ended(self, report: Dict[str, Any]) -> None:
        """Every end comes here, its reader finished: the log line, the counters, and the server forgets us."""
        server = self.server
        if self.transfer is None and not server.guard.may_log(server.reactor.seconds()):
            pass  # a refusal before any transfer: its line is within the log budget (a flood is not a log)
        elif not (server.quiet and report["outcome"] in (Outcome.COMPLETE, Outcome.PROBE)):
            fields = self.fields(report)
            logs.transfer_end(log, fields)
        if self.transfer is not None:
            server.stats.transfer_ended(self, self.transfer, server.reactor.seconds())
        # Last: forgetting the last session fires drain()'s Deferred, by which time the reader
        # must be finished (ephemeral files removed, the backend told).
        server.forget(self)

    def fields(self, report: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The structured fields of this request's log events: plain strings and numbers (docs/operations.md)."""
        request, transfer, size = self.request, self.transfer, self.size
        engine = transfer.engine if transfer is not None else None
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
        if by is None and self.error is not None:
            code, message, by = self.error
        # One store a key, not update(**): a boot storm's small files each log one of these.
        fields["outcome"] = outcome_text(report["outcome"])
        fields["bytes"] = report["bytes"]
        fields["duration"] = report["duration"]
        fields["retransmits"] = report["retransmits"]
        fields["error_code"] = code
        fields["error_message"] = message
        fields["error_by"] = by
        return fields
