"""Answers reused for a few seconds, so that a ROM's retries and a UEFI size probe cost one lookup.

"The same thing" is a `Key`: (local address, local port, client address, filename, mode); not the
client's port, nor its options, which change between the probe and the real request. The cache
is bounded in entries (each descriptor answer holds an open file) and in bytes (inline answers,
kept stream heads); the oldest entries go first.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional, Tuple

from twisted.internet.interfaces import IReactorTime

from .answers import Answer, StreamAnswer

Key = Tuple[str, int, str, bytes, str]

CACHE_TTL = 5.0
"""Seconds an answer is reused: long enough for a probe and its real RRQ, a retry or two."""

CACHE_MAX_ENTRIES = 512
"""Answers kept at most (a descriptor answer holds one open file each)."""

CACHE_MAX_BYTES = 32 << 20
"""Bytes of inline answers and kept stream heads at most."""


class _Entry:
    __slots__ = ("answer", "request_id", "timer", "weight")

    def __init__(self, answer: Answer, request_id: int, timer: Any, weight: int) -> None:
        self.answer = answer
        self.request_id = request_id
        self.timer = timer
        self.weight = weight


class AnswerCache:
    """Answers by `Key`, each until its time to live ends; an answer that leaves is `release()`d."""

    def __init__(self, clock: IReactorTime, max_entries: int = CACHE_MAX_ENTRIES,
                 max_bytes: int = CACHE_MAX_BYTES) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._entries: "OrderedDict[Key, _Entry]" = OrderedDict()
        self._bytes = 0

    def get(self, key: Key) -> Optional[Tuple[Answer, int]]:
        """(answer, the request id that got it) for `key`, or None."""
        entry = self._entries.get(key)
        return None if entry is None else (entry.answer, entry.request_id)

    def put(self, key: Key, answer: Answer, ttl: float, request_id: int) -> None:
        """Keep `answer` for `ttl` seconds (replacing what `key` had), then drop the oldest beyond the bounds."""
        self.drop(key)
        timer = self._clock.callLater(ttl, self._expire, key, answer)
        self._entries[key] = _Entry(answer, request_id, timer, answer.weight)
        self._bytes += answer.weight
        answer.keep()
        while self._entries and (len(self._entries) > self._max_entries or self._bytes > self._max_bytes):
            self.drop(next(iter(self._entries)))

    def drop(self, key: Key) -> None:
        """Forget `key`'s answer now (its readers already given keep what they need)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._bytes -= entry.weight
        if entry.timer.active():
            entry.timer.cancel()
        entry.answer.release()

    def drop_streams(self) -> None:
        """Forget every stream answer: the connection they lived on is gone (other answers are local)."""
        for key in [k for k, entry in self._entries.items() if isinstance(entry.answer, StreamAnswer)]:
            self.drop(key)

    def clear(self) -> None:
        while self._entries:
            self.drop(next(iter(self._entries)))

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, key: Key, answer: Answer) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.answer is answer:
            self.drop(key)
