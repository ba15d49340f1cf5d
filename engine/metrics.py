"""Prometheus metrics of one service process, served as `GET /metrics` on its port.

Each app has its own registry (tests run several apps in one process). The event loop counts
requests by route and status; the model thread reports each job's end and each model load
(`Metrics` is its `Observer`) and hands finished jobs to the service's own observer (chat's
tokens, embeddings' texts, speech's audio seconds). Gauges of the queue, the model's state and
the process's memory are read when scraped; MLX's memory counters are those the model thread
last read (`ModelThread.memory`: between jobs, after a load or an unload). Where llama-server
has a metric, it is served under its name (`llamacpp:requests_processing`) beside an `mlxd_`
twin.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable, Iterator
from typing import Any

import prometheus_client
import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from engine.modelthread import Cancelled, Job, ModelState, ModelThread

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# A finished job and its result, on the model thread: a service counts what it served.
ServiceObserver = Callable[[Job, Any], None]
# Registers a service's metrics in an app's registry and returns its observer.
ServiceMetrics = Callable[[CollectorRegistry], ServiceObserver]


class Twin:
    """One counter under several names: llama-server's (`llamacpp:...`) and ours."""

    def __init__(self, registry: CollectorRegistry, names: tuple[str, ...], doc: str) -> None:
        self._counters = [Counter(name, doc, registry=registry) for name in names]
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount
        for counter in self._counters:
            counter.inc(amount)


def ratio_gauge(registry: CollectorRegistry, name: str, doc: str, top: Twin, bottom: Twin) -> None:
    """A gauge read when scraped: top / bottom (0 while bottom is 0)."""
    gauge = Gauge(name, doc, registry=registry)
    gauge.set_function(lambda: top.value / bottom.value if bottom.value else 0.0)


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux counts KiB


class Metrics:
    """The registry of one app and what feeds it; the model thread's `Observer`."""

    def __init__(
        self,
        service: str,
        model_id: str,
        worker: Callable[[], ModelThread | None],
        service_metrics: ServiceMetrics | None = None,
    ) -> None:
        prometheus_client.disable_created_metrics()
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "mlxd_http_requests",
            "HTTP requests answered, by route, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "mlxd_http_request_duration_seconds",
            "Seconds from a request to its response's start (a stream's first bytes)",
            ["route"],
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.jobs = Counter(
            "mlxd_jobs",
            "Model-thread jobs ended, by outcome (ok, error, cancelled)",
            ["outcome"],
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "mlxd_job_queue_seconds",
            "Seconds a job waited in the queue before the model thread took it",
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.job_seconds = Histogram(
            "mlxd_job_seconds",
            "Seconds from the model thread taking a job to its end",
            buckets=SECONDS_BUCKETS,
            registry=registry,
        )
        self.loads = Counter("mlxd_model_loads", "Model loads completed", registry=registry)
        self.load_seconds = Gauge(
            "mlxd_model_load_seconds", "Seconds the last model load took", registry=registry
        )
        registry.register(_ScrapeTime(self, service, model_id, worker))
        self.service_observer = service_metrics(registry) if service_metrics else None

    # ---- event loop ----------------------------------------------------------------------

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

    # ---- model thread (the Observer) ---------------------------------------------------

    def loaded(self, seconds: float) -> None:
        self.loads.inc()
        self.load_seconds.set(seconds)

    def finished(self, job: Job, result: Any, error: BaseException | None) -> None:
        outcome = (
            "ok" if error is None else "cancelled" if isinstance(error, Cancelled) else "error"
        )
        self.jobs.labels(outcome).inc()
        if job.started_at is not None:
            self.queue_seconds.observe(job.started_at - job.enqueued_at)
            self.job_seconds.observe((job.finished_at or job.started_at) - job.started_at)
        if error is None and self.service_observer is not None:
            self.service_observer(job, result)


class _ScrapeTime:
    """The gauges read when scraped: the model, its queue and the process's memory."""

    def __init__(
        self, metrics: Metrics, service: str, model_id: str, worker: Callable[[], Any]
    ) -> None:
        self.metrics, self.service, self.model_id, self.worker = metrics, service, model_id, worker

    def collect(self) -> Iterator[Metric]:
        worker: ModelThread | None = self.worker()
        yield _gauge(
            "mlxd_model_info",
            "The served model (value 1)",
            1,
            {"service": self.service, "model": self.model_id},
        )
        state = worker.state if worker is not None else ModelState.LOADING
        states = GaugeMetricFamily(
            "mlxd_model_state", "The model's state (1: the current one)", labels=["state"]
        )
        for each in ModelState:
            states.add_metric([each.name.lower()], float(each is state))
        yield states
        yield _gauge(
            "mlxd_model_loaded", "1 while the model is loaded and ready", state is ModelState.READY
        )
        queued, running = worker.counts() if worker is not None else (0, 0)
        yield from _twins(
            ("llamacpp:requests_deferred", "mlxd_queue_depth"),
            "Requests queued for the model thread, not yet taken",
            queued,
        )
        yield from _twins(
            ("llamacpp:requests_processing", "mlxd_requests_in_flight"),
            "Requests the model thread has taken and not finished",
            running,
        )
        yield from self._memory(worker)

    def _memory(self, worker: ModelThread | None) -> Iterator[Metric]:
        yield _gauge(
            "mlxd_process_resident_memory_bytes",
            "Resident memory of the service process",
            psutil.Process().memory_info().rss,
        )
        yield _gauge(
            "mlxd_process_peak_resident_memory_bytes",
            "Peak resident memory of the service process",
            peak_rss_bytes(),
        )
        if worker is None:
            return
        memory = worker.memory  # replaced whole by the model thread: a consistent snapshot
        for key in ("active", "peak", "cache"):
            yield _gauge(
                f"mlxd_mlx_{key}_memory_bytes",
                f"MLX {key} memory, as the model thread last read it (between jobs, after a "
                "load or an unload)",
                getattr(memory, key),
            )


def _gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), float(value))
    return family


def _twins(names: tuple[str, ...], doc: str, value: float) -> Iterator[Metric]:
    for name in names:
        yield _gauge(name, doc, value)
