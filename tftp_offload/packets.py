"""The TFTP wire codec (RFC 1350, 2347): datagrams to values and back, no I/O.

Decoding is strict on purpose: a network-boot server faces ROMs with bugs and
scanners with worse, and every datagram that does not follow the RFCs to the
letter must fail here, with one exception type and a reason that can be logged
and sent back, before any other layer sees it.

Encoding of DATA packets is not done here per block: the transfer engine
builds them with `DATA_HEADER` directly, because that is the hot path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from functools import lru_cache
from typing import Dict, Union


class Opcode(IntEnum):
    RRQ = 1
    WRQ = 2
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6


class ErrorCode(IntEnum):
    """TFTP error codes (RFC 1350, and 8 from RFC 2347)."""

    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_REFUSED = 8


MODES = ("netascii", "octet")
"""Transfer modes served. "mail" (RFC 1350) is obsolete and refused as unknown."""

NUMERIC_OPTIONS = frozenset({"blksize", "tsize", "timeout", "windowsize", "rollover"})
"""Options whose value must be a decimal number; anything else is a malformed request."""

MAX_NUMBER_DIGITS = 20
"""Longer numbers are not numbers any client means; refusing them bounds int() work."""

_HEADER = struct.Struct("!HH")
DATA_HEADER = _HEADER
"""Opcode and block number: the first four bytes of DATA, ACK and ERROR packets."""
_OPCODE = struct.Struct("!H")


class MalformedPacket(ValueError):
    """A datagram that is not a valid TFTP packet; the message says why."""


@dataclass(frozen=True)
class Request:
    """An RRQ or WRQ. `filename` stays bytes: what it means is the backend's business."""

    opcode: Opcode
    filename: bytes
    mode: str
    options: Dict[str, str] = field(default_factory=dict)
    """Option names lower-cased, in the order sent (dicts keep it); shared by every request decoded
    from the same bytes (`decode`), so never changed."""


@dataclass(frozen=True)
class Data:
    block: int
    payload: bytes


@dataclass(frozen=True)
class Ack:
    block: int


@dataclass(frozen=True)
class Error:
    code: int
    message: str


@dataclass(frozen=True)
class OptionAck:
    options: Dict[str, str]


Packet = Union[Request, Data, Ack, Error, OptionAck]


def _split_strings(body: bytes, what: str) -> list[bytes]:
    """Split NUL-terminated strings; the body must end with a NUL."""
    if not body.endswith(b"\0"):
        raise MalformedPacket(f"{what} does not end with a NUL byte")
    return body[:-1].split(b"\0")


def _ascii(raw: bytes, what: str) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedPacket(f"{what} is not ASCII") from None


def _decode_options(fields: list[bytes], what: str) -> Dict[str, str]:
    if len(fields) % 2:
        raise MalformedPacket(f"{what} has an option without a value")
    options: Dict[str, str] = {}
    if not fields:
        return options
    try:
        texts = b"\0".join(fields).decode("ascii").split("\0")  # one decode for all: every request has some
    except UnicodeDecodeError:
        texts = []
        for i, raw in enumerate(fields):  # which one, for the message
            texts.append(_ascii(raw, f"the value of option {texts[-1].lower()!r}" if i % 2 else "an option name"))
    for i in range(0, len(texts), 2):
        name = texts[i].lower()
        value = texts[i + 1]
        if not name:
            raise MalformedPacket(f"{what} has an empty option name")
        if name in options:
            raise MalformedPacket(f"{what} repeats option {name!r}")
        if name in NUMERIC_OPTIONS and not (
            0 < len(value) <= MAX_NUMBER_DIGITS and value.isdigit() and value.isascii()
        ):
            raise MalformedPacket(f"option {name!r} has a bad number {value!r}")
        options[name] = value
    return options


CACHED_REQUEST_BYTES = 512
"""Requests up to this size (RFC 1350's datagram, which every ROM's fits) are decoded once per
distinct datagram, `CACHED_REQUESTS` of them at most: a boot storm's machines send the same bytes
for the same bootloader, and decoding one is a tenth of a small file's Python. A larger request is
decoded afresh each time, so the cache holds at most that many times this many bytes."""
CACHED_REQUESTS = 512


def decode(datagram: bytes) -> Packet:
    """Decode one datagram, or raise `MalformedPacket` (which is never cached).

    A request may be the very object an earlier identical datagram decoded to: its `options`
    are shared, not to be changed (`RequestContext` hands backends a copy).
    """
    if 4 <= len(datagram) <= CACHED_REQUEST_BYTES and datagram[0] == 0 and (datagram[1] == 1 or datagram[1] == 2):
        return _decode_request(datagram)
    return _decode(datagram)


def _decode(datagram: bytes) -> Packet:
    if len(datagram) < 2:
        raise MalformedPacket("datagram shorter than an opcode")
    (op,) = _OPCODE.unpack_from(datagram)
    if op == 1 or op == 2:  # RRQ, WRQ: compared as ints, the common case first
        fields = _split_strings(datagram[2:], "request")
        if len(fields) < 2:
            raise MalformedPacket("request lacks a filename or mode")
        filename = fields[0]
        if not filename:
            raise MalformedPacket("request has an empty filename")
        mode = _ascii(fields[1], "mode").lower()
        if mode not in MODES:
            raise MalformedPacket(f"unknown transfer mode {mode!r}")
        return Request(Opcode.RRQ if op == 1 else Opcode.WRQ, filename, mode, _decode_options(fields[2:], "request"))
    if op == Opcode.DATA:
        if len(datagram) < 4:
            raise MalformedPacket("DATA packet shorter than its header")
        return Data(_HEADER.unpack_from(datagram)[1], datagram[4:])
    if op == Opcode.ACK:
        if len(datagram) != 4:
            raise MalformedPacket(f"ACK packet of {len(datagram)} bytes, not 4")
        return Ack(_HEADER.unpack_from(datagram)[1])
    if op == Opcode.ERROR:
        if len(datagram) < 5:
            raise MalformedPacket("ERROR packet shorter than its header")
        fields = _split_strings(datagram[4:], "ERROR packet")
        if len(fields) != 1:
            raise MalformedPacket("ERROR packet has bytes after its message")
        message = fields[0].decode("utf-8", "replace")
        return Error(_HEADER.unpack_from(datagram)[1], message)
    if op == Opcode.OACK:
        fields = _split_strings(datagram[2:], "OACK") if len(datagram) > 2 else []
        if not fields:
            raise MalformedPacket("OACK without options")
        return OptionAck(_decode_options(fields, "OACK"))
    raise MalformedPacket(f"unknown opcode {op}")


_decode_request = lru_cache(maxsize=CACHED_REQUESTS)(_decode)


def _encode_options(options: Dict[str, str]) -> bytes:
    return b"".join(
        name.encode("ascii") + b"\0" + value.encode("ascii") + b"\0" for name, value in options.items()
    )


def encode_request(request: Request) -> bytes:
    return (
        _OPCODE.pack(request.opcode)
        + request.filename
        + b"\0"
        + request.mode.encode("ascii")
        + b"\0"
        + _encode_options(request.options)
    )


def encode_data(block: int, payload: bytes) -> bytes:
    return _HEADER.pack(Opcode.DATA, block) + payload


def encode_ack(block: int) -> bytes:
    return _HEADER.pack(Opcode.ACK, block)


MAX_ERROR_MESSAGE = 400
"""Bytes of message sent at most: an ERROR must fit the smallest datagram a ROM takes (512)."""


@lru_cache(maxsize=256)  # a handful of (code, message) pairs answer nearly every refusal: encoded once each
def encode_error(code: int, message: str) -> bytes:
    cut = message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE].decode("utf-8", "ignore")
    text = cut.encode("utf-8").replace(b"\0", b" ")
    return _HEADER.pack(Opcode.ERROR, code) + text + b"\0"


def encode_oack(options: Dict[str, str]) -> bytes:
    if not options:
        raise ValueError("an OACK must carry at least one option")
    return _OPCODE.pack(Opcode.OACK) + _encode_options(options)


def encode(packet: Packet) -> bytes:
    """Encode any packet value; the inverse of `decode`."""
    if isinstance(packet, Request):
        return encode_request(packet)
    if isinstance(packet, Data):
        return encode_data(packet.block, packet.payload)
    if isinstance(packet, Ack):
        return encode_ack(packet.block)
    if isinstance(packet, Error):
        return encode_error(packet.code, packet.message)
    return encode_oack(packet.options)
