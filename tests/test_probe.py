"""The size probe's follow-up, in this process, in the order that used to lose it.

A UEFI client sends RRQ(tsize 0), gets the OACK, sends ERROR 8 to the transfer port and at
once the same RRQ to the listening port. If the reactor reads the listening port first, the
probe's session still runs and the RRQ looks like a duplicate. Here the two datagrams are
queued and the request is handed to the server before the reactor has read the ERROR: the
driver must read what waits at the transfer port before judging. The same reading must
still drop a real duplicate whose transfer's final ACK was waiting.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List

import pytest_twisted

from tests.support import tftp_client as wire
from tests.support.inprocess import (
    QUIET,
    Backend,
    Serving,
    events_with,
    log_events,  # noqa: F401  (fixture)
    opcode,
    serve,  # noqa: F401  (fixture)
    until,
)

FILE = os.urandom(3000)
SMALL = b"one block\n"


def listener_of(service: Any) -> Any:
    return service.ports[0]


@pytest_twisted.ensureDeferred
async def test_follow_up_handled_before_the_probe_error_is_served(serve: Serving,
                                                                  log_events: List[Dict[str, Any]]) -> None:
    service = serve(Backend({b"file": FILE}))
    listener = listener_of(service)
    server = ("127.0.0.1", listener.getHost().port)
    peer = serve.peer()
    request = wire.rrq(b"file", b"octet", {"tsize": "0"})
    peer.send(request, server)
    oack, tid = await peer.recv()
    assert opcode(oack) == wire.OACK
    peer.send(wire.error(8, b"size only"), tid)  # queued at the transfer port, not yet read
    # What the reactor does when it reads the listening port first:
    service.server.request_received(listener, request, peer.address, "127.0.0.1", time.time())
    again, second = await peer.recv()
    assert opcode(again) == wire.OACK and second != tid  # served at once, by a new transfer
    peer.send(wire.error(8, b"size only"), second)
    await until(lambda: not service.server.sessions, what="both probes to end")
    probes = events_with(log_events, event="transfer-end", outcome="probe")
    assert len(probes) == 2 and probes[0]["error_code"] == 8 and probes[0]["error_message"] == "size only"


@pytest_twisted.ensureDeferred
async def test_duplicate_whose_final_ack_was_waiting_is_still_a_duplicate(serve: Serving,
                                                                          log_events: List[Dict[str, Any]]) -> None:
    backend = Backend({b"small": SMALL})
    service = serve(backend)
    listener = listener_of(service)
    server = ("127.0.0.1", listener.getHost().port)
    peer = serve.peer()
    request = wire.rrq(b"small")
    sent = time.time()
    peer.send(request, server)
    data, tid = await peer.recv()
    assert data == b"\0\3\0\1" + SMALL
    peer.send(wire.ack(1), tid)  # completes the transfer, once read
    # The ROM's duplicate RRQ, which arrived (by the kernel's clock) before that ACK:
    service.server.request_received(listener, request, peer.address, "127.0.0.1", sent)
    await peer.silence(QUIET)  # no second transfer
    assert len(backend.lookups) == 1
    assert [e["outcome"] for e in events_with(log_events, event="transfer-end")] == ["complete"]
