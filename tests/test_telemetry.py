"""Telemetry of a running dispatcher: metrics, spans, log lines and recent errors.

Real components throughout: the dispatcher with in-process and HTTP plugins, the
prometheus-client registry served by the aiohttp handler on 127.0.0.1 and parsed by the
library's own parser, and OpenTelemetry's SDK with its in-memory exporter (a real span
processor chain; the OTLP wire is tests/test_telemetry_tracing.py's).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from dispatcher import Dispatcher, parse_manifest
from dispatcher.config import ManifestError, TelemetryEnvironmentError, TracingSettings
from dispatcher.config.errors import ENVIRONMENT
from dispatcher.telemetry import CallStep, metrics_handler
from linchkit_plugin.errors import (
    CircuitOpen,
    DispatchError,
    InvalidParams,
    PluginError,
    TargetUnavailable,
)
from tests.conftest import EXAMPLES, ROOT, bound_socket

TRACED_TARGET = {
    "provider": "local",
    "entrypoint": "traced_plugin:TracedPlugin",
    "path": str(ROOT / "tests" / "plugins"),
}
ECHO_TARGET = {"provider": "local", "entrypoint": "echo_plugin:EchoPlugin", "path": str(EXAMPLES)}


def telemetry_manifest(telemetry: dict[str, Any], *plugins: dict[str, Any]) -> Any:
    return parse_manifest(
        {"version": 1, "plugins": list(plugins), "telemetry": telemetry}, base_dir=ROOT
    )


def traced(**methods: Any) -> dict[str, Any]:
    return {
        "id": "traced",
        "version": "1.0.0",
        "target": TRACED_TARGET,
        "methods": methods or {"context": {}, "fail": {}, "noisy": {}},
    }


def closed_port() -> int:
    sock = bound_socket()  # bound, never listening: connecting is refused at once
    port = int(sock.getsockname()[1])
    sock.close()
    return port


@pytest.fixture(autouse=True)
def _no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        "OTEL_SDK_DISABLED",
    ):
        monkeypatch.delenv(name, raising=False)


async def scrape(dispatcher: Dispatcher, accept: str | None = None) -> str:
    """GET /metrics from the aiohttp handler, served on 127.0.0.1 like the gateway will."""
    assert dispatcher.telemetry is not None
    assert dispatcher.telemetry.metrics is not None
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(dispatcher.telemetry.metrics.registry))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.SockSite(runner, bound_socket())
    await site.start()
    try:
        port = site._sock.getsockname()[1]  # type: ignore[union-attr]
        headers = {"Accept": accept} if accept else {}
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics", headers=headers) as response,
        ):
            assert response.status == 200
            return await response.text()
    finally:
        await runner.cleanup()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


# -- off means off ---------------------------------------------------------------------------


async def test_without_telemetry_the_chain_is_unchanged_and_nothing_is_recorded() -> None:
    plain = parse_manifest({"version": 1, "plugins": [traced()]}, base_dir=ROOT)
    async with Dispatcher(plain) as dispatcher:
        assert dispatcher.telemetry is None
        route = dispatcher._routes["traced"]["context"]
        assert not isinstance(route.invoke, CallStep)
        assert dispatcher.policies is not None
        assert dispatcher.policies.boundary is None
        context = await dispatcher.call("traced", "context", traceparent=None)
        assert "traceparent" not in context


# -- metrics ------------------------------------------------------------------------------------


async def test_calls_are_counted_by_plugin_method_and_outcome_and_served_at_metrics() -> None:
    telemetry = {"metrics": {"enabled": True}}
    async with Dispatcher(telemetry_manifest(telemetry, traced())) as dispatcher:
        for _ in range(7):
            await dispatcher.call("traced", "context", {}, caller="alice")
        for _ in range(3):
            with pytest.raises(PluginError):
                await dispatcher.call("traced", "fail", {"name": "Boom"})
        text = await scrape(dispatcher)
    found = samples(text)
    labels = {"plugin": "traced", "method": "context", "outcome": "ok"}
    assert value(found, "dispatcher_calls_total", **labels) == 7
    assert value(found, "dispatcher_call_duration_seconds_count", **labels) == 7
    assert value(found, "dispatcher_call_duration_seconds_sum", **labels) > 0
    failed = {"plugin": "traced", "method": "fail", "outcome": "plugin_error"}
    assert value(found, "dispatcher_calls_total", **failed) == 3
    assert value(found, "dispatcher_calls_in_flight") == 0
    # Bounded labels: no caller, request id or plugin exception name is a label value.
    assert "alice" not in text
    assert "Boom" not in text


async def test_openmetrics_is_served_when_asked_for() -> None:
    async with Dispatcher(telemetry_manifest({"metrics": {"enabled": True}}, traced())) as d:
        await d.call("traced", "context")
        text = await scrape(d, accept="application/openmetrics-text; version=1.0.0")
    assert text.rstrip().endswith("# EOF")
    assert 'dispatcher_calls_total{method="context",outcome="ok",plugin="traced"} 1.0' in text


async def test_a_plugin_naming_thousands_of_errors_adds_no_label_values() -> None:
    """Hostile: a plugin (or its callers) choosing error names must not grow the series."""
    async with Dispatcher(telemetry_manifest({"metrics": {"enabled": True}}, traced())) as d:
        for index in range(500):
            with pytest.raises(PluginError):
                await d.call("traced", "fail", {"name": f"Error{index}", "message": "x" * 10_000})
        text = await scrape(d)
        assert d.telemetry is not None
        errors = d.telemetry.errors
    series = [
        line
        for line in text.splitlines()
        if line.startswith("dispatcher_calls_total") and 'method="fail"' in line
    ]
    # Each route's `ok` series exists from the start (at 0); failures add one per type.
    assert len(series) == 2, series
    assert "Error499" not in text
    # The ring keeps the last 100, each message cut; the counts stay one key.
    assert len(errors.recent) == 100
    assert errors.recent[-1].remote_type == "Error499"
    assert len(errors.recent[-1].message) <= 513
    assert errors.counts == {("traced", "plugin_error"): 500}
    snapshot = errors.snapshot(limit=2)
    assert [entry["remote_type"] for entry in snapshot["recent"]] == ["Error499", "Error498"]
    json.dumps(snapshot)  # what /v1/errors will serve must be JSON


async def test_breaker_state_transitions_and_policy_counters_are_exported() -> None:
    port = closed_port()
    plugin = {
        "id": "down",
        "version": "1.0.0",
        "target": {"provider": "http", "url": f"http://127.0.0.1:{port}"},
        "defaults": {
            "breaker": {"fail_max": 2, "reset_timeout_ms": 60_000},
            "rate_limit": {"rate": 1000, "burst": 1000, "scope": "target"},
            "concurrency": {"max_in_flight": 4, "scope": "target"},
        },
        "methods": {"say": {}},
    }
    async with Dispatcher(telemetry_manifest({"metrics": {"enabled": True}}, plugin)) as d:
        for _ in range(2):
            with pytest.raises(TargetUnavailable):
                await d.call("down", "say", {"text": "hi"})
        with pytest.raises(CircuitOpen):
            await d.call("down", "say", {"text": "hi"})
        found = samples(await scrape(d))
    target = f"http http://127.0.0.1:{port}/invoke"
    assert value(found, "dispatcher_breaker_state", target=target, state="open") == 1
    assert value(found, "dispatcher_breaker_state", target=target, state="closed") == 0
    transition = {"target": target, "from_state": "closed", "to_state": "open"}
    assert value(found, "dispatcher_breaker_transitions_total", **transition) == 1
    assert (
        value(found, "dispatcher_calls_total", plugin="down", method="say", outcome="circuit_open")
        == 1
    )
    assert (
        value(
            found,
            "dispatcher_calls_total",
            plugin="down",
            method="say",
            outcome="target_unavailable",
        )
        == 2
    )
    assert value(found, "dispatcher_bulkhead_rejections_total", bulkhead=target) == 0
    assert value(found, "dispatcher_rate_limit_rejections_total", limit=target, scope="target") == 0


async def test_batches_cache_and_retries_are_exported(echo_url: str) -> None:
    plugin = {
        "id": "echo",
        "version": "1.0.0",
        "target": {"provider": "http", "url": echo_url},
        "methods": {
            "say": {"batch": {"max_size": 4, "max_wait_ms": 50}},
            "digest": {"pure": True, "cache": {"ttl_ms": 60_000}},
        },
    }
    async with Dispatcher(telemetry_manifest({"metrics": {"enabled": True}}, plugin)) as d:
        await d.call_many([("echo", "say", {"text": str(index)}) for index in range(8)])
        for _ in range(3):
            await d.call("echo", "digest", {"data": "x", "rounds": 1})
        found = samples(await scrape(d))
    assert value(found, "dispatcher_batches_total", route="echo.say") == 2
    assert value(found, "dispatcher_batch_items_total", route="echo.say") == 8
    assert value(found, "dispatcher_batch_flushes_total", route="echo.say", cause="full") == 2
    assert value(found, "dispatcher_batch_size_count", target_kind="http") == 2
    assert value(found, "dispatcher_batch_size_sum", target_kind="http") == 8
    assert value(found, "dispatcher_cache_hits_total", route="echo@1.0.0.digest") == 2
    assert value(found, "dispatcher_cache_misses_total", route="echo@1.0.0.digest") == 1


# -- tracing ----------------------------------------------------------------------------------


async def traced_dispatcher(
    exporter: InMemorySpanExporter, *plugins: dict[str, Any], ratio: float = 1.0
) -> AsyncIterator[Dispatcher]:
    telemetry = {"tracing": {"enabled": True, "sample_ratio": ratio}, "metrics": {"enabled": True}}
    dispatcher = Dispatcher(telemetry_manifest(telemetry, *plugins))
    assert dispatcher.telemetry is not None
    assert dispatcher.telemetry.tracing is not None
    dispatcher.telemetry.tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with dispatcher:
        yield dispatcher


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


async def test_a_call_span_has_one_child_per_attempt_and_the_plugin_gets_the_attempt_context() -> (
    None
):
    exporter = InMemorySpanExporter()
    async for d in traced_dispatcher(exporter, traced()):
        context = await d.call("traced", "context")
    spans = exporter.get_finished_spans()
    (call,) = by_name(spans, "traced.context")
    (attempt,) = by_name(spans, "traced.context attempt")
    assert attempt.parent is not None
    assert attempt.parent.span_id == call.context.span_id
    assert attempt.context.trace_id == call.context.trace_id
    expected = f"00-{attempt.context.trace_id:032x}-{attempt.context.span_id:016x}-"
    assert context["traceparent"].startswith(expected)
    assert int(context["traceparent"][-2:], 16) & 1  # sampled (0x02: W3C's random flag)
    assert call.attributes is not None
    assert call.attributes["linchkit.plugin"] == "traced"
    assert call.attributes["linchkit.method"] == "context"
    assert call.attributes["linchkit.target.kind"] == "local"
    assert call.attributes["linchkit.outcome"] == "ok"
    assert call.attributes["linchkit.attempts"] == 1


async def test_the_callers_trace_is_continued_and_an_unsampled_one_is_left_alone() -> None:
    exporter = InMemorySpanExporter()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async for d in traced_dispatcher(exporter, traced(), ratio=0.0):
        sampled = await d.call(
            "traced", "context", traceparent=f"00-{trace_id}-00f067aa0ba902b7-01"
        )
        unsampled_parent = f"00-{trace_id}-00f067aa0ba902b7-00"
        unsampled = await d.call("traced", "context", traceparent=unsampled_parent)
        root = await d.call("traced", "context")  # ratio 0: a root is not traced
    assert sampled["traceparent"].startswith(f"00-{trace_id}-")
    assert unsampled["traceparent"] == unsampled_parent
    assert "traceparent" not in root
    spans = exporter.get_finished_spans()
    assert {f"{span.context.trace_id:032x}" for span in spans} == {trace_id}
    (call,) = by_name(spans, "traced.context")
    assert call.parent is not None
    assert call.parent.span_id == 0x00F067AA0BA902B7


@pytest.mark.parametrize(
    "hostile",
    [
        "garbage",
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",  # all-zero trace id: invalid
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" + "x" * 10_000,
    ],
)
async def test_a_malformed_traceparent_starts_a_new_trace_instead_of_failing(hostile: str) -> None:
    exporter = InMemorySpanExporter()
    async for d in traced_dispatcher(exporter, traced()):
        context = await d.call("traced", "context", traceparent=hostile)
    (call,) = by_name(exporter.get_finished_spans(), "traced.context")
    assert call.parent is None  # a root of its own
    assert context["traceparent"].startswith(f"00-{call.context.trace_id:032x}-")


async def test_retries_make_one_attempt_span_each_and_errors_are_marked() -> None:
    exporter = InMemorySpanExporter()
    port = closed_port()
    plugin = {
        "id": "down",
        "version": "1.0.0",
        "target": {"provider": "http", "url": f"http://127.0.0.1:{port}"},
        "methods": {
            "say": {
                "idempotent": True,
                "retry": {"attempts": 3, "initial_backoff_ms": 1, "max_backoff_ms": 2},
            }
        },
    }
    async for d in traced_dispatcher(exporter, plugin):
        with pytest.raises(TargetUnavailable):
            await d.call("down", "say", {"text": "hi"}, timeout=10)
        assert d.telemetry is not None
        recent = d.telemetry.errors.recent[-1]
    spans = exporter.get_finished_spans()
    (call,) = by_name(spans, "down.say")
    attempts = by_name(spans, "down.say attempt")
    assert call.attributes is not None
    assert len(attempts) == call.attributes["linchkit.attempts"]
    assert len(attempts) >= 2  # the retry budget may refuse the third on a cold start
    assert [a.attributes["linchkit.attempt"] for a in attempts] == list(range(1, len(attempts) + 1))  # type: ignore[index]
    assert all(a.attributes["error.type"] == "target_unavailable" for a in attempts)  # type: ignore[index]
    assert call.status.status_code.name == "ERROR"
    assert recent.trace_id == f"{call.context.trace_id:032x}"


async def test_a_batch_span_links_every_traced_call_it_carries(echo_url: str) -> None:
    exporter = InMemorySpanExporter()
    plugin = {
        "id": "echo",
        "version": "1.0.0",
        "target": {"provider": "http", "url": echo_url},
        "methods": {"say": {"batch": {"max_size": 3, "max_wait_ms": 100}}},
    }
    async for d in traced_dispatcher(exporter, plugin):
        await d.call_many([("echo", "say", {"text": str(index)}) for index in range(3)])
    spans = exporter.get_finished_spans()
    calls = by_name(spans, "echo.say")
    (batch,) = by_name(spans, "echo.say batch")
    assert len(calls) == 3
    assert {link.context.span_id for link in batch.links} == {c.context.span_id for c in calls}
    assert batch.attributes is not None
    assert batch.attributes["linchkit.batch_size"] == 3
    assert all(c.attributes["linchkit.batch_size"] == 3 for c in calls)  # type: ignore[index]


async def test_a_cache_hit_is_marked_and_makes_no_attempt() -> None:
    exporter = InMemorySpanExporter()
    plugin = {
        "id": "echo",
        "version": "1.0.0",
        "target": ECHO_TARGET,
        "methods": {"digest": {"pure": True, "cache": {"ttl_ms": 60_000}}},
    }
    async for d in traced_dispatcher(exporter, plugin):
        await d.call("echo", "digest", {"data": "x", "rounds": 1})
        await d.call("echo", "digest", {"data": "x", "rounds": 1})
    calls = by_name(exporter.get_finished_spans(), "echo.digest")
    assert [c.attributes["linchkit.cache_hit"] for c in calls] == [False, True]  # type: ignore[index]
    assert len(by_name(exporter.get_finished_spans(), "echo.digest attempt")) == 1


# -- logs ----------------------------------------------------------------------------------------


async def test_json_log_lines_carry_the_request_trace_plugin_and_method() -> None:
    exporter = InMemorySpanExporter()
    telemetry = {"tracing": {"enabled": True}, "logs": {"format": "json"}}
    dispatcher = Dispatcher(telemetry_manifest(telemetry, traced()))
    assert dispatcher.telemetry is not None
    assert dispatcher.telemetry.tracing is not None
    dispatcher.telemetry.tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with dispatcher:
        handler = dispatcher.telemetry._log_handler
        assert handler is not None
        stream = io.StringIO()
        handler.setStream(stream)  # type: ignore[attr-defined]
        await dispatcher.call("traced", "noisy", {"text": "hello\nworld"}, request_id="req-1")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    (line,) = [each for each in lines if each["logger"] == "dispatcher.test.traced_plugin"]
    (call,) = by_name(exporter.get_finished_spans(), "traced.noisy")
    assert line["message"] == "plugin says hello\nworld"  # one line on the wire all the same
    assert line["request_id"] == "req-1"
    assert line["plugin"] == "traced"
    assert line["method"] == "noisy"
    assert line["trace_id"] == f"{call.context.trace_id:032x}"
    assert line["level"] == "WARNING"
    assert not logging.getLogger("dispatcher").handlers  # removed when the dispatcher closed


#: What a plugin or a caller may put in a message: a line break starting a record of its
#: own making, and an escape sequence clearing the operator's terminal.
FORGED = "hello\n2026-12-05 00:00:00,000 ERROR dispatcher: forged\x1b[2J"


async def test_a_peer_s_words_in_a_text_log_line_stay_on_that_line() -> None:
    """The text format wrote a message as it came: a plugin's words holding a line break
    made a second line that read as the dispatcher's own record (the JSON format escapes
    them)."""
    telemetry = {"logs": {"format": "text"}}
    async with Dispatcher(telemetry_manifest(telemetry, traced())) as dispatcher:
        assert dispatcher.telemetry is not None
        handler = dispatcher.telemetry._log_handler
        assert handler is not None
        stream = io.StringIO()
        handler.setStream(stream)  # type: ignore[attr-defined]
        await dispatcher.call("traced", "noisy", {"text": FORGED})
    (line,) = [each for each in stream.getvalue().splitlines() if "plugin says" in each]
    assert "forged" in line and "\\n" in line and "\\x1b" in line
    assert "\x1b" not in stream.getvalue()
    assert not any(
        each.startswith("2026-12-05 00:00:00") for each in stream.getvalue().splitlines()
    )


def test_the_command_line_s_own_log_lines_keep_a_peer_s_words_on_one_line(tmp_path: Path) -> None:
    """Without ``telemetry.logs``, ``dispatcher``'s commands log through the handler the
    command line installs: its lines too are one per record."""
    import subprocess

    manifest = tmp_path / "plugins.json"
    manifest.write_text(json.dumps({"version": 1, "plugins": [traced()]}))
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'sdk' / 'python'}"}
    ran = subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", "-v", "-m", str(manifest), "call",
         "traced.noisy", "-p", json.dumps({"text": FORGED})],
        capture_output=True, text=True, env=environment, timeout=60, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    (line,) = [each for each in ran.stderr.splitlines() if "plugin says" in each]
    assert "forged" in line and "\\n" in line
    assert "\x1b" not in ran.stderr
    assert not any(each.startswith("2026-12-05 00:00:00") for each in ran.stderr.splitlines())


@pytest.mark.parametrize("format", ["json", "text"])
async def test_serve_writes_each_log_record_once_in_the_manifests_format(
    tmp_path: Path, format: str
) -> None:
    """``dispatcher serve`` installs a root handler and the manifest's ``telemetry.logs``
    one more: each record once, in that format (JSON: every stderr line parses), the
    access log and the drain included; "listening on" stays on stdout for scripts."""
    document = {
        "version": 1,
        "plugins": [traced()],
        "telemetry": {"logs": {"format": format, "level": "INFO"}},
    }
    manifest = tmp_path / "plugins.json"
    manifest.write_text(json.dumps(document))
    environment = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'sdk' / 'python'}"}
    serve = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher.cli", "-v", "-m", str(manifest), "serve",
        "--port", "0", "--access-log",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment,
    )  # fmt: skip
    try:
        assert serve.stdout is not None
        listening = (await asyncio.wait_for(serve.stdout.readline(), 60)).decode()
        assert listening.startswith("listening on http://"), listening
        url = listening.split()[-1]
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{url}/v1/plugins/traced/methods/noisy",
                json={"text": "hello"},
                headers={"X-Request-Id": "req-7"},
            ) as answer,
        ):
            assert answer.status == 200
        serve.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(serve.communicate(), 60)
    finally:
        if serve.returncode is None:
            serve.kill()
            await serve.wait()
    lines = err.decode().splitlines()
    if format == "json":
        records = [json.loads(line) for line in lines]  # every line is JSON
        messages = [record["message"] for record in records]
        loggers = {record["logger"] for record in records}
        (said,) = [record for record in records if record["message"] == "plugin says hello"]
        assert said["request_id"] == "req-7"
    else:
        messages = [line.split(": ", 1)[1].rsplit(" [", 1)[0] for line in lines]
        loggers = {line.split(" ")[3].rstrip(":") for line in lines}
    assert messages.count("plugin says hello") == 1, lines
    assert messages.count("draining: calls in flight have 20 s") == 1, lines
    assert "aiohttp.access" in loggers, lines  # another logger's line, in the same format
    assert len(set(messages)) == len(messages), lines  # nothing written twice


def test_a_plugin_stderr_line_is_tagged_with_its_plugin_and_instance() -> None:
    from dispatcher.telemetry import CallContextFilter, JsonFormatter

    record = logging.getLogger("dispatcher.plugin.ledger").makeRecord(
        "dispatcher.plugin.ledger", logging.INFO, __file__, 1, "%s", ("x" * 100_000,), None,
        extra={"instance": "pid 4242"},
    )  # fmt: skip
    assert CallContextFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert (line["plugin"], line["instance"]) == ("ledger", "pid 4242")
    assert "request_id" not in line  # written outside any call
    assert len(line["message"]) <= 16_385  # a flooding plugin costs a bounded line


# -- configuration ----------------------------------------------------------------------------


def test_tracing_follows_the_standard_environment_and_the_manifest_wins() -> None:
    settings = TracingSettings()
    assert settings.resolved({}) is None
    resolved = settings.resolved(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
            "OTEL_SERVICE_NAME": "checkout",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
        }
    )
    assert resolved is not None
    assert resolved.endpoint == "http://collector:4318/v1/traces"
    assert resolved.service_name == "checkout"
    assert resolved.sample_ratio == 0.25
    explicit = TracingSettings(otlp_endpoint="http://here:4318/v1/traces", sample_ratio=0.5)
    resolved = explicit.resolved({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://there/v1/traces"})
    assert resolved is not None
    assert resolved.endpoint == "http://here:4318/v1/traces"
    assert resolved.sample_ratio == 0.5
    assert explicit.resolved({"OTEL_SDK_DISABLED": "true"}) is None
    assert (
        TracingSettings(enabled=False).resolved({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}) is None
    )
    bad_arg = TracingSettings(enabled=True).resolved(
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "lots"}
    )
    assert bad_arg is not None
    assert bad_arg.sample_ratio == 1.0


@pytest.mark.parametrize(
    ("telemetry", "path"),
    [
        ({"tracing": {"otlp_endpoint": "file:///etc/passwd"}}, "telemetry.tracing.otlp_endpoint"),
        ({"tracing": {"sample_ratio": 1.5}}, "telemetry.tracing.sample_ratio"),
        ({"metrics": {"latency_buckets": [1, 0.5]}}, "telemetry.metrics.latency_buckets"),
        ({"logs": {"format": "xml"}}, "telemetry.logs.format"),
        ({"metrics": {"enabld": True}}, "telemetry.metrics.enabld"),
    ],
)
def test_a_wrong_telemetry_section_is_a_manifest_error_naming_its_path(
    telemetry: dict[str, Any], path: str
) -> None:
    with pytest.raises(ManifestError) as caught:
        telemetry_manifest(telemetry, traced())
    assert path in str(caught.value)


#: Endpoints the manifest's ``otlp_endpoint`` refuses, set in the environment instead: they
#: loaded and started, and the exporter failed at its first export (or sent to a port
#: that urllib3 wrapped around), while the dispatcher's repr printed the password.
ENVIRONMENT_ENDPOINTS = [
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://u:s3cret@h:99999/v1/traces", "65535"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://u:s3cret@collector/v1/traces", "http://"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "u:s3cret@collector:4318", "http://"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector/v1/traces#s3cret", "fragment"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector/v1/tr\naces?k=s3cret", "line"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://u:s3cret@collector:0", "65535"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/?token=s3cret", "no query"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318", "http://"),
]


@pytest.mark.parametrize(("variable", "value", "problem"), ENVIRONMENT_ENDPOINTS)
def test_an_otlp_endpoint_from_the_environment_is_checked_at_load_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, problem: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ManifestError) as caught:
        telemetry_manifest({}, traced())
    (refused,) = caught.value.problems
    assert (refused.source, refused.path, refused.line) == (ENVIRONMENT, variable, None)
    assert problem in refused.message
    assert "s3cret" not in str(caught.value)


#: What the OTLP exporter reads besides the manifest's ``headers``: it dropped an item it
#: could not read with a warning printing it whole, and sent a decoded CR or LF or a
#: character past ASCII on to fail (or split the request) at the first export.
ENVIRONMENT_HEADERS = [
    ("OTEL_EXPORTER_OTLP_HEADERS", "Bearer s3cret", "name=value"),
    ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20s3cret%0d%0aX-Evil%3a%201", "CR"),
    ("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=a,x-key=s3cret\x7f", "name=value"),
    ("OTEL_EXPORTER_OTLP_HEADERS", "x-key=s3cret%C3%A9", "printable ASCII"),
    ("OTEL_EXPORTER_OTLP_HEADERS", "x%20key=s3cret", "not a token"),
    ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x key=s3cret", "name=value"),
]


@pytest.mark.parametrize(("variable", "value", "problem"), ENVIRONMENT_HEADERS)
def test_otlp_headers_from_the_environment_are_held_to_the_manifests_rules(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, problem: str
) -> None:
    monkeypatch.setenv(variable, value)
    telemetry_manifest({}, traced())  # no exporter, so no headers to send
    with pytest.raises(ManifestError) as caught:
        telemetry_manifest({"tracing": {"otlp_endpoint": "http://c:4318/v1/traces"}}, traced())
    (refused,) = caught.value.problems
    assert (refused.source, refused.path) == (ENVIRONMENT, variable)
    assert problem in refused.message
    assert "s3cret" not in str(caught.value)


def test_otlp_variables_the_exporter_reads_as_the_spec_writes_them_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://u:pw@collector:4318/")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer%20abc, x-tenant=a")
    telemetry_manifest({}, traced())
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "Authorization=Bearer abc,,")  # liberal
    telemetry_manifest({}, traced())
    # The traces' own variables win: the generic ones are not read, whatever they hold.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://unused")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:4318/v1/traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "unused")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=b")
    telemetry_manifest({}, traced())
    # Nor are any when tracing is off.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://unused")
    telemetry_manifest({"tracing": {"enabled": False}}, traced())


async def test_a_dispatcher_does_not_start_half_traced_on_a_variable_set_after_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A manifest validated elsewhere (or before the variable was set): the dispatcher is
    refused when it is made, before anything starts, naming the variable."""
    manifest = telemetry_manifest({}, traced())
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://u:s3cret@h:99999/v1/traces")
    with pytest.raises(TelemetryEnvironmentError) as caught:
        Dispatcher(manifest)
    assert caught.value.variable == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    assert "s3cret" not in str(caught.value)


async def test_the_otlp_endpoints_password_never_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://u:s3cret@127.0.0.1:9/v1/t")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")  # nothing exported meanwhile
    async with Dispatcher(telemetry_manifest({}, traced())) as dispatcher:
        shown = repr(dispatcher.telemetry)
    assert "s3cret" not in shown and "127.0.0.1:9/v1/t" in shown


def test_otlp_headers_never_print() -> None:
    settings = TracingSettings(
        otlp_endpoint="http://x/v1/traces", headers={"Authorization": "Bearer s3cret"}
    )
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in str(settings.resolved({}))


async def test_errors_before_the_chain_are_counted_but_not_kept() -> None:
    async with Dispatcher(telemetry_manifest({"metrics": {"enabled": True}}, traced())) as d:
        with pytest.raises(DispatchError):
            await d.call("nope", "context")
        assert d.telemetry is not None
        # Counted (a flood of bad calls is worth seeing) under a name the caller did not
        # choose; no entry kept: there was no invocation, and the message is theirs.
        assert d.telemetry.errors.counts == {("?", "plugin_not_found"): 1}
        assert not d.telemetry.errors.recent


SAY_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string"}},
    "required": ["text"],
}


def echo(**state: Any) -> dict[str, Any]:
    """The echo plugin, its ``say`` checked by a schema, with metrics on; ``state``: the
    manifest's state section (none: memory)."""
    document: dict[str, Any] = {
        "version": 1,
        "telemetry": {"metrics": {"enabled": True}},
        "plugins": [
            {
                "id": "echo",
                "version": "1.0.0",
                "target": ECHO_TARGET,
                "methods": {"say": {"params_schema": SAY_SCHEMA}},
            }
        ],
    }
    if state:
        document["state"] = state
    return document


async def test_the_refusals_of_a_keyed_call_are_counted_as_a_call_s_refusals_are() -> None:
    """A keyed call's params are checked by its idempotency step, outside the chain's
    telemetry, and so is its key: a call refused there (the key used with other params,
    params no schema takes) was counted nowhere, while the same params without a key were
    ``dispatcher_calls_total{outcome="invalid_params"}``. Counted as those are now: the
    same series, no latency, the error counted and its message not kept."""
    async with Dispatcher(parse_manifest(echo(), base_dir=ROOT)) as d:
        said = await d.call("echo", "say", {"text": "hi"}, idempotency_key="k-1")
        assert said["text"] == "hi"
        with pytest.raises(InvalidParams, match=r"k-1.*already used"):
            await d.call("echo", "say", {"text": "other"}, idempotency_key="k-1")
        with pytest.raises(InvalidParams, match="text"):
            await d.call("echo", "say", {"words": "hi"}, idempotency_key="k-2")
        with pytest.raises(InvalidParams, match="text"):  # without a key: counted before
            await d.call("echo", "say", {"words": "hi"})
        found = samples(await scrape(d))
        assert d.telemetry is not None
        assert d.telemetry.errors.counts == {("echo", "invalid_params"): 3}
        assert not d.telemetry.errors.recent
    refused = {"plugin": "echo", "method": "say", "outcome": "invalid_params"}
    assert value(found, "dispatcher_calls_total", **refused) == 3
    assert value(found, "dispatcher_call_duration_seconds_count", **refused) == 3
    assert value(found, "dispatcher_call_duration_seconds_sum", **refused) == 0
    ok = {"plugin": "echo", "method": "say", "outcome": "ok"}
    assert value(found, "dispatcher_calls_total", **ok) == 1


async def test_a_keyed_call_refused_for_a_store_that_cannot_answer_is_counted() -> None:
    """``fail_closed`` with the store down: the refusal of a keyed call, which its
    idempotency step makes before the chain, is counted as the chain counts a shared
    limit's (``target_unavailable``)."""
    port = closed_port()
    state = {
        "backend": "redis",
        "url": f"redis://127.0.0.1:{port}",
        "on_unavailable": "fail_closed",
    }
    async with Dispatcher(parse_manifest(echo(**state), base_dir=ROOT)) as d:
        for _ in range(2):
            with pytest.raises(TargetUnavailable, match="state store"):
                await d.call("echo", "say", {"text": "hi"}, idempotency_key="k-1")
        found = samples(await scrape(d))
    refused = {"plugin": "echo", "method": "say", "outcome": "target_unavailable"}
    assert value(found, "dispatcher_calls_total", **refused) == 2


async def test_keyed_calls_answered_without_running_are_counted_by_route() -> None:
    """Keyed calls the idempotency step answered without running: replayed from their
    key's record, or joined to the same key's call in flight. Neither reaches the chain
    nor its telemetry, so a client retrying a lot showed as nothing at all (and the
    plugin's own counts could not be squared with the host's)."""
    document = echo()
    document["plugins"][0]["methods"]["sleep"] = {}
    async with Dispatcher(parse_manifest(document, base_dir=ROOT)) as d:
        for _ in range(3):  # the first runs; the next two are answered from its record
            await d.call("echo", "say", {"text": "hi"}, idempotency_key="k-1")
        answers = await asyncio.gather(
            *(d.call("echo", "sleep", {"seconds": 0.3}, idempotency_key="k-2") for _ in range(4))
        )  # one runs, three wait for it
        assert len(set(answers)) == 1  # the one run's answer, four times
        found = samples(await scrape(d))
    assert value(found, "dispatcher_idempotency_replays_total", route="echo@1.0.0.say") == 2
    assert value(found, "dispatcher_idempotency_joined_total", route="echo@1.0.0.say") == 0
    assert value(found, "dispatcher_idempotency_joined_total", route="echo@1.0.0.sleep") == 3
    ok = {"plugin": "echo", "method": "say", "outcome": "ok"}
    assert value(found, "dispatcher_calls_total", **ok) == 1  # the one that ran


def test_a_log_level_is_read_in_any_case_as_the_command_line_reads_it() -> None:
    for written in ("info", "Info", "INFO"):
        manifest = telemetry_manifest({"logs": {"format": "json", "level": written}}, traced())
        assert manifest.telemetry.logs.level == "INFO"
    with pytest.raises(ManifestError, match="level"):
        telemetry_manifest({"logs": {"level": "verbose"}}, traced())
