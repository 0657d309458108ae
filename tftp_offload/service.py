"""The embedding API: a TFTP server as an ordinary Twisted service.

    from tftp_offload.service import TFTPOffloadService
    TFTPOffloadService(backend, listen=[("::", 69)]).setServiceParent(application)

`backend` is anything providing `IBackend` (python-tx-tftp's contract, which
MAAS's rack controller implements). No twistd, no socket, no subprocess.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from .options import Limits
from .server import LOOKUP_TIMEOUT, ListenerProtocol, TFTPServer
from .udp import RequestPort, is_ipv6

log = Logger(namespace="tftp_offload")

DEFAULT_LISTEN: Tuple[Tuple[str, int], ...] = (("::", 69),)
"""Every address, IPv4 and IPv6, on the TFTP port: one dual-stack socket."""


DRAIN_TIMEOUT = 10.0
"""Seconds running transfers may take to finish once the service is stopping."""


class TFTPOffloadService(Service):
    """Listens on `listen` (host, port) pairs, and on `inherited` sockets, and serves what `backend` decides.

    - `backend`: provides python-tx-tftp's `IBackend` contract (`get_reader`);
      it need not declare our interface, which is why the hint is `Any`.
    - `listen`: (host, port) pairs; "::" is every address, IPv4 included.
      Port 0 picks a free port: `addresses()` tells which.
    - `limits`: blksize/windowsize caps, retransmission timeout, give-up time,
      rollover (`tftp_offload.options.Limits`).
    - `max_sessions`: transfers and backend lookups at once; more requests are
      dropped with a log line (ROMs retry).
    - `lookup_timeout`: seconds a backend may take before the client is told.
    - `quiet`: log only transfers that fail.
    - `drain_timeout`: on stop, seconds running transfers get to finish.
    - `inherited`: (fd, family) of bound UDP sockets to adopt (socket activation).
    - `port_range`: (low, high): every transfer's port comes from it; when all are in
      use, requests are dropped with a log line (ROMs retry). None: any free port.
    - `single_port`: serve every transfer from the listening port it was asked on,
      told apart by the client's address and port (for firewalls and NAT).
    - `reuse_port`: bind the listening addresses with SO_REUSEPORT, so that other
      processes (`--workers`) can bind them too.
    - `reactor`: defaults to the global one, looked up only when the service starts.
    """

    def __init__(
        self,
        backend: Any,
        listen: Sequence[Tuple[str, int]] = DEFAULT_LISTEN,
        limits: Limits = Limits(),
        max_sessions: int = 1000,
        lookup_timeout: float = LOOKUP_TIMEOUT,
        reactor: Any = None,
        quiet: bool = False,
        drain_timeout: float = DRAIN_TIMEOUT,
        inherited: Sequence[Tuple[int, int]] = (),
        port_range: Optional[Tuple[int, int]] = None,
        single_port: bool = False,
        reuse_port: bool = False,
    ) -> None:
        self.backend = backend
        self.listen = list(listen)
        self.limits = limits
        self.max_sessions = max_sessions
        self.lookup_timeout = lookup_timeout
        self._reactor = reactor
        self.quiet = quiet
        self.drain_timeout = drain_timeout
        self.inherited = list(inherited)
        self.port_range = port_range
        self.single_port = single_port
        self.reuse_port = reuse_port
        self.server: Optional[TFTPServer] = None
        self.ports: List[RequestPort] = []

    def startService(self) -> None:
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        self.server = TFTPServer(self.backend, self.limits, self.max_sessions, self.lookup_timeout, reactor,
                                 self.quiet, self.port_range, self.single_port)
        v4_ports = {port for host, port in self.listen if not is_ipv6(host)}
        try:
            for fd, family in self.inherited:
                listener = RequestPort.adopt(fd, family, ListenerProtocol(self.server), reactor)
                listener.startListening()
                self.ports.append(listener)
                address = listener.getHost()
                log.info("Serving TFTP on inherited {address}", address=_show(address.host, address.port))
            for host, port in self.listen:
                # An IPv6 wildcard is dual-stack unless an IPv4 address is also asked for on its port.
                v6only = (port in v4_ports) if is_ipv6(host) else None
                listener = RequestPort(port, ListenerProtocol(self.server), host, v6only, reactor=reactor,
                                       reuse_port=self.reuse_port)
                listener.startListening()
                self.ports.append(listener)
                log.info("Serving TFTP on {address}", address=_show(host, listener.getHost().port))
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
        """Stop listening at once; running transfers get `drain_timeout` seconds to finish."""
        super().stopService()
        stopping = [listener.stopListening() for listener in self.ports]
        self.ports = []
        if self.server is not None:
            stopping.append(self.server.drain(self.drain_timeout))
        return DeferredList([d for d in stopping if d is not None])


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if is_ipv6(host) else f"{host}:{port}"
