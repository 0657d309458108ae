"""The read-transfer state machine, sans I/O: events in, datagrams out.

One `ReadTransfer` is one RRQ being served after the backend has answered and
options are negotiated. It never touches a socket, a clock or a file: the
driver feeds it the peer's datagrams, the data it asked for and timer
expiries (each with the current time), and sends what each call returns.
Between calls the driver reads three attributes:

- `need`: bytes the engine wants from the reader next (0 for none). Read
  exactly that many and hand them to `data()`; fewer means end of file. It
  does not change while a read may be in flight (only `data()` resets it), and
  it is 0 once `outcome` is set, and while an OACK waits for its ACK 0 (a
  request nobody acknowledges costs no read and no buffered window).
- `deadline`: when to call `timer()`. The engine moves it on every ACK without
  the driver re-arming anything: a timer that fires early just finds
  `now < deadline` and is re-armed for the new value, which keeps the hot path
  (ACK in, next DATA out) free of timer churn. The deadline can also move
  *earlier* (an ACK after a backed-off timeout, a smaller learnt timeout): the
  driver compares it with the time its timer is armed for and re-arms then.
- `outcome`: set once the transfer is over (see `Outcome`).

Retransmission (RFC 6298 with Karn's rule, or RFC 2349's fixed interval):
without a client `timeout` option the timeout is learnt from the transfer's own
round trips, between `MIN_RTO` and the operator's timeout (also the first
value); a timeout doubles it, up to `MAX_BACKOFF`, and any progress brings it
back. A timeout resends the oldest unacknowledged block alone (go-back-N
resumes at the client's answer), so a peer that stops costs one block per
timeout. A transfer with no progress for `give_up` seconds ends then.

Block numbers are kept as wide integers internally and only folded into 16
bits on the wire, so rollover past 65535 blocks and late ACKs across it are
plain arithmetic.
"""

from __future__ import annotations

from enum import Enum
from typing import List, Optional

from .options import Limits, Negotiated
from .packets import DATA_HEADER, ErrorCode, Opcode, encode_error

_pack_header = DATA_HEADER.pack
_DATA = int(Opcode.DATA)
_ACK = int(Opcode.ACK)
_ERROR = int(Opcode.ERROR)

MAX_BACKOFF = 8.0
"""Retransmission timeouts double up to this (or the operator's timeout, if larger)."""

MIN_RTO = 0.01
"""The learnt retransmission timeout is at least this much over the smoothed round trip (seconds).

A LAN round trip is a fraction of a millisecond, so the floor, not the
round trip, sets how long a loss costs. 10 ms stays clear of what is not
loss: the reactor's timer granularity (1 ms), a busy reactor's scheduling
delay on a loaded host, and firmware network stacks that poll the NIC on a
timer (EDK2's MNP polls every 10 ms). A spurious timeout is cheap anyway:
one block, whose duplicate ACK the engine ignores."""

_CLOCK_GRANULARITY = 1e-6
"""No round trip is shorter than this; two events at one instant are not cause and effect."""
_NEVER = 1 << 62
"""A block number no transfer reaches."""
_NO_RTT = float("inf")
"""The shortest round trip before the first sample."""

READ_AHEAD_BLOCKS = 16
READ_AHEAD_BYTES = 32 << 10
"""Small windows read this far ahead (blocks, and bytes at most): fewer, larger reads."""

NOTHING: List[bytes] = []
"""Shared empty answer: callers only iterate over it, so one list serves every call."""


class Outcome(str, Enum):
    """Why a transfer (or a request) ended: the `outcome` field of its log line and of its report."""

    COMPLETE = "complete"
    """The client acknowledged the last block."""
    TIMEOUT = "timeout"
    """No progress for the give-up time."""
    CLIENT_ERROR = "client-error"
    """The client sent an ERROR during the transfer."""
    PROBE = "probe"
    """The client answered an OACK carrying tsize with an ERROR: a size probe (UEFI), not a failure."""
    PROTOCOL_ERROR = "protocol-error"
    """The client sent something other than an ACK or ERROR (it was told, with ERROR 4)."""
    ABORTED = "aborted"
    """Ended from our side: shutdown, a reader failure, or a new request from the same client."""
    REFUSED = "refused"
    """The request never became a transfer (the backend refused it); logged, never reported."""

    # The value, not "Outcome.COMPLETE", in log lines and f-strings on every Python version.
    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


def outcome_text(outcome: object) -> str:
    """An outcome as plain text, for a log line's field and a report: an Enum member's value
    (`_value_`, the documented attribute, not the `value` property, a Python call per transfer;
    and a str Enum member hashes by name, not value), anything else as `str()`."""
    return outcome._value_ if isinstance(outcome, Enum) else str(outcome)


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
        "_top",
        "_next",
        "_last",
        "_last_len",
        "_rto",
        "_rto_base",
        "_rto_cap",
        "_rto_ceiling",
        "_adaptive",
        "_srtt",
        "_rttvar",
        "_min_rtt",
        "_timed",
        "_timed_at",
        "_window_at",
        "_quiet",
        "_stalls",
        "_probe",
        "_give_up",
        "_progress_at",
        "_rollover",
        "_started",
        "_ahead",
        "_refill_at",
    )

    def __init__(self, negotiated: Negotiated, limits: Limits, read_ahead: int = READ_AHEAD_BYTES) -> None:
        # One per request of a boot storm's small files: conditional expressions, not min() and
        # max() (a builtin call is 1,500 instructions: this method was 17,000, now 7,000).
        blksize = self.blksize = negotiated.blksize
        windowsize = self.windowsize = negotiated.windowsize
        self.need = 0
        ahead = read_ahead // blksize
        ahead = (READ_AHEAD_BLOCKS if ahead > READ_AHEAD_BLOCKS else ahead) - windowsize
        self._ahead = ahead if ahead > 0 else 0
        self.deadline = 0.0
        self.outcome: Optional[Outcome] = None
        self.retransmits = 0
        self.duplicate_acks = 0
        self.client_error: Optional[str] = None
        options = negotiated.oack
        oack = negotiated.datagram
        # Datagrams of blocks _acked+1 .. _acked+len(_packets): built once, resent as they are.
        # With an OACK to send it stands as block 0, so "ACK 0" acknowledges it like any block.
        self._packets: List[bytes] = [oack] if oack is not None else []
        self._acked = -1 if oack is not None else 0
        self._sent = self._acked
        self._top = self._acked
        """Highest block ever sent: a block above it goes out for the first time (Karn's rule)."""
        self._next = 1
        self._last: Optional[int] = None
        self._last_len = 0
        self._probe = "tsize" in options
        # A client's timeout is obeyed as it is (RFC 2349); otherwise the round trips teach it.
        adaptive = self._adaptive = "timeout" not in options
        timeout = negotiated.timeout
        give_up = self._give_up = limits.give_up
        self._rto_ceiling = self._rto_base = self._rto = timeout if timeout < give_up else give_up
        self._rto_cap = (MAX_BACKOFF if timeout < MAX_BACKOFF else timeout) if adaptive else timeout
        self._srtt = -1.0  # no sample yet
        self._rttvar = 0.0
        self._min_rtt = _NO_RTT
        self._timed = -1  # the block being timed for a round-trip sample (-1: none)
        self._timed_at = 0.0
        self._window_at = 0.0
        self._quiet = -1
        """Duplicate ACKs of blocks up to this may be echoes of our own resend: no gap report."""
        self._stalls = 0
        """Timeouts in a row without progress."""
        self._progress_at = 0.0
        self._rollover = limits.rollover
        self._started = 0.0
        self._refill_at = 0
        """The lowest ACKed block at which `need` may grow again: set by `_update_need`, so an ACK
        below it (15 of a lock-step transfer's 16) skips the call."""

    # -- events -----------------------------------------------------------------------------

    def start(self, now: float) -> List[bytes]:
        """Begin: returns the OACK to send, if any, and sets `need` for the first window."""
        self._started = self._progress_at = now
        self.deadline = now + self._rto
        self._update_need()
        if self._acked < 0:
            self._sent = self._top = self._timed = 0
            self._timed_at = now
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
        idle = self._sent == self._acked
        out = self._send_new(now)
        if idle and out:
            self._window_at = now
            self._arm(now)  # the line was idle: time from this send
        self._update_need()
        return out

    def datagram(self, datagram: bytes, now: float) -> List[bytes]:
        """A datagram from the peer (the driver has checked its address and port)."""
        if self.outcome is not None:
            return NOTHING
        if len(datagram) == 4 and datagram[0] == 0 and datagram[1] == _ACK:
            return self._ack((datagram[2] << 8) | datagram[3], now)
        if len(datagram) >= 4 and datagram[0] == 0 and datagram[1] == _ERROR:
            # The client gave up, or (before ACK 0, after an OACK with tsize) had what it wanted.
            self.outcome = Outcome.PROBE if self._acked < 0 and self._probe else Outcome.CLIENT_ERROR
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
        if self._sent == self._acked:
            # Nothing out: the reader is slow. Only the give-up time matters until data() sends
            # (and arms the timer again, earlier).
            self.deadline = self._progress_at + self._give_up
            return NOTHING
        # The oldest unacknowledged block alone: the client's answer (an ACK of what it has)
        # restarts go-back-N, and a peer that stopped gets one block per timeout. Once per
        # stall, at the second timeout, the whole window: a client that ACKs a position only
        # once ignores a duplicate of an old block, and needs the block after its own.
        self._stalls += 1
        out = self._packets[: self._sent - self._acked] if self._stalls == 2 else self._packets[:1]
        self.retransmits += len(out)
        self._timed = -1  # Karn: an ACK now could answer either copy
        self._quiet = self._sent  # a client that had the block re-ACKs what it has: an echo
        self._rto = min(self._rto * 2, self._rto_cap)
        self._arm(now)
        return out

    def abort(self, message: str, code: int = ErrorCode.NOT_DEFINED) -> List[bytes]:
        """End the transfer from our side (shutdown, reader failure); returns the ERROR to send."""
        if self.outcome is None:
            self.outcome = Outcome.ABORTED
        self.need = 0
        return [encode_error(code, message)]

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
            # A duplicate or stale ACK: never resend for it alone (Sorcerer's Apprentice)...
            self.duplicate_acks += 1
            if self._acked >= 0 and number == self._wire(self._acked) and self._is_gap_report(now):
                return self._go_back(now)
            return NOTHING
        del self._packets[: block - self._acked]
        self._acked = block
        self._progress_at = now
        self._stalls = 0
        if block >= self._timed >= 0:
            self._sample(now - self._timed_at)
        self._rto = self._rto_base
        if block == self._last:
            self.outcome = Outcome.COMPLETE
            return NOTHING
        if block < self._sent:
            # A partial ACK: the client saw a gap after `block`. Go back and resend from there.
            self.retransmits += self._sent - block
            self._sent = block
            self._timed = -1
        self.deadline = now + self._rto  # _rto <= give_up: within the give-up time
        self._window_at = now
        out = self._send_new(now)
        if block >= self._refill_at:
            self._update_need()
        return out

    def _is_gap_report(self, now: float) -> bool:
        """Is this repeat of the current ACK an RFC 7440 client saying the window's first block was lost?

        A client that lost the first block of
        a window and received a later one ACKs the block before the window again.
        Not every repeat means that: the network duplicates ACKs, and a client
        re-ACKs every duplicate DATA it gets. A resend in answer to those would
        double each window forever (the windowed Sorcerer's Apprentice). So a
        repeat counts only in a window (never lock-step, where it means nothing
        but an echo), at least one shortest round trip seen after the window
        left (the report needs a block of it to reach the client and an ACK to
        come back), once per window, and not for the window right after such a
        resend (whose repeats are the echoes of that resend).
        """
        return (
            self.windowsize > 1
            and self._sent > self._acked > self._quiet
            and now - self._window_at >= max(self._min_rtt, _CLOCK_GRANULARITY)
        )

    def _go_back(self, now: float) -> List[bytes]:
        """Resend the outstanding window from its first block (the client dropped what followed a gap)."""
        out = self._packets[: self._sent - self._acked]
        self.retransmits += len(out)
        self._quiet = self._sent
        self._timed = -1
        self._arm(now)
        return out

    def _sample(self, rtt: float) -> None:
        """A round trip of a block sent once (RFC 6298, section 2); on the lock-step hot path."""
        self._timed = -1
        if rtt < self._min_rtt:
            self._min_rtt = rtt
        if not self._adaptive:
            return
        srtt = self._srtt
        if srtt < 0:
            srtt = rtt
            rttvar = rtt / 2
        else:
            diff = srtt - rtt
            rttvar = 0.75 * self._rttvar + 0.25 * (diff if diff > 0 else -diff)
            srtt -= 0.125 * diff
        self._srtt = srtt
        self._rttvar = rttvar
        # RFC 6298's RTO = SRTT + max(G, 4 * RTTVAR), with MIN_RTO as G: a steady round trip
        # (RTTVAR near 0) still leaves that much margin, so the ACK beats the timer.
        margin = 4 * rttvar
        rto = srtt + (margin if margin > MIN_RTO else MIN_RTO)
        self._rto_base = rto if rto < self._rto_ceiling else self._rto_ceiling

    def _arm(self, now: float) -> None:
        """Next deadline: one timeout from now, but never past the give-up time."""
        deadline = now + self._rto
        limit = self._progress_at + self._give_up
        self.deadline = deadline if deadline < limit else limit

    def _send_new(self, now: float) -> List[bytes]:
        acked = self._acked
        limit = acked + self.windowsize
        if limit >= self._next:
            limit = self._next - 1
        if limit <= self._sent or acked < 0:  # nothing new, or the OACK is not yet ACKed
            return NOTHING
        start = self._sent - acked
        if limit > self._top:
            self._top = limit
            if self._timed < 0:
                self._timed = limit
                self._timed_at = now
        self._sent = limit
        return self._packets[start : limit - acked]

    def _update_need(self) -> None:
        if self.need:
            # A read of `need` bytes may be in flight (a Deferred): what data() takes for
            # end of file is measured against it, so it must not grow under that read.
            return
        if self._last is None:
            # Keep the window and `_ahead` more blocks read, refilling only once the read-ahead is
            # used up: a lock-step transfer then reads every 16th block, not every block.
            # Nothing while the OACK is out: a request that is never acknowledged costs no buffer.
            ahead = self._ahead
            self._refill_at = self._next - 1 - self.windowsize - ahead + (ahead if ahead > 1 else 1)
            blocks = self._acked + self.windowsize + ahead - self._next + 1
            self.need = blocks * self.blksize if self._acked >= self._refill_at and self._acked >= 0 else 0
        else:
            self._refill_at = _NEVER
            self.need = 0
