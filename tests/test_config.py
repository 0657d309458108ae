"""ServerConfig (config.py): the defaults, every bound at its edges, and the messages an operator reads.

Pure: no socket, no reactor. The same checks reach twistd users as one-line usage errors
(tests/test_tap.py, tests/test_startup.py) and embedders as ValueError (tests/test_service.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, List, Tuple

import pytest

from tftp_offload.config import (
    DRAIN_TIMEOUT,
    LOOKUP_GRACE,
    LOOKUP_TIMEOUT,
    ServerConfig,
    lookup_timeout_for,
)
from tftp_offload.guard import GuardLimits
from tftp_offload.options import Limits, Range


def test_defaults() -> None:
    """The documented defaults (docs/embedding.md, docs/operations.md), each typed once."""
    config = ServerConfig()
    assert config == ServerConfig(limits=Limits(), max_sessions=1000, lookup_timeout=4.0, quiet=False,
                                  drain_timeout=10.0, guard=GuardLimits(), port_range=None, single_port=False,
                                  reuse_port=False, log_starts=False)
    assert (LOOKUP_TIMEOUT, DRAIN_TIMEOUT) == (4.0, 10.0)
    assert config.limits == Limits(65464, 64, 1 << 20, 1.0, 30.0, 0)
    assert config.guard == GuardLimits(max_sessions_per_client=100, requests_per_second_per_client=100.0)


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ServerConfig().max_sessions = 5  # type: ignore[misc]


Build = Callable[[Any], Any]

# (the option named, how a value reaches the check, the lowest and highest allowed)
BOUNDS: List[Tuple[str, Build, float, float]] = [
    ("--max-blksize", lambda v: ServerConfig(limits=Limits(max_blksize=v)), 8, 65464),
    ("--max-windowsize", lambda v: ServerConfig(limits=Limits(max_windowsize=v)), 1, 32767),
    ("--max-window-bytes", lambda v: ServerConfig(limits=Limits(max_window_bytes=v)), 512, 1 << 30),
    ("--timeout", lambda v: ServerConfig(limits=Limits(timeout=v, give_up=max(v, 30.0))), 0.01, 255),
    ("--give-up", lambda v: ServerConfig(limits=Limits(timeout=0.01, give_up=v)), 0.01, 3600),
    ("--rollover", lambda v: ServerConfig(limits=Limits(rollover=v)), 0, 1),
    ("--max-sessions", lambda v: ServerConfig(max_sessions=v), 1, 1_000_000),
    ("lookup_timeout", lambda v: ServerConfig(lookup_timeout=v), 0.01, 3600),
    ("--drain-timeout", lambda v: ServerConfig(drain_timeout=v), 0, 3600),
    ("--max-sessions-per-client", lambda v: ServerConfig(guard=GuardLimits(max_sessions_per_client=v)),
     0, 1_000_000),
    ("--max-requests-per-second-per-client",
     lambda v: ServerConfig(guard=GuardLimits(requests_per_second_per_client=v)), 0, 1_000_000),
    ("--backend-timeout", lookup_timeout_for, 0.1, 60),
]
IDS = [option for option, *_ in BOUNDS]
INTEGERS = {"--max-blksize", "--max-windowsize", "--max-window-bytes", "--rollover", "--max-sessions",
            "--max-sessions-per-client"}


@pytest.mark.parametrize(("option", "build", "low", "high"), BOUNDS, ids=IDS)
def test_the_edges_are_accepted(option: str, build: Build, low: float, high: float) -> None:
    build(low)
    build(high)


@pytest.mark.parametrize(("option", "build", "low", "high"), BOUNDS, ids=IDS)
def test_beyond_the_edges_is_refused_naming_the_option_and_the_range(option: str, build: Build, low: float,
                                                                      high: float) -> None:
    step = 1 if option in INTEGERS else low / 10 or 0.001
    kind = int if option in INTEGERS else float
    allowed = f"from {kind(low)} to {kind(high)}"
    for value in (low - step, high + step):
        with pytest.raises(ValueError) as caught:
            build(value)
        message = str(caught.value)
        if option == "--give-up" and value < low:
            assert message == "--give-up must be at least --timeout"  # the timeout's own floor is higher
        else:
            assert message == f"{option} must be {allowed}, not {value}"
        assert "\n" not in message


@pytest.mark.parametrize(("option", "build", "low", "high"), [b for b in BOUNDS if b[0] not in INTEGERS],
                         ids=[i for i in IDS if i not in INTEGERS])
def test_nan_is_refused(option: str, build: Build, low: float, high: float) -> None:
    with pytest.raises(ValueError, match=f"^{option} must be "):  # --give-up: "... at least --timeout"
        build(math.nan)


@pytest.mark.parametrize("option", sorted(INTEGERS - {"--rollover"}))
def test_whole_numbers_only(option: str) -> None:
    [(build, low)] = [(build, low) for name, build, low, _ in BOUNDS if name == option]
    with pytest.raises(ValueError, match=f"^{option} must be from"):
        build(low + 0.5)


def test_rollover_is_0_or_1() -> None:
    with pytest.raises(ValueError, match=r"^--rollover must be from 0 to 1, not 0.5$"):
        Limits(rollover=0.5)  # type: ignore[arg-type]


def test_give_up_at_least_the_timeout() -> None:
    ServerConfig(limits=Limits(timeout=5, give_up=5))
    with pytest.raises(ValueError) as caught:
        ServerConfig(limits=Limits(timeout=5, give_up=4.99))
    assert str(caught.value) == "--give-up must be at least --timeout"


def test_timeout_bound_is_the_same_for_limits_and_the_option() -> None:
    """It was > 0 in Limits but >= 0.01 for --timeout: now one declaration (the engine's 10 ms floor)."""
    Limits(timeout=0.01, give_up=0.01)
    with pytest.raises(ValueError, match=r"^--timeout must be from 0.01 to 255.0, not 0.009$"):
        Limits(timeout=0.009, give_up=1)


@pytest.mark.parametrize("ports", [(1, 65535), (69, 69), (49152, 49407)])
def test_port_range_accepted(ports: Tuple[int, int]) -> None:
    assert ServerConfig(port_range=ports).port_range == ports


@pytest.mark.parametrize("ports", [(0, 10), (6000, 5000), (1, 65536), (-5, 5), (10, 20.5)])
def test_port_range_refused(ports: Tuple[Any, Any]) -> None:
    with pytest.raises(ValueError) as caught:
        ServerConfig(port_range=ports)
    low, high = ports
    assert str(caught.value) == f"--port-range {low}:{high}: ports from 1 to 65535, LOW no higher than HIGH"


def test_lookup_deadline_follows_the_backend_timeout() -> None:
    """The driver's deadline comes after the backend client's own timeout, never before it."""
    assert LOOKUP_GRACE > 0
    assert lookup_timeout_for(LOOKUP_TIMEOUT) == LOOKUP_TIMEOUT + LOOKUP_GRACE == 5.0
    for backend_timeout in (0.1, 2.0, 60.0):
        deadline = lookup_timeout_for(backend_timeout)
        assert deadline > backend_timeout
        ServerConfig(lookup_timeout=deadline)  # always a valid lookup_timeout


def test_range_description() -> None:
    assert Range("--x", 1, 64).describe() == "from 1 to 64"
    assert Range("--y", 0.01, 255, float).describe() == "from 0.01 to 255.0"
    Range("--x", 1, 64).check(64)
    with pytest.raises(ValueError, match=r"^--x must be from 1 to 64, not 65$"):
        Range("--x", 1, 64).check(65)
