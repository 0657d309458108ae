"""Option negotiation (RFC 2347, 2348, 2349, 7440): what we grant, from what was asked.

Pure: the caller supplies what it knows of the world (the reader's size, the
path MTU) and gets back the values the transfer runs with and the options to
echo in an OACK. Only options the client asked for are ever echoed; a value we
cannot honour is ignored (RFC 2347 lets the server leave an option out), which
is kinder to ROMs than refusing the whole transfer with ERROR 8.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Dict, Mapping, Optional, Tuple

from .packets import MAX_NUMBER_DIGITS, encode_oack

MIN_BLKSIZE = 8
MAX_BLKSIZE = 65464
DEFAULT_BLKSIZE = 512
MAX_WINDOWSIZE = 32767
"""Half the 16-bit block space: any more and a stale ACK reads as a fresh one."""

IPV4_OVERHEAD = 20 + 8 + 4
"""IPv4 header, UDP header, TFTP DATA header: what a DATA datagram adds to blksize."""
IPV6_OVERHEAD = 40 + 8 + 4


@dataclass(frozen=True)
class Range:
    """The values a setting may take, both ends included, and the twistd option that sets it.

    Declared once per setting (here for `Limits`, in `tftp_offload.config` for
    the rest) and used for the check, the error message and the option's help
    text alike, so that they cannot disagree.
    """

    option: str
    """What the error names: the twistd option (embedders' keywords are the same words)."""
    low: float
    high: float
    kind: type = int
    """int or float: how the ends are shown ("from 1 to 64", "from 0.01 to 255.0")."""

    def describe(self) -> str:
        return f"from {self.kind(str(self.low))} to {self.kind(str(self.high))}"

    def check(self, value: float) -> None:
        """ValueError naming the option and the range unless `value` is in it (NaN never is)."""
        if not self.low <= value <= self.high or (self.kind is int and value != int(value)):
            raise ValueError(f"{self.option} must be {self.describe()}, not {value}")


MAX_BLKSIZE_RANGE = Range("--max-blksize", MIN_BLKSIZE, MAX_BLKSIZE)
MAX_WINDOWSIZE_RANGE = Range("--max-windowsize", 1, MAX_WINDOWSIZE)
TIMEOUT_RANGE = Range("--timeout", 0.01, 255, float)
"""10 ms at least (the engine's floor for a learnt timeout, `engine.MIN_RTO`); RFC 2349's 255 at most."""
ROLLOVER_RANGE = Range("--rollover", 0, 1)


@dataclass(frozen=True)
class Limits:
    """Server-side caps, set by the operator.

    What is checked here is what negotiation and the engine need to be right.
    `tftp_offload.config.ServerConfig` narrows two of them to what an operator
    may set (`--max-window-bytes` from 512, `--give-up` up to an hour); tests
    of the engine use the wider values.
    """

    max_blksize: int = MAX_BLKSIZE
    max_windowsize: int = 64
    max_window_bytes: int = 1 << 20
    """Bytes in flight per transfer at most: bounds a burst whatever blksize was granted."""
    timeout: float = 1.0
    """First retransmission timeout when the client does not ask for one."""
    give_up: float = 30.0
    """Seconds without progress after which a transfer is abandoned."""
    rollover: int = 0
    """Block number after 65535: 0 (what most clients expect) or 1."""

    def __post_init__(self) -> None:
        MAX_BLKSIZE_RANGE.check(self.max_blksize)
        MAX_WINDOWSIZE_RANGE.check(self.max_windowsize)
        if not self.max_window_bytes >= 1:  # fewer bytes than a block: a window of one block
            raise ValueError(f"--max-window-bytes must be positive, not {self.max_window_bytes}")
        TIMEOUT_RANGE.check(self.timeout)
        if not self.give_up >= self.timeout:
            raise ValueError("--give-up must be at least --timeout")
        ROLLOVER_RANGE.check(self.rollover)
        # Hashed once: the server's Limits is part of negotiate()'s cache key on every request, and
        # the hash a frozen dataclass generates builds and hashes a tuple of all six fields each time.
        object.__setattr__(self, "_hash", hash(tuple(getattr(self, f.name) for f in fields(self))))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined, no-any-return]


@dataclass(frozen=True)
class Negotiated:
    """The terms a transfer runs on, and what to say in the OACK (empty: send DATA 1 at once)."""

    blksize: int
    windowsize: int
    timeout: float
    oack: Dict[str, str]
    datagram: Optional[bytes] = field(init=False, compare=False, repr=False)
    """The OACK datagram, None when there is nothing to say: encoded once, as `negotiate` hands
    out one `Negotiated` for each distinct question."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "datagram", encode_oack(self.oack) if self.oack else None)


def blksize_for_mtu(mtu: int, ipv6: bool) -> int:
    """The largest blksize whose DATA datagram fits `mtu` without IP fragmentation."""
    return mtu - (IPV6_OVERHEAD if ipv6 else IPV4_OVERHEAD)


def negotiate(
    requested: Mapping[str, str],
    mode: str,
    size: Optional[int],
    limits: Limits,
    path_mtu: Optional[int] = None,
    ipv6: bool = False,
) -> Negotiated:
    """Grant what can be granted of `requested` (names lower-cased, values decimal strings).

    `size` is the file's length when known (tsize is only answered then, and
    never in netascii, whose length on the wire is not the file's). netascii
    also forces a window of one block: its conversion is a stream that cannot
    seek back for a go-back-N resend across a window cheaply.

    A boot storm asks the same few questions again and again (the same options, files of the
    same few sizes): answers are remembered, and the same `Negotiated` is handed out for the
    same question (its `oack` is never changed by anyone).
    """
    return _negotiate(tuple(requested.items()), mode, size, limits, path_mtu, ipv6)


@lru_cache(maxsize=1024)
def _negotiate(requested: Tuple[Tuple[str, str], ...], mode: str, size: Optional[int], limits: Limits,
               path_mtu: Optional[int], ipv6: bool) -> Negotiated:
    blksize = DEFAULT_BLKSIZE
    windowsize = 1
    timeout = limits.timeout
    oack: Dict[str, str] = {}
    cap = limits.max_blksize
    if path_mtu is not None:
        cap = max(MIN_BLKSIZE, min(cap, blksize_for_mtu(path_mtu, ipv6)))

    for name, value in requested:
        if not (value.isascii() and value.isdigit() and len(value) <= MAX_NUMBER_DIGITS):
            continue  # the codec refuses these; a caller building its own dict may not
        number = int(value)
        if name == "blksize" and number >= MIN_BLKSIZE:
            blksize = min(number, cap, MAX_BLKSIZE)
            oack[name] = str(blksize)
        elif name == "tsize" and mode == "octet" and size is not None:
            oack[name] = str(size)
        elif name == "timeout" and 1 <= number <= 255:
            timeout = float(number)
            oack[name] = str(number)
        elif name == "windowsize" and number >= 1 and mode == "octet":
            windowsize = min(number, limits.max_windowsize)
            oack[name] = str(windowsize)

    if "windowsize" in oack:
        # The cap in bytes needs the final blksize, so it is applied after the loop.
        windowsize = max(1, min(windowsize, limits.max_window_bytes // blksize))
        oack["windowsize"] = str(windowsize)
    return Negotiated(blksize, windowsize, timeout, oack)
