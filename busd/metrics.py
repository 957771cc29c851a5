"""Prometheus metrics and the health endpoints (docs/reference/metrics.md), on a private
registry.

Metrics are set at stage boundaries by the consumer; this module only defines them and serves
``/metrics``, ``/healthz`` and ``/readyz`` from a small HTTP thread bound to loopback by default.
The standard ``process_*`` and ``python_*`` collectors are registered on the same registry, as
operators expect of any Prometheus client.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from busd import __version__
from busd.errors import ConfigError, Outcome, Reason

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)

METRIC_NAMES: tuple[str, ...] = (
    "busd_consumer_pending_messages",
    "busd_consumer_ack_pending_messages",
    "busd_events_total",
    "busd_rejections_total",
    "busd_artifacts_committed_total",
    "busd_batch_size",
    "busd_commit_duration_seconds",
    "busd_export_duration_seconds",
    "busd_export_last_success_timestamp_seconds",
    "busd_export_failures_total",
    "busd_event_latency_seconds",
    "busd_catalog_seq",
    "busd_nats_connected",
    "busd_build_info",
    "busd_up",
    "busd_ready",
    "busd_active",
    "busd_artifacts_missing",
    "busd_oldest_unsettled_age_seconds",
    "busd_consumer_info",
    "busd_lineage_events_total",
)
LINEAGE_OUTCOMES = ("sent", "failed", "dropped")

# The label names prometheus-nats-exporter gives JetStream's own series, so a dashboard joins
# busd's with the server's with a plain `on (stream_name, consumer_name)`.
CONSUMER_LABELS = ("stream_name", "consumer_name")


class Metrics:
    """Every busd metric, on a registry of its own (no process-global state)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.pending = Gauge(
            "busd_consumer_pending_messages",
            "Messages in the stream not yet delivered to busd (the lag).",
            registry=r,
        )
        self.ack_pending = Gauge(
            "busd_consumer_ack_pending_messages",
            "Messages delivered to busd and not yet acked.",
            registry=r,
        )
        self.oldest_unsettled_age = Gauge(
            "busd_oldest_unsettled_age_seconds",
            "Lag in time: age (now minus its stream timestamp) of the oldest message the "
            "consumer has not settled yet, i.e. the first stored message after the consumer's "
            "ack floor, whether busd holds it, waits to redeliver it or has not fetched it yet; "
            "0 when nothing is pending or awaiting an ack.",
            registry=r,
        )
        self.consumer_info = Gauge(
            "busd_consumer_info",
            "Always 1 on the instance bound to the durable consumer; its labels name the "
            "stream and consumer, to join busd's series with the NATS server's.",
            list(CONSUMER_LABELS),
            registry=r,
        )
        self.events = Counter(
            "busd_events_total", "Stream messages by outcome.", ["outcome"], registry=r
        )
        self.rejections = Counter(
            "busd_rejections_total", "Rejected messages by reason.", ["reason"], registry=r
        )
        self.artifacts = Counter(
            "busd_artifacts_committed_total", "Artifact rows committed.", registry=r
        )
        self.batch_size = Histogram(
            "busd_batch_size", "Messages per committed batch.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.commit_seconds = Histogram(
            "busd_commit_duration_seconds",
            "Duration of one catalog transaction.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.export_seconds = Histogram(
            "busd_export_duration_seconds",
            "Duration of one export refresh.",
            ["export"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.export_last_success = Gauge(
            "busd_export_last_success_timestamp_seconds",
            "Unix time of the last successful refresh.",
            ["export"],
            registry=r,
        )
        self.export_failures = Counter(
            "busd_export_failures_total", "Failed export refreshes.", ["export"], registry=r
        )
        self.event_latency = Histogram(
            "busd_event_latency_seconds",
            "Time from publish (stream timestamp) to ack.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.catalog_seq = Gauge("busd_catalog_seq", "Last stream sequence applied.", registry=r)
        self.artifacts_missing = Gauge(
            "busd_artifacts_missing",
            "Committed artifacts whose file is gone or unreadable (checked periodically and "
            "at each refresh); they are left out of the data views.",
            registry=r,
        )
        self.nats_connected = Gauge("busd_nats_connected", "1 while connected to NATS.", registry=r)
        self.build_info = Gauge(
            "busd_build_info", "Always 1; the version is a label.", ["version"], registry=r
        )
        self.up = Gauge("busd_up", "1 while the process runs.", registry=r)
        self.active = Gauge(
            "busd_active",
            "1 on the instance that owns the consumer; 0 on a hot standby.",
            registry=r,
        )
        self.active.set(1)
        self.ready = Gauge("busd_ready", "1 while ready (NATS, consumer and catalog).", registry=r)
        self.lineage_events = Counter(
            "busd_lineage_events_total",
            "OpenLineage run events by outcome: sent, failed (not sent, not retried) or "
            "dropped (the queue was full; acks never wait for lineage).",
            ["outcome"],
            registry=r,
        )
        self.build_info.labels(version=__version__).set(1)
        self.up.set(1)
        ProcessCollector(registry=r)  # memory, CPU, open files
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)
        # Pre-create every label value so dashboards and alerts see zeros, not gaps.
        for outcome in Outcome:
            self.events.labels(outcome=outcome.value)
        for reason in Reason:
            self.rejections.labels(reason=reason.value)
        for sent in LINEAGE_OUTCOMES:
            self.lineage_events.labels(outcome=sent)

    def watch_exports(self, names: list[str]) -> None:
        for name in names:
            self.export_failures.labels(export=name)
            self.export_seconds.labels(export=name)

    def bound(self, stream: str, consumer: str) -> None:
        """Name the stream and consumer this instance consumes (``busd_consumer_info``)."""
        labels = dict(zip(CONSUMER_LABELS, (stream, consumer), strict=True))
        self.consumer_info.labels(**labels).set(1)

    def lag(self) -> tuple[int, int, float]:
        """(pending, ack pending, oldest unsettled age in seconds) as last measured."""
        return (
            int(self.pending._value.get()),
            int(self.ack_pending._value.get()),
            float(self.oldest_unsettled_age._value.get()),
        )

    def is_ready(self) -> bool:
        return bool(self.ready._value.get())

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` over HTTP on a daemon thread."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        outer = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, outer.render(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    ready = outer.is_ready()
                    self._send(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        server_class = _Server6 if ":" in host else _Server
        try:
            self.server = server_class((host, port), Handler)
        except OSError as exc:  # a busy port is the operator's to fix: exit 2, not a crash
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise ConfigError(
                f"bad value for metrics.listen: cannot listen on {where}: {exc.strerror or exc}"
            ) from None
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="busd-metrics", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
