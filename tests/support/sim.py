"""Drive the sans-I/O transfer engine with no socket, no reactor and a fake clock.

- `SimClient`: a read client as RFC 1350 and RFC 7440 describe one. It ACKs
  every windowsize-th block and the last, ACKs the last in-order block once on
  a gap, and re-ACKs on a duplicate DATA (what recovers a lost ACK: the
  server's resend brings the duplicate).
- `Monitor`: knows only the file, the terms and the ACKs the engine was given,
  and checks every datagram the engine emits: well-formed, never beyond the
  window, the right bytes under the right (16-bit) block number, no DATA before
  the OACK is acknowledged.
- `Harness`: the engine, a reader over a bytes object (synchronous, or
  asynchronous with a delay), the client, and a network that drops, duplicates
  and reorders datagrams from a seeded `random.Random`.

Block numbers here are computed independently of the engine (`wire`,
`latest_at_or_before`), so an arithmetic slip there cannot hide behind the same
slip here.
"""

from __future__ import annotations

import heapq
import random
from typing import Dict, List, Optional, Tuple

from hypothesis import HealthCheck, settings

from tftp_offload import packets
from tftp_offload.engine import ReadTransfer
from tftp_offload.options import Limits, Negotiated

QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
"""Hypothesis settings for the unit suite: modest example counts keep it to seconds."""


# -- block numbers ----------------------------------------------------------------------------


def cycle(rollover: int) -> int:
    """How many distinct wire numbers DATA blocks go through."""
    return 65536 if rollover == 0 else 65535


def wire(block: int, rollover: int = 0) -> int:
    """The 16-bit number block `block` (1-based, 0 the OACK) carries on the wire."""
    if rollover == 0:
        return block % 65536
    if block == 0:
        return 0
    return (block - 1) % 65535 + 1


def latest_at_or_before(number: int, top: int, rollover: int = 0) -> int:
    """The highest block <= `top` that carries `number` (negative if there is none)."""
    if rollover == 1 and number == 0:
        return 0
    return top - (wire(top, rollover) - number) % cycle(rollover)


def nearest(number: int, near: int, rollover: int = 0) -> int:
    """The block closest to `near` that carries `number`."""
    size = cycle(rollover)
    diff = (number - wire(near, rollover)) % size
    return near + diff - size if diff >= size // 2 else near + diff


def make_engine(
    blksize: int = 512,
    windowsize: int = 1,
    timeout: float = 1.0,
    oack: Optional[Dict[str, str]] = None,
    limits: Optional[Limits] = None,
    read_ahead: int = 0,
) -> ReadTransfer:
    """A `ReadTransfer` on these terms; with `oack` it starts by sending that OACK.

    No read-ahead by default, so that `need` is exactly what the window lacks;
    the read-ahead has tests of its own.
    """
    terms = Negotiated(blksize, windowsize, timeout, dict(oack or {}))
    return ReadTransfer(terms, limits or Limits(), read_ahead)


def data_blocks(datagrams: List[bytes]) -> List[int]:
    """The wire block numbers of the DATA packets among `datagrams`, in order."""
    return [p.block for p in map(packets.decode, datagrams) if isinstance(p, packets.Data)]


# -- the monitor ------------------------------------------------------------------------------


class Monitor:
    """Checks the engine's output against the rules; raises AssertionError on a breach."""

    def __init__(self, source: bytes, blksize: int, windowsize: int, rollover: int, oack: Optional[bytes]) -> None:
        self.source = source
        self.blksize = blksize
        self.windowsize = windowsize
        self.rollover = rollover
        self.oack = oack
        self.last_block = len(source) // blksize + 1
        self.acked = -1 if oack is not None else 0
        """Highest block the engine was given an ACK for (what it may count from)."""
        self.top = 0
        """Highest DATA block sent so far."""
        self.datagrams = 0
        self.data_packets = 0
        self.errors: List[packets.Error] = []

    def ack_delivered(self, number: int) -> None:
        """The engine is being handed ACK `number`."""
        if self.acked < 0:
            if number == 0:
                self.acked = 0
            return
        block = latest_at_or_before(number, self.top, self.rollover)
        if block > self.acked:
            self.acked = block

    def sent(self, datagram: bytes) -> None:
        """The engine emitted `datagram`."""
        self.datagrams += 1
        packet = packets.decode(datagram)  # raises MalformedPacket for anything ill-formed
        if isinstance(packet, packets.Data):
            assert self.acked >= 0, "DATA sent before the OACK was acknowledged"
            offset = (packet.block - wire(self.acked + 1, self.rollover)) % cycle(self.rollover)
            assert offset < self.windowsize, (
                f"DATA {packet.block} is {offset + 1} blocks past ACK {self.acked}, window {self.windowsize}"
            )
            block = self.acked + 1 + offset
            assert block <= self.last_block, f"DATA block {block} beyond the last, {self.last_block}"
            start = (block - 1) * self.blksize
            assert packet.payload == self.source[start : start + self.blksize], f"wrong bytes in block {block}"
            self.top = max(self.top, block)
            self.data_packets += 1
        elif isinstance(packet, packets.OptionAck):
            assert self.oack is not None and datagram == self.oack, "an OACK nobody negotiated"
            assert self.acked < 0, "OACK sent again after ACK 0"
        elif isinstance(packet, packets.Error):
            self.errors.append(packet)
        else:
            raise AssertionError(f"the engine sent {packet!r}")


# -- the client -------------------------------------------------------------------------------


class SimClient:
    """A read client receiving one file (after the RRQ, which the engine never sees)."""

    def __init__(
        self,
        blksize: int,
        windowsize: int = 1,
        rollover: int = 0,
        expect_oack: bool = False,
    ) -> None:
        self.blksize = blksize
        self.windowsize = windowsize
        self.rollover = rollover
        self.expect_oack = expect_oack
        self.oack: Optional[Dict[str, str]] = None
        self.data = bytearray()
        self.expected = 1
        """Next block wanted, as a wide number."""
        self.in_window = 0
        self.gap_acked = False
        self.done = False
        self.error: Optional[packets.Error] = None
        self.acks_sent = 0
        self.gaps = 0
        self.duplicates = 0

    def _ack(self, block: int) -> List[bytes]:
        self.acks_sent += 1
        return [packets.encode_ack(wire(block, self.rollover))]

    def receive(self, datagram: bytes) -> List[bytes]:
        """A datagram from the server; returns what the client sends back."""
        packet = packets.decode(datagram)
        if isinstance(packet, packets.OptionAck):
            assert self.expect_oack, "OACK to a client that asked for no option"
            if self.expected > 1:
                return []  # a late copy: DATA already flows
            self.oack = packet.options
            return self._ack(0)
        if isinstance(packet, packets.Error):
            self.error = packet
            return []
        assert isinstance(packet, packets.Data), f"client got {packet!r}"
        assert not self.expect_oack or self.oack is not None, "DATA before the OACK"
        payload = packet.payload
        assert len(payload) <= self.blksize, f"DATA of {len(payload)} bytes, blksize {self.blksize}"
        block = nearest(packet.block, self.expected, self.rollover)
        if block < self.expected:
            self.duplicates += 1
            start = (block - 1) * self.blksize
            assert payload == bytes(self.data[start : start + len(payload)]), f"block {block} resent changed"
            return self._ack(self.expected - 1)  # our ACK may have been lost: say it again
        if block > self.expected:
            self.gaps += 1
            if self.gap_acked:
                return []
            self.gap_acked = True
            self.in_window = 0
            return self._ack(self.expected - 1)
        assert not self.done, f"DATA {block} after the last block"
        self.data += payload
        self.expected += 1
        self.gap_acked = False
        self.in_window += 1
        if len(payload) < self.blksize:
            self.done = True
            return self._ack(block)
        if self.in_window >= self.windowsize:
            self.in_window = 0
            return self._ack(block)
        return []


# -- the harness ------------------------------------------------------------------------------

_TO_CLIENT, _TO_SERVER, _READ = 0, 1, 2


class Harness:
    """Runs one transfer to its end over a simulated network, on a simulated clock."""

    def __init__(
        self,
        engine: ReadTransfer,
        source: bytes,
        *,
        rollover: int = 0,
        oack: Optional[bytes] = None,
        client: Optional[SimClient] = None,
        loss: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        latency: float = 0.01,
        read_delay: Optional[float] = None,
        seed: int = 0,
        check: bool = True,
    ) -> None:
        self.engine = engine
        self.source = source
        self.client = client or SimClient(engine.blksize, engine.windowsize, rollover, expect_oack=oack is not None)
        self.monitor: Optional[Monitor] = (
            Monitor(source, engine.blksize, engine.windowsize, rollover, oack) if check else None
        )
        self.loss = loss
        self.duplicate = duplicate
        self.reorder = reorder
        self.latency = latency
        self.read_delay = read_delay
        self.random = random.Random(seed)
        self.now = 0.0
        self.offset = 0
        self.reading = False
        self.reads = 0
        self.sent = 0
        """Datagrams the engine emitted."""
        self.timer_calls = 0
        self._queue: List[Tuple[float, int, int, bytes]] = []
        self._seq = 0

    # network

    def _push(self, when: float, kind: int, payload: bytes) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, kind, payload))

    def transmit(self, kind: int, datagram: bytes) -> None:
        """Put a datagram on the simulated wire: maybe lost, late or doubled."""
        rand = self.random.random
        if self.loss and rand() < self.loss:
            return
        delay = self.latency
        if self.reorder and rand() < self.reorder:
            delay += rand() * self.latency * 4
        self._push(self.now + delay, kind, datagram)
        if self.duplicate and rand() < self.duplicate:
            self._push(self.now + delay + rand() * self.latency * 2, kind, datagram)

    def emit(self, datagrams: List[bytes]) -> None:
        for datagram in datagrams:
            self.sent += 1
            if self.monitor is not None:
                self.monitor.sent(datagram)
            self.transmit(_TO_CLIENT, datagram)

    # reader

    def _chunk(self, size: int) -> bytes:
        chunk = self.source[self.offset : self.offset + size]
        self.offset += len(chunk)
        self.reads += 1
        return chunk

    def feed(self) -> None:
        """Read what the engine needs: at once, or (with `read_delay`) one read at a time, later."""
        engine = self.engine
        if self.read_delay is not None:
            if engine.need > 0 and not self.reading and engine.outcome is None:
                self.reading = True
                self._push(self.now + self.read_delay, _READ, self._chunk(engine.need))
            return
        for _ in range(1000):
            if engine.need <= 0:
                return
            self.emit(engine.data(self._chunk(engine.need), self.now))
        raise AssertionError("the engine keeps asking for data without taking it")

    # the loop

    def step(self) -> None:
        """Deliver the next datagram or read, or fire the timer, whichever is due first."""
        engine = self.engine
        if self._queue and self._queue[0][0] <= engine.deadline:
            when, _, kind, payload = heapq.heappop(self._queue)
            self.now = max(self.now, when)
            if kind == _TO_CLIENT:
                for reply in self.client.receive(payload):
                    self.transmit(_TO_SERVER, reply)
            elif kind == _TO_SERVER:
                if self.monitor is not None and len(payload) == 4 and payload[1] == packets.Opcode.ACK:
                    self.monitor.ack_delivered(int.from_bytes(payload[2:], "big"))
                self.emit(engine.datagram(payload, self.now))
            else:
                self.reading = False
                self.emit(engine.data(payload, self.now))
        else:
            self.now = max(self.now, engine.deadline)
            self.timer_calls += 1
            self.emit(engine.timer(self.now))
        self.feed()

    def run(self, max_steps: int = 5_000_000) -> Optional[str]:
        """Start the engine and run until it reports an outcome; returns the outcome."""
        self.emit(self.engine.start(self.now))
        self.feed()
        for _ in range(max_steps):
            if self.engine.outcome is not None:
                return self.engine.outcome
            self.step()
        raise AssertionError(f"no outcome after {max_steps} steps")
