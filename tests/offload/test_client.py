"""The server's AMP backend (offload/client.py) against the responder, in one process over a real UNIX socket.

What the caller of `get_reader` sees of the backend's errors, and that a request AMP cannot carry
costs neither the connection nor the next request. The answer kinds, sharing, the cache, streams
and the connection have test modules of their own.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from tests.support.offload_support import (
    FakeBackend,
    Reader,
    Start,
    fetch,
    get_reader,
)
from tftp_offload import errors

# ------------------------------------------------------------------------ answer kinds --


@pytest_twisted.ensureDeferred
async def test_backend_errors_reach_the_caller(pair: Start) -> None:
    backend = FakeBackend({b"missing": errors.FileNotFound("Not on this rack"),
                           b"no": errors.AccessViolation("Not for you"),
                           b"crash": RuntimeError("/secret/path")})
    client, _ = pair(backend)
    with pytest.raises(errors.FileNotFound, match="Not on this rack"):
        await get_reader(client, b"missing")
    with pytest.raises(errors.AccessViolation, match="Not for you"):
        await get_reader(client, b"no")
    with pytest.raises(errors.BackendError, match=r"^Internal server error$"):
        await get_reader(client, b"crash")
    # Errors are not cached: asking again asks again.
    with pytest.raises(errors.FileNotFound):
        await get_reader(client, b"missing")
    assert backend.count(b"missing") == 2


@pytest_twisted.ensureDeferred
async def test_absurd_filename_is_refused_without_losing_the_connection(pair: Start) -> None:
    client, _ = pair(FakeBackend({b"ok": lambda: Reader(b"ok")}))
    with pytest.raises(errors.BackendError):
        await get_reader(client, b"x" * 70_000)  # over AMP's 65,535-byte value limit
    assert await fetch(client, b"ok") == b"ok"


# ------------------------------------------------------------------ sharing and caching --


# ---------------------------------------------------------------- slow, gone, restarting --


