"""One lookup on the server's side: the request, the `ReadRequest` asked for it, who waits, what they get.

Identical lookups in flight share one `Question`; each `get_reader` call is a `Waiter` on one,
with its own deadline (`lookup.BoundedLookup`: a reader that arrives after it is finished); a
reader handed out is `Reported`, so that the backend hears how its transfer went.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..context import RequestContext
from ..errors import BackendError
from ..interfaces import IReader
from ..lookup import BoundedLookup, LookupTimeout, as_failure
from .cache import Key

if TYPE_CHECKING:
    from .client import AMPBackend

log = Logger(namespace="tftp_offload.amp")

UNAVAILABLE = "Backend unavailable"
NO_ANSWER = "Backend did not answer in time"


class Request:
    """One RRQ as the backend sees it: what it names, who asked, where."""

    __slots__ = ("filename", "local", "remote", "mode", "options")

    def __init__(self, filename: bytes, ctx: RequestContext) -> None:
        self.filename = filename
        self.local = ctx.local
        self.remote = ctx.remote
        self.mode = ctx.mode
        self.options = ctx.options

    @property
    def key(self) -> Key:
        return (self.local[0], self.local[1], self.remote[0], self.filename, self.mode)


@implementer(IReader)
class Reported:
    """A reader handed to the server, which tells the backend how its transfer went (`transfer_finished`)."""

    __slots__ = ("_reader", "_report", "size", "read", "kind")

    def __init__(self, reader: Any, report: Callable[[Dict[str, Any]], None], kind: str) -> None:
        self._reader = reader
        self._report = report
        self.size = reader.size
        self.read = reader.read  # the hot path: no extra call per read
        self.kind = kind
        """The answer kind (inline, fd, path, ephemeral, stream), for metrics."""

    @property
    def reader(self) -> Any:
        """The reader this one reports for (None once finished)."""
        return self._reader

    def transfer_finished(self, report: Dict[str, Any]) -> None:
        self._report(report)

    def finish(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.finish()


class Waiter:
    """One `get_reader` call waiting for a question's answer, within its own deadline."""

    def __init__(self, backend: "AMPBackend", request: Request, fail_fast: bool) -> None:
        self.backend = backend
        self.request = request
        self.question: Optional[Question] = None
        self.deferred: Deferred = Deferred(self._cancel)
        self.fail_fast = fail_fast
        """Asked while the backend was known to be down: answered when the next attempt fails, not at the timeout."""
        self._wait = BoundedLookup(backend.reactor, backend.timeout, self.deferred.callback, self._failed)
        self._wait.arm()

    def succeed(self, reader: Any) -> None:
        self.question = None
        self._wait.resolve(reader)

    def fail(self, failure: Failure) -> None:
        self.question = None
        self._wait.reject(failure)

    def _failed(self, error: BaseException, failure: Optional[Failure]) -> None:
        if isinstance(error, LookupTimeout):
            failure = Failure(BackendError(self._expired()))
        self.deferred.errback(as_failure(error, failure))

    def _expired(self) -> str:
        question, self.question = self.question, None
        sent = question is not None and question.request_id is not None
        if question is not None:
            question.forget(self)
        # What the client reads on its console: short, true, and no paths or internals.
        message = NO_ANSWER if sent else UNAVAILABLE
        log.warn("{message} ({timeout} s) for {file!r} from {client}{reason}", message=message,
                 timeout=self.backend.timeout, file=self.request.filename, client=self.request.remote,
                 reason="" if sent else f": {self.backend.unavailable_reason()}", outcome="backend-timeout")
        return message

    def _cancel(self, deferred: Deferred) -> None:
        self._wait.abandon()
        question, self.question = self.question, None
        if question is not None:
            question.forget(self)


class Question:
    """One `ReadRequest`, and everyone waiting for its answer. `unwanted(question)` when nobody waits
    for one never sent."""

    def __init__(self, request: Request, shared: bool, unwanted: Callable[["Question"], object]) -> None:
        self.request = request
        self.key = request.key if shared else None
        self.request_id: Optional[int] = None
        self.waiters: List[Waiter] = []
        self._unwanted = unwanted

    def add(self, waiter: Waiter) -> None:
        waiter.question = self
        self.waiters.append(waiter)

    def forget(self, waiter: Waiter) -> None:
        if waiter in self.waiters:
            self.waiters.remove(waiter)
        if not self.waiters and self.request_id is None:
            self._unwanted(self)  # never sent: nobody needs it sent any more

    def take_waiters(self) -> List[Waiter]:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.question = None
        return waiters
