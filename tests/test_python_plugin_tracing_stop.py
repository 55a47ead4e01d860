"""``dispatcher-plugin serve`` with tracing on stops within its caps, whatever the collector does.

With ``OTEL_EXPORTER_OTLP_*`` set, the plugin's spans are buffered and sent in batches
(``linchkit_plugin.tracing``); a stop sends those still buffered after the stop and
destroy hooks, for what remains of the hooks' cap or ``SPAN_FLUSH_MARGIN_SECONDS`` when
less remains, as the Go and TypeScript SDKs do. A collector that accepts the connection
and never answers (or an endpoint that drops every packet) keeps the whole stop within
grace + hooks + that margin: the spans are dropped then, and the plugin says so in one
line that names neither the exporter's headers nor the endpoint's credentials. Before,
the flush ran at the interpreter's exit, for the exporter's own timeout (10 s) past the
operator's caps, where a platform may kill the process.

The collector here is a TCP server on 127.0.0.1 that accepts and never answers.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time

import httpx
import pytest

from linchkit_plugin import tracing
from linchkit_plugin.tracing import SPAN_FLUSH_MARGIN_SECONDS
from tests.conformance.test_stop_with_a_silent_collector import (
    SECRET,
    TRACEPARENT,
    stopped_after_a_traced_call,
    traced_environment,
)
from tests.conformance.test_stop_with_a_silent_collector import (
    silent_collector as silent_collector,  # the fixture
)
from tests.test_python_plugin_http_stop import _serving
from tests.test_telemetry_tracing import Collector, until
from tests.test_telemetry_tracing import collector as collector  # the fixture

pytestmark = pytest.mark.slow

#: Slack past grace + hooks + the margin for a slow, loaded machine; well short of the
#: exporter's own 10 s.
SLACK = 2.5


async def _stop_with_a_span_buffered(
    collector: str, caps_ms: int | None
) -> tuple[float, int | None, str]:
    """Serve the example with tracing to ``collector`` and both caps ``caps_ms`` (None: the
    defaults), make one traced call, SIGTERM the plugin: how long it took to exit, its
    status, its stderr."""
    async with _serving({}, traced_environment(collector, caps_ms)) as (process, url):
        assert process.stderr is not None
        envelope = {
            "v": 1,
            "plugin": "example",
            "method": "echo",
            "params": {"text": "traced"},
            "context": {"request_id": "r1", "traceparent": TRACEPARENT},
        }
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            response = await client.post("/invoke", json=envelope)
        assert response.json()["ok"] is True, response.text
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            said = (await process.stderr.read()).decode(errors="replace")
            await process.wait()
        return time.monotonic() - began, process.returncode, said


async def test_a_silent_collector_keeps_the_stop_within_grace_hooks_and_the_margin(
    silent_collector: str,
) -> None:
    took, returncode, said = await _stop_with_a_span_buffered(silent_collector, 0)
    assert took < SPAN_FLUSH_MARGIN_SECONDS + SLACK, (took, said)
    assert returncode == 0, said
    dropped = [line for line in said.splitlines() if "spans" in line and "dropped" in line]
    assert len(dropped) == 1, said
    assert "127.0.0.1" in dropped[0], dropped
    assert SECRET not in said, said


async def test_the_flush_gets_what_remains_of_the_hooks_cap(silent_collector: str) -> None:
    # Hooks that end at once leave most of a 2 s cap to the spans: the stop takes about
    # 2 s, not the 1 s margin alone, and not the exporter's 10 s.
    took, returncode, said = await _stop_with_a_span_buffered(silent_collector, 2_000)
    assert 2.0 - 0.5 <= took < 2.0 + SLACK, (took, said)
    assert returncode == 0, said
    assert SECRET not in said, said


async def test_a_collector_that_answers_gets_the_spans_buffered_at_the_stop(
    collector: tuple[Collector, str],
) -> None:
    received, base = collector
    took, returncode, said = await _stop_with_a_span_buffered(f"{base}/v1/traces", None)
    await until(lambda: received.named("linchkit.plugin/echo"), "the span sent at the stop")
    assert returncode == 0, said
    assert "dropped" not in said, said
    # Sent as soon as the collector took it, not after the rest of the hooks' cap.
    assert took < SPAN_FLUSH_MARGIN_SECONDS + SLACK, (took, said)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pass@collector:4318/v1/traces?token=t", "http://collector:4318"),
        ("https://[::1]:4318/v1/traces", "https://[::1]:4318"),
        ("http://collector/v1/traces", "http://collector"),
        ("http://collector:99999/v1/traces", "(its URL is malformed)"),
    ],
)
def test_the_warning_names_the_collector_by_scheme_host_and_port_only(
    monkeypatch: pytest.MonkeyPatch, url: str, shown: str
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url)
    assert tracing._collector_shown() == shown


# -- the plugin executable's own modes ---------------------------------------------------
# ``linchkit_plugin.grpc_server.main`` (a gRPC service) and ``linchkit_plugin.ws_server.main``
# (``serve --websocket``) read the same variables as ``dispatcher-plugin serve``: before,
# they installed no exporter, and a plugin served so sent no span at all.


@pytest.mark.parametrize("mode", ["grpc", "websocket"])
async def test_the_executable_s_own_modes_send_the_spans_of_traced_calls(
    mode: str, collector: tuple[Collector, str]
) -> None:
    received, base = collector
    took, returncode, said = await stopped_after_a_traced_call(
        "python", traced_environment(f"{base}/v1/traces", None), mode=mode
    )
    await until(lambda: received.named("linchkit.plugin/echo"), f"the {mode} plugin's span")
    (span,) = received.named("linchkit.plugin/echo")
    assert span.trace_id == TRACEPARENT.split("-")[1]
    assert span.attributes["linchkit.plugin"] == "example"
    assert span.service == "example"  # no OTEL_SERVICE_NAME: the plugin's id
    assert returncode == 0, said
    assert took < SPAN_FLUSH_MARGIN_SECONDS + SLACK, (took, said)


@pytest.mark.parametrize("mode", ["grpc", "websocket"])
async def test_the_executable_s_own_modes_stop_within_the_caps_with_a_silent_collector(
    mode: str, silent_collector: str
) -> None:
    took, returncode, said = await stopped_after_a_traced_call(
        "python", traced_environment(silent_collector, 0), mode=mode
    )
    assert took < SPAN_FLUSH_MARGIN_SECONDS + SLACK, (took, said)
    assert returncode == 0, said
    assert SECRET not in said, said
    assert "spans dropped at the stop" in said, said


def test_a_collector_named_without_opentelemetry_installed_is_said_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The variables name a collector and OpenTelemetry's API is missing: before, the
    # plugin served untraced and said nothing (the TypeScript SDK warns).
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://u:{SECRET}@127.0.0.1:4318")
    monkeypatch.setattr(tracing, "AVAILABLE", False)
    with caplog.at_level(logging.WARNING, logger="linchkit_plugin.tracing"):
        assert tracing.configure_from_env() is False
    (said,) = [record.getMessage() for record in caplog.records]
    assert "not installed: no span is sent" in said, said
    assert "http://127.0.0.1:4318" in said and SECRET not in said, said


def test_a_collector_named_without_the_exporter_installed_is_said_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The API alone (a library brought it) and no SDK or exporter: the same.
    from opentelemetry import trace

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:4318/v1/traces")
    monkeypatch.setattr(trace, "get_tracer_provider", trace.ProxyTracerProvider)
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with caplog.at_level(logging.WARNING, logger="linchkit_plugin.tracing"):
        assert tracing.configure_from_env() is False
    (said,) = [record.getMessage() for record in caplog.records]
    assert "not installed: no span is sent" in said, said
