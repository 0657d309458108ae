"""The read-transfer state machine, sans I/O: events in, datagrams out.

One `ReadTransfer` is one RRQ being served after the backend has answered and
options are negotiated. It never touches a socket, a clock or a file: the
driver feeds it the peer's datagrams, the data it asked for and timer
expiries (each with the current time), and sends what each call returns.
Between calls the driver reads three attributes:

- `need`: bytes the engine wants from the reader next (0 for none). Read
  exactly that many and hand them to `data()`; fewer means end of file. It
  does not change while a read may be in flight (only `data()` resets it), and
  it is 0 once `outcome` is set.
- `deadline`: when to call `timer()`. The engine moves it on every ACK without
  the driver re-arming anything: a timer that fires early just finds
  `now < deadline` and is re-armed for the new value, which keeps the hot path
  (ACK in, next DATA out) free of timer churn.
- `outcome`: set once the transfer is over (see `Outcome`).

Block numbers are kept as wide integers internally and only folded into 16
bits on the wire, so rollover past 65535 blocks and late ACKs across it are
plain arithmetic.
"""

from __future__ import annotations

from typing import List, Optional

from .options import Limits, Negotiated
from .packets import DATA_HEADER, ErrorCode, Opcode, encode_error

_pack_header = DATA_HEADER.pack
_DATA = int(Opcode.DATA)
_ACK = int(Opcode.ACK)
_ERROR = int(Opcode.ERROR)

MAX_BACKOFF = 8.0
"""Retransmission timeouts double up to this (or the negotiated timeout, if larger)."""

READ_AHEAD_BLOCKS = 16
READ_AHEAD_BYTES = 32 << 10
"""Small windows read this far ahead (blocks, and bytes at most): fewer, larger reads."""

NOTHING: List[bytes] = []
"""Shared empty answer: callers only iterate over it, so one list serves every call."""


class Outcome:
    """Why a transfer ended; also the `outcome` field of its log line and report."""

    COMPLETE = "complete"
    CLIENT_ERROR = "client-error"
    TIMEOUT = "timeout"
    PROTOCOL_ERROR = "protocol-error"
    ABORTED = "aborted"


class ReadTransfer:
    """Serve one file to one peer: windowed (RFC 7440) or lock-step, with go-back-N."""

    __slots__ = (
        "blksize",
        "windowsize",
        "need",
        "deadline",
        "outcome",
        "retransmits",
        "duplicate_acks",
        "client_error",
        "_packets",
        "_acked",
        "_sent",
        "_next",
        "_last",
        "_last_len",
        "_rto",
        "_rto_base",
        "_rto_cap",
        "_give_up",
        "_progress_at",
        "_rollover",
        "_started",
        "_ahead",
    )

    def __init__(self, negotiated: Negotiated, limits: Limits, oack: Optional[bytes] = None,
                 read_ahead: int = READ_AHEAD_BYTES) -> None:
        self.blksize = negotiated.blksize
        self.windowsize = negotiated.windowsize
        self.need = 0
        self._ahead = max(0, min(READ_AHEAD_BLOCKS, read_ahead // self.blksize) - self.windowsize)
        self.deadline = 0.0
        self.outcome: Optional[str] = None
        self.retransmits = 0
        self.duplicate_acks = 0
        self.client_error: Optional[str] = None
        # Datagrams of blocks _acked+1 .. _acked+len(_packets): built once, resent as they are.
        # With an OACK to send it stands as block 0, so "ACK 0" acknowledges it like any block.
        self._packets: List[bytes] = [oack] if oack is not None else []
        self._acked = -1 if oack is not None else 0
        self._sent = self._acked
        self._next = 1
        self._last: Optional[int] = None
        self._last_len = 0
        self._rto_base = negotiated.timeout
        self._rto = negotiated.timeout
        self._rto_cap = max(MAX_BACKOFF, negotiated.timeout)
        # At least a few retransmissions, even when a client asks for a long timeout.
        self._give_up = max(limits.give_up, 4 * negotiated.timeout)
        self._progress_at = 0.0
        self._rollover = limits.rollover
        self._started = 0.0

    # -- events -----------------------------------------------------------------------------

    def start(self, now: float) -> List[bytes]:
        """Begin: returns the OACK to send, if any, and sets `need` for the first window."""
        self._started = self._progress_at = now
        self.deadline = now + self._rto
        self._update_need()
        if self._acked < 0:
            self._sent = 0
            return list(self._packets)
        return NOTHING

    def data(self, chunk: bytes, now: float) -> List[bytes]:
        """Data read for the last `need`; a shorter chunk marks the end of the file."""
        wanted = self.need
        self.need = 0
        if self.outcome is not None:
            return NOTHING
        size = self.blksize
        packets = self._packets
        block = self._next
        length = len(chunk)
        view = memoryview(chunk)  # slices of a view are not copies: one copy per block, into its datagram
        if self._rollover == 0:
            for offset in range(0, length - size + 1, size):
                packets.append(_pack_header(_DATA, block & 0xFFFF) + view[offset : offset + size])
                block += 1
        else:
            for offset in range(0, length - size + 1, size):
                packets.append(_pack_header(_DATA, self._wire(block)) + view[offset : offset + size])
                block += 1
        if length < wanted:
            # End of file: the rest is the final, short (possibly empty) block.
            tail = view[length - length % size :]
            packets.append(_pack_header(_DATA, self._wire(block)) + tail)
            self._last = block
            self._last_len = len(tail)
            block += 1
        self._next = block
        out = self._send_new(now)
        self._update_need()
        return out

    def datagram(self, datagram: bytes, now: float) -> List[bytes]:
        """A datagram from the peer (the driver has checked its address and port)."""
        if self.outcome is not None:
            return NOTHING
        if len(datagram) == 4 and datagram[0] == 0 and datagram[1] == _ACK:
            return self._ack((datagram[2] << 8) | datagram[3], now)
        if len(datagram) >= 4 and datagram[0] == 0 and datagram[1] == _ERROR:
            # The client gave up (or, in the UEFI size probe, got what it wanted): end silently.
            self.outcome = Outcome.CLIENT_ERROR
            self.need = 0
            code = (datagram[2] << 8) | datagram[3]
            message = datagram[4:].rstrip(b"\0").decode("utf-8", "replace")
            self.client_error = f"{code}: {message}"
            return NOTHING
        self.outcome = Outcome.PROTOCOL_ERROR
        self.need = 0
        return [encode_error(ErrorCode.ILLEGAL_OPERATION, "expected an ACK")]

    def timer(self, now: float) -> List[bytes]:
        """The timer armed for `deadline` fired (perhaps early: then nothing happens)."""
        if self.outcome is not None or now < self.deadline:
            return NOTHING
        if now - self._progress_at >= self._give_up:
            self.outcome = Outcome.TIMEOUT
            self.need = 0
            return NOTHING
        out = self._packets[: self._sent - self._acked]
        self.retransmits += len(out)
        if out:
            self._rto = min(self._rto * 2, self._rto_cap)
        self.deadline = now + self._rto
        return out

    def abort(self, message: str, code: int = ErrorCode.NOT_DEFINED) -> bytes:
        """End the transfer from our side (shutdown, reader failure); returns the ERROR to send."""
        if self.outcome is None:
            self.outcome = Outcome.ABORTED
        self.need = 0
        return encode_error(code, message)

    # -- what the log line and report need -----------------------------------------------------

    @property
    def bytes_acked(self) -> int:
        """File bytes the client has acknowledged."""
        if self._last is not None and self._acked >= self._last:
            return (self._last - 1) * self.blksize + self._last_len
        return max(self._acked, 0) * self.blksize

    def duration(self, now: float) -> float:
        return now - self._started

    # -- internals ----------------------------------------------------------------------------

    def _wire(self, block: int) -> int:
        if self._rollover == 0:
            return block & 0xFFFF
        return ((block - 1) % 0xFFFF) + 1 if block else 0

    def _ack(self, number: int, now: float) -> List[bytes]:
        base = self._acked + 1
        if self._rollover == 0:
            block = base + ((number - (base & 0xFFFF)) & 0xFFFF)
        elif number == 0 or base == 0:
            # 0 only ever acknowledges the OACK, and while the OACK is out nothing else does
            block = 0 if number == base else self._sent + 1
        else:
            block = base + (number - self._wire(base)) % 0xFFFF
        if block > self._sent:
            # A duplicate or stale ACK: never resend for it alone (Sorcerer's Apprentice).
            self.duplicate_acks += 1
            return NOTHING
        del self._packets[: block - self._acked]
        self._acked = block
        self._progress_at = now
        self._rto = self._rto_base
        self.deadline = now + self._rto
        if block == self._last:
            self.outcome = Outcome.COMPLETE
            return NOTHING
        if block < self._sent:
            # A partial ACK: the client saw a gap after `block`. Go back and resend from there.
            self.retransmits += self._sent - block
            self._sent = block
        out = self._send_new(now)
        self._update_need()
        return out

    def _send_new(self, now: float) -> List[bytes]:
        limit = min(self._acked + self.windowsize, self._next - 1)
        if limit <= self._sent or self._acked < 0:  # nothing new, or the OACK is not yet ACKed
            return NOTHING
        start = self._sent - self._acked
        if not start:
            self.deadline = now + self._rto  # the line was idle: time from this send
        self._sent = limit
        return self._packets[start : limit - self._acked]

    def _update_need(self) -> None:
        if self.need:
            # A read of `need` bytes may be in flight (a Deferred): what data() takes for
            # end of file is measured against it, so it must not grow under that read.
            return
        if self._last is None:
            # Keep the window and `_ahead` more blocks read, refilling only once the read-ahead is
            # used up: a lock-step transfer then reads every 16th block, not every block.
            # max(): the OACK stands as block 0 but takes no room in the first window.
            blocks = max(self._acked, 0) + self.windowsize + self._ahead - self._next + 1
            self.need = blocks * self.blksize if blocks > 0 and blocks >= self._ahead else 0
        else:
            self.need = 0
