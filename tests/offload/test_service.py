"""offload_service (offload/service.py): the socket's permissions, a stale socket replaced, an IService."""

from __future__ import annotations

import os
import socket
import stat
from typing import Any, Awaitable, Callable, Tuple

import pytest
import pytest_twisted
from twisted.protocols import amp

from tests.support.offload_support import (
    FakeBackend,
    Reader,
    request,
)
from tftp_offload.offload.service import offload_service

Start = Callable[..., Awaitable[Tuple[Any, amp.AMP]]]


@pytest.mark.parametrize("mode", [0o600, 0o660])
@pytest_twisted.ensureDeferred
async def test_socket_permissions_and_stale_socket(serve: Start, sock_dir: str, mode: int) -> None:
    # A socket file left behind by a process that died: the service must take its place.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(sock_dir, "r0.sock"))
    stale.close()
    service, client = await serve(FakeBackend({b"f": Reader(b"x")}), mode=mode)
    assert stat.S_IMODE(os.stat(service.socket_path).st_mode) == mode
    assert (await request(client, b"f"))["data"] == b"x"


def test_offload_service_is_a_service() -> None:
    from twisted.application.service import IService

    service = offload_service(FakeBackend({}), "/nonexistent/x.sock")
    assert IService.providedBy(service)
