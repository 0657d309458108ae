"""The Prometheus endpoint (`--metrics HOST:PORT`): our plain counters, read at scrape time.

Imported only when metrics are asked for: it needs `prometheus-client`
(`pip install tftp-offload[metrics]`; Debian: python3-prometheus-client).
Nothing here runs per datagram or per request: the server keeps plain
integers (`tftp_offload.stats`), and a custom collector turns them into
metric families when Prometheus scrapes. The page is rendered on the reactor
thread (not prometheus_client.twisted's thread pool), so the counters are
read between two reactor events, never while a transfer updates them.
Labels are bounded sets (outcomes, reasons, kinds, TFTP codes): no client or
file name ever becomes a label.

Written for prometheus-client 0.16 (Debian bookworm) and later.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Tuple

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.application.service import Service
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .stats import Histogram, Stats

log = Logger(namespace="tftp_offload")


class TFTPCollector:
    """Metric families from a `TFTPServer`'s `Stats` (and its backend's connection), when collected.

    `source` returns the running `TFTPServer`, or None before the service has
    started (then only zeros would be known, and nothing is exported)."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def collect(self) -> Iterator[Any]:
        server = self._source()
        if server is None:
            return
        stats: Stats = server.stats
        yield _counter("tftp_transfers_started", "Transfers begun (the backend answered, a first datagram was due).",
                       stats.transfers_started)
        yield _labelled(CounterMetricFamily, "tftp_transfers_finished",
                        "Transfers ended, by outcome (as in the TransferFinished report).", "outcome", stats.finished)
        yield GaugeMetricFamily("tftp_sessions_active", "Requests being handled: waiting for the backend or "
                                "transferring.", value=len(server.sessions))
        yield GaugeMetricFamily("tftp_backend_lookups_in_flight", "Requests waiting for the backend's answer.",
                                value=stats.lookups_in_flight(server.sessions.values()))
        yield _counter("tftp_sent_bytes", "File bytes clients acknowledged, counted when each transfer ends.",
                       stats.bytes_sent)
        yield _counter("tftp_sent_datagrams", "Datagrams sent on transfer ports (OACK, DATA, ERROR; "
                       "retransmissions included), counted when each transfer ends.", stats.datagrams_sent)
        yield _counter("tftp_retransmitted_datagrams", "DATA and OACK datagrams sent again, counted when each "
                       "transfer ends.", stats.retransmits)
        yield _counter("tftp_duplicate_acks", "ACKs for blocks already acknowledged, counted when each transfer "
                       "ends.", stats.duplicate_acks)
        yield _labelled(CounterMetricFamily, "tftp_errors_sent", "TFTP ERROR datagrams sent, by error code.",
                        "code", {str(code): n for code, n in sorted(stats.errors_sent.items())})
        yield _labelled(CounterMetricFamily, "tftp_requests_refused", "Datagrams that got no transfer, by reason.",
                        "reason", stats.refused)
        yield _labelled(CounterMetricFamily, "tftp_backend_answers", "Readers the backend answered with, by answer "
                        "kind.", "kind", stats.answers)
        yield _counter("tftp_backend_lookup_failures", "Lookups the backend refused, failed or did not answer in "
                       "time (the client got an ERROR).", stats.lookup_failures)
        yield _histogram("tftp_backend_lookup_seconds", "Seconds from a request to the backend's answer or failure.",
                         stats.lookup_seconds)
        yield _histogram("tftp_first_datagram_seconds", "Seconds from a request to the first datagram of its "
                         "transfer.", stats.first_datagram_seconds)
        yield _histogram("tftp_transfer_duration_seconds", "Seconds from a request to the end of its transfer, "
                         "whatever the outcome.", stats.transfer_seconds)
        yield _histogram("tftp_transfer_size_bytes", "File bytes of completed transfers.", stats.transfer_bytes)
        yield from _backend_families(server.backend)


def _backend_families(backend: Any) -> Iterator[Any]:
    """Connection state and reconnects, for backends that have a connection (AMP; legacy: its last request)."""
    connected: Optional[bool] = getattr(backend, "connected", None)
    if connected is not None:
        yield GaugeMetricFamily("tftp_backend_up", "1 while the backend connection is up (legacy protocol: the "
                                "last request reached the backend).", value=int(bool(connected)))
    counts = getattr(backend, "stats", None)
    if isinstance(counts, dict) and "connections" in counts:
        yield _counter("tftp_backend_reconnects", "Connections to the backend made after the first.",
                       max(counts["connections"] - 1, 0))
        yield _labelled(CounterMetricFamily, "tftp_backend_lookups_saved", "Requests answered without a lookup "
                        "of their own: from the answer cache, or sharing one in flight.", "how",
                        {"cache": counts.get("cache_hits", 0), "coalesced": counts.get("coalesced", 0)})


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _labelled(family: Any, name: str, documentation: str, label: str, values: Any) -> Any:
    metric = family(name, documentation, labels=[label])
    for key, value in values.items():
        metric.add_metric([key], value)
    return metric


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, documentation, buckets=[(b, float(n)) for b, n in histogram.cumulative()],
                                 sum_value=histogram.sum)


def registry_for(source: Any) -> CollectorRegistry:
    """A registry of our own (not the library's global one, which holds process metrics of the host)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TFTPCollector(source))  # type: ignore[arg-type]
    return registry


class MetricsPage(Resource):
    """GET /metrics: the Prometheus text format, rendered on the reactor thread."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class MetricsService(Service):
    """Serves http://HOST:PORT/metrics for the TFTP service `tftp` while running."""

    def __init__(self, tftp: Any, address: Tuple[str, int], reactor: Any = None) -> None:
        self.tftp = tftp
        self.address = address
        self._reactor = reactor
        self.port: Any = None

    def startService(self) -> None:
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        root = Resource()
        root.putChild(b"metrics", MetricsPage(registry_for(lambda: self.tftp.server)))
        site = Site(root)
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]  # a scrape every 15 s is not news
        host, port = self.address
        self.port = reactor.listenTCP(port, site, interface=host)
        super().startService()
        bound = self.port.getHost()
        shown = f"[{bound.host}]" if ":" in bound.host else bound.host
        log.info("Serving metrics on http://{address}/metrics", address=f"{shown}:{bound.port}")

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None
