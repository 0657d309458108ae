"""stats.py: the histogram, the outcome values reports carry, and the embedding hook
(TFTPOffloadService's `observer`, one TransferReport per transfer) over real UDP in process.
"""

from __future__ import annotations

import enum
import os
from typing import Any, Dict, List

import pytest
import pytest_twisted

from tests.support import tftp_client as wire
from tests.support.inprocess import (
    Backend,
    Reader,
    ReportingReader,
    Serving,
    download,
    log_events,  # noqa: F401  (fixture)
    opcode,
    serve,  # noqa: F401  (fixture)
    until,
)
from tftp_offload.stats import OUTCOMES, Histogram, TransferReport, report_outcome

FILE = os.urandom(3000)


def test_histogram_buckets_are_upper_inclusive_and_cumulative() -> None:
    histogram = Histogram((1.0, 2.0))
    for value in (0.5, 1.0, 1.5, 2.0, 7.0):
        histogram.observe(value)
    assert histogram.cumulative() == [("1.0", 2), ("2.0", 4), ("+Inf", 5)]
    assert histogram.count == 5 and histogram.sum == 12.0


@pytest.mark.parametrize(("outcome", "reported"), [
    *[(o, o) for o in OUTCOMES], ("superseded", "aborted"), ("refused", "aborted"), (None, "aborted")])
def test_reports_carry_documented_outcomes_only(outcome: str, reported: str) -> None:
    assert report_outcome(outcome) == reported


def test_a_str_enum_outcome_is_reported_by_value() -> None:
    class Outcome(str, enum.Enum):
        PROBE = "probe"

    reported = report_outcome(Outcome.PROBE)
    assert reported == "probe" and type(reported) is str
    assert {reported: 1}["probe"] == 1


class KindReader(Reader):
    kind = "stream"


@pytest_twisted.ensureDeferred
async def test_observer_gets_one_report_per_transfer(serve: Serving) -> None:
    reports: List[TransferReport] = []
    later: List[TransferReport] = []
    backend = Backend({b"file": FILE, b"other": b"x" * 100}, reader=KindReader)
    service = serve(backend, observer=reports.append)
    service.observers.append(later.append)  # added once running: called too
    server = ("127.0.0.1", service.addresses()[0][1])
    peer = serve.peer()
    got = await download(peer, server, b"file", {"blksize": "1024", "tsize": "0"})
    assert got.complete
    # A size probe: the OACK, then ERROR 8.
    prober = serve.peer()
    prober.send(wire.rrq(b"other", options={"tsize": "0"}), server)
    _, tid = await prober.recv()
    prober.send(wire.error(8, b"probe"), tid)
    # Refused by the backend: no transfer, no report.
    missing = await download(serve.peer(), server, b"missing")
    assert missing.error is not None and missing.error[0] == 1
    await until(lambda: len(reports) == 2, what="two reports")
    await serve.settled(service)

    complete, probe = reports
    assert later == reports
    assert complete.outcome == "complete" and complete.filename == b"file"
    assert complete.client == peer.address and complete.local == server
    assert complete.kind == "stream" and complete.size == len(FILE)
    assert complete.bytes == len(FILE) and complete.blksize == 1024 and complete.windowsize == 1
    assert complete.datagrams == 1 + 3 and complete.retransmits == 0 and complete.duplicate_acks == 0
    assert complete.client_error is None
    assert 0 <= complete.lookup <= complete.first_datagram <= complete.duration < 5  # type: ignore[operator]
    assert probe.outcome in ("client-error", "probe") and probe.bytes == 0 and probe.datagrams == 1
    assert probe.client_error == "8: probe" and probe.size == 100
    stats = service.server.stats  # type: ignore[union-attr]
    assert stats.transfers_started == 2 and stats.lookup_failures == 1


@pytest_twisted.ensureDeferred
async def test_a_superseded_transfer_is_reported_aborted(serve: Serving) -> None:
    """A client that moves on to another request from the same port ends its first transfer: the
    reader's report (what the AMP backend forwards in TransferFinished) and the observer's say `aborted`,
    a documented outcome."""
    reports: List[TransferReport] = []
    backend = Backend({b"file": FILE, b"next": b"short"}, reader=ReportingReader)
    service = serve(backend, observer=reports.append)
    server = ("127.0.0.1", service.addresses()[0][1])
    peer = serve.peer()
    peer.send(wire.rrq(b"file"), server)
    first, _ = await peer.recv()
    assert opcode(first) == wire.DATA
    got = await download(peer, server, b"next")
    assert got.complete and got.data == b"short"
    await serve.settled(service)
    assert [r.outcome for r in reports] == ["aborted", "complete"]
    superseded = backend.readers[0]
    assert superseded.events[0][0] == "report" and superseded.events[0][1]["outcome"] == "aborted"


@pytest_twisted.ensureDeferred
async def test_an_observer_that_raises_is_logged_and_harmless(serve: Serving, log_events: List[Dict[str, Any]]) -> None:
    def broken(report: TransferReport) -> None:
        raise RuntimeError("observer bug")

    seen: List[TransferReport] = []
    service = serve(Backend({b"file": FILE}), observer=broken)
    service.observers.append(seen.append)
    server = ("127.0.0.1", service.addresses()[0][1])
    for _ in range(2):
        got = await download(serve.peer(), server)
        assert got.complete and got.data == FILE
    await serve.settled(service)
    assert len(seen) == 2
    failures = [e for e in log_events if e.get("log_format") == "A transfer observer failed"]
    assert len(failures) == 2 and failures[0]["log_failure"].check(RuntimeError)
    for failure in failures:
        failure["log_failure"].cleanFailure()


@pytest_twisted.ensureDeferred
async def test_first_datagram_is_timed_when_the_first_read_is_asynchronous(serve: Serving) -> None:
    """No OACK and a reader answering with Deferreds: the first datagram leaves a reactor turn after the
    backend's answer, and that is when it is timed."""
    reports: List[TransferReport] = []
    service = serve(Backend({b"file": FILE}, deferred=True), observer=reports.append)
    server = ("127.0.0.1", service.addresses()[0][1])
    got = await download(serve.peer(), server)
    assert got.complete and got.data == FILE
    await until(lambda: len(reports) == 1, what="a report")
    report = reports[0]
    assert report.first_datagram is not None and report.lookup < report.first_datagram <= report.duration
    assert report.datagrams == 6 and report.kind == "other"  # 3000 bytes: five full blocks and a short one
    stats = service.server.stats  # type: ignore[union-attr]
    assert stats.first_datagram_seconds.count == 1 and stats.datagrams_sent == 6
    await serve.settled(service)
