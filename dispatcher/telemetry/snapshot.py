"""What a running dispatcher's ``/metrics`` says, read back: the figures of ``dispatcher top``.

``Sample.parse`` reads one Prometheus exposition (the text format, with the client
library's own parser) into the few families the live view shows; ``method_rows`` compares
two samples and gives, per plugin method, what happened *between* them: calls per second,
the share that failed, p50 and p99 from the latency histogram's bucket counts in that
window (interpolated inside a bucket as PromQL's ``histogram_quantile`` does), and the
cache's hit ratio. Breakers and fleet instances are read as they are now.

Pure and synchronous, so the view is tested without a terminal and the arithmetic
without a server.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

__all__ = ["MethodRow", "Sample", "method_rows", "quantile"]

Method = tuple[str, str]


@dataclass
class Sample:
    """The families ``dispatcher top`` shows, from one scrape at ``time`` (seconds)."""

    time: float
    #: Calls by (plugin, method) and outcome (``ok`` or an error type).
    calls: dict[Method, dict[str, float]] = field(default_factory=dict)
    #: Cumulative latency buckets by (plugin, method), all outcomes: (upper bound, count).
    buckets: dict[Method, list[tuple[float, float]]] = field(default_factory=dict)
    #: Cache hits and misses by route (``plugin@version.method``).
    cache: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: Each breaker's state, by the target it guards.
    breakers: dict[str, str] = field(default_factory=dict)
    #: Each fleet instance's state: (fleet, instance) -> state.
    instances: dict[tuple[str, str], str] = field(default_factory=dict)
    in_flight: float = 0.0

    @classmethod
    def parse(cls, text: str, time: float) -> Sample:
        from prometheus_client.parser import text_string_to_metric_families

        sample = cls(time)
        buckets: dict[Method, dict[float, float]] = defaultdict(lambda: defaultdict(float))
        hits: dict[str, float] = {}
        misses: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for point in family.samples:
                labels, value = point.labels, point.value
                name = point.name
                if name == "dispatcher_calls_total":
                    key = (labels["plugin"], labels["method"])
                    sample.calls.setdefault(key, {})[labels["outcome"]] = value
                elif name == "dispatcher_call_duration_seconds_bucket":
                    key = (labels["plugin"], labels["method"])
                    buckets[key][float(labels["le"])] += value
                elif name == "dispatcher_cache_hits_total":
                    hits[labels["route"]] = value
                elif name == "dispatcher_cache_misses_total":
                    misses[labels["route"]] = value
                elif name == "dispatcher_breaker_state" and value == 1:
                    sample.breakers[labels["target"]] = labels["state"]
                elif name == "dispatcher_fleet_instance_state" and value == 1:
                    sample.instances[(labels["fleet"], labels["instance"])] = labels["state"]
                elif name == "dispatcher_calls_in_flight":
                    sample.in_flight = value
        sample.buckets = {key: sorted(bounds.items()) for key, bounds in buckets.items()}
        sample.cache = {route: (hits[route], misses.get(route, 0.0)) for route in hits}
        return sample


@dataclass(frozen=True)
class MethodRow:
    plugin: str
    method: str
    calls_per_s: float
    error_ratio: float | None
    p50_s: float | None
    p99_s: float | None
    cache_hit_ratio: float | None


def method_rows(before: Sample, now: Sample) -> list[MethodRow]:
    """Per plugin method, what happened between ``before`` and ``now``."""
    elapsed = max(now.time - before.time, 1e-9)
    rows = []
    for key in sorted(now.calls):
        outcomes = now.calls[key]
        earlier = before.calls.get(key, {})
        delta = {kind: count - earlier.get(kind, 0.0) for kind, count in outcomes.items()}
        total = sum(delta.values())
        window = _bucket_delta(before.buckets.get(key, []), now.buckets.get(key, []))
        rows.append(
            MethodRow(
                key[0],
                key[1],
                total / elapsed,
                (total - delta.get("ok", 0.0)) / total if total else None,
                quantile(0.5, window),
                quantile(0.99, window),
                _hit_ratio(before, now, key),
            )
        )
    return rows


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of cumulative ``buckets`` (upper bound, count), interpolated
    linearly inside its bucket; None with no observation. The ``+Inf`` bucket answers
    with the highest finite bound, as ``histogram_quantile`` does."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def _bucket_delta(
    before: list[tuple[float, float]], now: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    earlier = dict(before)
    return [(bound, count - earlier.get(bound, 0.0)) for bound, count in now]


def _hit_ratio(before: Sample, now: Sample, key: Method) -> float | None:
    plugin, method = key
    hits = misses = 0.0
    for route, (route_hits, route_misses) in now.cache.items():
        if route.startswith(f"{plugin}@") and route.endswith(f".{method}"):
            old_hits, old_misses = before.cache.get(route, (0.0, 0.0))
            hits += route_hits - old_hits
            misses += route_misses - old_misses
    looked_up = hits + misses
    return hits / looked_up if looked_up else None
