"""What any one client, and every sender together, may cost the server: pure, on a clock passed in.

Anyone can send UDP to port 69, with any source address. Without limits one
address can hold every session (2,000 RRQs kept 1,000 sessions full while a
second client timed out), every refusal is an ERROR datagram larger than the
request (a reflector: 10,000 WRQs of 10 bytes got 63-byte replies), and
every refused datagram writes a log line. `Guard` holds the limits that stop
this, so that the driver (`server.TFTPServer`) only asks it yes or no:

- `permitted(host)`: is the client on an `--allow` network (all are when none is given)?
- `admit(host, now)`: may this client start one more session
  (`--max-sessions-per-client`, `--max-requests-per-second-per-client`)?
- `opened(host)` / `closed(host)`: a session began / ended.
- `may_reply(now, reply, request)`: one budget for every ERROR sent from a listening port that is
  larger than the datagram it answers (the rest amplify nothing).
- `may_log(now)`: one budget for the lines about bad or refused traffic; what
  it suppresses is counted and reported in one line every `REPORT_INTERVAL`.

Nothing here allocates per datagram beyond a dictionary entry per new client
address, and every table is bounded (a spoofed flood of random source
addresses costs at most `MAX_TRACKED` small entries).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from twisted.logger import Logger

log = Logger(namespace="tftp_offload")

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

MAX_SESSIONS_PER_CLIENT = 100
"""Default cap on one address's sessions: a tenth of the default --max-sessions.

A PXE or UEFI client holds one or two at a time; a hypervisor that NATs the
VMs it boots (libvirt's default network does) shows all of them as one
address, so the cap leaves room for dozens booting at once."""

REQUESTS_PER_SECOND_PER_CLIENT = 100.0
"""Default sustained rate of new sessions one address may start; bursts of `BURST_SECONDS` worth pass.

A booting client asks for ten to twenty files in its first seconds
(PXELINUX tries a dozen config names), so 100 a second with bursts of 200
lets several NATed machines boot at once, while a flood of 2,000 a second
from one address reaches the backend at 100 a second."""

BURST_SECONDS = 2.0

ERROR_REPLIES_PER_SECOND = 200
"""ERROR datagrams sent at most per second from the listening ports, whatever their reason.

The bound on what the server can reflect: 200 x ~70 bytes a second, however
many (spoofed) requests arrive."""

LOG_LINES_PER_SECOND = 10
"""Lines about bad or refused traffic logged at most per second."""

REPORT_INTERVAL = 10.0
"""Seconds between "suppressed N lines" reports while lines are being suppressed."""

MAX_TRACKED = 65536
"""Client addresses whose request rate is tracked at once; idle ones are forgotten first."""


def parse_network(text: str) -> Network:
    """`192.0.2.0/24`, `2001:db8::/32` or a single address; an IPv4-mapped network becomes IPv4.

    Host bits are allowed (`192.0.2.7/24` is 192.0.2.0/24), as operators copy an
    interface's address. Raises ValueError with a message naming the text.
    """
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a network: write ADDRESS/PREFIX, e.g. 192.0.2.0/24 "
                         "or 2001:db8::/32") from None
    if isinstance(network, ipaddress.IPv6Network):
        mapped = network.network_address.ipv4_mapped
        if mapped is not None and network.prefixlen >= 96:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _address(host: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Bucket:
    """A token bucket: `rate` a second, at most `burst` saved up; `take()` spends one if there is one."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:  # not min(): a builtin call per request
            tokens = self.burst
        self.stamp = now
        if tokens < 1:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1
        return True

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


@dataclass(frozen=True)
class GuardLimits:
    """The limits; 0 turns a per-client limit off, and an empty `allow` serves everyone."""

    max_sessions_per_client: int = MAX_SESSIONS_PER_CLIENT
    requests_per_second_per_client: float = REQUESTS_PER_SECOND_PER_CLIENT
    error_replies_per_second: int = ERROR_REPLIES_PER_SECOND
    log_lines_per_second: int = LOG_LINES_PER_SECOND
    allow: Tuple[Network, ...] = ()

    @classmethod
    def allowing(cls, networks: Sequence[str], **limits: Any) -> "GuardLimits":
        return cls(allow=tuple(parse_network(text) for text in networks), **limits)


class Guard:
    """The limits' state. `reactor` needs `seconds()` and `callLater()` (a `task.Clock` in tests)."""

    def __init__(self, limits: GuardLimits = GuardLimits(), reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.limits = limits
        self.reactor = reactor
        self._sessions: Dict[str, int] = {}
        self._rates: Dict[str, Bucket] = {}
        self._replies = Bucket(limits.error_replies_per_second, limits.error_replies_per_second,
                               reactor.seconds())
        self._allowed: Dict[str, bool] = {}
        self._log_second = 0
        self._log_count = 0
        self.suppressed = 0
        """Lines suppressed since the last report."""
        self.suppressed_total = 0
        self.replies_withheld = 0
        """ERROR replies not sent for want of budget (since start)."""
        self._report: Any = None

    # -- who may ask at all ---------------------------------------------------------------------

    def permitted(self, host: str) -> bool:
        """Whether `host` (an address as the socket reported it) is on an allowed network."""
        networks = self.limits.allow
        if not networks:
            return True
        known = self._allowed.get(host)
        if known is not None:
            return known
        address = _address(host)
        verdict = address is not None and any(address in network for network in networks)
        if len(self._allowed) >= MAX_TRACKED:
            self._allowed.clear()
        self._allowed[host] = verdict
        return verdict

    # -- sessions per client --------------------------------------------------------------------

    def admit(self, host: str, now: float) -> Optional[str]:
        """None if `host` may start a session now, else why not (the log line's `outcome`)."""
        limits = self.limits
        cap = limits.max_sessions_per_client
        if cap and self._sessions.get(host, 0) >= cap:
            return "client-busy"
        rate = limits.requests_per_second_per_client
        if rate:
            bucket = self._rates.get(host)
            if bucket is None:
                if len(self._rates) >= MAX_TRACKED:
                    self._forget_idle(now)
                bucket = self._rates[host] = Bucket(rate, max(1.0, rate * BURST_SECONDS), now)
            if not bucket.take(now):
                return "rate-limited"
        return None

    def _forget_idle(self, now: float) -> None:
        """Drop the clients whose bucket has refilled (they are as if new); if none has, drop all."""
        rates = self._rates
        idle = [host for host, bucket in rates.items() if bucket.full(now)]
        for host in idle:
            del rates[host]
        if len(rates) >= MAX_TRACKED:
            rates.clear()

    def opened(self, host: str) -> None:
        self._sessions[host] = self._sessions.get(host, 0) + 1

    def closed(self, host: str) -> None:
        count = self._sessions.get(host, 0) - 1
        if count > 0:
            self._sessions[host] = count
        else:
            self._sessions.pop(host, None)

    def sessions_of(self, host: str) -> int:
        return self._sessions.get(host, 0)

    # -- what we send and write -----------------------------------------------------------------

    def may_reply(self, now: float, reply: int = 1 << 16, request: int = 0) -> bool:
        """Whether an ERROR of `reply` bytes, answering a datagram of `request` bytes, may be sent now.

        One that is no larger than what provoked it amplifies nothing (a spoofer gets
        back at most what it sent) and always goes: a boot storm's "File not found"
        for PXELINUX's dozen config names per machine must not wait for a budget.
        Every larger one spends the one budget of the listening ports.
        """
        if reply <= request:
            return True
        if self._replies.take(now):
            return True
        self.replies_withheld += 1
        return False

    def may_log(self, now: float) -> bool:
        """Whether a line about bad or refused traffic may be written now; if not, it is counted."""
        second = int(now)
        if second != self._log_second:
            self._log_second, self._log_count = second, 0
        self._log_count += 1
        if self._log_count <= self.limits.log_lines_per_second:
            return True
        self.suppressed += 1
        self.suppressed_total += 1
        if self._report is None:
            self._report = self.reactor.callLater(REPORT_INTERVAL, self._report_suppressed)
        return False

    def _report_suppressed(self) -> None:
        self._report = None
        count, self.suppressed = self.suppressed, 0
        if count:
            log.info("Suppressed {count} log lines about bad or refused requests in the last {seconds:.0f}s "
                     "(at most {limit} a second are written)", count=count, seconds=REPORT_INTERVAL,
                     limit=self.limits.log_lines_per_second, outcome="suppressed")

    def stop(self) -> None:
        """Report what is still unreported, and leave no timer behind."""
        if self._report is not None:
            if self._report.active():
                self._report.cancel()
            self._report_suppressed()
