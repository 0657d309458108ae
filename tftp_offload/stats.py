"""Plain counters the server bumps, and the report each finished transfer produces.

No library and nothing per datagram: the driver adds integers at a handful of
points on the per-request path (a refusal, a backend answer, a transfer's
start and end) and the per-transfer figures (datagrams, retransmissions,
duplicate ACKs, bytes) once, at the end. Whoever wants them reads them when
it likes: the Prometheus endpoint (`tftp_offload.metrics`, `--metrics`) at
scrape time, an embedding host through `observers` (one `TransferReport`
per transfer, see docs/embedding.md).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.logger import Logger

from .engine import Outcome, outcome_text

if TYPE_CHECKING:
    from .server import Session
    from .transfer import Transfer

log = Logger(namespace="tftp_offload")

OUTCOMES = tuple(outcome.value for outcome in Outcome if outcome is not Outcome.REFUSED)
"""What a finished transfer reports (docs/offload-protocol.md, TransferFinished `outcome`)."""

REFUSALS = ("capacity", "malformed", "wrq", "stranger", "not-request", "draining", "limit", "not-allowed")
"""Why a datagram got no transfer: too many sessions, undecodable, a write request, a datagram
on a transfer port from someone else (answered with ERROR 5), another opcode on the request port,
the server stopping; `limit` and `not-allowed` are for per-source limits and an allow list."""

KINDS = ("file", "directory", "bytes", "fd", "path", "ephemeral", "inline", "stream", "other")
"""Answer kinds: a reader's optional `kind` attribute, `other` for a reader without one."""

SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SIZE_BUCKETS = tuple(float(1 << n) for n in range(10, 32, 2))
"""1 KiB, 4 KiB, ... 1 GiB: a pxelinux.cfg, an iPXE binary, a kernel, an initrd, a squashfs."""


class Histogram:
    """Counts per bucket and a sum: one bisect and two additions per observation."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> List[Tuple[str, int]]:
        """(upper bound, observations at most that) as Prometheus wants them, `+Inf` last."""
        total, out = 0, []
        for bound, count in zip([*map(repr, self.bounds), "+Inf"], self.counts):
            total += count
            out.append((bound, total))
        return out


@dataclass(frozen=True)
class TransferReport:
    """How one transfer went: what `observers` receive once it has ended.

    `outcome` is one of `OUTCOMES`; `lookup` and `first_datagram` are seconds
    from the RRQ to the backend's answer and to the first datagram sent (None
    if nothing was sent); `duration` is seconds from the RRQ to the end.
    """

    outcome: str
    filename: bytes
    client: Tuple[str, int]
    local: Tuple[str, int]
    kind: str
    size: Optional[int]
    bytes: int
    duration: float
    lookup: float
    first_datagram: Optional[float]
    blksize: int
    windowsize: int
    datagrams: int
    retransmits: int
    duplicate_acks: int
    client_error: Optional[str]


def report_outcome(outcome: Optional[str]) -> str:
    """A session's outcome as reports carry it: the documented values only (a transfer superseded by
    a new request from its client, or ended from our side for any other reason, is `aborted`)."""
    text = outcome_text(outcome)
    return text if text in OUTCOMES else "aborted"


def reader_kind(reader: Any) -> str:
    kind = getattr(reader, "kind", None)
    return kind if kind in KINDS else "other"


class Stats:
    """What one `TFTPServer` has done since it started; read by whoever wants it, when it wants."""

    def __init__(self) -> None:
        self.transfers_started = 0
        self.finished: Dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.refused: Dict[str, int] = dict.fromkeys(REFUSALS, 0)
        self.errors_sent: Dict[int, int] = {}
        self.answers: Dict[str, int] = dict.fromkeys(KINDS, 0)
        self.lookup_failures = 0
        self.bytes_sent = 0
        self.datagrams_sent = 0
        self.retransmits = 0
        self.duplicate_acks = 0
        self.lookup_seconds = Histogram(SECONDS_BUCKETS)
        self.first_datagram_seconds = Histogram(SECONDS_BUCKETS)
        self.transfer_seconds = Histogram(DURATION_BUCKETS)
        self.transfer_bytes = Histogram(SIZE_BUCKETS)
        self.observers: List[Callable[[TransferReport], Any]] = []
        """Called with a `TransferReport` as each transfer ends (TFTPOffloadService's `observer`)."""

    def refuse(self, reason: str, error_code: Optional[int] = None) -> None:
        """A datagram that got no transfer; `error_code` if an ERROR went back."""
        self.refused[reason] += 1
        if error_code is not None:
            self.error_sent(error_code)

    def error_sent(self, code: int) -> None:
        code = int(code)
        self.errors_sent[code] = self.errors_sent.get(code, 0) + 1

    def answered(self, session: "Session", reader: Any, now: float) -> None:
        """The backend gave `session` a reader."""
        self.answers[reader_kind(reader)] += 1
        session.answered_at = now
        self.lookup_seconds.observe(now - session.started)

    def lookup_failed(self, session: "Session", now: float) -> None:
        """The backend refused, failed or did not answer (the ERROR the client gets is counted where sent)."""
        self.lookup_failures += 1
        self.lookup_seconds.observe(now - session.started)

    def transfer_ended(self, session: "Session", transfer: "Transfer", now: float) -> None:
        """Once per transfer that ran (`session`'s transfer phase), after its reader is finished."""
        engine = transfer.engine
        outcome = report_outcome(session.outcome)
        self.finished[outcome] += 1
        if outcome == "protocol-error":
            self.error_sent(4)  # the engine answers a datagram it cannot place with ERROR 4
        acked = engine.bytes_acked
        self.bytes_sent += acked
        self.datagrams_sent += transfer.sent
        self.retransmits += engine.retransmits
        self.duplicate_acks += engine.duplicate_acks
        first = None if transfer.first_sent is None else transfer.first_sent - session.started
        if first is not None:
            self.first_datagram_seconds.observe(first)
        duration = now - session.started
        self.transfer_seconds.observe(duration)
        if outcome == "complete":
            self.transfer_bytes.observe(acked)
        if not self.observers:
            return
        report = TransferReport(
            outcome=outcome, filename=session.request.filename, client=session.client,
            local=(session.local, session.listener.getHost().port), kind=reader_kind(session._backend_reader),
            size=getattr(session._backend_reader, "size", None), bytes=acked, duration=duration,
            lookup=(session.answered_at or now) - session.started, first_datagram=first,
            blksize=engine.blksize, windowsize=engine.windowsize, datagrams=transfer.sent,
            retransmits=engine.retransmits, duplicate_acks=engine.duplicate_acks, client_error=engine.client_error)
        for observer in list(self.observers):
            try:
                observer(report)
            except Exception:
                log.failure("A transfer observer failed")

    def lookups_in_flight(self, sessions: Any) -> int:
        """Sessions still waiting for the backend (counted at read time, not kept up to date)."""
        return sum(1 for session in sessions if session.transfer is None and session.outcome is None)
