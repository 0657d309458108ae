"""The legacy MAAS offload wire format (MAAS 2.2 to 3.4) as a backend.

With `tftp_port: 0`, a MAAS 2.2-3.4 rack controller (rackd) serves no TFTP
itself: it listens on a UNIX stream socket (`/var/lib/maas/tftp-offload.sock`)
and answers one request per connection in a small NUL-delimited format (see
docs/legacy.md):

    request:  <local IP> NUL <client IP> NUL <filename> NUL $
    reply:    - NUL <kind> NUL <path> NUL $       kind: "-" (static) or "EPH" (delete after serving)
         or:  <code> NUL <UTF-8 message> NUL $

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
  behind however the transfer ends, even if this process dies. A reply that
  arrives after the server gave up on the request (or after the timeout)
  still has its `EPH` file deleted.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python import context
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import AccessViolation, BackendError, FileNotFound, TFTPError, Unsupported
from ..interfaces import IBackend
from ..readers import FileReader, discard_ephemeral, open_ephemeral, open_regular
from ..server import LOOKUP_TIMEOUT

log = Logger()

MAX_REPLY = 65536
"""Bytes of reply accepted: a path is at most PATH_MAX (4096); anything far longer is not a reply."""

_SHOWN = 200
"""Bytes of a bad reply quoted in the log: enough to recognise it, not enough to flood."""

_TERMINATOR = b"\0$"
_STATIC, _EPHEMERAL = b"-", b"EPH"

# What the client is told when rackd's answer is unusable; the log line says why in detail.
NO_ANSWER = "Backend did not answer in time"
UNREACHABLE = "Backend unavailable"
INVALID = "Backend sent an invalid answer"


class MalformedReply(ValueError):
    """rackd's reply does not follow the format; the text says how, for the log."""


@dataclass(frozen=True)
class FileAnswer:
    """A success reply: serve `path`; delete it afterwards when `ephemeral` (kind `EPH`)."""

    path: bytes
    ephemeral: bool


@dataclass(frozen=True)
class ErrorAnswer:
    """A failure reply: a TFTP error code (rackd always sends 0) and its message."""

    code: int
    message: str


def wire_host(host: str) -> bytes:
    """An address as the format carries it: plain text, IPv4-mapped IPv6 as IPv4, no zone.

    rackd renders boot URLs from the local address and looks the client up by
    its address, so both must be the plain form it knows (`10.0.0.1`, not
    `::ffff:10.0.0.1`); a link-local zone (`%2`, which our listener adds) is
    not part of an address rackd could match. Anything that is not an IP
    address cannot be sent: it could carry a NUL and shift every field.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise BackendError(f"not an IP address: {host!r}") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address).encode("ascii")


def encode_request(local: str, client: str, file_name: bytes) -> bytes:
    """The whole request, to be written at once. Ports are not part of the format.

    A filename with a NUL would shift rackd's fields, and the format is ASCII
    (rackd cannot decode anything else), so both are refused here, clearly,
    instead of being answered by a dropped connection.
    """
    if b"\0" in file_name:
        raise AccessViolation("Access violation: NUL in filename")
    if not file_name.isascii():
        raise AccessViolation("Access violation: filename is not ASCII")
    return b"\0".join((wire_host(local), wire_host(client), file_name)) + _TERMINATOR


def parse_reply(reply: bytes) -> Union[FileAnswer, ErrorAnswer]:
    """Parse one complete reply (everything up to EOF), strictly; raise `MalformedReply`."""
    if not reply:
        raise MalformedReply("empty reply: the connection closed without an answer")
    if not reply.endswith(_TERMINATOR):
        if _TERMINATOR in reply:
            raise MalformedReply("bytes after the terminating NUL $")
        raise MalformedReply("truncated reply: no terminating NUL $")
    fields = reply[: -len(_TERMINATOR)].split(b"\0")
    if fields[0] == b"-":
        if len(fields) != 3:
            raise MalformedReply(f"a success reply has 3 fields, this one {len(fields)}")
        kind, path = fields[1], fields[2]
        if kind not in (_STATIC, _EPHEMERAL):
            raise MalformedReply(f"unknown kind {kind!r} (expected '-' or 'EPH')")
        if not path.startswith(b"/"):
            raise MalformedReply(f"path {path!r} is not absolute")
        return FileAnswer(path, kind == _EPHEMERAL)
    if len(fields) != 2:
        raise MalformedReply(f"an error reply has 2 fields, this one {len(fields)}")
    code, message = fields
    if not (code.isdigit() and code.isascii() and len(code) <= 5 and int(code) <= 0xFFFF):
        raise MalformedReply(f"error code {code!r} is not a number from 0 to 65535")
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedReply("error message is not UTF-8") from None
    return ErrorAnswer(int(code), text)


def error_for_answer(answer: ErrorAnswer) -> TFTPError:
    """The exception that gives the client the TFTP error rackd meant.

    rackd sends code 0 for everything and says what it means in the message,
    so a message starting `File not found` is error 1. Its text (rackd's path
    for the file) is not the client's business: the client gets the standard
    one, as for every backend. Other messages (e.g. `Insecure path`) are what
    rackd's own TFTP server would have sent, so they are passed on.
    """
    if answer.code == FileNotFound.code or answer.message.startswith("File not found"):
        return FileNotFound("File not found")
    if answer.code == AccessViolation.code:
        return AccessViolation(answer.message or "Access violation")
    if answer.code == Unsupported.code:
        return Unsupported(answer.message or "Unsupported operation")
    return BackendError(answer.message or "Backend error")


def _quote(reply: bytes) -> str:
    shown = repr(reply[:_SHOWN])
    return shown + (f" ... ({len(reply)} bytes)" if len(reply) > _SHOWN else "")


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


class _Lookup:
    """One request to rackd, from connecting to a reader (or an error), bounded by `timeout`.

    `result` is what the server waits for. It has no canceller on purpose:
    when the server gives up first (its own timeout, the client moved on,
    shutdown), the exchange still runs to its end so that an `EPH` file rackd
    created for us is deleted, and the timer still bounds it.
    """

    def __init__(self, backend: LegacyBackend, file_name: bytes, request: bytes) -> None:
        self.backend = backend
        self.file_name = file_name
        self.result: Deferred[FileReader] = Deferred()
        self.timed_out = False
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
        else:
            self.exchange.abort()  # -> _replied, with what came so far

    def _stop_timer(self) -> None:
        if self.timer.active():
            self.timer.cancel()

    def _fail(self, exception: TFTPError) -> None:
        if not self.result.called:  # else the server has already given up (cancelled it)
            self.result.errback(exception)

    def _not_connected(self, failure: Failure) -> None:
        self._stop_timer()
        self.backend.connected = False
        if self.timed_out:
            log.warn("rackd at {socket} did not accept a connection within {timeout}s (request for {file!r})",
                     socket=self.backend.socket_path, timeout=self.backend.timeout, file=self.file_name,
                     outcome="backend-timeout")
            self._fail(BackendError(NO_ANSWER))
            return
        log.warn("Cannot reach rackd at {socket} for {file!r}: {error}", socket=self.backend.socket_path,
                 file=self.file_name, error=failure.getErrorMessage(), outcome="backend-unavailable")
        self._fail(BackendError(UNREACHABLE))

    def _replied(self, reply: bytes) -> None:
        self._stop_timer()
        self.backend.connected = True
        socket_path = self.backend.socket_path
        if self.exchange.oversized:
            log.warn("Reply from rackd at {socket} for {file!r} exceeds {limit} bytes: {reply}", socket=socket_path,
                     file=self.file_name, limit=MAX_REPLY, reply=_quote(reply), outcome="backend-error")
            self._fail(BackendError(INVALID))
            return
        try:
            answer = parse_reply(reply)
        except MalformedReply as e:
            if self.timed_out:
                log.warn("rackd at {socket} did not answer {file!r} within {timeout}s (got {reply})",
                         socket=socket_path, file=self.file_name, timeout=self.backend.timeout,
                         reply=_quote(reply), outcome="backend-timeout")
                self._fail(BackendError(NO_ANSWER))
            else:
                log.warn("Invalid reply from rackd at {socket} for {file!r}: {reason}; reply {reply}",
                         socket=socket_path, file=self.file_name, reason=str(e), reply=_quote(reply),
                         outcome="backend-error")
                self._fail(BackendError(INVALID))
            return
        if isinstance(answer, ErrorAnswer):
            log.debug("rackd refused {file!r}: {code} {message}", file=self.file_name, code=answer.code,
                      message=answer.message)
            self._fail(error_for_answer(answer))
            return
        if self.result.called or self.timed_out:
            # Nobody will serve it (a complete answer that came without EOF in time also counts).
            if answer.ephemeral:
                discard_ephemeral(answer.path)
            self._fail(BackendError(NO_ANSWER))
            return
        try:
            reader = open_answer(answer)
        except TFTPError as e:
            self._fail(e)
            return
        self.result.callback(reader)


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
class LegacyBackend:
    """Asks a MAAS 2.2-3.4 rack controller what to serve, over its legacy offload socket.

    Stateless: one short-lived connection per request, so rackd restarting
    (or not running yet) costs the requests of that moment a TFTP error 0,
    and the next request simply connects again. The request's addresses come
    from `twisted.python.context` ("local" and "remote", as the server sets
    them); their ports are not part of the format.
    """

    def __init__(self, socket_path: str, timeout: float = LOOKUP_TIMEOUT, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.socket_path = socket_path
        self.timeout = timeout
        self.reactor = reactor
        self.connected: Optional[bool] = None
        """Whether the last request reached rackd (None before the first): one connection per request,
        so this is as near as the legacy format comes to a connection state (`tftp_backend_up`)."""

    def get_reader(self, file_name: bytes) -> Deferred[FileReader]:
        local: Optional[Any] = context.get("local")
        remote: Optional[Any] = context.get("remote")
        if local is None or remote is None:
            raise BackendError("Backend error: no request addresses (called outside a TFTP request)")
        request = encode_request(local[0], remote[0], file_name)
        return _Lookup(self, file_name, request).result

    def get_writer(self, file_name: bytes) -> None:
        raise Unsupported("Write requests are not supported")
