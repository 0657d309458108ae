"""The legacy MAAS offload wire format (MAAS 2.2 to 3.4), as bytes: encoding a request, parsing a reply.

With `tftp_port: 0`, a MAAS 2.2-3.4 rack controller (rackd) listens on a UNIX stream
socket and answers one request per connection in a small NUL-delimited format (see
docs/legacy.md):

    request:  <local IP> NUL <client IP> NUL <filename> NUL $
    reply:    - NUL <kind> NUL <path> NUL $       kind: "-" (static) or "EPH" (delete after serving)
         or:  <code> NUL <UTF-8 message> NUL $

Nothing here does I/O: `legacy.LegacyBackend` runs the exchange. The reply is parsed
strictly: anything empty, truncated, oversized or oddly shaped is `MalformedReply`, never a guess.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Union

from ..errors import AccessViolation, BackendError, FileNotFound, TFTPError, Unsupported

MAX_REPLY = 65536
"""Bytes of reply accepted: a path is at most PATH_MAX (4096); anything far longer is not a reply."""

_SHOWN = 200
"""Bytes of a bad reply quoted in the log: enough to recognise it, not enough to flood."""

TERMINATOR = b"\0$"
"""What ends a request and a reply."""
_STATIC, _EPHEMERAL = b"-", b"EPH"


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

    A filename with a NUL would shift rackd's fields, so it is refused here,
    clearly. Anything else goes as the client sent it: rackd serves non-ASCII
    names (`caf\u00e9.txt`) like any other.
    """
    if b"\0" in file_name:
        raise AccessViolation("Access violation: NUL in filename")
    return b"\0".join((wire_host(local), wire_host(client), file_name)) + TERMINATOR


def parse_reply(reply: bytes) -> Union[FileAnswer, ErrorAnswer]:
    """Parse one complete reply (everything up to EOF), strictly; raise `MalformedReply`."""
    if not reply:
        raise MalformedReply("empty reply: the connection closed without an answer")
    if not reply.endswith(TERMINATOR):
        if TERMINATOR in reply:
            raise MalformedReply("bytes after the terminating NUL $")
        raise MalformedReply("truncated reply: no terminating NUL $")
    fields = reply[: -len(TERMINATOR)].split(b"\0")
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
    so a message starting `File not found` is error 1, and one starting
    `Insecure path` (a traversal: `../../etc/passwd`) is error 2, as rackd's
    own TFTP server sends them. Both texts name server paths, which are not
    the client's business: the client gets the standard text. So does any
    other message that holds a path (a `/`); the rest are passed on.
    """
    message = answer.message
    if answer.code == FileNotFound.code or message.startswith("File not found"):
        return FileNotFound("File not found")
    if answer.code == AccessViolation.code or message.startswith("Insecure path"):
        return AccessViolation(_shown(message, "Access violation"))
    if answer.code == Unsupported.code:
        return Unsupported(_shown(message, "Unsupported operation"))
    return BackendError(_shown(message, "Backend error"))


def _shown(message: str, standard: str) -> str:
    """rackd's message for the client, unless it is empty or names a path (then the standard text)."""
    if not message or "/" in message or "\\" in message or message.startswith("Insecure path"):
        return standard
    return message


def quote(reply: bytes) -> str:
    """A reply as the log shows it: its start, and its length when longer."""
    shown = repr(reply[:_SHOWN])
    return shown + (f" ... ({len(reply)} bytes)" if len(reply) > _SHOWN else "")
