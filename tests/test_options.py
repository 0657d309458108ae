"""Option negotiation: what is granted, at what value, and what is echoed."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.sim import QUICK
from tftp_offload.options import (
    DEFAULT_BLKSIZE,
    IPV4_OVERHEAD,
    IPV6_OVERHEAD,
    MAX_BLKSIZE,
    MAX_WINDOWSIZE,
    MIN_BLKSIZE,
    Limits,
    Negotiated,
    blksize_for_mtu,
    negotiate,
)
from tftp_offload.packets import encode_oack

LIMITS = Limits()


def grant(
    requested: Dict[str, str],
    mode: str = "octet",
    size: Optional[int] = 1000,
    limits: Limits = LIMITS,
    **kwargs: Any,
) -> Negotiated:
    return negotiate(requested, mode, size, limits, **kwargs)


# -- what is echoed -------------------------------------------------------------------------------


def test_nothing_requested_nothing_echoed() -> None:
    assert grant({}) == Negotiated(DEFAULT_BLKSIZE, 1, LIMITS.timeout, {})


def test_no_option_accepted_gives_an_empty_oack() -> None:
    requested = {"blksize": "7", "timeout": "0", "windowsize": "0", "multicast": "", "rollover": "1", "x": "y"}
    result = grant(requested, size=None)
    assert result.oack == {}
    assert (result.blksize, result.windowsize, result.timeout) == (DEFAULT_BLKSIZE, 1, LIMITS.timeout)
    assert grant({"tsize": "0"}, size=None).oack == {}
    assert grant({"tsize": "0", "windowsize": "8"}, mode="netascii").oack == {}


@pytest.mark.parametrize(
    "requested, echoed",
    [
        ({"blksize": "1024"}, {"blksize": "1024"}),
        ({"tsize": "0"}, {"tsize": "1000"}),
        ({"timeout": "3"}, {"timeout": "3"}),
        ({"windowsize": "4"}, {"windowsize": "4"}),
        ({"blksize": "1024", "unknown": "1", "tsize": "0"}, {"blksize": "1024", "tsize": "1000"}),
    ],
)
def test_only_requested_options_are_echoed(requested: Dict[str, str], echoed: Dict[str, str]) -> None:
    assert grant(requested).oack == echoed


def test_echo_keeps_the_request_order() -> None:
    result = grant({"windowsize": "8", "tsize": "0", "blksize": "1024", "timeout": "2"})
    assert list(result.oack) == ["windowsize", "tsize", "blksize", "timeout"]


# -- blksize --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, granted",
    [("8", 8), ("9", 9), ("512", 512), ("1468", 1468), ("65464", MAX_BLKSIZE), ("65465", MAX_BLKSIZE),
     ("65535", MAX_BLKSIZE), ("99999999", MAX_BLKSIZE), ("0008", 8)],
)
def test_blksize_range(value: str, granted: int) -> None:
    result = grant({"blksize": value})
    assert result.blksize == granted
    assert result.oack == {"blksize": str(granted)}


@pytest.mark.parametrize("value", ["0", "1", "7"])
def test_blksize_below_8_is_ignored(value: str) -> None:
    result = grant({"blksize": value})
    assert result.blksize == DEFAULT_BLKSIZE
    assert result.oack == {}


def test_blksize_clamped_to_the_server_cap() -> None:
    limits = Limits(max_blksize=1024)
    assert grant({"blksize": "4096"}, limits=limits).oack == {"blksize": "1024"}
    assert grant({"blksize": "1000"}, limits=limits).blksize == 1000


@pytest.mark.parametrize("ipv6, overhead", [(False, IPV4_OVERHEAD), (True, IPV6_OVERHEAD)])
def test_blksize_clamped_to_the_path_mtu(ipv6: bool, overhead: int) -> None:
    assert blksize_for_mtu(1500, ipv6) == 1500 - overhead
    assert overhead == (40 if ipv6 else 20) + 8 + 4
    result = grant({"blksize": "65464"}, path_mtu=1500, ipv6=ipv6)
    assert result.blksize == (1448 if ipv6 else 1468)
    assert result.oack == {"blksize": str(result.blksize)}
    assert grant({"blksize": "1200"}, path_mtu=1500, ipv6=ipv6).blksize == 1200  # never raised
    assert grant({"blksize": "65464"}, path_mtu=9000, ipv6=ipv6).blksize == 9000 - overhead
    # the smaller of the MTU's and the operator's cap
    assert grant({"blksize": "65464"}, path_mtu=9000, ipv6=ipv6, limits=Limits(max_blksize=4096)).blksize == 4096


def test_tiny_path_mtu_still_allows_8() -> None:
    result = grant({"blksize": "512"}, path_mtu=30)
    assert result.blksize == MIN_BLKSIZE
    assert result.oack == {"blksize": "8"}


def test_no_path_mtu_means_no_mtu_clamp() -> None:
    assert grant({"blksize": "65464"}, path_mtu=None, ipv6=True).blksize == MAX_BLKSIZE


# -- tsize ----------------------------------------------------------------------------------------


def test_tsize_is_the_file_size() -> None:
    assert grant({"tsize": "0"}, size=123_456_789).oack == {"tsize": "123456789"}
    assert grant({"tsize": "0"}, size=0).oack == {"tsize": "0"}
    assert grant({"tsize": "999"}, size=5).oack == {"tsize": "5"}  # what the client sent is no matter


def test_tsize_needs_octet_and_a_known_size() -> None:
    assert grant({"tsize": "0"}, size=None).oack == {}
    assert grant({"tsize": "0"}, mode="netascii", size=100).oack == {}
    assert grant({"tsize": "0", "blksize": "1024"}, size=None).oack == {"blksize": "1024"}


# -- timeout --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, granted", [("1", 1.0), ("5", 5.0), ("255", 255.0)])
def test_timeout_in_range(value: str, granted: float) -> None:
    result = grant({"timeout": value})
    assert result.timeout == granted
    assert result.oack == {"timeout": value}


@pytest.mark.parametrize("value", ["0", "256", "1000"])
def test_timeout_out_of_range_is_ignored(value: str) -> None:
    result = grant({"timeout": value}, limits=Limits(timeout=2.5))
    assert result.timeout == 2.5
    assert result.oack == {}


def test_timeout_default_is_the_operators() -> None:
    assert grant({}, limits=Limits(timeout=0.5)).timeout == 0.5


# -- windowsize -----------------------------------------------------------------------------------


def test_windowsize_granted_and_capped_in_blocks() -> None:
    assert grant({"windowsize": "1"}).windowsize == 1
    assert grant({"windowsize": "16"}).oack == {"windowsize": "16"}
    result = grant({"windowsize": "65535"})
    assert result.windowsize == LIMITS.max_windowsize
    assert result.oack == {"windowsize": str(LIMITS.max_windowsize)}
    assert grant({"windowsize": "10"}, limits=Limits(max_windowsize=4)).windowsize == 4


def test_windowsize_capped_in_bytes_in_flight() -> None:
    limits = Limits(max_window_bytes=64 * 1024)
    result = grant({"blksize": "8192", "windowsize": "64"}, limits=limits)
    assert (result.blksize, result.windowsize) == (8192, 8)
    assert result.oack == {"blksize": "8192", "windowsize": "8"}
    # the order of the request does not matter: the byte cap uses the final blksize
    result = grant({"windowsize": "64", "blksize": "8192"}, limits=limits)
    assert result.oack == {"windowsize": "8", "blksize": "8192"}


def test_windowsize_byte_cap_never_below_one() -> None:
    result = grant({"blksize": "1468", "windowsize": "16"}, limits=Limits(max_window_bytes=1000))
    assert result.windowsize == 1
    assert result.oack == {"blksize": "1468", "windowsize": "1"}


def test_windowsize_byte_cap_uses_the_default_blksize() -> None:
    result = grant({"windowsize": "64"}, limits=Limits(max_window_bytes=4096))
    assert result.windowsize == 4096 // DEFAULT_BLKSIZE


def test_windowsize_0_is_ignored() -> None:
    result = grant({"windowsize": "0"})
    assert (result.windowsize, result.oack) == (1, {})


def test_netascii_forces_window_1_and_does_not_echo_it() -> None:
    result = grant({"windowsize": "16", "blksize": "1024", "tsize": "0", "timeout": "2"}, mode="netascii", size=10)
    assert result.windowsize == 1
    assert result.oack == {"blksize": "1024", "timeout": "2"}


# -- values the codec would refuse ----------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "abc", "-8", "1.5", " 512", "\u00b2", "\u0665\u0661\u0662", "9" * 5000])
def test_values_that_are_not_decimal_numbers_are_ignored(value: str) -> None:
    """The codec never passes these on, but a caller may build its own dict: no exception."""
    requested = dict.fromkeys(("blksize", "tsize", "timeout", "windowsize"), value)
    assert grant(requested) == Negotiated(DEFAULT_BLKSIZE, 1, LIMITS.timeout, {})


# -- Limits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_blksize": 7},
        {"max_blksize": 65465},
        {"max_windowsize": 0},
        {"max_windowsize": MAX_WINDOWSIZE + 1},
        {"max_window_bytes": 0},
        {"timeout": 0},
        {"timeout": -1},
        {"timeout": 255.5},
        {"timeout": 10, "give_up": 5},
        {"rollover": 2},
        {"rollover": -1},
    ],
)
def test_limits_refuse_nonsense(kwargs: Dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Limits(**kwargs)


def test_limits_accept_the_edges() -> None:
    Limits(max_blksize=8, max_windowsize=1, max_window_bytes=1, timeout=0.01, give_up=0.01, rollover=1)
    Limits(max_blksize=65464, max_windowsize=MAX_WINDOWSIZE, timeout=255, give_up=255)


def test_limits_defaults() -> None:
    assert Limits(65464, 64, 1 << 20, 1.0, 30.0, 0) == LIMITS


# -- properties -------------------------------------------------------------------------------------

number_strings = st.integers(0, 10**6).map(str)
requests = st.dictionaries(
    st.sampled_from(["blksize", "tsize", "timeout", "windowsize", "rollover", "multicast", "x"]),
    number_strings,
    max_size=6,
)


@QUICK
@given(
    requested=requests,
    mode=st.sampled_from(["octet", "netascii"]),
    size=st.none() | st.integers(0, 2**40),
    max_blksize=st.integers(MIN_BLKSIZE, MAX_BLKSIZE),
    max_windowsize=st.integers(1, MAX_WINDOWSIZE),
    max_window_bytes=st.integers(1, 1 << 24),
    path_mtu=st.none() | st.integers(0, 70000),
    ipv6=st.booleans(),
)
def test_negotiation_invariants(
    requested: Dict[str, str],
    mode: str,
    size: Optional[int],
    max_blksize: int,
    max_windowsize: int,
    max_window_bytes: int,
    path_mtu: Optional[int],
    ipv6: bool,
) -> None:
    limits = Limits(max_blksize=max_blksize, max_windowsize=max_windowsize, max_window_bytes=max_window_bytes)
    result = negotiate(requested, mode, size, limits, path_mtu, ipv6)
    assert set(result.oack) <= set(requested) & {"blksize", "tsize", "timeout", "windowsize"}
    assert MIN_BLKSIZE <= result.blksize <= MAX_BLKSIZE
    if "blksize" in result.oack:
        assert result.oack["blksize"] == str(result.blksize)
        assert result.blksize <= max(max_blksize, MIN_BLKSIZE)
        if path_mtu is not None:
            assert result.blksize <= max(MIN_BLKSIZE, blksize_for_mtu(path_mtu, ipv6))
    else:
        assert result.blksize == DEFAULT_BLKSIZE
    assert 1 <= result.windowsize <= max_windowsize
    assert result.windowsize == 1 or result.windowsize * result.blksize <= max_window_bytes
    if "windowsize" in result.oack:
        assert result.oack["windowsize"] == str(result.windowsize) and mode == "octet"
    else:
        assert result.windowsize == 1
    if "tsize" in result.oack:
        assert mode == "octet" and result.oack["tsize"] == str(size)
    assert 1 <= result.timeout <= 255 or result.timeout == limits.timeout


def test_the_same_question_gets_the_same_answer_once_worked_out() -> None:
    """A storm's requests ask alike: the answer is remembered, and another question is answered anew."""
    limits = Limits()
    first = negotiate({"blksize": "1468", "tsize": "0"}, "octet", 1024, limits, 1500)
    assert negotiate({"blksize": "1468", "tsize": "0"}, "octet", 1024, limits, 1500) is first
    other = negotiate({"blksize": "1468", "tsize": "0"}, "octet", 2048, limits, 1500)
    assert other is not first and other.oack == {"blksize": "1468", "tsize": "2048"}
    assert negotiate({"blksize": "1468", "tsize": "0"}, "octet", 1024, limits, 1280).blksize == 1280 - IPV4_OVERHEAD


def test_limits_are_a_key_by_value() -> None:
    """Limits hash once, by their values: equal limits share answers, other limits get their own."""
    question = ({"blksize": "9000", "windowsize": "64"}, "octet", 1 << 20)
    first = negotiate(*question, Limits(max_blksize=4096))
    assert hash(Limits(max_blksize=4096)) == hash(Limits(max_blksize=4096))
    assert negotiate(*question, Limits(max_blksize=4096)) is first
    narrower = dataclasses.replace(Limits(max_blksize=4096), max_windowsize=8)
    assert narrower != Limits(max_blksize=4096) and hash(narrower) != hash(Limits(max_blksize=4096))
    assert (first.blksize, first.windowsize) == (4096, 64)
    assert negotiate(*question, narrower).windowsize == 8


def test_the_oack_datagram_is_encoded_with_the_answer() -> None:
    """What the engine sends first: the OACK's bytes in the request's option order, or nothing."""
    result = grant({"tsize": "0", "blksize": "1468"})
    assert result.datagram == b"\x00\x06tsize\x001000\x00blksize\x001468\x00"
    assert result.datagram == encode_oack(result.oack)
    assert grant({}).datagram is None and grant({"tsize": "0"}, size=None).datagram is None
    assert Negotiated(512, 1, 1.0, {"timeout": "3"}).datagram == b"\x00\x06timeout\x003\x00"
