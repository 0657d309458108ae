"""Every server limit and default, with its bounds: `ServerConfig`, one frozen value.

twistd's options (`tap.py`) and the embedding API (`service.TFTPOffloadService`)
both build one, and `server.TFTPServer` takes it whole. Each default is typed
once, as the field's default; each bound once, as a `Range` (the transfer
limits' in `options.py`, beside `Limits`), and checked in `__post_init__`,
which raises ValueError naming the option and what it allows. tap.py turns
that into a one-line usage error, and derives its help texts from the same
declarations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

from .guard import GuardLimits
from .options import TIMEOUT_RANGE, Limits, Range

LOOKUP_TIMEOUT = 4.0
"""Seconds a backend may take to answer; well under a PXE ROM's RRQ retry budget."""

DRAIN_TIMEOUT = 10.0
"""Seconds running transfers may take to finish once the service is stopping."""

MAX_SESSIONS_RANGE = Range("--max-sessions", 1, 1_000_000)
LOOKUP_TIMEOUT_RANGE = Range("lookup_timeout", 0.01, 3600, float)
DRAIN_TIMEOUT_RANGE = Range("--drain-timeout", 0, 3600, float)
MAX_WINDOW_BYTES_RANGE = Range("--max-window-bytes", 512, 1 << 30)
"""Narrower than `Limits` allows: a window of less than one default block is --max-windowsize 1."""
GIVE_UP_RANGE = Range("--give-up", TIMEOUT_RANGE.low, 3600, float)
"""And at least the timeout (`Limits` checks that)."""
MAX_SESSIONS_PER_CLIENT_RANGE = Range("--max-sessions-per-client", 0, 1_000_000)
REQUESTS_PER_SECOND_PER_CLIENT_RANGE = Range("--max-requests-per-second-per-client", 0, 1_000_000, float)
PORT_NUMBER_RANGE = Range("--port-range", 1, 65535)
"""Either end of --port-range."""

BACKEND_TIMEOUT_RANGE = Range("--backend-timeout", 0.1, 60, float)
"""A --socket backend client's own timeout (it is the backend's setting, not the server's)."""
LOOKUP_GRACE = 1.0
"""Seconds the driver's lookup deadline allows beyond a backend client's own timeout: see `lookup_timeout_for`."""


def lookup_timeout_for(backend_timeout: float) -> float:
    """The driver's lookup deadline (`ServerConfig.lookup_timeout`) for a backend client's `backend_timeout`.

    The backend client's timeout is the one that answers the client (with an
    ERROR), and its exchange goes on reading a late answer so that it can
    delete the answer's ephemeral file: the driver's deadline must not cut in
    first and abort it. The driver's own deadline, a little later, only
    catches a backend that never answers at all.
    """
    BACKEND_TIMEOUT_RANGE.check(backend_timeout)
    return backend_timeout + LOOKUP_GRACE


@dataclass(frozen=True)
class ServerConfig:
    """What the server runs with, all checked on construction (ValueError naming the option)."""

    limits: Limits = field(default_factory=Limits)
    """Block and window size caps, retransmission timeout, give-up time, rollover."""
    max_sessions: int = 1000
    """Transfers and backend lookups at once; more requests are dropped with a log line (ROMs retry)."""
    lookup_timeout: float = LOOKUP_TIMEOUT
    """Seconds a backend may take before the client is told."""
    quiet: bool = False
    """Log only transfers that fail."""
    drain_timeout: float = DRAIN_TIMEOUT
    """On stop, seconds running transfers get to finish."""
    guard: GuardLimits = field(default_factory=GuardLimits)
    """Per-client session cap and request rate, the allowed networks, the ERROR and log budgets."""
    port_range: Optional[Tuple[int, int]] = None
    """(low, high): every transfer's port comes from it. None: any free port."""
    single_port: bool = False
    """Serve every transfer from the listening port it was asked on (firewalls, NAT)."""
    reuse_port: bool = False
    """Bind the listening addresses with SO_REUSEPORT (for --workers)."""
    log_starts: bool = False
    """Log a transfer-start event for every transfer too (--log-format json)."""

    def __post_init__(self) -> None:
        MAX_SESSIONS_RANGE.check(self.max_sessions)
        LOOKUP_TIMEOUT_RANGE.check(self.lookup_timeout)
        DRAIN_TIMEOUT_RANGE.check(self.drain_timeout)
        MAX_WINDOW_BYTES_RANGE.check(self.limits.max_window_bytes)
        GIVE_UP_RANGE.check(self.limits.give_up)
        MAX_SESSIONS_PER_CLIENT_RANGE.check(self.guard.max_sessions_per_client)
        REQUESTS_PER_SECOND_PER_CLIENT_RANGE.check(self.guard.requests_per_second_per_client)
        if self.port_range is not None:
            low, high = self.port_range
            ports = PORT_NUMBER_RANGE
            if not (ports.low <= low <= high <= ports.high and low == int(low) and high == int(high)):
                raise ValueError(f"--port-range {low}:{high}: ports {ports.describe()}, LOW no higher than HIGH")
