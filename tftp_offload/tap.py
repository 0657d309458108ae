"""twistd wiring: `twistd -n tftp-offload (--root DIR | --socket PATH) [--listen HOST:PORT ...]`."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable, List, Optional, Tuple

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from . import config
from .activation import inherited_datagram_sockets
from .backends.directory import PER_CLIENT, DirectoryBackend
from .config import LOOKUP_TIMEOUT, ServerConfig, lookup_timeout_for
from .guard import GuardLimits, parse_network
from .interfaces import IBackend
from .logs import address, twistd_observer
from .options import MAX_BLKSIZE_RANGE, MAX_WINDOWSIZE_RANGE, ROLLOVER_RANGE, TIMEOUT_RANGE, Limits, Range
from .remap import MapFileError, RuleSet
from .service import DEFAULT_LISTEN, TFTPOffloadService
from .startup import StartupError, check_listen, check_root, fail, failed_to_listen, resolve, version
from .workers import WORKER_ENV, Workers

PROTOCOLS = ("amp", "legacy")
WORKERS_RANGE = Range("--workers", 1, 64)
DEFAULTS = ServerConfig()
"""Where the options' defaults come from (the help shows them as [default: X])."""

log = Logger(namespace="tftp_offload")


def parse_listen(text: str) -> Tuple[str, int]:
    """`HOST:PORT`, `[V6ADDR]:PORT`, or `:PORT` / `PORT` for every address (dual-stack)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            if text.endswith("]") and ":" in text:
                raise usage.UsageError(f"--listen {text}: the port is missing: --listen {text}:69 (or another port)")
            raise usage.UsageError(f"--listen {text!r}: expected [IPV6ADDRESS]:PORT")
    elif ":" in text:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise usage.UsageError(f"--listen {text!r}: put an IPv6 address in brackets: [{host}]:{port}")
    elif text and not text.isdigit():
        # "127.0.0.1", "tftp.example": an address or a name, without a port
        raise usage.UsageError(f"--listen {text}: the port is missing: --listen {text}:69 (or another port)")
    else:
        host, port = "", text
    if not port and host:
        raise usage.UsageError(f"--listen {text}: the port is missing: --listen {text}69 (or another port)")
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:  # "²".isdigit() too
        raise usage.UsageError(f"--listen {text!r}: port must be a number from 0 to 65535")
    return host or "::", int(port)


def parse_port_range(text: str) -> Tuple[int, int]:
    """`LOW:HIGH` (the ports' range is `ServerConfig`'s to check)."""
    low, sep, high = text.partition(":")
    if not sep or not all(p.isascii() and p.isdigit() for p in (low, high)):
        raise ValueError(f"--port-range {text!r}: expected LOW:HIGH, e.g. 49152:49407")
    return int(low), int(high)


parse_port_range.coerceDoc = "LOW:HIGH, e.g. 49152:49407."  # type: ignore[attr-defined]


def _number(bound: Range, doc: Optional[str] = None) -> Callable[[str], Any]:
    """The option's parser: a number of the range's kind. The range is checked with the rest, in postOptions."""

    def coerce(text: str) -> Any:
        try:
            return bound.kind(text)
        except ValueError:
            raise ValueError(f"{bound.option} must be a number, not {text!r}") from None

    coerce.coerceDoc = doc or f"{bound.describe().capitalize()}."  # type: ignore[attr-defined]
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
        ["protocol", None, None, f"What the --socket backend speaks: {' or '.join(PROTOCOLS)} "
         "(the MAAS 2.2-3.4 offload format). [default: amp]"],
        ["backend-timeout", None, None, "Seconds a --socket backend may take to answer a request; "
         f"then the client gets an error. [default: {LOOKUP_TIMEOUT}]", _number(config.BACKEND_TIMEOUT_RANGE)],
        ["max-blksize", None, DEFAULTS.limits.max_blksize, "Largest block size granted (RFC 2348); the path MTU "
         "also caps it.", _number(MAX_BLKSIZE_RANGE)],
        ["max-windowsize", None, DEFAULTS.limits.max_windowsize, "Largest window granted, in blocks (RFC 7440).",
         _number(MAX_WINDOWSIZE_RANGE)],
        ["max-window-bytes", None, DEFAULTS.limits.max_window_bytes, "Largest window granted, in bytes in flight.",
         _number(config.MAX_WINDOW_BYTES_RANGE)],
        ["timeout", "t", DEFAULTS.limits.timeout, "When the client sets no timeout (RFC 2349): seconds before the "
         "first retransmission, and the most the timeout learnt from the transfer's round trips (10 ms over them "
         "at least) may be; it doubles on each retry, up to 8.", _number(TIMEOUT_RANGE)],
        ["give-up", None, DEFAULTS.limits.give_up, "Seconds without progress after which a transfer is abandoned "
         "(then, not at the next retry).",
         _number(config.GIVE_UP_RANGE, f"From the --timeout value to {config.GIVE_UP_RANGE.high:g}.")],
        ["rollover", None, DEFAULTS.limits.rollover, "Block number after 65535: 0 or 1.", _number(ROLLOVER_RANGE)],
        ["max-sessions", None, DEFAULTS.max_sessions, "Transfers (and backend lookups) at once; further requests "
         "are dropped, with a log line, until one ends (ROMs retry).", _number(config.MAX_SESSIONS_RANGE)],
        ["map-file", "m", None, "With --root: rewrite requested names by the rules in this file (tftpd-hpa's "
         "--map-file syntax; reread on SIGHUP). Try them with tftp-offload-map-test."],
        ["root-per-client", None, None, "With --root: 'ip' serves ROOT/<client address>/ first, then ROOT/; "
         "'mac' ROOT/<client MAC>/ (52-54-00-12-34-56, from the kernel's neighbour table)."],
        ["log-format", None, "text", "text (one readable line per event) or json (one JSON object per line, "
         "every structured field, transfer-start events too; for jq). Written where twistd's --logfile says."],
        ["max-sessions-per-client", None, DEFAULTS.guard.max_sessions_per_client, "Transfers one client "
         "address may run at once (0: no limit); more from it are dropped until one ends. Raise it for many "
         "machines behind one NAT address.", _number(config.MAX_SESSIONS_PER_CLIENT_RANGE)],
        ["max-requests-per-second-per-client", None, DEFAULTS.guard.requests_per_second_per_client, "New "
         "transfers one client address may start a second, with bursts of twice that (0: no limit); more are "
         "dropped.", _number(config.REQUESTS_PER_SECOND_PER_CLIENT_RANGE)],
        ["workers", None, 1, "Processes serving the same addresses (SO_REUSEPORT: the kernel keeps each "
         "client with one), for hosts with many cores.", _number(WORKERS_RANGE)],
        ["port-range", None, None, "Serve every transfer from a port in LOW:HIGH (for firewalls); when all "
         "are in use, requests are dropped with a log line until one ends (ROMs retry)", parse_port_range],
        ["drain-timeout", None, DEFAULTS.drain_timeout, "On shutdown, seconds running transfers get to finish "
         "before they are aborted.", _number(config.DRAIN_TIMEOUT_RANGE)],
        ["metrics", None, None, "Serve Prometheus metrics at http://HOST:PORT/metrics (needs prometheus-client)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.listen: List[Tuple[str, int]] = []
        self._listen_text: List[Tuple[str, Tuple[str, int]]] = []
        self.inherited: List[Tuple[int, int]] = []
        self.allow: List[Any] = []
        self.argv: List[str] = []
        """The arguments as given: --workers starts its workers with them."""
        self.config = DEFAULTS
        """What the server runs with, built (and checked) from the options by postOptions."""

    def opt_listen(self, value: str) -> None:
        """HOST:PORT or [IPV6]:PORT to listen on (a host name means each of its addresses); repeat for
        more (default: the sockets systemd passed (socket activation), else [::]:69, all addresses)."""
        self._listen_text.append((value, parse_listen(value)))

    opt_l = opt_listen

    def opt_version(self) -> None:
        """Print tftp-offload's version (and Twisted's) and exit."""
        print(version())
        raise SystemExit(0)

    def parseOptions(self, options: Any = None) -> None:
        """Under twistd (a subcommand has a parent), a mistake is one line on stderr and exit status 1."""
        self.argv = list(sys.argv[1:] if options is None else options)
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise  # a library caller or a test: let it see the error
            fail(str(e) if isinstance(e, StartupError) else f"{e} (twistd tftp-offload --help lists the options)")

    def opt_allow(self, value: str) -> None:
        """NETWORK (CIDR: 192.0.2.0/24, 2001:db8::/32) whose clients are served; repeat for more.
        Datagrams from elsewhere are dropped (default: every client is served)."""
        try:
            self.allow.append(parse_network(value))
        except ValueError as e:
            raise usage.UsageError(f"--allow: {e}") from None

    def postOptions(self) -> None:
        if (self["root"] is None) == (self["socket"] is None):
            raise usage.UsageError("give exactly one of --root DIR (serve a directory) or --socket PATH "
                                   "(ask a backend)")
        if self["root"] is not None and not os.path.isdir(self["root"]):
            raise usage.UsageError(f"--root {self['root']!r} is not a directory")
        self.check_directory_options()
        if self["root"] is not None:
            for name in ("protocol", "backend-timeout"):
                if self[name] is not None:
                    raise usage.UsageError(f"--{name} is for a --socket backend; --root serves a directory itself: "
                                           f"drop --{name} {self[name]}")
        self["protocol"] = self["protocol"] or "amp"
        self["backend-timeout"] = self["backend-timeout"] or LOOKUP_TIMEOUT
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(f"--log-format must be text or json, not {self['log-format']!r}")
        if self["protocol"] not in PROTOCOLS:
            raise usage.UsageError(f"--protocol must be one of {', '.join(PROTOCOLS)}, not {self['protocol']!r}")
        wanted = [(text, address) for text, (host, port) in self._listen_text for address in resolve(text, host, port)]
        self.listen = [address for _, address in wanted]
        self.config = self.server_config()
        self.inherited = inherited_datagram_sockets()
        if not self.listen and not self.inherited:
            self.listen = list(DEFAULT_LISTEN)
            wanted = [(address(host, port), (host, port)) for host, port in self.listen]
        check_listen(wanted, reuse_port=self["workers"] > 1)
        if self["workers"] > 1 and self["metrics"] is not None:
            raise usage.UsageError("--metrics counts the transfers of one process: it cannot be used with --workers")
        if self["workers"] > 1 and self.inherited:
            raise usage.UsageError("--workers needs addresses to bind (--listen): a socket systemd passes "
                                   "cannot be shared by SO_REUSEPORT")
        if self["metrics"] is not None:
            self["metrics"] = metrics_address(self["metrics"])

    def server_config(self) -> ServerConfig:
        """The options' `ServerConfig`; a value out of its range is a usage error (one line, naming the option)."""
        try:
            WORKERS_RANGE.check(self["workers"])
            return ServerConfig(
                limits=Limits(
                    max_blksize=self["max-blksize"],
                    max_windowsize=self["max-windowsize"],
                    max_window_bytes=self["max-window-bytes"],
                    timeout=self["timeout"],
                    give_up=self["give-up"],
                    rollover=self["rollover"],
                ),
                max_sessions=self["max-sessions"],
                lookup_timeout=lookup_timeout_for(self["backend-timeout"]),
                quiet=bool(self["quiet"]),
                drain_timeout=self["drain-timeout"],
                guard=GuardLimits(max_sessions_per_client=self["max-sessions-per-client"],
                                  requests_per_second_per_client=self["max-requests-per-second-per-client"],
                                  allow=tuple(self.allow)),
                port_range=self["port-range"],
                single_port=bool(self["single-port"]),
                reuse_port=self["workers"] > 1,
                log_starts=self["log-format"] == "json",
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def check_directory_options(self) -> None:
        """--map-file and --root-per-client: one line for what is wrong, before anything starts."""
        for name in ("map-file", "root-per-client"):
            if self[name] is not None and self["root"] is None:
                raise usage.UsageError(f"--{name} works with --root only (a --socket backend decides names itself)")
        per_client = self["root-per-client"]
        if per_client not in (None, *PER_CLIENT):
            raise usage.UsageError(f"--root-per-client must be {' or '.join(PER_CLIENT)}, not {per_client!r}")
        if self["map-file"] is not None:
            try:
                RuleSet.load(self["map-file"])
            except MapFileError as e:
                raise usage.UsageError(f"--map-file {e}") from None


def metrics_address(text: str) -> Tuple[str, int]:
    """--metrics HOST:PORT (as --listen), checked here: without the library, say what to install."""
    try:
        address = parse_listen(text)
    except usage.UsageError as e:
        raise usage.UsageError(str(e).replace("--listen", "--metrics", 1)) from None
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise usage.UsageError("--metrics needs the prometheus-client library: pip install "
                               "'tftp-offload[metrics]' (Debian: apt install python3-prometheus-client)") from None
    return address


def make_backend(options: Options) -> IBackend:
    """The backend the options name. One that provides `IService` is started and stopped with us."""
    if options["root"] is not None:
        return DirectoryBackend(options["root"], options["map-file"], options["root-per-client"])
    if options["protocol"] == "legacy":
        from .offload.legacy import LegacyBackend

        return LegacyBackend(options["socket"], timeout=options["backend-timeout"])
    from .offload.client import AMPBackend

    return AMPBackend(options["socket"], timeout=options["backend-timeout"])


class StopInOrder(MultiService):
    """A MultiService that stops its children one after another, last added first.

    MultiService stops them all at once, which would close the backend while
    the TFTP service drains: lookups in flight would fail instead of being
    answered (and their ephemeral files removed) within --drain-timeout.
    """

    def stopService(self) -> Deferred:
        Service.stopService(self)

        async def in_order() -> None:
            for child in reversed(list(self)):
                try:
                    await maybeDeferred(child.stopService)
                except Exception:
                    log.failure("Stopping {service} failed", service=child)

        return ensureDeferred(in_order())


class CheckRoot(Service):
    """Warns, as the service starts (after twistd has shed privileges), if `--root` is unreadable."""

    def __init__(self, root: str) -> None:
        self.root = root

    def startService(self) -> None:
        super().startService()
        check_root(self.root)


class Top(StopInOrder):
    """The service twistd runs; with --log-format json it gives the application its log observer.

    twistd adopts an `ILogObserver` component of the application (the .tac idiom)
    instead of its text file observer: set here, as twistd makes us its child.
    """

    observer: Any = None
    twistd: Any = None
    """twistd's own options when run by twistd (then a port that cannot be bound ends the process)."""

    def startService(self) -> None:
        try:
            super().startService()
        except CannotListenError as e:
            if self.twistd is None:
                raise
            failed_to_listen(e, bool(self.twistd.get("nodaemon")))

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if self.observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.observer)


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


class ReloadOnHangup(Service):
    """Under twistd, SIGHUP rereads the --map-file, as tftpd-hpa does (without us it would end the process)."""

    def __init__(self, reload: Callable[[], object]) -> None:
        self.reload = reload
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        from twisted.internet import reactor

        def hangup(signum: int, frame: Any) -> None:
            reactor.callFromThread(self.reload)  # type: ignore[attr-defined]

        self._previous = signal.signal(signal.SIGHUP, hangup)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None


def makeService(options: Options) -> IService:
    backend = make_backend(options)
    top = Top()
    top.twistd = twistd = getattr(options, "parent", None)
    top.observer = twistd_observer(options["log-format"], twistd)
    if IService.providedBy(backend):
        backend.setServiceParent(top)  # type: ignore[attr-defined]
    if options["root"] is not None:
        CheckRoot(options["root"]).setServiceParent(top)
    tftp = TFTPOffloadService(backend, listen=options.listen, inherited=options.inherited, config=options.config)
    tftp.setServiceParent(top)
    if isinstance(backend, DirectoryBackend) and backend.map_file is not None:
        ReloadOnHangup(backend.reload).setServiceParent(top)
    if options["metrics"] is not None:
        from .metrics import MetricsService

        MetricsService(tftp, options["metrics"]).setServiceParent(top)
    if options["workers"] > 1 and WORKER_ENV not in os.environ:
        Workers(options["workers"], options.argv, tftp).setServiceParent(top)  # after tftp: its addresses
    AbortOnSecondSignal(tftp).setServiceParent(top)  # last, so it stops (and arms) first
    return top
