"""The Twisted driver: requests in on the listening ports, one session per request.

Everything protocol-shaped is decided elsewhere (`packets`, `options`,
`engine`); the driver only moves datagrams, time and Deferreds between them,
the backend and the reactor. The chain for one request:

    RRQ decoded -> duplicate / capacity checks (`TFTPServer.request_received`,
    here) -> backend.get_reader, in the request's `RequestContext`, bounded in
    time (`Session`, session.py) -> negotiate (tsize from reader.size, blksize
    clamped to the path MTU) -> a UDP port of its own, bound to the address the
    RRQ was sent to -> the engine runs (`Transfer`, transfer.py) ->
    reader.finish() -> one log line with the outcome.

Tests drive all of it on a `task.Clock` (the `reactor` argument) with the
transfer-socket factory (`TFTPServer.transfers`) replaced by a recorder.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Deque, Dict, Optional, Tuple, Union, cast

from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from . import logs
from .config import ServerConfig
from .deadlines import Deadlines
from .engine import Outcome
from .guard import Guard
from .interfaces import IBackend
from .mux import TransferSockets
from .packets import (
    ErrorCode,
    MalformedPacket,
    Opcode,
    Request,
    decode,
    encode_error,
)
from .session import Session
from .stats import Stats
from .transfer import UNKNOWN_TID
from .transfer_socket import ListenerTransfer
from .udp import Address, RequestPort, path_mtu, plain_host

__all__ = ["DUPLICATE_WINDOW", "ListenerProtocol", "Outcome", "Session", "TFTPServer"]

log = Logger(namespace="tftp_offload")

DUPLICATE_WINDOW = 2.0
"""Seconds during which an identical RRQ from the same (address, port) is a retransmission.

PXE ROMs resend an RRQ within milliseconds and race the duplicates; a
second transfer would make two sessions fight over one client port."""

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
        """Client -> (request, final ACK's arrival) of transfers completed lately (`_remember_completed`)."""
        self._completed_order: Deque[Tuple[Address, float]] = deque()
        """(client, arrival) in the order they were remembered: what expires first is at the left."""
        self.quiet = config.quiet
        """Log only transfers that did not complete (a boot storm's worth of lines costs CPU)."""
        self.log_starts = config.log_starts
        """Also log a transfer-start event per transfer (on with --log-format json; the text end line says it all)."""
        self.stats = Stats()
        self.deadlines = Deadlines(reactor)
        """Every transfer's retransmission deadline, behind one reactor timer."""
        self.transfers = TransferSockets(reactor, config.port_range)
        """The transfer-socket factory: every transfer's socket, read through one reactor reader.

        Sessions call its `open(local, protocol)` and `exhausted()`; tests put a recorder here."""
        self.single_port = config.single_port
        """Serve every transfer from the listening port, told apart by the client's address."""

    # -- requests ---------------------------------------------------------------------------

    def request_received(self, listener: RequestPort, data: bytes, wire_client: Address, local: str,
                         arrived: float) -> None:
        """A datagram on a listening port: each step below may answer it, drop it, or pass it on.

        `wire_client` is the address as the socket saw it; `arrived` the kernel's
        receive time (time.time() scale), which tells a duplicate that arrived
        while its transfer still ran from a new request made after it ended.
        """
        if not self.accepting:
            self.stats.refuse("draining")
            return  # draining: nothing new is taken
        client = (plain_host(wire_client[0]), wire_client[1])
        if not self._permitted(client):
            return
        local = plain_host(local)
        if self.single_port and data[:2] not in (b"\0\1", b"\0\2") and self._for_transfer(
                listener, data, client, wire_client, local, arrived):
            return
        request = self._parse(listener, data, client, wire_client, local)
        if request is None:
            return
        now = self.reactor.seconds()
        if self._duplicate(client, data, now, arrived):
            return
        if not self._admit(request, client, now):
            return
        self._start(request, data, client, wire_client, local, listener, now)

    def _permitted(self, client: Address) -> bool:
        """The --allow list: a datagram from anywhere else is dropped, unanswered, and counted."""
        guard = self.guard
        if guard.permitted(client[0]):
            return True
        if guard.may_log(self.reactor.seconds()):
            log.info("Ignored a datagram from {client}: not on an --allow network", client=logs.address(*client),
                     event="dropped", reason="not-allowed")
        self.stats.refuse("not-allowed")
        return False

    def _parse(self, listener: RequestPort, data: bytes, client: Address, wire_client: Address,
               local: str) -> Optional[Request]:
        """The RRQ in `data`, or None once anything else has been answered, logged and counted.

        A malformed request gets ERROR 4 and a write request ERROR 2 (both within the reply
        budget: no amplifier for spoofers); other opcodes here are ignored.
        """
        guard = self.guard
        try:
            packet = decode(data)
        except MalformedPacket as e:
            is_request = data[:2] in (b"\0\1", b"\0\2")
            if guard.may_log(self.reactor.seconds()):
                log.info("Malformed datagram from {client}: {reason}", client=logs.address(*client),
                         reason=str(e), event="malformed", outcome=logs.REFUSED if is_request else None)
            if is_request:  # someone meant to ask for a file: tell them why not
                self.reply_error(listener, ErrorCode.ILLEGAL_OPERATION, f"Malformed request: {e}", wire_client,
                                 local, len(data))
            self.stats.refuse("malformed")
            return None
        if not isinstance(packet, Request):
            # An ACK or ERROR here is the normal aftermath of an ERROR sent from this port (tftp-hpa
            # acknowledges a refusal): not worth a line. Anything else is odd.
            if data[1] not in (Opcode.ACK, Opcode.ERROR) and guard.may_log(self.reactor.seconds()):
                log.info("Ignored {opcode} from {client} on the request port", client=logs.address(*client),
                         opcode=Opcode(data[1]).name, event="ignored")
            self.stats.refuse("not-request")
            return None
        if packet.opcode == Opcode.WRQ:
            if guard.may_log(self.reactor.seconds()):
                log.info("refused write request for {file} from {client}: this server is read-only",
                         client=logs.address(*client), file=logs.filename(packet.filename), event="write-request",
                         outcome=logs.REFUSED, error_code=int(ErrorCode.ACCESS_VIOLATION))
            self.reply_error(listener, ErrorCode.ACCESS_VIOLATION, WRITE_REFUSED, wire_client, local, len(data))
            self.stats.refuse("wrq")
            return None
        return packet

    def _duplicate(self, client: Address, data: bytes, now: float, arrived: float) -> bool:
        """Is this RRQ a retransmission of the client's running (or just completed) transfer's?

        PXE ROMs resend an RRQ within milliseconds; a second transfer would fight the
        first over one client port. A different request from the same client port means
        it has moved on (a restart, another file): its old session ends here.
        """
        existing = self.sessions.get(client)
        if existing is None:
            done = self._completed.get(client)
            # It arrived while its transfer ran (the reactor just handled the final ACK first):
            # a small file is often sent and ACKed before the ROM's duplicate RRQ is read.
            return done is not None and done[0] == data and arrived < done[1]
        same = existing.raw == data and now - existing.started < DUPLICATE_WINDOW
        if same:
            # The UEFI size probe's ERROR 8 may wait, unread, at the transfer port while its
            # follow-up (this same request) is read here: handle it first, then judge.
            existing.catch_up()
        if existing.outcome == Outcome.COMPLETE and existing.raw == data \
                and arrived < (existing.last_arrival or arrived + 1):
            return True  # its final ACK was waiting too: a duplicate of a transfer now complete
        if existing.outcome is None:
            if same:
                return True  # a ROM's retransmission: its transfer runs
            existing.close(Outcome.ABORTED)
        return False

    def _admit(self, request: Request, client: Address, now: float) -> bool:
        """Room for one more transfer: the per-client limits, --max-sessions and --port-range.

        Each refusal is a silent drop (the ROM retries, and is served once there is room),
        logged within the log budget; a full server says so once, not per retry.
        """
        guard = self.guard
        refused = guard.admit(client[0], now)
        if refused is not None:
            if guard.may_log(now):
                log.info("Dropped request for {file} from {client}: {why}; the client will retry",
                         client=logs.address(*client), file=logs.filename(request.filename), event="dropped",
                         reason=refused, why=_PER_CLIENT[refused].format(sessions=guard.sessions_of(client[0])))
            self.stats.refuse("limit")
            return False
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
            return False
        if self.transfers.exhausted():
            self.ports_exhausted(request.filename, client, now)
            return False
        return True

    def _start(self, request: Request, data: bytes, client: Address, wire_client: Address, local: str,
               listener: RequestPort, now: float) -> None:
        """A session for the request, in the table before its lookup starts (a synchronous backend may end it)."""
        session = Session(self, request, data, client, wire_client, local, listener, now)
        self.sessions[client] = session
        self.guard.opened(client[0])
        session.lookup()

    def _for_transfer(self, listener: RequestPort, data: bytes, client: Address, wire_client: Address, local: str,
                      arrived: float) -> bool:
        """--single-port: a datagram that is not a request goes to the client's transfer, if it has one.

        An ACK that belongs to no transfer gets ERROR 5 (RFC 1350's unknown
        transfer ID), unless it is the client whose transfer just completed
        (a repeated final ACK). Anything else takes the listener's usual path.
        """
        session = self.sessions.get(client)
        transfer = session.transfer if session is not None else None
        port = transfer.port if transfer is not None else None
        if isinstance(port, ListenerTransfer):
            port.arrived = arrived
            transfer.datagramReceived(data, client)  # type: ignore[union-attr]
            return True
        if data[:2] == b"\0\4" and client not in self._completed:
            self.reply_error(listener, ErrorCode.UNKNOWN_TID, UNKNOWN_TID, wire_client, local, len(data))
            self.stats.refuse("stranger")
            return True
        return False

    def reply_error(self, listener: RequestPort, code: int, error: Union[str, bytes], wire_client: Address,
                    local: str, answering: int) -> bool:
        """ERROR `code` from the listening port, from the address asked, within the listeners' one
        reply budget (`Guard.may_reply`: no amplifier for spoofers); counted if sent.

        `error` is the message, or the datagram already encoded; `answering` is the size of the
        datagram it answers. Every ERROR sent from a listener goes through here.
        """
        datagram = error if isinstance(error, bytes) else encode_error(code, error)
        if not self.guard.may_reply(self.reactor.seconds(), len(datagram), answering):
            return False
        listener.reply(datagram, wire_client, local)
        self.stats.error_sent(code)
        return True

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
        completed, order = self._completed, self._completed_order
        client = session.client
        completed[client] = (session.raw, ended)
        order.append((client, ended))
        horizon = ended - REMEMBER_COMPLETED
        # Expired from the front of a queue, not the dict: deleting a dict's oldest keys leaves
        # holes that every next(iter(dict)) walks over until the dict is resized (10 us a request
        # in a boot storm, with tens of thousands of transfers remembered).
        while order and (order[0][1] < horizon or len(order) > MAX_REMEMBERED):
            old, when = order.popleft()
            kept = completed.get(old)
            if kept is not None and kept[1] == when:  # not since replaced by a later transfer's
                del completed[old]

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
            self.transfers.close()  # the spare sockets too, now rather than after their linger
            drained.callback(None)


class ListenerProtocol(DatagramProtocol):
    """The protocol of one listening port; all of them hand requests to one `TFTPServer`."""

    noisy = False

    def __init__(self, server: TFTPServer) -> None:
        self.server = server

    def requestReceived(self, data: bytes, client: Address, local: str, arrived: float) -> None:
        self.server.request_received(cast(RequestPort, self.transport), data, client, local, arrived)
