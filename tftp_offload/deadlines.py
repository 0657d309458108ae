"""Every running transfer's retransmission deadline, in one heap behind one reactor timer.

A transfer arms a deadline when it starts, moves it earlier once the first
round trip has taught it a shorter timeout, and drops it when it ends: for a
boot storm's small file that was two `callLater`s and two `cancel`s, each a
`DelayedCall` (a dozen attributes) in the reactor's heap, about 2.5 us apiece
with the reactor's own bookkeeping. Here each is a tuple pushed on one heap,
and the reactor holds one `DelayedCall` for all of them, for the earliest.

An entry goes stale, rather than being searched for and removed, when its
transfer moves its deadline or ends; stale entries are skipped when they come
due and swept out once they outnumber the live ones, so the heap holds at most
about twice the running transfers. With no transfer armed the heap is emptied
and the reactor timer cancelled: an idle server holds no timer.
"""

from __future__ import annotations

from heapq import heapify, heappop, heappush
from typing import Any, List, Optional, Protocol, Tuple

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

log = Logger(namespace="tftp_offload")

SWEEP_AT_LEAST = 64
"""Stale entries are swept out only once there are this many (and more than live ones)."""

EARLY = 0.005
"""When a deadline comes in before the reactor timer, the timer is moved this much earlier still.

The transfers of one reactor turn arm deadlines that each come a little before the last (their
first round trips, measured in turn, get shorter): moved to each exactly, the timer would be
cancelled and set again for nearly every small file. Set early, it takes the next ones without
a move, and when it fires with nothing due it is set for the first deadline exactly. A deadline
never passes early; 5 ms is half the shortest retransmission timeout (engine.MIN_RTO)."""


_NOT_SET = float("inf")
"""`_call_at` with no call set: later than any deadline."""


class Armed(Protocol):
    """What the heap asks of a transfer: the ticket of its one live entry, and the call when it comes due."""

    deadline_ticket: int

    def deadline_passed(self) -> None: ...


class Deadlines:
    """One heap of (when, ticket, owner); an entry is live while its owner's `deadline_ticket` is its ticket."""

    __slots__ = ("_clock", "_heap", "_tickets", "_live", "_stale", "_call", "_call_at")

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._heap: List[Tuple[float, int, Armed]] = []
        self._tickets = 0
        self._live = 0
        self._stale = 0
        self._call: Optional[IDelayedCall] = None
        self._call_at = _NOT_SET

    def __len__(self) -> int:
        """Owners armed now."""
        return self._live

    def arm(self, owner: Armed, when: float) -> None:
        """Call `owner.deadline_passed()` at `when` (its earlier deadline, if it had one, is dropped)."""
        if owner.deadline_ticket:
            self.disarm(owner)
        self._tickets += 1
        owner.deadline_ticket = ticket = self._tickets
        heappush(self._heap, (when, ticket, owner))
        self._live += 1
        if when < self._call_at:
            if self._call is not None:  # another owner's deadline set the timer: see EARLY
                early = when - EARLY
                self._schedule(early if early > self._clock.seconds() else when)
            else:
                self._schedule(when)

    def disarm(self, owner: Armed) -> None:
        """Drop `owner`'s deadline, if it has one."""
        if not owner.deadline_ticket:
            return
        owner.deadline_ticket = 0
        self._live -= 1
        if not self._live:
            self._clear()
            return
        self._stale += 1
        if self._stale >= SWEEP_AT_LEAST and self._stale > self._live:
            self._heap = [entry for entry in self._heap if entry[2].deadline_ticket == entry[1]]
            heapify(self._heap)
            self._stale = 0

    def _schedule(self, when: float) -> None:
        call = self._call
        if call is not None and call.active():
            call.cancel()
        self._call_at = when
        delay = when - self._clock.seconds()
        self._call = self._clock.callLater(delay if delay > 0 else 0, self._fire)

    def _fire(self) -> None:
        self._call = None
        self._call_at = -1.0  # while firing, arm() schedules nothing: the next call is set once, below
        now = self._clock.seconds()
        while self._heap and self._heap[0][0] <= now:
            _when, ticket, owner = heappop(self._heap)
            if owner.deadline_ticket != ticket:
                self._stale -= 1
                continue
            owner.deadline_ticket = 0
            self._live -= 1
            try:
                owner.deadline_passed()  # may arm again (a later entry), or end
            except Exception:  # one owner's bug must not stop every other owner's deadlines
                log.failure("Unhandled error at a transfer's deadline")
        self._call_at = _NOT_SET
        if not self._live:
            self._clear()
            return
        heap = self._heap
        while heap[0][2].deadline_ticket != heap[0][1]:  # a live entry is below: the loop ends
            heappop(heap)
            self._stale -= 1
        self._schedule(heap[0][0])

    def _clear(self) -> None:
        self._heap = []
        self._stale = 0
        call, self._call = self._call, None
        self._call_at = _NOT_SET
        if call is not None and call.active():
            call.cancel()
