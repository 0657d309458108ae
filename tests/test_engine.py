"""The sans-I/O read-transfer engine, driven by hand and by a simulated client (tests/support/sim.py)."""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Tuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.sim import QUICK, Harness, Monitor, SimClient, data_blocks, make_engine, wire
from tftp_offload import engine as engine_module
from tftp_offload import packets
from tftp_offload.engine import MAX_BACKOFF, Outcome, ReadTransfer
from tftp_offload.options import Limits
from tftp_offload.packets import ErrorCode, encode_ack, encode_error


def ack(number: int) -> bytes:
    return encode_ack(number)


class Source:
    """A reader over bytes for driving the engine by hand."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def read(self, size: int) -> bytes:
        chunk = self.data[self.offset : self.offset + size]
        self.offset += len(chunk)
        return chunk


def pump(engine: ReadTransfer, source: Source, now: float = 0.0) -> List[bytes]:
    """Give the engine all it asks for, as a synchronous driver does; returns what it sent."""
    out: List[bytes] = []
    while engine.need > 0:
        out += engine.data(source.read(engine.need), now)
    return out


def begin(engine: ReadTransfer, source: Source, now: float = 0.0) -> List[bytes]:
    return list(engine.start(now)) + pump(engine, source, now)


def event(engine: ReadTransfer, source: Source, datagram: bytes, now: float = 0.0) -> List[bytes]:
    """Deliver a datagram and read what that makes the engine ask for."""
    return list(engine.datagram(datagram, now)) + pump(engine, source, now)


def payloads(datagrams: List[bytes]) -> List[bytes]:
    found = []
    for datagram in datagrams:
        packet = packets.decode(datagram)
        if isinstance(packet, packets.Data):
            found.append(packet.payload)
    return found


def pattern(size: int) -> bytes:
    """Bytes that differ block to block even at blksize 8, cheaper than urandom for big sizes."""
    return bytes(range(251)) * (size // 251) + bytes(range(size % 251))


# -- whole transfers over the simulated client ------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 1024, 5000])
def test_lockstep_transfer_is_byte_identical(size: int) -> None:
    source = os.urandom(size)
    engine = make_engine(blksize=512)
    run = Harness(engine, source)
    assert run.run() == Outcome.COMPLETE
    assert bytes(run.client.data) == source and run.client.done
    assert engine.bytes_acked == size
    assert run.monitor is not None and run.monitor.data_packets == size // 512 + 1
    assert engine.retransmits == 0 and engine.duplicate_acks == 0


@pytest.mark.parametrize("windowsize", [1, 2, 4, 16])
@pytest.mark.parametrize("size", [0, 100, 8 * 64, 8 * 64 + 3, 10_000])
def test_windowed_transfer_with_oack_is_byte_identical(windowsize: int, size: int) -> None:
    source = os.urandom(size)
    oack = {"blksize": "64", "windowsize": str(windowsize)}
    engine = make_engine(blksize=64, windowsize=windowsize, oack=oack)
    run = Harness(engine, source, oack=packets.encode_oack(oack))
    assert run.run() == Outcome.COMPLETE
    assert bytes(run.client.data) == source
    assert run.client.oack == oack
    assert engine.bytes_acked == size
    assert run.monitor is not None and run.monitor.data_packets == size // 64 + 1
    assert engine.retransmits == 0


@pytest.mark.parametrize("read_delay", [0.001, 0.05])
@pytest.mark.parametrize("windowsize", [1, 4, 8])
def test_asynchronous_reader_under_loss(windowsize: int, read_delay: float) -> None:
    """Reads that complete later (a Deferred), while ACKs keep arriving, lose nothing."""
    source = os.urandom(20_000)
    engine = make_engine(blksize=100, windowsize=windowsize, limits=Limits(give_up=10_000))
    run = Harness(engine, source, read_delay=read_delay, loss=0.15, reorder=0.2, seed=windowsize)
    assert run.run() == Outcome.COMPLETE
    assert bytes(run.client.data) == source
    assert engine.retransmits > 0 and run.client.duplicates > 0  # the loss did bite
    if windowsize > 1:
        assert run.client.gaps > 0


def test_duplicated_datagrams_never_cause_a_resend() -> None:
    """Sorcerer's Apprentice: with every datagram possibly doubled (and no loss), each block goes
    out exactly once although the engine sees many duplicate ACKs."""
    source = os.urandom(30_000)
    for windowsize in (1, 4):
        engine = make_engine(blksize=100, windowsize=windowsize)
        run = Harness(engine, source, duplicate=0.5, seed=7)
        assert run.run() == Outcome.COMPLETE
        assert bytes(run.client.data) == source
        assert run.monitor is not None and run.monitor.data_packets == 301
        assert engine.duplicate_acks > 10
        assert engine.retransmits == 0


# -- beginnings and ends ----------------------------------------------------------------------


def test_without_oack_data_1_comes_first() -> None:
    engine = make_engine(blksize=512, windowsize=1)
    assert engine.start(0.0) == []
    assert engine.need == 512
    out = engine.data(b"x" * 512, 0.0)
    assert [packets.decode(d) for d in out] == [packets.Data(1, b"x" * 512)]


def test_oack_is_sent_first_and_no_data_goes_before_ack_0() -> None:
    oack = {"blksize": "8", "windowsize": "4", "tsize": "100"}
    engine = make_engine(blksize=8, windowsize=4, oack=oack)
    source = Source(pattern(100))
    out = begin(engine, source)
    assert out == [packets.encode_oack(oack)]
    for stray in (ack(1), ack(4), ack(65535)):
        assert engine.datagram(stray, 0.1) == []
    assert engine.duplicate_acks == 3
    assert pump(engine, source) == []
    out = event(engine, source, ack(0), 0.2)
    assert data_blocks(out) == [1, 2, 3, 4]
    assert payloads(out) == [source.data[i : i + 8] for i in range(0, 32, 8)]
    # a second ACK 0 is a duplicate, not a new start
    assert event(engine, source, ack(0), 0.3) == []
    assert engine.duplicate_acks == 4


def test_lockstep_oack_then_data() -> None:
    oack = {"blksize": "1024"}
    engine = make_engine(blksize=1024, oack=oack)
    source = Source(pattern(1500))
    assert begin(engine, source) == [packets.encode_oack(oack)]
    assert data_blocks(event(engine, source, ack(0))) == [1]
    out = event(engine, source, ack(1))
    assert data_blocks(out) == [2] and payloads(out) == [source.data[1024:]]
    assert engine.datagram(ack(2), 1.0) == [] and engine.outcome == Outcome.COMPLETE


def test_exact_multiple_of_blksize_ends_with_an_empty_block() -> None:
    engine = make_engine(blksize=512, windowsize=4)
    source = Source(pattern(1024))
    out = begin(engine, source)
    assert data_blocks(out) == [1, 2, 3]
    assert [len(payload) for payload in payloads(out)] == [512, 512, 0]
    assert engine.need == 0
    assert data_blocks(engine.datagram(ack(2), 0.1)) == [3]  # a partial ACK: the empty block again
    assert engine.datagram(ack(3), 0.2) == []
    assert engine.outcome == Outcome.COMPLETE
    assert engine.bytes_acked == 1024


def test_partial_ack_at_the_end_resends_only_the_tail() -> None:
    engine = make_engine(blksize=8, windowsize=4)
    source = Source(pattern(20))  # blocks 1, 2 full, 3 has 4 bytes
    assert data_blocks(begin(engine, source)) == [1, 2, 3]
    out = event(engine, source, ack(1))
    assert data_blocks(out) == [2, 3]
    assert event(engine, source, ack(3)) == []
    assert engine.outcome == Outcome.COMPLETE
    assert engine.bytes_acked == 20


def test_empty_file_is_one_empty_data_1() -> None:
    engine = make_engine(blksize=512, windowsize=8)
    out = begin(engine, Source(b""))
    assert [packets.decode(d) for d in out] == [packets.Data(1, b"")]
    assert engine.need == 0
    assert engine.bytes_acked == 0
    assert engine.datagram(ack(1), 0.5) == []
    assert engine.outcome == Outcome.COMPLETE
    assert engine.bytes_acked == 0
    assert engine.duration(2.5) == 2.5


def test_bytes_acked_follows_the_acks() -> None:
    oack = {"blksize": "512"}
    engine = make_engine(blksize=512, oack=oack)
    source = Source(pattern(1300))
    begin(engine, source)
    assert engine.bytes_acked == 0
    event(engine, source, ack(0))
    assert engine.bytes_acked == 0
    for block, expected in ((1, 512), (2, 1024), (3, 1300)):
        event(engine, source, ack(block))
        assert engine.bytes_acked == expected
    assert engine.outcome == Outcome.COMPLETE


# -- rollover ---------------------------------------------------------------------------------


BLOCKS_PAST_WRAP = 65_600


@pytest.mark.parametrize("rollover", [0, 1])
def test_rollover_whole_transfer(rollover: int) -> None:
    """65,600 blocks of 8 bytes: the block number wraps, to 0 or to 1, and every byte arrives."""
    source = pattern(8 * BLOCKS_PAST_WRAP + 5)
    engine = make_engine(blksize=8, windowsize=16, limits=Limits(rollover=rollover))
    run = Harness(engine, source, rollover=rollover)
    assert run.run() == Outcome.COMPLETE
    assert bytes(run.client.data) == source
    assert engine.bytes_acked == len(source)
    assert run.monitor is not None and run.monitor.data_packets == BLOCKS_PAST_WRAP + 1


def _drive_to(engine: ReadTransfer, source: Source, top: int, windowsize: int, rollover: int) -> None:
    """ACK window after window (each ACK the window's last block) until `top` has been sent."""
    sent = windowsize
    while sent < top:
        out = event(engine, source, ack(wire(sent, rollover)))
        assert len(out) == windowsize
        sent += windowsize


@pytest.mark.parametrize("rollover", [0, 1])
def test_late_and_duplicate_acks_across_the_wrap(rollover: int) -> None:
    size = 8 * 65_560 + 3
    source = Source(pattern(size))
    engine = make_engine(blksize=8, windowsize=4, limits=Limits(rollover=rollover))
    assert data_blocks(begin(engine, source)) == [1, 2, 3, 4]
    _drive_to(engine, source, 65_532, 4, rollover)

    def w(block: int) -> int:
        return wire(block, rollover)

    out = event(engine, source, ack(w(65_532)))
    assert data_blocks(out) == [w(b) for b in (65_533, 65_534, 65_535, 65_536)]
    assert data_blocks(out)[-1] == (0 if rollover == 0 else 1)
    assert payloads(out)[-1] == source.data[65_535 * 8 : 65_536 * 8]

    dups = engine.duplicate_acks
    assert event(engine, source, ack(w(65_531))) == []  # late
    assert event(engine, source, ack(w(65_532))) == []  # duplicate
    assert engine.duplicate_acks == dups + 2

    # A partial ACK just before the wrap: go back to 65,535 and carry on past it.
    out = event(engine, source, ack(w(65_534)))
    assert data_blocks(out) == [w(b) for b in (65_535, 65_536, 65_537, 65_538)]
    assert payloads(out)[1:] == [source.data[b * 8 : b * 8 + 8] for b in (65_535, 65_536, 65_537)]
    assert engine.bytes_acked == 65_534 * 8

    # ACK of block 65,536, which is 0 on the wire (rollover 0) or 1 (rollover 1).
    out = event(engine, source, ack(w(65_536)))
    assert data_blocks(out) == [w(b) for b in (65_537, 65_538, 65_539, 65_540)]
    assert engine.bytes_acked == 65_536 * 8

    # Late ACKs from before the wrap are duplicates now, and move nothing.
    dups = engine.duplicate_acks
    for late in (65_535, 65_534, 65_533, 65_536):
        assert event(engine, source, ack(w(late))) == []
    if rollover == 1:
        assert event(engine, source, ack(0)) == []  # 0 only ever acknowledges an OACK
    assert engine.duplicate_acks == dups + (5 if rollover == 1 else 4)
    assert engine.bytes_acked == 65_536 * 8

    out = event(engine, source, ack(w(65_540)))
    assert data_blocks(out) == [w(b) for b in range(65_541, 65_545)]
    top = 65_544
    while engine.outcome is None:
        out = event(engine, source, ack(w(top)))
        top += len(out)
    assert engine.bytes_acked == size


def test_rollover_1_after_an_oack() -> None:
    """With rollover 1, ACK 0 acknowledges the OACK, and only the OACK."""
    oack = {"blksize": "8"}
    engine = make_engine(blksize=8, oack=oack, limits=Limits(rollover=1))
    source = Source(pattern(100))
    begin(engine, source)
    assert data_blocks(event(engine, source, ack(0))) == [1]
    assert event(engine, source, ack(0)) == []
    assert engine.duplicate_acks == 1


@pytest.mark.parametrize("rollover", [0, 1])
@pytest.mark.parametrize("number", [1, 2, 65534, 65535])
def test_only_ack_0_acknowledges_the_oack(rollover: int, number: int) -> None:
    oack = {"blksize": "8"}
    engine = make_engine(blksize=8, oack=oack, limits=Limits(rollover=rollover))
    source = Source(pattern(100))
    begin(engine, source)
    assert event(engine, source, ack(number)) == []
    assert engine.duplicate_acks == 1
    assert engine.timer(engine.deadline) == [packets.encode_oack(oack)]
    assert data_blocks(event(engine, source, ack(0), 1.5)) == [1]


# -- acknowledgements ---------------------------------------------------------------------------


def test_duplicate_ack_never_resends_lockstep() -> None:
    engine = make_engine(blksize=8)
    source = Source(pattern(40))
    assert data_blocks(begin(engine, source)) == [1]
    assert data_blocks(event(engine, source, ack(1))) == [2]
    for _ in range(3):
        assert event(engine, source, ack(1)) == []
    assert engine.duplicate_acks == 3
    assert engine.retransmits == 0
    assert data_blocks(event(engine, source, ack(2))) == [3]


def test_duplicate_ack_never_resends_windowed() -> None:
    engine = make_engine(blksize=8, windowsize=4)
    source = Source(pattern(200))
    begin(engine, source)
    assert data_blocks(event(engine, source, ack(4))) == [5, 6, 7, 8]
    for number in (4, 4, 3, 0, 9, 200):  # old, duplicate, and not yet sent
        assert event(engine, source, ack(number)) == []
    assert engine.duplicate_acks == 6
    assert engine.bytes_acked == 32


def test_partial_ack_goes_back_n_from_the_block_after_it() -> None:
    engine = make_engine(blksize=8, windowsize=4)
    source = Source(pattern(200))
    assert data_blocks(begin(engine, source)) == [1, 2, 3, 4]
    out = event(engine, source, ack(2))
    assert data_blocks(out) == [3, 4, 5, 6]
    assert payloads(out) == [source.data[i : i + 8] for i in range(16, 48, 8)]
    assert engine.bytes_acked == 16
    # a later partial ACK inside the new window: back to 5 only, not the whole window again
    out = event(engine, source, ack(4))
    assert data_blocks(out) == [5, 6, 7, 8]
    out = event(engine, source, ack(5))
    assert data_blocks(out) == [6, 7, 8, 9]


def test_need_never_runs_ahead_of_the_window() -> None:
    engine = make_engine(blksize=8, windowsize=4)
    source = Source(pattern(200))
    engine.start(0.0)
    assert engine.need == 32
    engine.data(source.read(32), 0.0)
    assert engine.need == 0
    engine.datagram(ack(1), 0.0)
    assert engine.need == 8


def test_need_holds_still_while_a_read_is_pending() -> None:
    """A driver reads `need` bytes and hands them over later (a Deferred): ACKs meanwhile must
    not change what the engine takes the answer to be, or a full read looks like end of file."""
    engine = make_engine(blksize=8, windowsize=4)
    source = Source(pattern(200))
    assert data_blocks(begin(engine, source)) == [1, 2, 3, 4]
    out = engine.datagram(ack(2), 0.1)
    assert data_blocks(out) == [3, 4]
    asked = engine.need
    assert asked == 16  # the driver starts reading 16 bytes now...
    assert engine.datagram(ack(4), 0.2) == []  # ...and an ACK arrives before they do
    assert engine.need == asked
    out = engine.data(source.read(asked), 0.3)
    assert data_blocks(out) == [5, 6]
    assert engine.outcome is None
    out = pump(engine, source, 0.3)
    assert data_blocks(out) == [7, 8]
    top = 8
    while engine.outcome is None:
        top += len(event(engine, source, ack(top), 0.4))
    assert engine.bytes_acked == 200


# -- the timer ----------------------------------------------------------------------------------


def fire_until_done(engine: ReadTransfer, limit: int = 10_000) -> List[Tuple[float, int]]:
    """Fire the timer at each deadline until the engine gives up: (time, datagrams sent)."""
    fired: List[Tuple[float, int]] = []
    for _ in range(limit):
        if engine.outcome is not None:
            return fired
        now = engine.deadline
        out = engine.timer(now)
        fired.append((now, len(out)))
    raise AssertionError("the engine never gave up")


def test_early_timer_does_nothing() -> None:
    engine = make_engine(blksize=8)
    source = Source(pattern(100))
    begin(engine, source)
    deadline = engine.deadline
    assert deadline == 1.0
    assert engine.timer(0.999) == []
    assert engine.deadline == deadline
    assert engine.retransmits == 0


def test_timer_resends_with_exponential_backoff_and_gives_up() -> None:
    engine = make_engine(blksize=8, timeout=1.0, limits=Limits(timeout=1.0, give_up=30.0))
    source = Source(pattern(100))
    first = begin(engine, source)
    resends = fire_until_done(engine)
    # resends after 1, 2, 4, 8 (the cap), 8 seconds; the next would be at 31: it ends at 30 (give_up)
    assert resends == [(1.0, 1), (3.0, 1), (7.0, 1), (15.0, 1), (23.0, 1), (30.0, 0)]
    assert engine.outcome == Outcome.TIMEOUT
    assert engine.retransmits == 5
    assert engine.need == 0
    assert engine.timer(100.0) == [] and engine.datagram(ack(1), 100.0) == []
    assert first == [packets.encode_data(1, source.data[:8])]


def test_timer_resends_exactly_the_outstanding_window() -> None:
    engine = make_engine(blksize=8, windowsize=4)
    source = Source(pattern(200))
    begin(engine, source)
    event(engine, source, ack(2), 0.5)
    assert engine.deadline == 1.5
    out = engine.timer(1.5)
    assert data_blocks(out) == [3]  # the oldest unacknowledged block alone
    assert engine.retransmits == 2 + 1  # blocks 3 and 4 again at the partial ACK, then block 3
    # The client's answer (it had 3 and 4, say) restarts go-back-N from the block after it.
    assert data_blocks(engine.datagram(ack(4), 1.6)) == [5, 6]


def test_backoff_cap_is_the_negotiated_timeout_when_larger() -> None:
    assert MAX_BACKOFF < 10
    engine = make_engine(blksize=8, timeout=10.0, limits=Limits(give_up=45.0))
    begin(engine, Source(pattern(100)))
    fired = fire_until_done(engine)
    assert fired == [(10.0, 1), (20.0, 1), (30.0, 1), (40.0, 1), (45.0, 0)]  # ends at give_up


def test_backoff_cap_is_max_backoff_for_short_timeouts() -> None:
    engine = make_engine(blksize=8, timeout=0.5, limits=Limits(timeout=0.5, give_up=40.0))
    begin(engine, Source(pattern(100)))
    times = [now for now, _ in fire_until_done(engine)]
    gaps = [round(b - a, 6) for a, b in zip([0.0, *times], times)]
    assert gaps[:6] == [0.5, 1.0, 2.0, 4.0, MAX_BACKOFF, MAX_BACKOFF]
    assert max(gaps) == MAX_BACKOFF


def test_progress_resets_the_backoff_and_the_give_up_clock() -> None:
    engine = make_engine(blksize=8, limits=Limits(give_up=30.0))
    source = Source(pattern(100))
    begin(engine, source)
    assert len(engine.timer(1.0)) == 1
    assert len(engine.timer(3.0)) == 1
    assert engine.deadline == 7.0
    out = event(engine, source, ack(1), 4.0)
    assert data_blocks(out) == [2]
    assert engine.deadline == 5.0  # back to the base timeout
    fired = fire_until_done(engine)
    assert fired[0] == (5.0, 1)
    assert fired[-1][0] >= 4.0 + 30.0  # give-up counts from the last progress
    assert engine.outcome == Outcome.TIMEOUT


def test_timer_with_oack_outstanding_resends_the_oack_only() -> None:
    oack = {"blksize": "8", "windowsize": "4"}
    engine = make_engine(blksize=8, windowsize=4, oack=oack)
    begin(engine, Source(pattern(100)))
    assert engine.timer(engine.deadline) == [packets.encode_oack(oack)]


def test_timer_while_waiting_for_the_reader_sends_nothing() -> None:
    engine = make_engine(blksize=8, limits=Limits(give_up=5.0))
    engine.start(0.0)
    assert engine.need == 8  # the driver is reading; the reader is slow
    assert engine.timer(1.0) == []
    assert engine.deadline == 5.0  # nothing was resent, nothing backed off: only give-up is left
    engine.data(b"12345678", 1.5)
    assert engine.deadline == 2.5  # the line was idle: the timeout counts from this send
    assert fire_until_done(engine) == [(2.5, 1), (4.5, 1), (5.0, 0)]  # give-up counts from start


@pytest.mark.parametrize("windowsize", [1, 16, 64])
def test_silent_peer_costs_bounded_work(windowsize: int) -> None:
    """A peer that never ACKs (a spoofed RRQ) gets the first window, the window once more (the second
    timeout), and otherwise a few resends of its first block."""
    limits = Limits(give_up=30.0)
    engine = make_engine(blksize=512, windowsize=windowsize, limits=limits)
    sent = len(begin(engine, Source(pattern(10 << 20))))
    fired = fire_until_done(engine)
    sent += sum(count for _, count in fired)
    assert engine.outcome == Outcome.TIMEOUT
    assert sent == 2 * windowsize + 4
    assert len(fired) <= limits.give_up / limits.timeout + 2


# -- errors and ends --------------------------------------------------------------------------


def test_client_error_ends_silently() -> None:
    engine = make_engine(blksize=8, windowsize=4)
    source = Source(pattern(200))
    begin(engine, source)
    engine.datagram(ack(2), 0.1)  # the engine now wants more data
    assert engine.datagram(encode_error(ErrorCode.DISK_FULL, "disk full"), 0.2) == []
    assert engine.outcome == Outcome.CLIENT_ERROR
    assert engine.client_error == "3: disk full"
    assert engine.need == 0
    assert engine.datagram(ack(4), 0.3) == []
    assert engine.timer(100.0) == []
    assert engine.data(b"x" * 8, 0.4) == []


def test_uefi_tsize_probe_ends_as_a_probe() -> None:
    oack = {"tsize": "100"}
    engine = make_engine(blksize=512, oack=oack)
    assert begin(engine, Source(pattern(100))) == [packets.encode_oack(oack)]
    assert engine.datagram(encode_error(ErrorCode.OPTION_REFUSED, "tsize only"), 0.01) == []
    assert engine.outcome == Outcome.PROBE == "probe"
    assert engine.client_error == "8: tsize only"


@pytest.mark.parametrize("oack", [{"blksize": "512"}, {"tsize": "100"}])
def test_error_is_a_client_error_unless_it_answers_a_tsize_oack(oack: Dict[str, str]) -> None:
    """Only an ERROR to an OACK with tsize, before ACK 0, is a probe; after ACK 0 it is a client error."""
    engine = make_engine(blksize=512, oack=oack)
    source = Source(pattern(1000))
    begin(engine, source)
    if "tsize" in oack:
        event(engine, source, ack(0), 0.01)
    engine.datagram(encode_error(ErrorCode.NOT_DEFINED, "gone"), 0.02)
    assert engine.outcome == Outcome.CLIENT_ERROR


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00",
        b"junk",
        b"\x00\x04\x00",  # an ACK too short
        b"\x00\x04\x00\x01\x00",  # an ACK too long
        b"\x01\x04\x00\x01",
        b"\x00\x03\x00\x01data",  # DATA, to a read transfer
        b"\x00\x01file\x00octet\x00",  # an RRQ on the transfer port
        b"\x00\x06blksize\x00512\x00",
    ],
)
def test_garbage_from_the_peer_is_a_protocol_error(garbage: bytes) -> None:
    engine = make_engine(blksize=8, windowsize=2)
    source = Source(pattern(100))
    begin(engine, source)
    engine.datagram(ack(1), 0.1)
    out = engine.datagram(garbage, 0.2)
    assert len(out) == 1
    error = packets.decode(out[0])
    assert isinstance(error, packets.Error) and error.code == ErrorCode.ILLEGAL_OPERATION
    assert engine.outcome == Outcome.PROTOCOL_ERROR
    assert engine.need == 0
    assert engine.datagram(ack(3), 0.3) == [] and engine.timer(99.0) == []


def test_abort() -> None:
    engine = make_engine(blksize=8, windowsize=4)
    source = Source(pattern(200))
    begin(engine, source)
    engine.datagram(ack(4), 0.1)
    assert engine.need > 0
    out = engine.abort("shutting down", ErrorCode.NOT_DEFINED)
    assert [packets.decode(d) for d in out] == [packets.Error(0, "shutting down")]
    assert engine.outcome == Outcome.ABORTED and engine.need == 0
    assert engine.datagram(ack(8), 0.2) == [] and engine.timer(50.0) == []
    assert engine.data(source.read(32), 0.3) == []


def test_abort_after_the_end_keeps_the_outcome() -> None:
    engine = make_engine(blksize=8)
    begin(engine, Source(b"abc"))
    engine.datagram(ack(1), 0.1)
    assert engine.outcome == Outcome.COMPLETE
    assert [packets.decode(d) for d in engine.abort("reader failed", ErrorCode.ACCESS_VIOLATION)] == [
        packets.Error(2, "reader failed")
    ]
    assert engine.outcome == Outcome.COMPLETE


def test_shared_empty_answer_stays_empty() -> None:
    run = Harness(make_engine(blksize=8, windowsize=3), os.urandom(1000), duplicate=0.3, seed=3)
    assert run.run() == Outcome.COMPLETE
    assert engine_module.NOTHING == []


# -- properties -------------------------------------------------------------------------------

Event = Tuple[str, int]

events = st.lists(
    st.one_of(
        st.tuples(st.just("ack"), st.integers(-2, 10)),  # relative to the highest ACK given
        st.tuples(st.just("raw-ack"), st.integers(0, 65535)),
        st.tuples(st.just("wait"), st.integers(0, 20_000)),  # milliseconds, then the timer fires
        st.tuples(st.just("early-timer"), st.just(0)),
        st.tuples(st.just("read"), st.just(0)),  # a pending asynchronous read completes
        st.tuples(st.just("client-error"), st.integers(0, 8)),
        st.tuples(st.just("garbage"), st.integers(0, 3)),
    ),
    max_size=80,
)

GARBAGE = [b"", b"\x00\x04\x00", b"\x00\x03\x00\x01x", b"\xff\xff\xff\xff"]
FIRES_FROM_THE_FLOOR = math.log2(MAX_BACKOFF / engine_module.MIN_RTO) + 1


@QUICK
@given(
    size=st.integers(0, 3000),
    blksize=st.sampled_from([8, 16, 100, 512]),
    windowsize=st.integers(1, 8),
    with_oack=st.booleans(),
    rollover=st.sampled_from([0, 1]),
    timeout=st.sampled_from([0.5, 1.0, 3.0]),
    asynchronous=st.booleans(),
    script=events,
)
def test_random_events_keep_the_invariants(
    size: int,
    blksize: int,
    windowsize: int,
    with_oack: bool,
    rollover: int,
    timeout: float,
    asynchronous: bool,
    script: List[Event],
) -> None:
    """Whatever a peer sends and whenever timers fire: no exception, every datagram well-formed,
    no DATA past the window or before ACK 0, the right bytes in every block, bytes_acked
    monotonic, need 0 once over, and bounded output for a peer that then falls silent."""
    source = pattern(size)
    limits = Limits(timeout=timeout, give_up=20.0, rollover=rollover)
    oack = {"blksize": str(blksize), "windowsize": str(windowsize)} if with_oack else None
    engine = make_engine(blksize=blksize, windowsize=windowsize, timeout=timeout, oack=oack, limits=limits)
    monitor = Monitor(source, blksize, windowsize, rollover, packets.encode_oack(oack) if oack else None)
    reader = Source(source)
    pending: Optional[bytes] = None
    now = 0.0
    acked_bytes = 0

    def emit(out: List[bytes]) -> None:
        for datagram in out:
            monitor.sent(datagram)

    def feed() -> None:
        nonlocal pending
        if asynchronous:
            if pending is None and engine.need > 0:
                pending = reader.read(engine.need)  # read now, delivered at a "read" event
            return
        while engine.need > 0:
            emit(engine.data(reader.read(engine.need), now))

    emit(engine.start(now))
    feed()
    for kind, value in script:
        before = engine.outcome
        if kind == "ack":
            number = wire(max(monitor.acked + value, 0), rollover)
            monitor.ack_delivered(number)
            out = engine.datagram(ack(number), now)
        elif kind == "raw-ack":
            monitor.ack_delivered(value)
            out = engine.datagram(ack(value), now)
        elif kind == "wait":
            now += value / 1000
            out = engine.timer(now)
        elif kind == "early-timer":
            out = engine.timer(now)
        elif kind == "read":
            out = []
            if pending is not None:
                chunk, pending = pending, None
                out = engine.data(chunk, now)
        elif kind == "client-error":
            out = engine.datagram(encode_error(value, "gone"), now)
            assert out == []
            assert engine.outcome == (before or Outcome.CLIENT_ERROR)
        else:
            out = engine.datagram(GARBAGE[value], now)
            if before is None:
                assert engine.outcome == Outcome.PROTOCOL_ERROR
                assert [packets.decode(d) for d in out] == [packets.Error(4, "expected an ACK")]
        if before is not None:
            assert out == [] and engine.outcome == before
        emit(out)
        feed()
        assert engine.need >= 0
        if engine.outcome is not None:
            assert engine.need == 0
        assert acked_bytes <= engine.bytes_acked <= size
        acked_bytes = engine.bytes_acked
        if engine.outcome == Outcome.COMPLETE:
            assert acked_bytes == size

    # Then the peer falls silent: bounded work, and the engine gives up.
    if engine.outcome is None:
        sent = 0
        fired = 0
        while engine.outcome is None:
            fired += 1
            # A learnt timeout starts as low as MIN_RTO: doublings up to MAX_BACKOFF, then steady.
            assert fired <= max(limits.give_up / timeout, FIRES_FROM_THE_FLOOR + limits.give_up / MAX_BACKOFF) + 2
            now = max(now, engine.deadline)
            out = engine.timer(now)
            emit(out)
            sent += len(out)
        assert engine.outcome == Outcome.TIMEOUT
        assert sent <= windowsize * fired
    assert engine_module.NOTHING == []


@QUICK
@given(
    size=st.integers(0, 6000),
    blksize=st.sampled_from([8, 64, 512]),
    windowsize=st.integers(1, 12),
    with_oack=st.booleans(),
    rollover=st.sampled_from([0, 1]),
    loss=st.floats(0.0, 0.3),
    duplicate=st.floats(0.0, 0.3),
    reorder=st.floats(0.0, 0.5),
    read_delay=st.sampled_from([None, 0.0, 0.003, 0.05]),
    seed=st.integers(0, 2**32 - 1),
)
def test_lossy_network_still_delivers_identical_bytes(
    size: int,
    blksize: int,
    windowsize: int,
    with_oack: bool,
    rollover: int,
    loss: float,
    duplicate: float,
    reorder: float,
    read_delay: Optional[float],
    seed: int,
) -> None:
    source = os.urandom(size)
    oack = {"blksize": str(blksize), "windowsize": str(windowsize)} if with_oack else None
    engine = make_engine(
        blksize=blksize, windowsize=windowsize, oack=oack, limits=Limits(give_up=100_000.0, rollover=rollover)
    )
    client = SimClient(blksize, windowsize, rollover, expect_oack=with_oack)
    run = Harness(
        engine,
        source,
        rollover=rollover,
        oack=packets.encode_oack(oack) if oack else None,
        client=client,
        loss=loss,
        duplicate=duplicate,
        reorder=reorder,
        read_delay=read_delay,
        seed=seed,
    )
    assert run.run() == Outcome.COMPLETE
    assert bytes(client.data) == source and client.done
    assert engine.bytes_acked == size


# -- read-ahead ---------------------------------------------------------------------------------


def test_lockstep_reads_sixteen_blocks_at_a_time() -> None:
    """Small windows read ahead: one read per 16 blocks, not per block; the wire is unchanged."""
    engine = make_engine(blksize=512, windowsize=1, read_ahead=engine_module.READ_AHEAD_BYTES)
    content = pattern(512 * 40 + 7)
    sizes: List[int] = []

    class Recording(Source):
        def read(self, size: int) -> bytes:
            sizes.append(size)
            return super().read(size)

    source = Recording(content)
    out = begin(engine, source)
    received: List[bytes] = []
    while engine.outcome is None:
        assert data_blocks(out) == [len(received) + 1]  # lock-step: one block per ACK, in order
        received += payloads(out)
        out = event(engine, source, encode_ack(len(received)))
    assert b"".join(received) == content
    assert sizes == [8192, 7680, 7680]  # 16 blocks, then 15 whenever only the next one is left


def test_read_ahead_is_capped_in_bytes_and_not_added_to_large_windows() -> None:
    big_blocks = make_engine(blksize=8192, windowsize=1, read_ahead=engine_module.READ_AHEAD_BYTES)
    big_blocks.start(0.0)
    assert big_blocks.need == 4 * 8192  # 32 KiB of 8 KiB blocks
    wide = make_engine(blksize=512, windowsize=64, read_ahead=engine_module.READ_AHEAD_BYTES)
    wide.start(0.0)
    assert wide.need == 64 * 512  # the window is already more than the read-ahead


# -- the learnt timeout (RFC 6298) ------------------------------------------------------------


def lockstep_acks(engine: ReadTransfer, source: Source, rtt: float, blocks: int, now: float = 0.0) -> float:
    """ACK each block `rtt` after it was sent, `blocks` times; returns the time of the last ACK."""
    top = 1
    for _ in range(blocks):
        now += rtt
        out = event(engine, source, ack(top), now)
        assert data_blocks(out) == [top + 1]
        top += 1
    return now


def test_timeout_is_learnt_from_round_trips() -> None:
    """Steady 2 ms round trips: the timeout falls from --timeout (1 s) to SRTT + 10 ms."""
    engine = make_engine(blksize=8, limits=Limits(timeout=1.0))
    source = Source(pattern(10_000))
    begin(engine, source)
    assert engine.deadline == 1.0
    now = lockstep_acks(engine, source, 0.002, 50)
    assert engine.deadline == pytest.approx(now + 0.002 + engine_module.MIN_RTO, abs=5e-4)
    # A loss now costs about 12 ms, not a second.
    assert data_blocks(engine.timer(engine.deadline)) == [51]


def test_learnt_timeout_never_exceeds_the_operator_timeout() -> None:
    engine = make_engine(blksize=8, timeout=0.5, limits=Limits(timeout=0.5))
    source = Source(pattern(10_000))
    begin(engine, source)
    now = lockstep_acks(engine, source, 0.6, 20)  # slow and steady round trips
    assert engine.deadline == pytest.approx(now + 0.5)


def test_karn_no_sample_from_a_retransmitted_block() -> None:
    """An ACK after a resend could answer either copy: it teaches nothing (Karn's rule)."""
    engine = make_engine(blksize=8)
    source = Source(pattern(10_000))
    begin(engine, source)
    now = lockstep_acks(engine, source, 0.002, 30)
    learnt = engine.deadline - now
    resend_at = engine.deadline
    assert data_blocks(engine.timer(resend_at)) == [31]
    # The ACK comes 3 s after the first copy went: were it a sample, the timeout would grow.
    out = event(engine, source, ack(31), resend_at + 2.99)
    assert data_blocks(out) == [32]
    assert engine.deadline - (resend_at + 2.99) == pytest.approx(learnt, abs=1e-3)


def test_progress_after_backoff_brings_the_learnt_timeout_back() -> None:
    engine = make_engine(blksize=8)
    source = Source(pattern(10_000))
    begin(engine, source)
    now = lockstep_acks(engine, source, 0.002, 30)
    learnt = engine.deadline - now
    for _ in range(4):  # four timeouts in a row: 12, 24, 48, 96 ms
        now = engine.deadline
        engine.timer(now)
    assert engine.deadline - now == pytest.approx(learnt * 16, rel=0.01)
    event(engine, source, ack(31), now + 0.001)
    assert engine.deadline - (now + 0.001) == pytest.approx(learnt, abs=1e-3)


def test_a_client_timeout_is_obeyed_as_it_is() -> None:
    """RFC 2349: the client's timeout is the retransmission interval: no learning, no doubling."""
    oack = {"timeout": "2"}
    engine = make_engine(blksize=8, timeout=2.0, oack=oack, limits=Limits(give_up=9.0))
    source = Source(pattern(10_000))
    begin(engine, source)
    event(engine, source, ack(0), 0.001)
    now = lockstep_acks(engine, source, 0.001, 30, 0.001)
    assert engine.deadline == pytest.approx(now + 2.0)
    fired = fire_until_done(engine)
    assert [round(t - now, 6) for t, _ in fired] == [2.0, 4.0, 6.0, 8.0, 9.0]
    assert [count for _, count in fired] == [1, 1, 1, 1, 0]


# -- after a timeout: the oldest block alone ----------------------------------------------------


def test_timeout_resends_the_oldest_block_until_the_client_answers() -> None:
    engine = make_engine(blksize=8, windowsize=8)
    source = Source(pattern(1000))
    assert data_blocks(begin(engine, source)) == list(range(1, 9))
    assert data_blocks(engine.timer(1.0)) == [1]
    # Once per stall, the second timeout resends the window: a client that ACKs each position once
    # and lost that ACK ignores a duplicate of block 1, and needs the block after its own.
    assert data_blocks(engine.timer(3.0)) == list(range(1, 9))
    assert data_blocks(engine.timer(7.0)) == [1]
    assert data_blocks(engine.timer(15.0)) == [1]
    # The client had blocks 1 to 5 (say): its ACK restarts the window from 6.
    assert data_blocks(event(engine, source, ack(5), 15.5)) == list(range(6, 14))
    # and a new stall starts over: the oldest block first.
    assert data_blocks(engine.timer(engine.deadline)) == [6]


def test_peer_that_stops_after_the_oack_costs_a_bounded_amount() -> None:
    """64 x 65464 asked, the OACK acknowledged once, then silence: the figure in docs/architecture.md."""
    oack = {"blksize": "65464", "windowsize": "16"}  # what negotiate() grants under 1 MiB in flight
    limits = Limits()
    engine = make_engine(blksize=65464, windowsize=16, oack=oack, limits=limits)
    source = Source(pattern(32 << 20))
    sent = sum(map(len, begin(engine, source)))
    sent += sum(map(len, event(engine, source, ack(0), 0.001)))
    resends = 0
    while engine.outcome is None:
        now = engine.deadline
        out = engine.timer(now)
        resends += len(out)
        sent += sum(map(len, out))
    assert engine.outcome == Outcome.TIMEOUT and now == pytest.approx(0.001 + limits.give_up)
    # The first window (16 blocks), the window again at the second timeout, and one block at each
    # other: 11 ms (1 ms learnt + 10 ms) doubling to 8 s, then every 8 s until the give-up time
    # (30 s): 12 timeouts, 43 blocks, 2.82 MB (was 6.28 MB).
    assert resends == 16 + 11
    assert sent == (16 + 16 + 11) * 65468 + len(packets.encode_oack(oack))
    assert sent < 2.9e6


# -- nothing read before ACK 0 --------------------------------------------------------------------


def test_nothing_is_read_while_the_oack_is_outstanding() -> None:
    """1,000 RRQs for 64 x 65464 that never ACK: no window is read or cut into datagrams."""
    oack = {"blksize": "65464", "windowsize": "16"}
    engines = [make_engine(blksize=65464, windowsize=16, oack=oack) for _ in range(1000)]
    for engine in engines:
        assert engine.start(0.0) == [packets.encode_oack(oack)]
        assert engine.need == 0
        assert engine.timer(engine.deadline) == [packets.encode_oack(oack)]
        assert engine.need == 0
    engine = engines[0]
    source = Source(pattern(3 << 20))
    out = event(engine, source, ack(0), 2.0)
    assert data_blocks(out) == list(range(1, 17))


# -- give-up ------------------------------------------------------------------------------------


@pytest.mark.parametrize("give_up", [1.0, 2.0, 5.0, 30.0])
def test_give_up_means_what_it_says(give_up: float) -> None:
    """No progress for give_up seconds: the transfer ends then, not at the next backed-off timeout."""
    engine = make_engine(blksize=8, limits=Limits(timeout=1.0, give_up=give_up))
    source = Source(pattern(1000))
    begin(engine, source)
    event(engine, source, ack(1), 0.5)
    fired = fire_until_done(engine)
    assert fired[-1] == (0.5 + give_up, 0)
    assert all(t <= 0.5 + give_up for t, _ in fired)


def test_give_up_shorter_than_a_client_timeout_is_kept() -> None:
    engine = make_engine(blksize=8, timeout=10.0, oack={"timeout": "10"}, limits=Limits(give_up=5.0))
    begin(engine, Source(pattern(1000)))
    assert fire_until_done(engine) == [(5.0, 0)]


# -- gap reports (RFC 7440) and the Sorcerer's Apprentice ---------------------------------------


def windowed_after_oack(rtt: float = 0.002) -> Tuple[ReadTransfer, Source]:
    """Window 4 of 8-byte blocks; the OACK was acknowledged after `rtt`, and window 1..4 sent then."""
    oack = {"blksize": "8", "windowsize": "4"}
    engine = make_engine(blksize=8, windowsize=4, oack=oack)
    source = Source(pattern(1000))
    begin(engine, source)
    assert data_blocks(event(engine, source, ack(0), rtt)) == [1, 2, 3, 4]
    return engine, source


def test_repeated_ack_of_the_previous_window_resends_the_window_once() -> None:
    engine, source = windowed_after_oack()
    # Block 1 was lost, 2 arrived: the client ACKs 0 again, one round trip later. Resend from 1.
    assert data_blocks(event(engine, source, ack(0), 0.004)) == [1, 2, 3, 4]
    assert engine.retransmits == 4
    assert event(engine, source, ack(0), 0.0045) == []  # once per window
    assert event(engine, source, ack(0), 0.006) == []
    assert data_blocks(event(engine, source, ack(4), 0.006)) == [5, 6, 7, 8]
    # The window after such a resend: a repeat of ACK 4 is the client answering our duplicates.
    assert event(engine, source, ack(4), 0.0085) == []
    assert data_blocks(event(engine, source, ack(8), 0.009)) == [9, 10, 11, 12]
    assert event(engine, source, ack(8), 0.0095) == []  # sooner than any round trip: an echo
    assert data_blocks(event(engine, source, ack(8), 0.0115)) == [9, 10, 11, 12]
    assert engine.retransmits == 8


def test_repeated_ack_in_lockstep_never_resends() -> None:
    """Lock-step: a repeat of the last ACK is an echo (the Sorcerer's Apprentice), never a report."""
    oack = {"blksize": "8"}
    engine = make_engine(blksize=8, oack=oack)
    source = Source(pattern(1000))
    begin(engine, source)
    now = 0.002
    event(engine, source, ack(0), now)
    for block in range(1, 50):
        now += 0.002
        assert data_blocks(event(engine, source, ack(block), now)) == [block + 1]
        for late in (0.001, 0.003, 0.5):
            assert event(engine, source, ack(block), now + late) == []
    assert engine.retransmits == 0


@pytest.mark.parametrize("windowsize", [1, 4, 16])
def test_every_datagram_doubled_and_late_is_no_storm(windowsize: int) -> None:
    """Each datagram arrives twice, the copy up to a round trip late: the client re-ACKs every
    duplicate DATA, and those ACKs are duplicated too. Not one block is resent (a Sorcerer's
    Apprentice storm would double every window from the first echo on)."""
    source = os.urandom(64 * 400)
    oack = {"blksize": "64", "windowsize": str(windowsize)}
    engine = make_engine(blksize=64, windowsize=windowsize, oack=oack)
    run = Harness(engine, source, oack=packets.encode_oack(oack), duplicate=1.0, seed=windowsize)
    assert run.run() == Outcome.COMPLETE
    assert bytes(run.client.data) == source
    assert engine.duplicate_acks > 800
    assert engine.retransmits == 0


def test_gap_reports_spare_timeouts_under_loss() -> None:
    """5% loss, window 8: answering gap reports needs fewer timeouts than waiting for the timer."""
    source = os.urandom(64 * 3000)
    oack = {"blksize": "64", "windowsize": "8"}
    engine = make_engine(blksize=64, windowsize=8, oack=oack, limits=Limits(give_up=1000.0))
    run = Harness(engine, source, oack=packets.encode_oack(oack), loss=0.05, reorder=0.3, seed=1)
    assert run.run() == Outcome.COMPLETE
    assert bytes(run.client.data) == source
    with_reports = run.now
    assert engine.retransmits > 0
    silent = make_engine(blksize=64, windowsize=8, oack=oack, limits=Limits(give_up=1000.0))
    silent._min_rtt = float("nan")  # every comparison with it is false: no gap report ever counts
    run = Harness(silent, source, oack=packets.encode_oack(oack), loss=0.05, reorder=0.3, seed=1)
    assert run.run() == Outcome.COMPLETE
    assert with_reports < run.now * 0.9


# -- properties: whatever arrives, whenever --------------------------------------------------------

anything = st.lists(
    st.one_of(
        st.tuples(st.just("ack"), st.integers(0, 65535)),  # any number at all
        st.tuples(st.just("ack-next"), st.integers(0, 70)),  # one the engine may count as progress
        st.tuples(st.just("datagram"), st.binary(max_size=12)),  # junk, errors, truncated, oversized
        st.tuples(st.just("timer"), st.integers(0, 3000)),  # ms later; fired at any time, early or late
    ),
    max_size=120,
)


@QUICK
@given(
    size=st.integers(0, 5000),
    blksize=st.sampled_from([8, 64, 512]),
    windowsize=st.sampled_from([1, 2, 8, 64]),
    options=st.sampled_from([None, {"tsize": "0"}, {"timeout": "2"}, {"blksize": "x"}]),
    give_up=st.sampled_from([0.5, 2.0, 10.0]),
    script=anything,
)
def test_anything_at_any_time(
    size: int,
    blksize: int,
    windowsize: int,
    options: Optional[Dict[str, str]],
    give_up: float,
    script: List[Tuple[str, object]],
) -> None:
    """No exception; never a block beyond the file; what a client taking DATA in order gets is the
    file's prefix; the deadline never passes the give-up time, and a timer at or after it ends the
    transfer; after the script, silence ends it within the give-up time of the last progress."""
    source = pattern(size)
    oack = dict(options) if options else None
    if oack is not None and "tsize" in oack:
        oack["tsize"] = str(size)
    if oack is not None and "blksize" in oack:
        oack = {"blksize": str(blksize)}
    timeout = 2.0 if oack and "timeout" in oack else 0.5
    limits = Limits(timeout=0.5, give_up=max(give_up, 0.5))
    engine = make_engine(blksize=blksize, windowsize=windowsize, timeout=timeout, oack=oack, limits=limits)
    monitor = Monitor(source, blksize, windowsize, 0, packets.encode_oack(oack) if oack else None)
    reader = Source(source)
    delivered = bytearray()
    expected = 1
    now = 0.0
    progress_at = 0.0
    last_bytes = 0

    def emit(out: List[bytes]) -> None:
        nonlocal expected
        for datagram in out:
            monitor.sent(datagram)  # well-formed, inside the window, the right bytes, not past the end
            if datagram[1] == packets.Opcode.DATA and int.from_bytes(datagram[2:4], "big") == expected & 0xFFFF:
                delivered.extend(datagram[4:])
                expected += 1

    def feed() -> None:
        while engine.need > 0:
            emit(engine.data(reader.read(engine.need), now))

    emit(engine.start(now))
    feed()
    for kind, value in script:
        if engine.outcome is not None:
            break
        acked_before = engine._acked
        if kind == "ack":
            monitor.ack_delivered(int(value))  # type: ignore[call-overload]
            emit(engine.datagram(ack(int(value)), now))  # type: ignore[call-overload]
        elif kind == "ack-next":
            number = max(monitor.acked, 0) + int(value)  # type: ignore[call-overload]
            monitor.ack_delivered(number & 0xFFFF)
            emit(engine.datagram(ack(number & 0xFFFF), now))
        elif kind == "datagram":
            datagram = bytes(value)  # type: ignore[call-overload]
            if len(datagram) == 4 and datagram[:2] == b"\0\4":
                monitor.ack_delivered(int.from_bytes(datagram[2:], "big"))
            emit(engine.datagram(datagram, now))
        else:
            now += int(value) / 1000  # type: ignore[call-overload]
            ended_by_time = now - progress_at >= limits.give_up
            emit(engine.timer(now))
            if ended_by_time:  # the deadline was never later than this: the timer was not early
                assert engine.outcome == Outcome.TIMEOUT
        feed()
        if engine._acked > acked_before:
            progress_at = now
        if engine.outcome is None:
            assert engine.deadline <= progress_at + limits.give_up + 1e-9
        assert last_bytes <= engine.bytes_acked <= size
        last_bytes = engine.bytes_acked
        assert bytes(delivered) == source[: len(delivered)]
    if engine.outcome is None:  # silence: the timer fired at each deadline, on time
        fired = 0
        while engine.outcome is None:
            assert engine.deadline <= progress_at + limits.give_up + 1e-9
            now = max(now, engine.deadline)
            emit(engine.timer(now))
            fired += 1
            assert fired < 100
        assert engine.outcome == Outcome.TIMEOUT
        assert now <= progress_at + limits.give_up + 1e-9  # within the give-up time, not a timeout later
    if engine.outcome == Outcome.COMPLETE:
        assert engine.bytes_acked == size
