"""Prometheus metrics: what the service measures, and one scrape that sums every worker.

    http_requests_total{method,route,status_class}            counter (the histogram's _count)
    http_request_duration_seconds{method,route,status_class}  histogram
    http_requests_in_flight                                   gauge
    http_unavailable_total{cause}                             counter, 503s by cause
    db_pool_size, db_pool_checked_out, db_pool_overflow{pool} gauges
    db_pool_wait_seconds{pool}                                histogram, waits for a connection
    db_pool_timeouts_total{pool}                              counter
    db_replica_lag_seconds{replica}                           gauge
    idempotent_replays_total                                  counter

With several workers each one writes its values to files in
PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode: `service.server`
prepares the directory before the workers start and reports workers that exit),
and a scrape, whichever worker answers it, reads the files of all of them. One
worker without that directory keeps its values in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from service.db.pool import FairAsyncQueuePool
from service.errors import UNAVAILABLE_CAUSES, UnavailableCause

# From a cached liveness answer (~0.1 ms) to the 5 s pool and 15 s statement timeouts.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
)  # fmt: skip
POOL_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_LABELS = ("method", "route", "status_class")
# Label values must stay few: any other method a client invents counts as "other",
# and a path no route matched as "unmatched", never as itself.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"
CLIENT_CLOSED = 499  # nginx's status for a client that left before any response
DURATION = "http_request_duration_seconds"


class Metrics:
    """Every metric of this process; `metrics()` builds the one instance."""

    def __init__(self) -> None:
        # Where the values actually go: files when prometheus-client was imported
        # with PROMETHEUS_MULTIPROC_DIR set, memory otherwise.
        self.multiprocess = values.ValueClass is not values.MutexValue
        registry = None if self.multiprocess else CollectorRegistry()
        self.registry = registry
        # http_requests_total is read off this histogram's _count at scrape time
        # (`WithRequestCount`): a counter of its own doubled the work per request.
        self.duration = Histogram(
            DURATION,
            "Time from receiving a request to its last response byte",
            REQUEST_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "http_requests_in_flight",
            "HTTP requests being handled now",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.unavailable = Counter(
            "http_unavailable_total", "503 answers by cause", ["cause"], registry=registry
        )
        for cause in UNAVAILABLE_CAUSES:
            self.unavailable.labels(cause)  # present at 0, so rate() works from the start
        self.pool_size = Gauge(
            "db_pool_size",
            "Configured connections per pool (summed over workers)",
            ["pool"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.pool_checked_out = Gauge(
            "db_pool_checked_out",
            "Connections in use by requests",
            ["pool"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.pool_overflow = Gauge(
            "db_pool_overflow",
            "Connections open beyond the pool size (DB_MAX_OVERFLOW)",
            ["pool"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.pool_wait = Histogram(
            "db_pool_wait_seconds",
            "Waits for a free connection when none was free, timed-out ones included",
            ["pool"],
            buckets=POOL_WAIT_BUCKETS,
            registry=registry,
        )
        self.pool_timeouts = Counter(
            "db_pool_timeouts_total",
            "Waits for a connection that ran out of DB_POOL_TIMEOUT (each a 503)",
            ["pool"],
            registry=registry,
        )
        self.replica_lag = Gauge(
            "db_replica_lag_seconds",
            "How far a replica's replay is behind the primary (worst worker's view)",
            ["replica"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.idempotent_replays = Counter(
            "idempotent_replays_total",
            "POSTs answered with a stored response for a repeated Idempotency-Key",
            registry=registry,
        )
        self._request_children: dict[tuple[str, str, int], Any] = {}

    def request_started(self) -> None:
        """A request is in flight (liveness is not: see RequestContextMiddleware)."""
        self.in_flight.inc()

    def request_done(
        self, *, method: str, route: str | None, status: int | None, seconds: float
    ) -> None:
        """The request is over; `route` is the template of the route that took it
        (None: no route matched). No status means no response was sent: the client
        went away (or the server is stopping), counted as nginx's 499."""
        self.in_flight.dec()
        self.count(method=method, route=route or UNMATCHED_ROUTE, status=status, seconds=seconds)

    def count(self, *, method: str, route: str, status: int | None, seconds: float) -> None:
        """Count and time one answered request; label lookups are cached per (method,
        route, status). Liveness, answered before the router, calls it directly."""
        key = (method, route, status or CLIENT_CLOSED)
        duration = self._request_children.get(key)
        if duration is None:
            labels = (method if method in METHODS else "other", route, f"{key[2] // 100}xx")
            duration = self._request_children[key] = self.duration.labels(*labels)
        duration.observe(seconds)

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The scrape body in the format the scraper asked for, and its content type."""
        encode, content_type = choose_encoder(accept)
        # Built per scrape in multiprocess mode, as prometheus-client's docs say: it
        # reads every worker's files.
        source = self.registry if self.registry is not None else MultiProcessCollector(None)
        return encode(WithRequestCount(source)), content_type


class WithRequestCount:
    """What `source` collects, plus http_requests_total: the same name, labels and
    values a counter of its own had, read off the latency histogram's `_count`,
    which every answered request is observed in exactly once."""

    def __init__(self, source: Collector) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            yield family
            if family.name == DURATION:
                yield _request_count(family)


def _request_count(duration: Metric) -> CounterMetricFamily:
    requests = CounterMetricFamily("http_requests", "HTTP requests answered", labels=REQUEST_LABELS)
    created = {
        tuple(sample.labels.get(name) for name in REQUEST_LABELS): sample.value
        for sample in duration.samples
        if sample.name == f"{DURATION}_created"
    }
    for sample in duration.samples:
        if sample.name == f"{DURATION}_count":
            labels = tuple(sample.labels[name] for name in REQUEST_LABELS)
            requests.add_metric(labels, sample.value, created=created.get(labels))
    return requests


@cache
def metrics() -> Metrics:
    """The process's metrics, built on first use: in a worker, after the server has
    set PROMETHEUS_MULTIPROC_DIR, never at import time."""
    return Metrics()


class PoolMetrics:
    """What one connection pool reports (`service.db.pool.PoolObserver`), with its
    labelled children bound once."""

    def __init__(self, metrics: Metrics, *, name: str, size: int) -> None:
        metrics.pool_size.labels(name).set(size)
        self._checked_out = metrics.pool_checked_out.labels(name)
        self._overflow = metrics.pool_overflow.labels(name)
        self._wait = metrics.pool_wait.labels(name)
        self._timeouts = metrics.pool_timeouts.labels(name)
        self._overflow.set(0)
        self._last_overflow = 0

    def in_use(self, *, checked_out: int, overflow: int) -> None:
        self._checked_out.set(checked_out)
        if overflow != self._last_overflow:  # rarely changes: skip the write
            self._overflow.set(overflow)
            self._last_overflow = overflow

    def waited(self, seconds: float, *, timed_out: bool) -> None:
        self._wait.observe(seconds)
        if timed_out:
            self._timeouts.inc()


def observe_pool(pool: FairAsyncQueuePool, *, name: str) -> None:
    """Report `pool` under the label `pool=name` from now on."""
    observer = PoolMetrics(metrics(), name=name, size=pool.size())
    observer.in_use(checked_out=pool.checkedout(), overflow=max(pool.overflow(), 0))
    pool.observer = observer


def record_unavailable(cause: UnavailableCause) -> None:
    """One 503 answered because of `cause`."""
    metrics().unavailable.labels(cause).inc()


def record_replica_lag(replica: str, seconds: float) -> None:
    """The replica's replay lag as last measured by this worker."""
    metrics().replica_lag.labels(replica).set(seconds)


def record_idempotent_replay() -> None:
    """One POST answered with the stored response of an earlier one."""
    metrics().idempotent_replays.inc()
