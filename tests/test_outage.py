"""A backend that is down: answered at once, retried quietly, logged once, then rarely, then once more.

`Outage` and `explain` on their own (a fake clock, real files), then the AMP backend against a
socket with nobody behind it, in process over a real UNIX socket.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Dict, List

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from tests.support.inprocess import log_events  # noqa: F401  (fixture)
from tests.support.offload_support import FakeBackend, Reader, get_reader, sock_dir, wait_for  # noqa: F401
from tftp_offload import errors
from tftp_offload.backends.outage import REMINDER_INTERVAL, Outage, explain
from tftp_offload.offload.client import AMPBackend
from tftp_offload.offload.service import offload_service

Events = List[Dict[str, Any]]


def lines(events: Events) -> List[str]:
    return [formatEvent(e) for e in events]


def test_one_warning_then_reminders_then_one_info(log_events: Events) -> None:
    clock = Clock()
    outage = Outage(Logger(namespace="test.outage"), "the backend", "/run/b.sock", clock)
    assert not outage.down and outage.back() is None
    for _ in range(20):  # an attempt every 2 s for 40 s
        outage.went("nothing listens")
        clock.advance(2)
    ours = [e for e in log_events if e.get("log_namespace") == "test.outage"]
    assert [e["log_level"].name for e in ours] == ["warn"]
    assert "Cannot reach the backend at /run/b.sock: nothing listens" in lines(ours)[0]
    clock.advance(REMINDER_INTERVAL)
    outage.refused = 7
    outage.went("nothing listens")
    outage.went("nothing listens")
    ours = [e for e in log_events if e.get("log_namespace") == "test.outage"]
    assert len(ours) == 2 and "Still cannot reach the backend" in lines(ours)[1] and "7 requests" in lines(ours)[1]
    assert outage.back() == pytest.approx(40 + REMINDER_INTERVAL)
    ours = [e for e in log_events if e.get("log_namespace") == "test.outage"]
    assert len(ours) == 3 and ours[2]["log_level"].name == "info" and "again after" in lines(ours)[2]
    assert not outage.down


def test_explain_names_what_is_wrong(tmp_path: Any) -> None:
    regular = tmp_path / "file"
    regular.write_text("")
    assert explain(str(regular)) == (f"{regular} is a regular file, not a UNIX socket: is the backend running "
                                     "(and is --socket right)?")
    assert "is a directory, not a UNIX socket" in explain(str(tmp_path))
    assert "does not exist" in explain(str(tmp_path / "missing"))
    stale = socket.socket(socket.AF_UNIX)
    path = f"/tmp/tfb-{os.getpid()}.sock"
    stale.bind(path)
    stale.close()
    try:
        assert "nothing listens on" in explain(path)
    finally:
        os.unlink(path)


@pytest_twisted.ensureDeferred
async def test_known_down_is_answered_at_once_and_back_is_found_by_the_next_request(
        sock_dir: str, log_events: Events) -> None:
    """No backend: after the first failed attempt every request is refused at once (not after the 3 s
    timeout); one warning, no retry chatter; a backend that appears is found by the next request even
    while the backoff would wait 30 s more."""
    path = os.path.join(sock_dir, "b.sock")
    client = AMPBackend(path, timeout=3.0, retry_max_delay=30.0)
    client.startService()
    service = None
    try:
        await wait_for(lambda: client.outage.down, 2.0)
        for _ in range(50):
            started = time.monotonic()
            with pytest.raises(errors.BackendError, match=r"^Backend unavailable$"):
                await get_reader(client, b"f")
            assert time.monotonic() - started < 0.5
        text = lines(log_events)
        assert len([t for t in text if "Cannot reach the backend" in t]) == 1, text
        assert not [t for t in text if "Scheduling retry" in t or "Lost the connection" in t]
        assert client.outage.refused == 50
        service = offload_service(FakeBackend({b"f": lambda: Reader(b"back")}), path)
        service.startService()
        from tests.support.offload_support import turn

        await turn(0.15)  # past NUDGE_INTERVAL: this request tries a connection itself
        started = time.monotonic()
        reader = await get_reader(client, b"f")
        assert time.monotonic() - started < 1.0
        assert reader.read(10) == b"back"
        reader.finish()
        text = lines(log_events)
        [connected] = [t for t in text if "Connected to the backend" in t]
        assert "without it (50 requests refused)" in connected or "requests refused" in connected, connected
    finally:
        await client.stopService()
        if service is not None:
            await service.stopService()
    assert not [t for t in lines(log_events) if "Lost the connection" in t], "a clean stop is not news"
