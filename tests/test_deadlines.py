"""deadlines.py: every transfer's deadline in one heap, behind one reactor timer (on task.Clock)."""

from __future__ import annotations

from typing import Any, List, Optional

from twisted.internet.task import Clock

from tftp_offload.deadlines import EARLY, SWEEP_AT_LEAST, Deadlines


class Owner:
    """Records when its deadline passed; `then` arms it again that much later."""

    def __init__(self, clock: Clock, deadlines: Deadlines, name: str, log: List[tuple],
                 then: Optional[float] = None) -> None:
        self.deadline_ticket = 0
        self.clock, self.deadlines, self.name, self.log, self.then = clock, deadlines, name, log, then

    def deadline_passed(self) -> None:
        self.log.append((self.name, self.clock.seconds()))
        if self.then is not None:
            then, self.then = self.then, None
            self.deadlines.arm(self, self.clock.seconds() + then)


def setup() -> tuple:
    clock = Clock()
    clock.advance(100)
    return clock, Deadlines(clock), []


def run_out(clock: Clock) -> None:
    """Advance to each timer in turn until none is left; there is never more than one."""
    for _ in range(1000):
        calls = clock.getDelayedCalls()
        if not calls:
            return
        assert len(calls) == 1
        clock.advance(calls[0].getTime() - clock.seconds())
    raise AssertionError("timers never ran out")


def test_deadlines_pass_in_order_at_their_time_under_one_timer() -> None:
    clock, deadlines, log = setup()
    owners = [Owner(clock, deadlines, name, log) for name in "abc"]
    deadlines.arm(owners[0], 103.0)
    deadlines.arm(owners[1], 101.0)
    deadlines.arm(owners[2], 102.0)
    assert len(deadlines) == 3 and len(clock.getDelayedCalls()) == 1
    run_out(clock)
    assert log == [("b", 101.0), ("c", 102.0), ("a", 103.0)]
    assert len(deadlines) == 0


def test_moving_a_deadline_drops_the_old_one() -> None:
    clock, deadlines, log = setup()
    a, b = Owner(clock, deadlines, "a", log), Owner(clock, deadlines, "b", log)
    deadlines.arm(a, 105.0)
    deadlines.arm(b, 110.0)
    deadlines.arm(a, 102.0)  # earlier: the timer moves (EARLY before it, another deadline being set)
    assert clock.getDelayedCalls()[0].getTime() == 102.0 - EARLY
    deadlines.arm(b, 104.0)
    run_out(clock)
    assert log == [("a", 102.0), ("b", 104.0)]  # neither 105 nor 110 fired


def test_a_disarmed_deadline_never_passes_and_none_left_means_no_timer() -> None:
    clock, deadlines, log = setup()
    a, b = Owner(clock, deadlines, "a", log), Owner(clock, deadlines, "b", log)
    deadlines.arm(a, 101.0)
    deadlines.arm(b, 102.0)
    deadlines.disarm(a)
    deadlines.disarm(a)  # harmless twice
    assert len(deadlines) == 1
    deadlines.disarm(b)
    assert clock.getDelayedCalls() == [] and len(deadlines) == 0
    clock.advance(10)
    assert log == []


def test_an_owner_arming_again_as_its_deadline_passes() -> None:
    clock, deadlines, log = setup()
    a = Owner(clock, deadlines, "a", log, then=0.5)
    b = Owner(clock, deadlines, "b", log)
    deadlines.arm(a, 101.0)
    deadlines.arm(b, 101.2)
    run_out(clock)
    assert log == [("a", 101.0), ("b", 101.2), ("a", 101.5)]


def test_due_together_pass_in_one_turn() -> None:
    clock, deadlines, log = setup()
    owners = [Owner(clock, deadlines, str(i), log) for i in range(5)]
    for i, owner in enumerate(owners):
        deadlines.arm(owner, 101.0 + i * 0.001)
    clock.advance(2)
    assert [name for name, _ in log] == ["0", "1", "2", "3", "4"]
    assert clock.getDelayedCalls() == []


def test_stale_entries_are_swept_so_the_heap_stays_small() -> None:
    """A storm of short transfers: each arms, moves its deadline once and ends long before its
    first deadline would pass; the heap holds about twice the running ones, not every one since."""
    clock, deadlines, log = setup()
    running = [Owner(clock, deadlines, "long", log) for _ in range(10)]
    for owner in running:
        deadlines.arm(owner, 200.0)
    for i in range(10_000):
        short = Owner(clock, deadlines, "short", log)
        deadlines.arm(short, 101.0 + i * 1e-4)
        deadlines.arm(short, 100.5 + i * 1e-4)
        deadlines.disarm(short)
        assert len(deadlines._heap) <= 2 * len(deadlines) + SWEEP_AT_LEAST + 1
    assert len(deadlines) == 10
    run_out(clock)
    assert log == [("long", 200.0)] * 10


def test_an_owner_that_raises_does_not_stop_the_others() -> None:
    from twisted.logger import globalLogPublisher

    clock, deadlines, log = setup()

    class Broken(Owner):
        def deadline_passed(self) -> None:
            raise RuntimeError("bug")

    events: List[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        deadlines.arm(Broken(clock, deadlines, "broken", log), 101.0)
        deadlines.arm(Owner(clock, deadlines, "b", log), 101.0)
        deadlines.arm(Owner(clock, deadlines, "c", log), 102.0)
        run_out(clock)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert log == [("b", 101.0), ("c", 102.0)]
    assert [e["log_failure"].type for e in events if "log_failure" in e] == [RuntimeError]


def test_slightly_earlier_deadlines_do_not_move_the_timer_each_time() -> None:
    """A turn's transfers arm deadlines each a little before the last: the timer, set EARLY
    before the first of them, takes the next ones without a move; none passes before its time."""
    clock, deadlines, log = setup()
    scheduled: List[float] = []
    call_later = clock.callLater

    def counting(delay: float, f: Any, *a: Any, **kw: Any) -> Any:
        scheduled.append(clock.seconds() + delay)
        return call_later(delay, f, *a, **kw)

    clock.callLater = counting  # type: ignore[method-assign]
    owners = [Owner(clock, deadlines, str(i), log) for i in range(50)]
    deadlines.arm(Owner(clock, deadlines, "first", log), 101.0)
    for i, owner in enumerate(owners):
        deadlines.arm(owner, 100.02 - i * 0.00004)  # 40 us earlier each
    assert len(scheduled) <= 3
    passed_at = {}
    for _ in range(100):
        calls = clock.getDelayedCalls()
        if not calls:
            break
        clock.advance(calls[0].getTime() - clock.seconds())
        for name, when in log:
            passed_at.setdefault(name, when)
    for i in range(50):
        assert passed_at[str(i)] >= 100.02 - i * 0.00004  # never early
    assert passed_at["first"] == 101.0
    assert len(log) == 51
