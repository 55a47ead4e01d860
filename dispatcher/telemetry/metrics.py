"""Prometheus metrics of one dispatcher: a registry of its own, and how to serve it.

Why prometheus-client rather than OpenTelemetry metrics with a Prometheus exporter: most
figures already exist as plain counters in ``Dispatcher.stats()`` (policies, fleets,
hedges, fallbacks), and prometheus-client's custom collectors read them *at scrape time*,
costing the hot path nothing; the OTel equivalent (observable instruments) goes through
the SDK's aggregation and its exporter is still a pre-release package. What ``stats()``
lacks — calls by plugin, method and outcome, and their latency — is recorded per call in
a ``CallRecord`` (one per route and outcome, made once: a bucket index found by bisection
and two additions, no lock) and exported the same way, at scrape time, as a counter and a
histogram family. prometheus-client's own ``Counter``/``Histogram`` take a lock per
update and walk the buckets one by one: together 2.5 µs per call on this machine under
load, against ~0.3 µs (``bench/bench_telemetry.py``). Every update happens on the
dispatcher's event loop thread, so nothing else writes concurrently; a scrape from another
thread reads a histogram whose ``_count`` is computed from the very bucket counts it
exports, so it is consistent by construction. The exposition format is the library's
(``generate_latest``/``choose_encoder``), never written by hand.

Names follow Prometheus' conventions (``dispatcher_`` prefix, base units, ``_total`` on
counters) and labels are bounded: plugin, method, route and target names come from the
manifest (or a fleet's discovered instances), outcomes from the error tree's stable types
— never params, request ids, callers or a plugin's own exception names.

Serving: ``metrics_handler(registry)`` is an aiohttp handler (the gateway mounts it at
``/metrics``), ``asgi_app(registry)`` an ASGI app; ``Dispatcher.telemetry.metrics.registry``
is the registry for hosts that expose their own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from dispatcher.config import MetricsSettings
from dispatcher.telemetry.job_metrics import job_families

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client.metrics_core import Metric

__all__ = [
    "CallRecord",
    "ConnectionsCollector",
    "DispatcherMetrics",
    "StatsCollector",
    "asgi_app",
    "metrics_handler",
]

#: Distinct outcomes one route may report before the rest are counted as ``other``: the
#: error tree bounds them already; this bounds a third-party error class naming itself.
MAX_OUTCOMES_PER_ROUTE = 32
#: Distinct event names one plugin's host events are counted under before ``other``.
MAX_EVENT_NAMES = 32

_BREAKER_STATES = ("closed", "open", "half-open")
_INSTANCE_STATES = ("healthy", "ejected", "down", "leaving")


class CallRecord:
    """Calls of one route that ended with one outcome: counts per latency bucket, and
    the sum of their latencies. ``buckets[i]`` counts calls within ``bounds[i]`` (not
    cumulative; the last one is +Inf)."""

    __slots__ = ("buckets", "sum")

    def __init__(self, size: int) -> None:
        self.buckets = [0] * (size + 1)
        self.sum = 0.0


class DispatcherMetrics:
    """The metrics registry of one dispatcher and its per-call records."""

    def __init__(self, settings: MetricsSettings, stats: Callable[[], Mapping[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        #: Upper bounds of the latency buckets, for ``bisect_left`` (``le`` is inclusive).
        self.bounds: tuple[float, ...] = settings.latency_buckets
        self.records: dict[tuple[str, str, str], CallRecord] = {}
        #: Streams by (plugin, method, outcome), when they end; their chunks by (plugin, method).
        self.streams: dict[tuple[str, str, str], CallRecord] = {}
        self.stream_chunks: dict[tuple[str, str], int] = {}
        #: Host events by (plugin, event, outcome): event names come from the host or a
        #: gateway client, so each plugin keeps at most MAX_EVENT_NAMES, the rest ``other``.
        self.events: dict[tuple[str, str, str], CallRecord] = {}
        self.breaker_transitions = Counter(
            "dispatcher_breaker_transitions",
            "Circuit breaker state changes, by target and states.",
            ["target", "from_state", "to_state"],
            registry=self.registry,
        )
        #: The (from, to) states each breaker's series were made for, by breaker name.
        self._breaker_moves: dict[str, set[tuple[str, str]]] = {}
        self.batch_size = Histogram(
            "dispatcher_batch_size",
            "Invocations per batch sent to a target.",
            ["target_kind"],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=self.registry,
        )
        self.registry.register(StatsCollector(stats))
        self.registry.register(_CallCollector(self))

    def record(self, plugin: str, method: str, outcome: str) -> CallRecord:
        """The record of ``plugin.method`` calls ending with ``outcome`` (made once)."""
        key = (plugin, method, outcome)
        record = self.records.get(key)
        if record is None:
            record = self.records[key] = CallRecord(len(self.bounds))
        return record

    def stream_record(self, plugin: str, method: str, outcome: str) -> CallRecord:
        return self._made(self.streams, (plugin, method, outcome))

    def event_record(self, plugin: str, event: str, outcome: str) -> CallRecord:
        record = self.events.get((plugin, event, outcome))
        if record is not None:
            return record
        names = {name for owner, name, _ in self.events if owner == plugin}
        if event not in names and len(names) >= MAX_EVENT_NAMES:
            event = "other"
        return self._made(self.events, (plugin, event, outcome))

    def _made(
        self, records: dict[tuple[str, str, str], CallRecord], key: tuple[str, str, str]
    ) -> CallRecord:
        record = records.get(key)
        if record is None:
            record = records[key] = CallRecord(len(self.bounds))
        return record

    def breaker_changed(self, breaker: Any, old: object, new: object) -> None:
        """A ``Dispatcher.on_circuit_change`` listener."""
        move = (str(old), str(new))
        self._breaker_moves.setdefault(breaker.name, set()).add(move)
        self.breaker_transitions.labels(breaker.name, *move).inc()

    def breaker_forgotten(self, name: str) -> None:
        """The breaker ``name`` is gone (a fleet instance that left, a target a reload
        moved away from): its transitions' series go too. Kept, every address a
        registry or DNS ever listed and whose circuit once opened stayed in /metrics."""
        for move in self._breaker_moves.pop(name, ()):
            self.breaker_transitions.remove(name, *move)


class _CallCollector(Collector):
    """Calls, streams and host events, counted and timed from their records."""

    def __init__(self, metrics: DispatcherMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        yield from self._families(
            "dispatcher_calls",
            "Calls through Dispatcher.call, by plugin, method and outcome (ok or the error type).",
            "dispatcher_call_duration_seconds",
            "Time from Dispatcher.call to its result or error, policies included.",
            ["plugin", "method", "outcome"],
            metrics.records,
        )
        yield from self._families(
            "dispatcher_streams",
            "Streams through Dispatcher.stream that ended, by plugin, method and outcome"
            " (ok, closed by their consumer, or the error type).",
            "dispatcher_stream_duration_seconds",
            "Time from opening a stream to its end.",
            ["plugin", "method", "outcome"],
            metrics.streams,
        )
        chunks = CounterMetricFamily(
            "dispatcher_stream_chunks",
            "Chunks streams yielded, by plugin and method.",
            labels=["plugin", "method"],
        )
        for key, count in list(metrics.stream_chunks.items()):
            chunks.add_metric(list(key), count)
        yield chunks
        yield from self._families(
            "dispatcher_events",
            "Host events through Dispatcher.publish, by plugin, event and outcome.",
            "dispatcher_event_duration_seconds",
            "Time to deliver a host event to every target of its plugin.",
            ["plugin", "event", "outcome"],
            metrics.events,
        )

    def _families(
        self,
        name: str,
        documentation: str,
        duration_name: str,
        duration_documentation: str,
        labels: list[str],
        records: Mapping[tuple[str, str, str], CallRecord],
    ) -> Iterator[Metric]:
        counts = CounterMetricFamily(name, documentation, labels=labels)
        latency = HistogramMetricFamily(duration_name, duration_documentation, labels=labels)
        bounds = [*(repr(float(bound)) for bound in self._metrics.bounds), "+Inf"]
        for key, record in list(records.items()):
            buckets = list(record.buckets)  # one read: the family is consistent with itself
            cumulative, running = [], 0
            for bound, count in zip(bounds, buckets, strict=True):
                running += count
                cumulative.append((bound, running))
            counts.add_metric(list(key), running)
            latency.add_metric(list(key), cumulative, record.sum)
        yield counts
        yield latency


class StatsCollector(Collector):
    """Exports ``Dispatcher.stats()`` at scrape time: counters the policies and fleets
    keep anyway, so the hot path pays nothing for them."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []  # families depend on the manifest; described when collected

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield from _dispatcher(stats.get("dispatcher", {}))
        yield from _caches(stats.get("caches", {}))
        yield from _breakers(stats.get("breakers", {}))
        yield from _batchers(stats.get("batchers", {}))
        yield from _retries(stats.get("retry_budgets", {}), stats.get("retries", {}))
        yield from _idempotency(stats.get("idempotency", {}))
        yield from _rate_limits(stats.get("rate_limits", []))
        yield from _bulkheads(stats.get("bulkheads", {}))
        yield from _hedges(stats.get("hedges", {}))
        yield from _fallbacks(stats.get("fallbacks", {}))
        yield from _fleets(stats.get("fleets", {}))
        yield from _state(stats.get("state", {}))
        yield from _rollouts(stats.get("rollouts", {}))
        yield from _cold_starts(stats.get("cold_starts", {}))
        yield from job_families(stats)


class ConnectionsCollector(Collector):
    """A gateway's connections by port (``GatewayServer.connection_stats``), read at
    scrape time: open now, the limit, and those refused, by the limit that refused them.
    A port whose grpc does not report a figure leaves it out."""

    def __init__(self, stats: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        open_now = _gauge(
            "dispatcher_gateway_connections", "Connections open on a gateway port.", ["port"]
        )
        most = _gauge(
            "dispatcher_gateway_max_connections",
            "Connections a gateway port holds at most (gateway.max_connections).",
            ["port"],
        )
        refused = _counter(
            "dispatcher_gateway_connections_refused",
            "New connections a gateway port closed at once, by the limit they met"
            " (max_connections, max_connections_per_peer).",
            ["port", "reason"],
        )
        for port, each in self._stats().items():
            if each.get("open") is not None:
                open_now.add_metric([port], each["open"])
            most.add_metric([port], each["max"])
            for reason, count in each.get("refused", {}).items():
                refused.add_metric([port, reason], count)
        yield from (open_now, most, refused)


def _counter(name: str, documentation: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, labels=labels)


def _gauge(name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=labels)


def _dispatcher(stats: Mapping[str, Any]) -> Iterator[Metric]:
    if not stats:
        return
    yield GaugeMetricFamily(
        "dispatcher_calls_in_flight", "Calls inside Dispatcher.call now.", stats["calls_in_flight"]
    )
    yield GaugeMetricFamily(
        "dispatcher_streams_in_flight", "Streams open now.", stats["streams_in_flight"]
    )
    yield GaugeMetricFamily(
        "dispatcher_draining", "1 while the dispatcher drains.", int(stats["draining"])
    )


def _caches(stats: Mapping[str, Any]) -> Iterator[Metric]:
    hits = _counter("dispatcher_cache_hits", "Calls answered from the cache.", ["route"])
    misses = _counter("dispatcher_cache_misses", "Calls the cache could not answer.", ["route"])
    coalesced = _counter(
        "dispatcher_cache_coalesced", "Misses that waited for a concurrent one.", ["route"]
    )
    entries = _gauge("dispatcher_cache_entries", "Results held by the cache.", ["route"])
    for route, each in stats.items():
        hits.add_metric([route], each["hits"])
        misses.add_metric([route], each["misses"])
        coalesced.add_metric([route], each["coalesced"])
        entries.add_metric([route], each["size"])
    yield from (hits, misses, coalesced, entries)


def _breakers(stats: Mapping[str, Any]) -> Iterator[Metric]:
    state = _gauge(
        "dispatcher_breaker_state",
        "Circuit breaker state of a target: 1 for the state it is in.",
        ["target", "state"],
    )
    failures = _gauge(
        "dispatcher_breaker_failures", "Health failures in a row the breaker counted.", ["target"]
    )
    for target, each in stats.items():
        for name in _BREAKER_STATES:
            state.add_metric([target, name], 1.0 if each["state"] == name else 0.0)
        failures.add_metric([target], each["failures"])
    yield from (state, failures)


def _batchers(stats: Mapping[str, Any]) -> Iterator[Metric]:
    batches = _counter("dispatcher_batches", "Batches sent.", ["route"])
    items = _counter("dispatcher_batch_items", "Calls sent in batches.", ["route"])
    flushes = _counter(
        "dispatcher_batch_flushes",
        "Why batches went out: full, timer (end of the window) or drain.",
        ["route", "cause"],
    )
    for route, each in stats.items():
        batches.add_metric([route], each["batches"])
        items.add_metric([route], each["items"])
        for cause, count in each["flushes"].items():
            flushes.add_metric([route, cause], count)
    yield from (batches, items, flushes)


def _retries(budgets: Mapping[str, Any], retries: Mapping[str, int]) -> Iterator[Metric]:
    spent = _counter(
        "dispatcher_retry_budget_spent", "Retries and hedges the budget allowed.", ["target"]
    )
    refused = _counter(
        "dispatcher_retry_budget_exhausted",
        "Retries and hedges refused because the target's budget was spent.",
        ["target"],
    )
    for target, each in budgets.items():
        spent.add_metric([target], each["spent"])
        refused.add_metric([target], each["refused"])
    attempts = _counter("dispatcher_retries", "Attempts after the first, by route.", ["route"])
    for route, count in retries.items():
        attempts.add_metric([route], count)
    yield from (spent, refused, attempts)


def _idempotency(stats: Mapping[str, Any]) -> Iterator[Metric]:
    replayed = _counter(
        "dispatcher_idempotency_replays",
        "Keyed calls answered from their key's record without running (the first call"
        " had ended), by route.",
        ["route"],
    )
    joined = _counter(
        "dispatcher_idempotency_joined",
        "Keyed calls that waited for the same key's call in flight in this replica and"
        " got its answer, by route.",
        ["route"],
    )
    for route, each in stats.items():
        replayed.add_metric([route], each["replayed"])
        joined.add_metric([route], each["joined"])
    yield from (replayed, joined)


def _rate_limits(stats: list[Mapping[str, Any]]) -> Iterator[Metric]:
    # Several methods may share one target-scoped limit: sum them under its name.
    totals: dict[tuple[str, str, str], list[int]] = {}
    for each in stats:
        key = (each["name"], each["scope"], each["mode"])
        total = totals.setdefault(key, [0, 0])
        total[0] += each["waited"]
        total[1] += each["rejected"]
    waits = _counter(
        "dispatcher_rate_limit_waits", "Calls that queued for a rate limit.", ["limit", "scope"]
    )
    rejections = _counter(
        "dispatcher_rate_limit_rejections",
        "Calls a rate limit refused (reject mode, or the deadline passed while queued).",
        ["limit", "scope"],
    )
    for (name, scope, _), (waited, rejected) in totals.items():
        waits.add_metric([name, scope], waited)
        rejections.add_metric([name, scope], rejected)
    yield from (waits, rejections)


def _bulkheads(stats: Mapping[str, Any]) -> Iterator[Metric]:
    rejected = _counter(
        "dispatcher_bulkhead_rejections", "Calls a full bulkhead refused.", ["bulkhead"]
    )
    in_flight = _gauge("dispatcher_bulkhead_in_flight", "Slots taken now.", ["bulkhead"])
    waiting = _gauge("dispatcher_bulkhead_waiting", "Calls waiting for a slot.", ["bulkhead"])
    for name, each in stats.items():
        rejected.add_metric([name], each["rejected"])
        in_flight.add_metric([name], each["in_flight"])
        waiting.add_metric([name], each["waiting"])
    yield from (rejected, in_flight, waiting)


def _hedges(stats: Mapping[str, Any]) -> Iterator[Metric]:
    sent = _counter("dispatcher_hedges_sent", "Hedged attempts sent.", ["route"])
    won = _counter("dispatcher_hedges_won", "Hedged attempts that answered first.", ["route"])
    refused = _counter(
        "dispatcher_hedges_refused_by_budget", "Hedges the retry budget refused.", ["route"]
    )
    delay = _gauge("dispatcher_hedge_delay_seconds", "Current delay before a hedge.", ["route"])
    for route, each in stats.items():
        sent.add_metric([route], each["sent"])
        won.add_metric([route], each["won"])
        refused.add_metric([route], each["refused_by_budget"])
        delay.add_metric([route], each["delay_ms"] / 1000)
    yield from (sent, won, refused, delay)


def _fallbacks(stats: Mapping[str, Any]) -> Iterator[Metric]:
    fallbacks = _counter(
        "dispatcher_fallbacks",
        "Calls answered (used) or not (failed, deadline_used_up) by a fallback plugin.",
        ["route", "result"],
    )
    for route, each in stats.items():
        for result in ("used", "failed", "deadline_used_up"):
            fallbacks.add_metric([route, result], each[result])
    yield fallbacks


def _rollouts(stats: Mapping[str, Any]) -> Iterator[Metric]:
    percent = _gauge(
        "dispatcher_rollout_percent",
        "Share of calls naming no exact version that go to the new version.",
        ["route", "from", "to", "status"],
    )
    rollbacks = _counter("dispatcher_rollout_rollbacks", "Automatic rollbacks.", ["route"])
    calls = _counter(
        "dispatcher_rollout_calls",
        "Calls a rollout sent to each side, and those that failed by its budget's rules.",
        ["route", "side", "result"],
    )
    shadows = _counter(
        "dispatcher_shadow_calls",
        "Mirrored calls by how their answer compared (equal, different, failed, skipped).",
        ["route", "to", "result"],
    )
    for route, each in stats.items():
        if each["kind"] == "shadow":
            for result in ("equal", "different", "failed", "skipped"):
                shadows.add_metric([route, each["to"], result], each[result])
            continue
        percent.add_metric([route, each["from"], each["to"], each["status"]], each["percent"])
        rollbacks.add_metric([route], each["rollbacks"])
        for side in ("from", "to"):
            calls.add_metric([route, side, "all"], each["calls"][side])
            calls.add_metric([route, side, "failed"], each["errors"][side])
    yield from (percent, rollbacks, calls, shadows)


def _fleets(stats: Mapping[str, Any]) -> Iterator[Metric]:
    failovers = _counter(
        "dispatcher_fleet_failovers", "Attempts moved to another instance.", ["fleet"]
    )
    ejections = _counter(
        "dispatcher_fleet_ejections", "Instances the outlier detector ejected.", ["fleet"]
    )
    state = _gauge(
        "dispatcher_fleet_instance_state",
        "State of each instance of a fleet: 1 for the state it is in.",
        ["fleet", "instance", "state"],
    )
    # Per fleet, every state always (0 included): an empty fleet has no per-instance
    # series at all, and an alert on "no instance healthy" needs a series that says 0.
    counts = _gauge(
        "dispatcher_fleet_instances",
        "Instances of a fleet in each state (0 when none: a fleet nobody registered in).",
        ["fleet", "state"],
    )
    calls = _counter("dispatcher_fleet_instance_calls", "Attempts sent.", ["fleet", "instance"])
    failures = _counter(
        "dispatcher_fleet_instance_failures", "Health failures.", ["fleet", "instance"]
    )
    in_flight = _gauge(
        "dispatcher_fleet_instance_in_flight", "Attempts in flight.", ["fleet", "instance"]
    )
    source_up = _gauge(
        "dispatcher_fleet_source_up",
        "1 while a discovery source reads (or has not failed yet), 0 while its reads fail"
        " (the fleet keeps its last list).",
        ["fleet", "source"],
    )
    source_failures = _counter(
        "dispatcher_fleet_source_failed_reads",
        "Reads of a discovery source that failed (each retry counts).",
        ["fleet", "source"],
    )
    for fleet, each in stats.items():
        failovers.add_metric([fleet], each["failovers"])
        ejections.add_metric([fleet], each["ejections"])
        for source in each.get("sources", ()):
            source_up.add_metric([fleet, source["source"]], 0.0 if source["error"] else 1.0)
            source_failures.add_metric([fleet, source["source"]], source["failed_reads"])
        states = [instance["state"] for instance in each["instances"]]
        for name in _INSTANCE_STATES:
            counts.add_metric([fleet, name], states.count(name))
        for instance in each["instances"]:
            target = instance["target"]
            for name in _INSTANCE_STATES:
                state.add_metric([fleet, target, name], 1.0 if instance["state"] == name else 0.0)
            calls.add_metric([fleet, target], instance["calls"])
            failures.add_metric([fleet, target], instance["failures"])
            in_flight.add_metric([fleet, target], instance["in_flight"])
    yield from (failovers, ejections, counts, state, calls, failures, in_flight)
    yield from (source_up, source_failures)


def _state(stats: Mapping[str, Any]) -> Iterator[Metric]:
    if "fallbacks" not in stats:  # the memory backend: nothing shared, nothing to fall back from
        return
    yield CounterMetricFamily(
        "dispatcher_state_fallbacks",
        "Steps that used this replica's own state because the shared store did not answer"
        " (on_unavailable: fail_open).",
        stats["fallbacks"],
    )


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The registry's metrics in the format ``accept`` asks for (text or OpenMetrics)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def metrics_handler(
    registry: CollectorRegistry,
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp handler serving ``registry`` (mount it at ``/metrics``)."""
    # Imported here: importing the dispatcher must not load the HTTP client (tests/test_imports).
    from aiohttp import web

    async def handle_metrics(request: web.Request) -> web.StreamResponse:
        body, content_type = exposition(registry, request.headers.get("Accept"))
        # content_type carries its charset; aiohttp wants it whole in the header.
        return web.Response(body=body, headers={"Content-Type": content_type})

    return handle_metrics


def asgi_app(registry: CollectorRegistry) -> Any:
    """An ASGI app serving ``registry`` (prometheus-client's own)."""
    from prometheus_client import make_asgi_app

    return make_asgi_app(registry)


def _cold_starts(stats: Mapping[str, Any]) -> Iterator[Metric]:
    labels = ["provider", "target"]
    count = _counter(
        "dispatcher_cold_starts",
        "Calls that waited for an instance of their target to start (Docker, Knative).",
        labels,
    )
    seconds = _counter(
        "dispatcher_cold_start_wait_seconds",
        "Seconds those calls waited, in all (sum; divide by the count for the mean).",
        labels,
    )
    for provider, targets in stats.items():
        for target, each in targets.items():
            count.add_metric([provider, target], each["count"])
            seconds.add_metric([provider, target], each["seconds"])
    yield from (count, seconds)
