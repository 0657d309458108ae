"""A backend lookup bounded in time: what sessions, the offload responder and the AMP client share.

`get_reader` may answer at once, with a Deferred, or never. Whoever asks waits at most
`timeout` seconds, but the backend's Deferred is never cancelled: cancelling one that cannot
really be cancelled (`deferToThread`'s) drops the reader it produces later, unfinished, and
the file stays open. So the deadline is a timer of our own, and a reader that arrives after
the asker has stopped waiting (timed out, or gone) is finished here.

A backend that answers synchronously (the directory backend) costs no Deferred and no timer
(`ask`): the per-request path of a boot storm is a budget in microseconds.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .context import RequestContext

log = Logger(namespace="tftp_offload.lookup")


class LookupTimeout(Exception):
    """The backend did not answer within the lookup's deadline."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"backend lookup: no answer in {timeout:g} s")
        self.timeout = timeout


def finish_reader(reader: Any) -> None:
    """`finish()` a reader nobody will use; a backend's failure here is logged, never raised."""
    try:
        reader.finish()
    except Exception:
        log.failure("reader.finish() failed")


OnFailure = Callable[[BaseException, Optional[Failure]], object]
"""`on_failure(error, failure)`: the error, and its `Failure` if one was already built."""


def as_failure(error: BaseException, failure: Optional[Failure]) -> Failure:
    """`failure`, or one built from `error` and the traceback it was raised with."""
    return failure if failure is not None else Failure(error, type(error), error.__traceback__)


def ask(clock: IReactorTime, timeout: float, get_reader: Callable[[bytes], Any], filename: bytes,
        ctx: Optional[RequestContext], on_reader: Callable[[Any], object],
        on_failure: OnFailure) -> Optional["BoundedLookup"]:
    """Ask the backend for `filename`'s reader (in the request's context `ctx`, if given).

    A synchronous answer (the directory backend's, a missing file's refusal) goes straight to
    `on_reader`, or to `on_failure(error, None)`: no lookup object, no timer and no `Failure`
    for what needs no waiting, two microseconds a request. A Deferred is waited for through a
    `BoundedLookup`, returned while the wait is on so that the asker can `abandon()` it.
    """
    try:
        answer = get_reader(filename) if ctx is None else ctx.call(get_reader, filename)
    except Exception as e:
        on_failure(e, None)
        return None
    # Not isinstance(): Deferred is an Awaitable, so that goes through ABCMeta's Python code.
    if Deferred not in type(answer).__mro__:
        on_reader(answer)
        return None
    lookup = BoundedLookup(clock, timeout, on_reader, on_failure)
    lookup.wait(answer)
    return None if lookup.done else lookup


class BoundedLookup:
    """One wait for a reader, which ends exactly once: with a reader, a failure, or `LookupTimeout`.

    `on_reader(reader)` or `on_failure(error, failure)` is called at most once, and not at all
    after `abandon()`. `failure` is the Deferred's `Failure`, or None for a `LookupTimeout` (see
    `as_failure`). The answer may be a Deferred from the backend (`wait`, through `ask`) or be
    handed in by whoever has it (`resolve` / `reject`, with `arm` to start the deadline): the
    AMP client shares one backend answer among several waiting requests.
    """

    __slots__ = ("_clock", "_on_failure", "_on_reader", "_timeout", "_timer", "done")

    def __init__(self, clock: IReactorTime, timeout: float, on_reader: Callable[[Any], object],
                 on_failure: OnFailure) -> None:
        self._clock = clock
        self._timeout = timeout
        self._on_reader = on_reader
        self._on_failure = on_failure
        self._timer: Optional[IDelayedCall] = None
        self.done = False
        """True once the wait has ended (answered, failed, timed out or abandoned)."""

    def wait(self, answer: Deferred) -> None:
        """The backend answered with a Deferred: wait for it, within the deadline."""
        self.arm()
        answer.addCallbacks(self.resolve, self.reject)

    def arm(self) -> None:
        """Start the deadline (once; not after the wait has ended)."""
        if self._timer is None and not self.done:
            self._timer = self._clock.callLater(self._timeout, self._expire)

    def resolve(self, reader: Any) -> None:
        """The backend's reader: to `on_reader`, or finished if nobody is waiting any more."""
        if self.done:
            finish_reader(reader)
            return
        self._end()
        self._on_reader(reader)

    def reject(self, failure: Failure) -> None:
        """The backend failed: to `on_failure`, or dropped (it holds no reader) if nobody is waiting."""
        if self.done:
            return
        self._end()
        self._on_failure(failure.value, failure)

    def abandon(self) -> None:
        """Stop waiting: no callback will run, and a reader that still arrives is finished."""
        self._end()

    def _expire(self) -> None:
        self._timer = None
        if not self.done:
            self.done = True
            self._on_failure(LookupTimeout(self._timeout), None)

    def _end(self) -> None:
        self.done = True
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
