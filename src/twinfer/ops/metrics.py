"""Prometheus metrics and HTTP health checks, served on ``--metrics-port``.

Nothing here runs on the request path: :class:`TwinferCollector` turns the
plain counters kept by :mod:`twinfer.ops.stats` and the state of the dispatcher
into metric families when Prometheus scrapes.  ``prometheus_client``'s
Twisted resource renders in a reactor pool thread; the collector only takes
snapshots (list copies, integer reads), which the GIL makes consistent per
value.

Routes: ``/metrics`` (Prometheus text format), ``/healthz`` (liveness: 200
while the reactor answers) and ``/readyz`` (readiness: 200 when every
configured model is loaded on at least one healthy device, else 503 with the
reason).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.twisted import MetricsResource
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from twinfer.ops.control import Controller
from twinfer.ops.stats import Histogram


class TwinferCollector(Collector):
    """Builds twinfer's metric families from a :class:`Controller` at scrape time."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def collect(self) -> Iterator[Metric]:
        controller = self.controller
        stats = controller.stats
        dispatcher = controller.dispatcher

        requests = CounterMetricFamily(
            "twinfer_requests",
            "Inference requests answered, by model (empty: not served here), outcome "
            "(OK or an error code name) and front end; refusals included.",
            labels=["model", "code", "frontend"],
        )
        for (model, code, via), n in list(stats.requests.items()):
            requests.add_metric([model, code, via], n)
        yield requests
        protocol_errors = CounterMetricFamily(
            "twinfer_protocol_errors",
            "Bytes refused before they became a request (malformed frames...), by front "
            "end and error code.",
            labels=["frontend", "code"],
        )
        frontends = list(controller.dataplane.frontends.values())
        for front in frontends:
            for code, n in list(front.protocol_errors.items()):
                protocol_errors.add_metric([front.name, code], n)
        yield protocol_errors
        refused = CounterMetricFamily(
            "twinfer_refused",
            "Connections closed or requests refused by a server limit, by front end and "
            "limit (max_connections, idle_timeout, http_header_timeout, hello_size...).",
            labels=["frontend", "limit"],
        )
        for front in frontends:
            for limit, n in list(front.refused.items()):
                refused.add_metric([front.name, limit], n)
        yield refused
        yield GaugeMetricFamily(
            "twinfer_buffered_bytes",
            "Request bytes held now in the buffer budget shared by the front ends "
            "(at most server.max_buffered_bytes, plus reads already in progress).",
            value=controller.dataplane.budget.used,
        )

        families = {
            "queue": HistogramMetricFamily(
                "twinfer_queue_seconds", "Time jobs waited in a queue.", labels=["model"]
            ),
            "compute": HistogramMetricFamily(
                "twinfer_compute_seconds", "Time jobs spent on a device.", labels=["model"]
            ),
            "latency": HistogramMetricFamily(
                "twinfer_request_seconds",
                "Time from a request reaching the data plane to its outcome (reply or error).",
                labels=["model"],
            ),
            "batch": HistogramMetricFamily(
                "twinfer_batch_size", "Samples per device execution.", labels=["model"]
            ),
        }
        for model, model_stats in list(stats.models.items()):
            for attr, family in families.items():
                histogram: Histogram = getattr(model_stats, attr)
                family.add_metric([model], histogram.cumulative(), histogram.sum)
        yield from families.values()

        depth = GaugeMetricFamily(
            "twinfer_queue_depth", "Jobs waiting, per queue.", labels=["model", "queue"]
        )
        for model, queue in dispatcher.model_queues():
            depth.add_metric([model, queue.name], queue.depth)
        yield depth
        inflight = GaugeMetricFamily(
            "twinfer_inflight", "Inference requests queued or running.", labels=["frontend"]
        )
        connections = GaugeMetricFamily(
            "twinfer_connections",
            "Open client connections (HTTP keep-alive included).",
            labels=["frontend"],
        )
        for front in frontends:
            inflight.add_metric([front.name], front.inflight)
            connections.add_metric([front.name], len(front.sessions))
        yield inflight
        yield connections

        busy = CounterMetricFamily(
            "twinfer_device_busy_seconds", "Seconds devices spent computing.", labels=["device"]
        )
        jobs = CounterMetricFamily(
            "twinfer_device_jobs", "Jobs devices completed.", labels=["device"]
        )
        workers = GaugeMetricFamily(
            "twinfer_device_workers", "Device workers, by state.", labels=["device", "state"]
        )
        for device in controller.device_names():
            busy.add_metric([device], controller.busy_seconds(device))
            jobs.add_metric([device], controller.jobs_done(device))
            states = {"serving": 0, "drained": 0}
            for worker in dispatcher.workers_on(device):
                if worker.alive:
                    states["drained" if worker.paused else "serving"] += 1
            for state, n in states.items():
                workers.add_metric([device, state], n)
        yield busy
        yield jobs
        yield workers

        health = controller.health()
        yield GaugeMetricFamily("twinfer_ready", "1 when the server is ready.", value=health.ready)
        yield GaugeMetricFamily(
            "twinfer_uptime_seconds",
            "Seconds since the server started.",
            value=time.monotonic() - stats.started,
        )


def make_registry(controller: Controller) -> CollectorRegistry:
    """A registry of twinfer's metrics plus the standard process metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TwinferCollector(controller))
    ProcessCollector(registry=registry)
    return registry


class HealthResource(Resource):
    """``/healthz`` (``ready=False``) or ``/readyz`` (``ready=True``)."""

    isLeaf = True

    def __init__(self, controller: Controller, ready: bool) -> None:
        super().__init__()
        self.controller = controller
        self.ready = ready

    def render_GET(self, request: Request) -> bytes:
        health = self.controller.health()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        ok = health.ready if self.ready else health.live
        if not ok:
            request.setResponseCode(503)
            return f"not ready: {health.detail}\n".encode()
        return b"ready\n" if self.ready else b"ok\n"


def make_site(controller: Controller, registry: CollectorRegistry | None = None) -> Site:
    """The metrics port's web site: ``/metrics``, ``/healthz``, ``/readyz``."""
    root = Resource()
    metrics: Any = MetricsResource(registry or make_registry(controller))
    root.putChild(b"metrics", metrics)
    health: Any = HealthResource(controller, ready=False)
    ready: Any = HealthResource(controller, ready=True)
    root.putChild(b"healthz", health)
    root.putChild(b"readyz", ready)
    site = Site(root)
    site.displayTracebacks = False
    site.noisy = False
    return site
