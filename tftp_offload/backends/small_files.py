"""Small files held in memory for the directory backend: a boot storm asks for the same few again and again.

A rack powering on fetches the same bootloader configs and small boot files
hundreds of times; opening, `fstat`-ing, reading and closing each one every
time is four system calls out of a small transfer's sixteen. Each request still
walks its path (`lstat` per component: the confinement checks run every time),
and the walk's `lstat` of the file decides: a kept copy is served only while the
file's inode, size, modification and change times are still the ones it was read
under. Any write, truncate, rename over it, chmod or chown changes the change
time (ctime), so a kept copy is never served after its file changed, provided it
was read once the file had *settled*: a file changed within the last `SETTLED`
seconds is served from disk and not kept, as git treats a "racily clean" index
entry, since two changes inside one tick of the file system's clock can leave
the same times behind.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Dict, Optional, Tuple

SMALL_FILE = 60 * 1024
"""Bytes: a file this size or smaller may be kept (configs, pxelinux.0); larger ones are read from disk.
No more than one inline answer of the offload protocol (`offload.commands.INLINE_MAX`): the responder
answers a kept file (bytes, no descriptor) inline, and a larger file keeps its descriptor answer."""

KEPT_BYTES = 8 << 20
"""All kept files together at most; the oldest kept go first."""

SETTLED = 2.0
"""Seconds since a file last changed before its bytes may be kept (longer than any file system's time tick)."""

Signature = Tuple[int, int, int, int, int]


def signature(info: os.stat_result) -> Signature:
    """What must not have changed for a kept copy to be served: inode, device, size, mtime, ctime."""
    return (info.st_ino, info.st_dev, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class SmallFiles:
    """Path -> (signature, bytes), bounded by `limit` bytes in all."""

    def __init__(self, limit: int = KEPT_BYTES, clock: Callable[[], float] = time.time) -> None:
        self.limit = limit
        self._clock = clock
        self._files: Dict[str, Tuple[Signature, bytes]] = {}
        self.size = 0
        """Bytes kept now."""

    def get(self, path: str, info: os.stat_result) -> Optional[bytes]:
        """The kept bytes of `path`, if the file `info` describes (its `lstat` now) is the one they were read from."""
        entry = self._files.get(path)
        if entry is not None and entry[0] == signature(info):
            return entry[1]
        return None

    def keep(self, path: str, info: os.stat_result, fd: int) -> Optional[bytes]:
        """Read the whole of `fd` (open on `path`, `info` its `fstat`) and keep it, if the file is small and
        settled; its bytes then, else None: serve the descriptor (`FileReader` reads at offsets of its own)."""
        size = info.st_size
        if size > SMALL_FILE or size > self.limit or self._clock() - info.st_ctime_ns / 1e9 < SETTLED:
            return None
        data = os.pread(fd, size + 1, 0)  # one more: a file grown since its fstat is not the one described
        if len(data) != size:
            return None
        old = self._files.pop(path, None)
        if old is not None:
            self.size -= len(old[1])
        while self._files and self.size + size > self.limit:
            first = next(iter(self._files))
            self.size -= len(self._files.pop(first)[1])
        self._files[path] = (signature(info), data)
        self.size += size
        return data

    def __len__(self) -> int:
        return len(self._files)
