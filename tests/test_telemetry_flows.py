"""Telemetry of streams and host events (``dispatcher.telemetry.flows``): counted by
outcome with their durations and chunks, traced with one span each, the plugin continuing
a stream's trace; event names a client invents stay bounded."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dispatcher import Dispatcher, parse_manifest
from dispatcher.telemetry.flows import StreamStep
from dispatcher.telemetry.metrics import MAX_EVENT_NAMES
from linchkit_plugin.errors import PluginError, PluginNotFound
from tests.conftest import ROOT
from tests.test_telemetry import (
    _no_otel_environment,  # noqa: F401  (autouse: no OTEL_* from the machine)
    by_name,
    samples,
    scrape,
    telemetry_manifest,
    traced,
    traced_dispatcher,
    value,
)

METHODS = {"chunks": {}, "context": {}}


def traced_process() -> dict[str, Any]:
    """The traced test plugin as a subprocess plugin: the local provider neither streams
    nor takes host events."""
    command = [sys.executable, str(ROOT / "tests" / "plugins" / "traced_plugin.py")]
    return {**traced(**METHODS), "target": {"provider": "subprocess", "command": command}}


def metrics_dispatcher() -> Dispatcher:
    return Dispatcher(telemetry_manifest({"metrics": {"enabled": True}}, traced_process()))


async def test_streams_are_counted_by_outcome_with_their_chunks_and_duration() -> None:
    async with metrics_dispatcher() as d:
        assert [chunk["index"] async for chunk in d.stream("traced", "chunks", {"count": 4})] == [
            0,
            1,
            2,
            3,
        ]
        with pytest.raises(PluginError):
            async for _ in d.stream("traced", "chunks", {"count": 4, "fail_at": 2}):
                pass
        stream = d.stream("traced", "chunks", {"count": 10})
        async for chunk in stream:  # the consumer stops after the first: no failure
            assert chunk["index"] == 0
            break
        await stream.aclose()  # type: ignore[attr-defined]
        found = samples(await scrape(d))
    labels = {"plugin": "traced", "method": "chunks"}
    assert value(found, "dispatcher_streams_total", outcome="ok", **labels) == 1
    assert value(found, "dispatcher_streams_total", outcome="plugin_error", **labels) == 1
    assert value(found, "dispatcher_streams_total", outcome="closed", **labels) == 1
    assert value(found, "dispatcher_stream_chunks_total", **labels) == 4 + 2 + 1
    assert value(found, "dispatcher_stream_duration_seconds_count", outcome="ok", **labels) == 1
    assert value(found, "dispatcher_stream_duration_seconds_sum", outcome="ok", **labels) > 0
    assert d.telemetry is not None
    assert d.telemetry.errors.counts[("traced", "plugin_error")] == 1


async def test_host_events_are_counted_and_invented_names_stay_bounded() -> None:
    async with metrics_dispatcher() as d:
        await d.publish("traced", "ping", {"n": 1})
        await d.publish("traced", "ping", {"n": 2})
        for index in range(MAX_EVENT_NAMES + 20):  # names a gateway client makes up
            await d.publish("traced", f"made-up-{index}", None)
        for index in range(5):  # plugins that do not exist
            with pytest.raises(PluginNotFound):
                await d.publish(f"nobody-{index}", "ping", None)
        found = samples(await scrape(d))
    assert value(found, "dispatcher_events_total", plugin="traced", event="ping", outcome="ok") == 2
    events = {labels for name, labels in found if name == "dispatcher_events_total"}
    names = {dict(labels)["event"] for labels in events if dict(labels)["plugin"] == "traced"}
    assert len(names) == MAX_EVENT_NAMES + 1  # and "other"
    assert "other" in names
    assert (
        value(found, "dispatcher_events_total", plugin="?", event="?", outcome="plugin_not_found")
        == 5
    )
    assert not any(dict(labels)["plugin"].startswith("nobody") for labels in events)


async def test_a_traced_stream_has_one_span_and_the_plugin_continues_its_trace() -> None:
    exporter = InMemorySpanExporter()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async for d in traced_dispatcher(exporter, traced_process()):
        chunks = [
            chunk
            async for chunk in d.stream(
                "traced", "chunks", {"count": 3}, traceparent=f"00-{trace_id}-00f067aa0ba902b7-01"
            )
        ]
        with pytest.raises(PluginError):
            async for _ in d.stream("traced", "chunks", {"count": 3, "fail_at": 1}):
                pass
    spans = exporter.get_finished_spans()
    ok, failed = by_name(spans, "traced.chunks stream")
    assert ok.context.trace_id == int(trace_id, 16)
    assert ok.attributes is not None
    assert ok.attributes["linchkit.chunks"] == 3
    assert ok.attributes["linchkit.outcome"] == "ok"
    expected = f"00-{trace_id}-{ok.context.span_id:016x}-"
    assert all(chunk["traceparent"].startswith(expected) for chunk in chunks)
    assert failed.attributes is not None
    assert failed.attributes["linchkit.outcome"] == "plugin_error"
    assert failed.attributes["linchkit.chunks"] == 1
    assert failed.status.status_code.name == "ERROR"


async def test_a_publish_has_one_span_and_an_unsampled_one_none() -> None:
    exporter = InMemorySpanExporter()
    async for d in traced_dispatcher(exporter, traced_process()):
        await d.publish("traced", "ping", {"n": 1})
    (span,) = by_name(exporter.get_finished_spans(), "traced event ping")
    assert span.attributes is not None
    assert span.attributes["linchkit.outcome"] == "ok"
    exporter.clear()
    async for d in traced_dispatcher(exporter, traced_process(), ratio=0.0):
        await d.publish("traced", "ping", {"n": 1})
        async for _ in d.stream("traced", "chunks", {"count": 2}):
            pass
    assert exporter.get_finished_spans() == ()


async def test_without_telemetry_a_stream_opens_the_gate_directly() -> None:
    plain = parse_manifest({"version": 1, "plugins": [traced_process()]}, base_dir=ROOT)
    async with Dispatcher(plain) as d:
        route = d._routes["traced"]["chunks"]
        assert not isinstance(route.open_stream, StreamStep)
        received: list[Any] = [chunk async for chunk in d.stream("traced", "chunks")]
        assert len(received) == 3
