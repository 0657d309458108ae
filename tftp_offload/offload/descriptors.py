"""When the responder may close its copy of a descriptor it passed to the server: once the kernel has it.

A descriptor passed with `amp.Descriptor` must stay open until `sendmsg` has handed it to the
kernel; closing it sooner sends nothing, or whatever file reuses the number. Twisted has no
"descriptor sent" notification, but it has a public drain signal: a consumer calls its registered
pull producer's `resumeProducing()` whenever it has written out everything it was given
(`IConsumer.registerProducer`), and a descriptor goes out with the bytes of the box that carries it.
So while descriptors are held, `SentDescriptors` is the transport's producer; the first drain after
they were queued closes them, and it unregisters at once, because `loseConnection` waits for a
registered producer to go before it completes.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Optional

from twisted.internet.interfaces import IDelayedCall, IPullProducer, IReactorTime
from zope.interface import implementer

GIVE_UP = 30.0
"""Seconds the transport may take to send what it holds; then `on_stuck` (the responder drops the
connection: a descriptor still queued is never closed while it may still be sent)."""


@implementer(IPullProducer)
class SentDescriptors:
    """Descriptors waiting to leave on one connection, closed once its transport has drained."""

    def __init__(self, transport: Any, clock: IReactorTime, on_stuck: Callable[[], object],
                 give_up: float = GIVE_UP) -> None:
        self._transport = transport
        self._clock = clock
        self._on_stuck = on_stuck
        self._give_up = give_up
        self._held: List[int] = []
        self._registering = False
        self._timer: Optional[IDelayedCall] = None

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, fd: int) -> None:
        """Keep `fd` open until what is written next (the box that carries it) has been sent.

        Call it before the box is written, in the same turn of the reactor: a drain comes only
        from the reactor, so the first one after this includes the box.
        """
        self._held.append(fd)
        if len(self._held) > 1:
            return  # already the transport's producer: the next drain covers this one too
        self._timer = self._clock.callLater(self._give_up, self._stuck)
        self._registering = True
        try:
            self._transport.registerProducer(self, False)  # a pull producer is resumed at once: not a drain
        finally:
            self._registering = False

    def resumeProducing(self) -> None:
        """The transport has written out everything it was given: the held descriptors have left."""
        if self._registering:
            return
        self._transport.unregisterProducer()
        self.close_all()

    def stopProducing(self) -> None:
        """The connection is gone: nothing held will be sent any more."""
        self.close_all()

    def close_all(self) -> None:
        """Close every descriptor held (once each) and stop waiting."""
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        held, self._held = self._held, []
        for fd in held:
            os.close(fd)

    def _stuck(self) -> None:
        self._timer = None
        self._on_stuck()
