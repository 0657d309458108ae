"""The limits (guard.py), pure, on a fake clock: per-client caps and rates, --allow, the budgets."""

from __future__ import annotations

import ipaddress
from typing import Any, Dict, List

import pytest
from twisted.internet.task import Clock

from tests.support.inprocess import log_events  # noqa: F401  (fixture)
from tftp_offload import guard as guard_module
from tftp_offload.guard import (
    BURST_SECONDS,
    REPORT_INTERVAL,
    Bucket,
    Guard,
    GuardLimits,
    parse_network,
)


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1_000_000)
    return clock


def test_bucket_rate_and_burst(clock: Clock) -> None:
    bucket = Bucket(10, 20, clock.seconds())
    assert sum(bucket.take(clock.seconds()) for _ in range(100)) == 20
    clock.advance(0.5)
    assert sum(bucket.take(clock.seconds()) for _ in range(100)) == 5
    clock.advance(1000)  # saving up stops at the burst
    assert sum(bucket.take(clock.seconds()) for _ in range(100)) == 20


def test_session_cap_per_client_and_recovery(clock: Clock) -> None:
    guard = Guard(GuardLimits(max_sessions_per_client=3, requests_per_second_per_client=0), clock)
    now = clock.seconds()
    for _ in range(3):
        assert guard.admit("192.0.2.1", now) is None
        guard.opened("192.0.2.1")
    assert guard.admit("192.0.2.1", now) == "client-busy"
    assert guard.admit("192.0.2.2", now) is None  # another client is not held up
    guard.closed("192.0.2.1")
    assert guard.admit("192.0.2.1", now) is None
    for _ in range(2):
        guard.closed("192.0.2.1")
    guard.closed("192.0.2.1")
    assert guard.sessions_of("192.0.2.1") == 0
    assert guard._sessions == {}  # nothing kept for a client with no session


def test_issue_figure_one_source_cannot_hold_every_session(clock: Clock) -> None:
    """Measured: 2,000 RRQs from one address held all 1,000 sessions. With the defaults it gets its cap."""
    guard = Guard(GuardLimits(), clock)
    held = 0
    for _ in range(2000):
        clock.advance(0.03)  # about 33 RRQs a second kept the sessions full
        if guard.admit("192.0.2.66", clock.seconds()) is None:
            guard.opened("192.0.2.66")
            held += 1
    assert held == guard_module.MAX_SESSIONS_PER_CLIENT < 1000
    assert guard.admit("192.0.2.7", clock.seconds()) is None


def test_request_rate_per_client(clock: Clock) -> None:
    """20,000 RRQs in 10 s from one address: at most rate x 10 s + a burst become sessions."""
    rate = 100.0
    guard = Guard(GuardLimits(max_sessions_per_client=0, requests_per_second_per_client=rate), clock)
    admitted = 0
    for _ in range(20_000):
        clock.advance(10 / 20_000)
        admitted += guard.admit("192.0.2.66", clock.seconds()) is None
    assert admitted <= rate * 10 + rate * BURST_SECONDS + 1
    assert admitted >= rate * 10
    assert guard.admit("192.0.2.7", clock.seconds()) is None  # another client has its own budget


def test_a_booting_client_is_never_limited(clock: Clock) -> None:
    """PXELINUX's dozen config names, retried, and a UEFI probe: well inside the defaults."""
    guard = Guard(GuardLimits(), clock)
    for _ in range(3):  # three machines behind one NAT address, at once
        for _ in range(40):
            assert guard.admit("198.51.100.1", clock.seconds()) is None
            clock.advance(0.001)


def test_limits_off(clock: Clock) -> None:
    guard = Guard(GuardLimits(max_sessions_per_client=0, requests_per_second_per_client=0), clock)
    for _ in range(10_000):
        assert guard.admit("192.0.2.1", clock.seconds()) is None
        guard.opened("192.0.2.1")


def test_rate_table_is_bounded(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard_module, "MAX_TRACKED", 100)
    guard = Guard(GuardLimits(max_sessions_per_client=0), clock)
    for i in range(1000):  # a spoofed flood from ever new addresses
        guard.admit(f"10.0.{i // 256}.{i % 256}", clock.seconds())
    assert len(guard._rates) <= 100
    clock.advance(60)  # all idle now: forgotten first
    guard.admit("192.0.2.1", clock.seconds())
    assert len(guard._rates) <= 100


def test_one_reply_budget(clock: Clock) -> None:
    """Every ERROR from the listener spends from one budget: 10,000 WRQs get at most that many replies."""
    guard = Guard(GuardLimits(error_replies_per_second=200), clock)
    sent = 0
    for _ in range(10_000):
        clock.advance(0.0001)  # 10,000 in one second
        sent += guard.may_reply(clock.seconds())
    assert 200 <= sent <= 400
    assert guard.replies_withheld == 10_000 - sent
    # 63-byte ERRORs for 10-byte WRQs: 6.3x before. Now what is reflected is bounded in bytes a second
    # (200 x 63 after the first second's burst), so a flood that fast is no amplifier at all.
    amplification = sent * 63 / (10_000 * 10)
    assert amplification < 0.3


def test_log_budget_and_suppressed_report(clock: Clock, log_events: List[Dict[str, Any]]) -> None:
    guard = Guard(GuardLimits(log_lines_per_second=10), clock)
    allowed = sum(guard.may_log(clock.seconds()) for _ in range(20_000))
    assert allowed == 10
    assert guard.suppressed == 19_990
    assert not [e for e in log_events if e.get("outcome") == "suppressed"]
    clock.advance(REPORT_INTERVAL)
    [report] = [e for e in log_events if e.get("outcome") == "suppressed"]
    assert report["count"] == 19_990
    assert guard.suppressed == 0 and not clock.getDelayedCalls()
    clock.advance(1)
    assert guard.may_log(clock.seconds())  # a new second, a new budget


def test_stop_reports_and_leaves_no_timer(clock: Clock, log_events: List[Dict[str, Any]]) -> None:
    guard = Guard(GuardLimits(log_lines_per_second=1), clock)
    for _ in range(5):
        guard.may_log(clock.seconds())
    assert clock.getDelayedCalls()
    guard.stop()
    assert not clock.getDelayedCalls()
    [report] = [e for e in log_events if e.get("outcome") == "suppressed"]
    assert report["count"] == 4


@pytest.mark.parametrize(
    ("networks", "host", "allowed"),
    [
        ((), "203.0.113.9", True),
        (("192.0.2.0/24",), "192.0.2.77", True),
        (("192.0.2.0/24",), "192.0.3.1", False),
        (("192.0.2.7/24",), "192.0.2.1", True),  # host bits are fine
        (("192.0.2.0/24",), "::ffff:192.0.2.77", True),  # a dual-stack socket's view
        (("::ffff:192.0.2.0/120",), "192.0.2.77", True),  # a mapped network is an IPv4 one
        (("2001:db8::/32",), "2001:db8:1::5", True),
        (("2001:db8::/32",), "2001:db9::5", False),
        (("fe80::/10",), "fe80::1%2", True),  # a scope does not get in the way
        (("192.0.2.0/24", "2001:db8::/32"), "2001:db8::1", True),
        (("192.0.2.0/24",), "not an address", False),
        (("127.0.0.1",), "127.0.0.1", True),  # one address is a /32
    ],
)
def test_allow(clock: Clock, networks: Any, host: str, allowed: bool) -> None:
    guard = Guard(GuardLimits.allowing(networks), clock)
    assert guard.permitted(host) is allowed
    assert guard.permitted(host) is allowed  # and from the cache


def test_parse_network() -> None:
    assert parse_network("::ffff:198.51.100.0/120") == ipaddress.ip_network("198.51.100.0/24")
    with pytest.raises(ValueError, match=r"'192\.0\.2\.0/33' is not a network"):
        parse_network("192.0.2.0/33")
    with pytest.raises(ValueError, match="not a network"):
        parse_network("lab")


def test_a_reply_no_larger_than_its_request_spends_no_budget() -> None:
    """Nothing to amplify: a boot storm's File not found is never withheld; larger replies are."""
    clock = Clock()
    guard = Guard(GuardLimits(error_replies_per_second=2), clock)
    assert all(guard.may_reply(clock.seconds(), 19, 21) for _ in range(1000))
    larger = [guard.may_reply(clock.seconds(), 63, 10) for _ in range(10)]
    assert larger.count(True) == 2 and guard.replies_withheld == 8
