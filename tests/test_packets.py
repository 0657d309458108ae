"""The wire codec: round trips, strict refusal of anything malformed, and fuzzing."""

from __future__ import annotations

import struct
from typing import Dict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.sim import QUICK
from tftp_offload import packets
from tftp_offload.packets import (
    Ack,
    Data,
    Error,
    MalformedPacket,
    Opcode,
    OptionAck,
    Packet,
    Request,
    decode,
    encode,
)


def op(code: int) -> bytes:
    return struct.pack("!H", code)


# -- round trips --------------------------------------------------------------------------------

ROUND_TRIPS = [
    (Request(Opcode.RRQ, b"pxelinux.0", "octet"), b"\x00\x01pxelinux.0\x00octet\x00"),
    (Request(Opcode.RRQ, b"grub/grub.cfg", "netascii"), b"\x00\x01grub/grub.cfg\x00netascii\x00"),
    (
        Request(Opcode.RRQ, b"bootx64.efi", "octet", {"blksize": "1468", "tsize": "0", "windowsize": "16"}),
        b"\x00\x01bootx64.efi\x00octet\x00blksize\x001468\x00tsize\x000\x00windowsize\x0016\x00",
    ),
    (
        Request(Opcode.RRQ, b"\xff\xfe non-ascii", "octet", {"multicast": ""}),
        b"\x00\x01\xff\xfe non-ascii\x00octet\x00multicast\x00\x00",
    ),
    (Request(Opcode.WRQ, b"upload", "octet"), b"\x00\x02upload\x00octet\x00"),
    (Data(1, b"hello"), b"\x00\x03\x00\x01hello"),
    (Data(0, b""), b"\x00\x03\x00\x00"),
    (Data(65535, b"\x00" * 512), b"\x00\x03\xff\xff" + b"\x00" * 512),
    (Ack(0), b"\x00\x04\x00\x00"),
    (Ack(65535), b"\x00\x04\xff\xff"),
    (Error(1, "File not found"), b"\x00\x05\x00\x01File not found\x00"),
    (Error(0, ""), b"\x00\x05\x00\x00\x00"),
    (Error(8, "caf\u00e9"), b"\x00\x05\x00\x08caf\xc3\xa9\x00"),
    (OptionAck({"blksize": "1468"}), b"\x00\x06blksize\x001468\x00"),
    (
        OptionAck({"tsize": "123", "blksize": "512", "timeout": "3"}),
        b"\x00\x06tsize\x00123\x00blksize\x00512\x00timeout\x003\x00",
    ),
]


@pytest.mark.parametrize("packet, wire", ROUND_TRIPS)
def test_round_trip(packet: Packet, wire: bytes) -> None:
    assert encode(packet) == wire
    assert decode(wire) == packet


def test_option_order_is_kept() -> None:
    request = decode(b"\x00\x01f\x00octet\x00windowsize\x004\x00blksize\x00512\x00tsize\x000\x00")
    assert isinstance(request, Request)
    assert list(request.options) == ["windowsize", "blksize", "tsize"]


def test_specific_encoders_match_encode() -> None:
    assert packets.encode_data(7, b"x") == encode(Data(7, b"x"))
    assert packets.encode_ack(7) == encode(Ack(7))
    assert packets.encode_error(2, "no") == encode(Error(2, "no"))
    assert packets.encode_oack({"a": "b"}) == encode(OptionAck({"a": "b"}))
    assert packets.DATA_HEADER.pack(Opcode.DATA, 9) + b"p" == packets.encode_data(9, b"p")


# -- case -----------------------------------------------------------------------------------------


def test_option_names_and_mode_are_case_insensitive() -> None:
    request = decode(b"\x00\x01File.BIN\x00OcTeT\x00BLKSIZE\x001024\x00TSize\x000\x00Vendor\x00AbC\x00")
    assert request == Request(Opcode.RRQ, b"File.BIN", "octet", {"blksize": "1024", "tsize": "0", "vendor": "AbC"})
    assert decode(b"\x00\x01f\x00NETASCII\x00") == Request(Opcode.RRQ, b"f", "netascii")
    oack = decode(b"\x00\x06BlkSize\x00512\x00")
    assert oack == OptionAck({"blksize": "512"})


def test_repeated_option_differing_only_in_case_is_malformed() -> None:
    with pytest.raises(MalformedPacket, match="repeats"):
        decode(b"\x00\x01f\x00octet\x00blksize\x00512\x00BLKSIZE\x001024\x00")


# -- malformed ------------------------------------------------------------------------------------

MALFORMED = {
    "empty": b"",
    "one byte": b"\x00",
    "unknown opcode 0": b"\x00\x00whatever",
    "unknown opcode 7": b"\x00\x07\x00\x01",
    "unknown opcode 0xffff": b"\xff\xff",
    "opcode alone, RRQ": b"\x00\x01",
    "RRQ without NUL": b"\x00\x01pxelinux.0",
    "RRQ without mode": b"\x00\x01pxelinux.0\x00",
    "RRQ mode without NUL": b"\x00\x01pxelinux.0\x00octet",
    "RRQ empty filename": b"\x00\x01\x00octet\x00",
    "RRQ empty mode": b"\x00\x01f\x00\x00",
    "RRQ mode mail": b"\x00\x01f\x00mail\x00",
    "RRQ mode MAIL": b"\x00\x01f\x00MAIL\x00",
    "RRQ mode binary": b"\x00\x01f\x00binary\x00",
    "RRQ mode not ASCII": b"\x00\x01f\x00oct\xe9t\x00",
    "RRQ odd options": b"\x00\x01f\x00octet\x00blksize\x00",
    "RRQ odd options, 3": b"\x00\x01f\x00octet\x00blksize\x00512\x00tsize\x00",
    "RRQ option value without NUL": b"\x00\x01f\x00octet\x00blksize\x00512",
    "RRQ trailing NUL": b"\x00\x01f\x00octet\x00\x00",
    "RRQ repeated option": b"\x00\x01f\x00octet\x00tsize\x000\x00tsize\x000\x00",
    "RRQ empty option name": b"\x00\x01f\x00octet\x00\x00512\x00",
    "RRQ option name not ASCII": b"\x00\x01f\x00octet\x00bl\xffksize\x00512\x00",
    "RRQ option value not ASCII": b"\x00\x01f\x00octet\x00vendor\x00\xff\x00",
    "WRQ mode mail": b"\x00\x02f\x00mail\x00",
    "DATA short header": b"\x00\x03\x00",
    "ACK short": b"\x00\x04\x00",
    "ACK long": b"\x00\x04\x00\x01\x00",
    "ACK opcode only": b"\x00\x04",
    "ERROR header only": b"\x00\x05\x00\x01",
    "ERROR short": b"\x00\x05\x00",
    "ERROR without NUL": b"\x00\x05\x00\x01oops",
    "ERROR trailing bytes": b"\x00\x05\x00\x01oops\x00more",
    "ERROR trailing string": b"\x00\x05\x00\x01oops\x00more\x00",
    "ERROR trailing NUL": b"\x00\x05\x00\x01oops\x00\x00",
    "OACK empty": b"\x00\x06",
    "OACK NUL only": b"\x00\x06\x00",
    "OACK odd": b"\x00\x06blksize\x00",
    "OACK without NUL": b"\x00\x06blksize\x00512",
    "OACK repeated": b"\x00\x06tsize\x001\x00TSIZE\x001\x00",
    "OACK bad number": b"\x00\x06blksize\x00big\x00",
}


@pytest.mark.parametrize("datagram", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed(datagram: bytes) -> None:
    with pytest.raises(MalformedPacket):
        decode(datagram)


@pytest.mark.parametrize("name", sorted(packets.NUMERIC_OPTIONS))
@pytest.mark.parametrize(
    "value",
    ["", "abc", "-1", "+5", "1.5", " 512", "512 ", "0x10", "1e3", "5" * (packets.MAX_NUMBER_DIGITS + 1)],
)
def test_numeric_options_need_decimal_numbers(name: str, value: str) -> None:
    datagram = b"\x00\x01f\x00octet\x00" + name.upper().encode() + b"\x00" + value.encode() + b"\x00"
    with pytest.raises(MalformedPacket, match="bad number"):
        decode(datagram)


@pytest.mark.parametrize("name", sorted(packets.NUMERIC_OPTIONS))
def test_numeric_options_accept_decimal_numbers(name: str) -> None:
    longest = "9" * packets.MAX_NUMBER_DIGITS
    for value in ("0", "8", "0512", longest):
        request = decode(b"\x00\x01f\x00octet\x00" + name.encode() + b"\x00" + value.encode() + b"\x00")
        assert isinstance(request, Request) and request.options == {name: value}


def test_unknown_options_may_carry_any_ascii_value() -> None:
    request = decode(b"\x00\x01f\x00octet\x00multicast\x00\x00x-vendor\x00a b-c\x00")
    assert isinstance(request, Request)
    assert request.options == {"multicast": "", "x-vendor": "a b-c"}


def test_malformed_is_a_value_error_with_a_reason() -> None:
    with pytest.raises(ValueError, match="unknown transfer mode 'mail'"):
        decode(b"\x00\x01f\x00mail\x00")
    with pytest.raises(MalformedPacket, match="unknown opcode 9"):
        decode(b"\x00\x09")


# -- encoding details -----------------------------------------------------------------------------


def test_error_message_is_bounded_and_has_no_nul() -> None:
    datagram = packets.encode_error(0, "x" * 2000)
    assert len(datagram) == 4 + packets.MAX_ERROR_MESSAGE + 1
    assert decode(datagram) == Error(0, "x" * packets.MAX_ERROR_MESSAGE)
    assert decode(packets.encode_error(4, "a\0b")) == Error(4, "a b")


def test_error_message_cut_inside_a_character_still_decodes() -> None:
    datagram = packets.encode_error(0, "x" + "\u00e9" * 400)  # 801 bytes of UTF-8, cut at 400
    error = decode(datagram)
    assert isinstance(error, Error) and error.message.startswith("x\u00e9")


def test_undecodable_error_text_is_replaced_not_refused() -> None:
    assert decode(b"\x00\x05\x00\x02\xff\xfe\x00") == Error(2, "\ufffd\ufffd")


def test_empty_oack_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        packets.encode_oack({})
    with pytest.raises(ValueError):
        encode(OptionAck({}))


# -- fuzzing --------------------------------------------------------------------------------------


def known_opcode_prefix() -> st.SearchStrategy[bytes]:
    """Bytes that start like a TFTP packet, so the fuzzing reaches past the opcode check."""
    fields = st.lists(
        st.one_of(
            st.sampled_from([b"octet", b"netascii", b"mail", b"blksize", b"tsize", b"512", b"", b"0", b"x"]),
            st.binary(max_size=12),
        ),
        max_size=7,
    )
    return st.builds(
        lambda code, parts, tail: op(code) + b"\0".join(parts) + tail,
        st.integers(0, 8),
        fields,
        st.sampled_from([b"", b"\0", b"\0\0"]),
    )


@QUICK
@given(st.one_of(st.binary(max_size=600), known_opcode_prefix()))
def test_decode_only_ever_raises_malformed_packet(datagram: bytes) -> None:
    try:
        packet = decode(datagram)
    except MalformedPacket:
        return
    assert isinstance(packet, (Request, Data, Ack, Error, OptionAck))


ascii_text = st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=20)
option_names = st.sampled_from(["blksize", "tsize", "timeout", "windowsize", "rollover"]) | st.text(
    "abcdefghijklmnopqrstuvwxyz-_", min_size=1, max_size=12
)
numbers = st.integers(0, 10**12).map(str)


@st.composite
def option_dicts(draw: st.DrawFn, min_size: int = 0) -> Dict[str, str]:
    names = draw(st.lists(option_names, min_size=min_size, max_size=6, unique=True))
    return {
        name: draw(numbers if name in packets.NUMERIC_OPTIONS else ascii_text)
        for name in names
    }


valid_packets = st.one_of(
    st.builds(
        Request,
        st.sampled_from([Opcode.RRQ, Opcode.WRQ]),
        st.binary(min_size=1, max_size=100).filter(lambda name: b"\0" not in name),
        st.sampled_from(packets.MODES),
        option_dicts(),
    ),
    st.builds(Data, st.integers(0, 65535), st.binary(max_size=600)),
    st.builds(Ack, st.integers(0, 65535)),
    st.builds(
        Error,
        st.integers(0, 65535),
        st.text(max_size=100).map(lambda text: text.replace("\0", " ")),  # no surrogates by default
    ),
    st.builds(OptionAck, option_dicts(min_size=1)),
)


@QUICK
@given(valid_packets)
def test_valid_packets_round_trip(packet: Packet) -> None:
    datagram = encode(packet)
    assert decode(datagram) == packet
    assert encode(decode(datagram)) == datagram


def test_a_request_is_decoded_once_per_distinct_datagram() -> None:
    """A storm's identical RRQs share one decoded `Request`; a different one, or a large one, does not."""
    wire = b"\0\1pxelinux.0\0octet\0blksize\x001468\0tsize\x000\0"
    first = decode(wire)
    assert decode(bytes(wire)) is first  # equal bytes, another object: as two clients' datagrams are
    assert decode(wire.replace(b"pxelinux.0", b"ldlinux.c32")) is not first
    large = b"\0\1" + b"f" * 300 + b"\0octet\0" + b"x" * 100 + b"\0" + b"y" * 200 + b"\0"
    assert len(large) > packets.CACHED_REQUEST_BYTES
    assert decode(large) == decode(large) and decode(large) is not decode(large)


def test_a_malformed_request_is_refused_every_time() -> None:
    """Refusals are not cached away: the same bad datagram raises (with its reason) each time it comes."""
    for _ in range(2):
        with pytest.raises(MalformedPacket, match="unknown transfer mode"):
            decode(b"\0\1file\0mail\0")
