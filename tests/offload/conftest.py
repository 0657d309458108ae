"""Fixtures of the offload tests: a responder with a bare AMP client (`serve`), an AMPBackend talking to a
responder (`pair`). Like tests/conftest.py, nothing here imports the reactor at module level."""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import pytest
import pytest_twisted
from twisted.internet.defer import maybeDeferred
from twisted.protocols import amp

from tests.support.offload_support import ALL, Start, sock_dir  # noqa: F401  (fixture)
from tftp_offload.offload import commands
from tftp_offload.offload.client import AMPBackend
from tftp_offload.offload.service import offload_service


@pytest.fixture
def serve(sock_dir: str) -> Iterator[Start]:
    """start(backend, capabilities=ALL, hello=True, **responder_options) -> (service, connected AMP client)."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol

    services: List[Any] = []
    clients: List[amp.AMP] = []

    async def start(backend: Any, capabilities: Sequence[str] = ALL, hello: bool = True,
                    **options: Any) -> Tuple[Any, amp.AMP]:
        path = os.path.join(sock_dir, f"r{len(services)}.sock")
        service = offload_service(backend, path, **options)
        service.startService()
        services.append(service)
        client = await connectProtocol(UNIXClientEndpoint(reactor, path), amp.AMP())
        clients.append(client)
        if hello:
            answer = await client.callRemote(commands.Hello, version=1, capabilities=list(capabilities))
            assert answer["version"] == 1
        return service, client

    yield start
    for client in clients:
        if client.transport is not None:
            client.transport.loseConnection()
    for service in services:
        if service.running:
            pytest_twisted.blockon(maybeDeferred(service.stopService))


@pytest.fixture
def pair(sock_dir: str) -> Iterator[Start]:
    """start(backend, responder_options={}, **amp_options) -> (AMPBackend, responder service), both running."""
    from twisted.internet import reactor

    started: List[Any] = []

    def start(backend: Any, responder_options: Dict[str, Any] = {}, path: str = "", **options: Any  # noqa: B006
              ) -> Tuple[AMPBackend, Any]:
        path = path or os.path.join(sock_dir, "b.sock")
        service = offload_service(backend, path, **responder_options)
        service.startService()
        client = AMPBackend(path, **{"timeout": 2.0, **options})
        client.startService()
        started.extend([client, service])
        return client, service

    yield start
    for service in started:
        if service.running:
            d = maybeDeferred(service.stopService)
            d.addTimeout(10, reactor)
            pytest_twisted.blockon(d)
