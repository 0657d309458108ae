"""twistd wiring: `twistd -n tftp-offload (--root DIR | --socket PATH) [--listen HOST:PORT ...]`."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable, List, Tuple

from twisted.application.service import IService, MultiService, Service
from twisted.python import usage

from .activation import inherited_datagram_sockets
from .backends.directory import DirectoryBackend
from .interfaces import IBackend
from .options import MAX_BLKSIZE, MAX_WINDOWSIZE, MIN_BLKSIZE, Limits
from .server import LOOKUP_TIMEOUT
from .service import DEFAULT_LISTEN, DRAIN_TIMEOUT, TFTPOffloadService
from .workers import WORKER_ENV, Workers

PROTOCOLS = ("amp", "legacy")


def parse_listen(text: str) -> Tuple[str, int]:
    """`HOST:PORT`, `[V6ADDR]:PORT`, or `:PORT` / `PORT` for every address (dual-stack)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise usage.UsageError(f"--listen {text!r}: expected [IPV6ADDRESS]:PORT")
    elif ":" in text:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise usage.UsageError(f"--listen {text!r}: put an IPv6 address in brackets: [{host}]:{port}")
    else:
        host, port = "", text
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:  # "²".isdigit() too
        raise usage.UsageError(f"--listen {text!r}: port must be a number from 0 to 65535")
    return host or "::", int(port)


def parse_port_range(text: str) -> Tuple[int, int]:
    """`LOW:HIGH`, both ports from 1 to 65535, LOW <= HIGH."""
    low, sep, high = text.partition(":")
    if not sep or not all(p.isascii() and p.isdigit() for p in (low, high)):
        raise ValueError(f"--port-range {text!r}: expected LOW:HIGH, e.g. 49152:49407")
    if not 1 <= int(low) <= int(high) <= 65535:
        raise ValueError(f"--port-range {text!r}: ports from 1 to 65535, LOW no higher than HIGH")
    return int(low), int(high)


parse_port_range.coerceDoc = "LOW:HIGH, e.g. 49152:49407."  # type: ignore[attr-defined]


def _number(kind: Callable[[str], Any], low: float, high: float, name: str) -> Callable[[str], Any]:
    def coerce(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"{name} must be a number, not {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"{name} must be from {kind(str(low))} to {kind(str(high))}, not {text}")
        return value

    coerce.coerceDoc = f"From {kind(str(low))} to {kind(str(high))}."  # type: ignore[attr-defined]
    return coerce


class Options(usage.Options):
    synopsis = "(--root DIR | --socket PATH) [options]"
    longdesc = (
        "A TFTP read server for network boot. What each request gets is decided by a backend: "
        "a directory (--root), or another process over a UNIX socket (--socket, e.g. the MAAS "
        "rack controller). Everything is read-only. Replies leave from the address each request "
        "was sent to."
    )
    optFlags = [
        ["quiet", "q", "Log only transfers that fail, not every completed one."],
        ["single-port", None, "Serve every transfer from the port the request came to (69), told apart by "
         "the client's address and port: for firewalls and NAT that pass only that port."],
    ]
    optParameters = [
        ["root", "r", None, "Serve files from this directory."],
        ["socket", "s", None, "Ask the backend listening on this UNIX socket what to serve."],
        ["protocol", None, "amp", f"What the --socket backend speaks: {' or '.join(PROTOCOLS)} "
         "(the MAAS 2.2-3.4 offload format)."],
        ["backend-timeout", None, LOOKUP_TIMEOUT, "Seconds a backend may take to answer a request; "
         "then the client gets an error.", _number(float, 0.1, 60, "--backend-timeout")],
        ["max-blksize", None, MAX_BLKSIZE, "Largest block size granted (RFC 2348); the path MTU also caps it.",
         _number(int, MIN_BLKSIZE, MAX_BLKSIZE, "--max-blksize")],
        ["max-windowsize", None, 64, "Largest window granted, in blocks (RFC 7440).",
         _number(int, 1, MAX_WINDOWSIZE, "--max-windowsize")],
        ["max-window-bytes", None, 1 << 20, "Largest window granted, in bytes in flight.",
         _number(int, 512, 1 << 30, "--max-window-bytes")],
        ["timeout", "t", 1.0, "Seconds before the first retransmission when the client sets no timeout "
         "(RFC 2349); it doubles on each retry, up to 8.", _number(float, 0.01, 255, "--timeout")],
        ["give-up", None, 30.0, "Seconds without progress after which a transfer is abandoned.",
         _number(float, 0.01, 3600, "--give-up")],
        ["rollover", None, 0, "Block number after 65535: 0 or 1.", _number(int, 0, 1, "--rollover")],
        ["max-sessions", None, 1000, "Transfers (and backend lookups) at once; further requests are "
         "dropped, with a log line, until one ends (ROMs retry).", _number(int, 1, 1000000, "--max-sessions")],
        ["workers", None, 1, "Processes serving the same addresses (SO_REUSEPORT: the kernel keeps each "
         "client with one), for hosts with many cores.", _number(int, 1, 64, "--workers")],
        ["port-range", None, None, "Serve every transfer from a port in LOW:HIGH (for firewalls); when all "
         "are in use, requests are dropped with a log line until one ends (ROMs retry)", parse_port_range],
        ["drain-timeout", None, DRAIN_TIMEOUT, "On shutdown, seconds running transfers get to finish "
         "before they are aborted.", _number(float, 0, 3600, "--drain-timeout")],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.listen: List[Tuple[str, int]] = []
        self.inherited: List[Tuple[int, int]] = []
        self.argv: List[str] = []
        """The arguments as given: --workers starts its workers with them."""

    def parseOptions(self, options: Any = None) -> None:
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_listen(self, value: str) -> None:
        """HOST:PORT or [IPV6]:PORT to listen on; repeat for more (default: the sockets systemd passed
        (socket activation), else [::]:69, all addresses)."""
        self.listen.append(parse_listen(value))

    opt_l = opt_listen

    def postOptions(self) -> None:
        if (self["root"] is None) == (self["socket"] is None):
            raise usage.UsageError("give exactly one of --root DIR (serve a directory) or --socket PATH "
                                   "(ask a backend)")
        if self["root"] is not None and not os.path.isdir(self["root"]):
            raise usage.UsageError(f"--root {self['root']!r} is not a directory")
        if self["protocol"] not in PROTOCOLS:
            raise usage.UsageError(f"--protocol must be one of {', '.join(PROTOCOLS)}, not {self['protocol']!r}")
        self.inherited = inherited_datagram_sockets()
        if not self.listen and not self.inherited:
            self.listen = list(DEFAULT_LISTEN)
        if self["workers"] > 1 and self.inherited:
            raise usage.UsageError("--workers needs addresses to bind (--listen): a socket systemd passes "
                                   "cannot be shared by SO_REUSEPORT")
        if self["give-up"] < self["timeout"]:
            raise usage.UsageError("--give-up must be at least --timeout")


def make_backend(options: Options) -> IBackend:
    """The backend the options name. One that provides `IService` is started and stopped with us."""
    if options["root"] is not None:
        return DirectoryBackend(options["root"])
    if options["protocol"] == "legacy":
        from .backends.legacy import LegacyBackend

        return LegacyBackend(options["socket"], timeout=options["backend-timeout"])
    from .backends.amp import AMPBackend

    return AMPBackend(options["socket"], timeout=options["backend-timeout"])


class AbortOnSecondSignal(Service):
    """Under twistd, a second SIGTERM or SIGINT while transfers drain aborts them at once.

    Without it the second signal only makes Twisted log a "Can't stop reactor
    that isn't running" traceback, and the operator who pressed Ctrl-C twice
    still waits. Kept out of `TFTPOffloadService`: a host process that embeds
    us owns its signals.
    """

    def __init__(self, tftp: TFTPOffloadService) -> None:
        self.tftp = tftp

    def stopService(self) -> None:
        super().stopService()
        from twisted.internet import reactor

        def again(signum: int, frame: Any) -> None:
            server = self.tftp.server
            if server is not None:
                reactor.callFromThread(server.abort_all)  # type: ignore[attr-defined]

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, again)


def makeService(options: Options) -> IService:
    limits = Limits(
        max_blksize=options["max-blksize"],
        max_windowsize=options["max-windowsize"],
        max_window_bytes=options["max-window-bytes"],
        timeout=options["timeout"],
        give_up=options["give-up"],
        rollover=options["rollover"],
    )
    backend = make_backend(options)
    top = MultiService()
    if IService.providedBy(backend):
        backend.setServiceParent(top)  # type: ignore[attr-defined]
    tftp = TFTPOffloadService(
        backend,
        listen=options.listen,
        limits=limits,
        max_sessions=options["max-sessions"],
        # The backend's own timeout answers first; this one only catches a backend that never does.
        lookup_timeout=options["backend-timeout"] + 1,
        quiet=bool(options["quiet"]),
        drain_timeout=options["drain-timeout"],
        inherited=options.inherited,
        port_range=options["port-range"],
        single_port=bool(options["single-port"]),
        reuse_port=options["workers"] > 1,
    )
    tftp.setServiceParent(top)
    if options["workers"] > 1 and WORKER_ENV not in os.environ:
        Workers(options["workers"], options.argv, tftp).setServiceParent(top)  # after tftp: its addresses
    AbortOnSecondSignal(tftp).setServiceParent(top)  # last, so it stops (and arms) first
    return top
