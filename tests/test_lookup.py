"""The bounded backend lookup, on a fake clock: every wait ends once, and no reader is left unfinished."""

from __future__ import annotations

from typing import Any, List, Optional

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python import context
from twisted.python.failure import Failure

from tftp_offload.context import RequestContext
from tftp_offload.lookup import BoundedLookup, LookupTimeout, as_failure, ask, finish_reader


class Reader:
    def __init__(self, fails: bool = False) -> None:
        self.finished = 0
        self.fails = fails

    def finish(self) -> None:
        self.finished += 1
        if self.fails:
            raise RuntimeError("finish failed")


class Recorder:
    def __init__(self) -> None:
        self.readers: List[Any] = []
        self.failures: List[Failure] = []
        self.errors: List[BaseException] = []
        self.built: List[bool] = []
        """Per failure: whether it came with a `Failure` of its own (a Deferred's)."""

    def failed(self, error: BaseException, failure: Optional[Failure]) -> None:
        self.errors.append(error)
        self.built.append(failure is not None)
        self.failures.append(as_failure(error, failure))

    def lookup(self, clock: Clock, timeout: float = 5.0) -> BoundedLookup:
        return BoundedLookup(clock, timeout, self.readers.append, self.failed)

    def ask(self, clock: Clock, get_reader: Any, ctx: Optional[RequestContext] = None,
            timeout: float = 5.0) -> Optional[BoundedLookup]:
        return ask(clock, timeout, get_reader, b"pxelinux.0", ctx, self.readers.append, self.failed)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def seen() -> Recorder:
    return Recorder()


def test_a_synchronous_answer_needs_no_lookup_and_no_timer(clock: Clock, seen: Recorder) -> None:
    reader = Reader()
    names: List[bytes] = []
    assert seen.ask(clock, lambda name: names.append(name) or reader) is None
    assert names == [b"pxelinux.0"]
    assert seen.readers == [reader] and not seen.failures
    assert clock.getDelayedCalls() == []


def test_a_synchronous_exception_is_the_error_itself(clock: Clock, seen: Recorder) -> None:
    def broken(name: bytes) -> Any:
        raise ValueError("no")

    assert seen.ask(clock, broken) is None
    assert not seen.readers and isinstance(seen.errors[0], ValueError)
    assert seen.built == [False]  # no Failure for a refusal that needed no waiting
    # ... but as_failure gives one with the traceback down to the raise, for a log line.
    failure = seen.failures[0]
    assert failure.check(ValueError) and failure.frames[-1][0] == "broken"
    assert clock.getDelayedCalls() == []


def test_a_subclass_of_deferred_is_waited_for(clock: Clock, seen: Recorder) -> None:
    class Answer(Deferred):
        pass

    pending = Answer()
    assert seen.ask(clock, lambda name: pending) is not None and not seen.readers
    reader = Reader()
    pending.callback(reader)
    assert seen.readers == [reader] and clock.getDelayedCalls() == []


def test_the_context_is_set_around_the_call(clock: Clock, seen: Recorder) -> None:
    ctx = RequestContext(("192.0.2.1", 69), ("192.0.2.7", 1234))
    seen.ask(clock, lambda name: context.get("remote"), ctx)
    assert seen.readers == [("192.0.2.7", 1234)]


def test_a_deferred_answer_in_time_cancels_the_timer(clock: Clock, seen: Recorder) -> None:
    pending: Deferred = Deferred()
    assert seen.ask(clock, lambda name: pending) is not None
    assert len(clock.getDelayedCalls()) == 1 and not seen.readers
    reader = Reader()
    clock.advance(4.9)
    pending.callback(reader)
    assert seen.readers == [reader] and reader.finished == 0
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert not seen.failures


def test_a_deferred_failure_in_time_is_the_failure(clock: Clock, seen: Recorder) -> None:
    pending: Deferred = Deferred()
    seen.ask(clock, lambda name: pending)
    pending.errback(KeyError("gone"))
    assert seen.failures[0].check(KeyError) and clock.getDelayedCalls() == []
    assert seen.built == [True]  # the Deferred's own Failure, passed on


def test_the_deadline_fails_the_wait_and_never_cancels_the_backend(clock: Clock, seen: Recorder) -> None:
    cancelled: List[Deferred] = []
    pending: Deferred = Deferred(cancelled.append)
    seen.ask(clock, lambda name: pending, timeout=2.0)
    clock.advance(2.0)
    assert len(seen.failures) == 1 and seen.built == [False]
    error = seen.failures[0].value
    assert isinstance(error, LookupTimeout) and error.timeout == 2.0
    assert not cancelled
    late = Reader()
    pending.callback(late)  # the backend answers after all: nobody serves it, so it is finished
    assert late.finished == 1 and not seen.readers and len(seen.failures) == 1


def test_a_late_failure_is_dropped(clock: Clock, seen: Recorder) -> None:
    pending: Deferred = Deferred()
    seen.ask(clock, lambda name: pending, timeout=1.0)
    clock.advance(1.0)
    pending.errback(KeyError("late"))  # consumed: no "Unhandled error in Deferred"
    assert len(seen.failures) == 1 and seen.failures[0].check(LookupTimeout)
    assert pending.called and pending.result is None


def test_abandon_stops_callbacks_and_finishes_a_late_reader(clock: Clock, seen: Recorder) -> None:
    pending: Deferred = Deferred()
    lookup = seen.ask(clock, lambda name: pending)
    assert lookup is not None
    lookup.abandon()
    assert clock.getDelayedCalls() == []
    late = Reader()
    pending.callback(late)
    assert late.finished == 1 and not seen.readers and not seen.failures


def test_handed_in_answers_with_arm(clock: Clock, seen: Recorder) -> None:
    """The AMP client's way: arm the deadline, then resolve when the shared answer comes."""
    lookup = seen.lookup(clock, timeout=3.0)
    lookup.arm()
    lookup.arm()  # once
    assert len(clock.getDelayedCalls()) == 1
    reader = Reader()
    lookup.resolve(reader)
    lookup.resolve(Reader())  # a second answer is not the caller's: finished
    assert seen.readers == [reader] and clock.getDelayedCalls() == []


def test_arm_after_the_end_sets_no_timer(clock: Clock, seen: Recorder) -> None:
    lookup = seen.lookup(clock)
    lookup.reject(Failure(KeyError("x")))
    lookup.arm()
    assert clock.getDelayedCalls() == [] and len(seen.failures) == 1


def test_a_deferred_already_fired_leaves_no_wait(clock: Clock, seen: Recorder) -> None:
    reader = Reader()
    assert seen.ask(clock, lambda name: succeed(reader)) is None  # nothing left to abandon
    assert seen.readers == [reader] and clock.getDelayedCalls() == []


def test_finish_reader_logs_a_failing_finish() -> None:
    from twisted.logger import globalLogPublisher

    events: List[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        reader = Reader(fails=True)
        finish_reader(reader)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert reader.finished == 1
    assert any(e.get("log_failure") is not None and e["log_failure"].check(RuntimeError) for e in events)
