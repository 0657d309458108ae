"""The embedding API: a TFTP server as an ordinary Twisted service.

    from tftp_offload.service import TFTPOffloadService
    TFTPOffloadService(backend, listen=[("::", 69)]).setServiceParent(application)

`backend` is anything providing `IBackend` (python-tx-tftp's contract, which
MAAS's rack controller implements). No twistd, no socket, no subprocess.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from .config import DRAIN_TIMEOUT, LOOKUP_TIMEOUT, ServerConfig  # noqa: F401  (the constants: part of this API)
from .guard import GuardLimits
from .logs import address as show
from .options import Limits
from .server import ListenerProtocol, TFTPServer
from .stats import TransferReport
from .udp import RequestPort, is_ipv6, plain_host

log = Logger(namespace="tftp_offload")

DEFAULT_LISTEN: Tuple[Tuple[str, int], ...] = (("::", 69),)
"""Every address, IPv4 and IPv6, on the TFTP port: one dual-stack socket."""


def _setting(name: str) -> Any:
    """`service.<name>`: the `config` field of that name; setting it replaces `config` (checked again).

    A started server keeps the config it was made with; `drain_timeout` is read when the service stops.
    """

    def get(self: "TFTPOffloadService") -> Any:
        return getattr(self.config, name)

    def set(self: "TFTPOffloadService", value: Any) -> None:
        self.config = replace(self.config, **{name: value})

    return property(get, set, doc=f"`config.{name}`; assigning it replaces `config`.")


class TFTPOffloadService(Service):
    """Listens on `listen` (host, port) pairs, and on `inherited` sockets, and serves what `backend` decides.

    - `backend`: provides python-tx-tftp's `IBackend` contract (`get_reader`);
      it need not declare our interface, which is why the hint is `Any`.
    - `listen`: (host, port) pairs; "::" is every address, IPv4 included.
      Port 0 picks a free port: `addresses()` tells which.
    - `reactor`: defaults to the global one, looked up only when the service starts.
    - `inherited`: (fd, family) of bound UDP sockets to adopt (socket activation).
    - `observer`: called with a `tftp_offload.stats.TransferReport` as each
      transfer ends (on the reactor thread; an exception it raises is logged).
      More can be added to `observers`, before or after the start.
    - `config`: a `tftp_offload.config.ServerConfig`, every limit and default
      (`ServerConfig()` when not given). The keywords below are its fields, for
      callers that name one or two; one given overrides `config`'s (None: as
      `config` says). Out of range, any of them raises ValueError naming the
      twistd option that sets it.
    - `limits`: blksize/windowsize caps, retransmission timeout, give-up time,
      rollover (`tftp_offload.options.Limits`).
    - `max_sessions`: transfers and backend lookups at once; more requests are
      dropped with a log line (ROMs retry).
    - `lookup_timeout`: seconds a backend may take before the client is told.
    - `quiet`: log only transfers that fail.
    - `drain_timeout`: on stop, seconds running transfers get to finish.
    - `guard`: per-client session cap and request rate, the allowed client networks, the budgets
      for ERROR replies and refusal log lines (`tftp_offload.guard.GuardLimits`).
    - `port_range`: (low, high): every transfer's port comes from it; when all are in
      use, requests are dropped with a log line (ROMs retry). None: any free port.
    - `single_port`: serve every transfer from the listening port it was asked on,
      told apart by the client's address and port (for firewalls and NAT).
    - `reuse_port`: bind the listening addresses with SO_REUSEPORT, so that other
      processes (`--workers`) can bind them too.

    Each field can also be read and set as an attribute (`service.drain_timeout = 0`); the server
    takes the config as it is when the service starts.
    """

    limits = _setting("limits")
    max_sessions = _setting("max_sessions")
    lookup_timeout = _setting("lookup_timeout")
    quiet = _setting("quiet")
    drain_timeout = _setting("drain_timeout")
    guard = _setting("guard")
    port_range = _setting("port_range")
    single_port = _setting("single_port")
    reuse_port = _setting("reuse_port")
    log_starts = _setting("log_starts")
    """Log a transfer-start event for every transfer too (the end event alone says how it went)."""

    def __init__(
        self,
        backend: Any,
        listen: Sequence[Tuple[str, int]] = DEFAULT_LISTEN,
        limits: Optional[Limits] = None,
        max_sessions: Optional[int] = None,
        lookup_timeout: Optional[float] = None,
        reactor: Any = None,
        quiet: Optional[bool] = None,
        drain_timeout: Optional[float] = None,
        inherited: Sequence[Tuple[int, int]] = (),
        observer: Optional[Callable[[TransferReport], Any]] = None,
        guard: Optional[GuardLimits] = None,
        port_range: Optional[Tuple[int, int]] = None,
        single_port: Optional[bool] = None,
        reuse_port: Optional[bool] = None,
        config: Optional[ServerConfig] = None,
    ) -> None:
        given = {"limits": limits, "max_sessions": max_sessions, "lookup_timeout": lookup_timeout, "quiet": quiet,
                 "drain_timeout": drain_timeout, "guard": guard, "port_range": port_range,
                 "single_port": single_port, "reuse_port": reuse_port}
        overrides: Dict[str, Any] = {name: value for name, value in given.items() if value is not None}
        self.config: ServerConfig = ServerConfig() if config is None else config
        if overrides:
            self.config = replace(self.config, **overrides)
        self.backend = backend
        self.listen = list(listen)
        self._reactor = reactor
        self.inherited = list(inherited)
        self.observers: List[Callable[[TransferReport], Any]] = [observer] if observer is not None else []
        self.server: Optional[TFTPServer] = None
        self.ports: List[RequestPort] = []

    def startService(self) -> None:
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        self.server = TFTPServer(self.backend, self.config, reactor)
        self.server.stats.observers = self.observers  # the same list: observers added later are called too
        v4_ports = {port for host, port in self.listen if not is_ipv6(host)}
        try:
            for fd, family in self.inherited:
                listener = RequestPort.adopt(fd, family, ListenerProtocol(self.server), reactor)
                listener.startListening()
                self.ports.append(listener)
                address = listener.getHost()
                log.info("Serving TFTP on inherited {address} (socket activation): {backend}",
                         address=show(plain_host(address.host), address.port), backend=describe(self.backend),
                         event="listening")
            for host, port in self.listen:
                # An IPv6 wildcard is dual-stack unless an IPv4 address is also asked for on its port.
                v6only = (port in v4_ports) if is_ipv6(host) else None
                listener = RequestPort(port, ListenerProtocol(self.server), host, v6only, reactor=reactor,
                                       reuse_port=self.reuse_port)
                listener.startListening()
                self.ports.append(listener)
                log.info("Serving TFTP on {address}: {backend}", address=show(host, listener.getHost().port),
                         backend=describe(self.backend), event="listening")
        except Exception:
            for listener in self.ports:
                listener.stopListening()
            self.ports = []
            raise
        super().startService()

    def addresses(self) -> List[Tuple[str, int]]:
        """(host, port) of each socket served, once started: the real port where 0 was asked."""
        return [(port.getHost().host, port.getHost().port) for port in self.ports]

    def stopService(self) -> Deferred:
        """Take no new request at once; running transfers and lookups get `drain_timeout` seconds to finish.

        The listening sockets stay open but unread until the drain is over: a
        lookup still in flight can still be answered, with an ERROR if need
        be, from the address its client asked, and new requests wait in the
        socket (an inherited one hands them to the next start).
        """
        super().stopService()
        ports, self.ports = self.ports, []
        for listener in ports:
            listener.stopReading()

        def close(result: object = None) -> Deferred:
            return DeferredList([d for d in (listener.stopListening() for listener in ports) if d is not None])

        if self.server is None:
            return close()
        return self.server.drain(self.drain_timeout).addCallback(close)


def describe(backend: Any) -> str:
    """What a start-up line says is served: `files from /srv/tftp (directory)`, `the backend on PATH (amp)`."""
    root = getattr(backend, "root", None)
    if isinstance(root, str):
        return f"files from {root} (directory)"
    path = getattr(backend, "socket_path", None)
    if path is not None:
        protocol = "legacy" if type(backend).__name__ == "LegacyBackend" else "amp"
        return f"asking the backend on {path} ({protocol})"
    return f"asking {type(backend).__name__}"
