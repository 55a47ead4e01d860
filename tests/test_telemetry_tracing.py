"""One trace from the host through the dispatcher into a plugin, as an OTLP collector sees it.

The collector is a small aiohttp server in the test, decoding OTLP/HTTP protobuf with
opentelemetry-proto; the dispatcher sends with the SDK's OTLP/HTTP exporter (its manifest
names the endpoint); the plugin is the example served by ``dispatcher-plugin serve`` in its
own process, exporting through the standard ``OTEL_*`` variables.
"""

from __future__ import annotations

import asyncio
import gzip
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from dispatcher import Dispatcher, parse_manifest
from linchkit_plugin import PluginHost
from tests.conftest import EXAMPLES, ROOT, bound_socket
from tests.services import free_port

BIN = Path(sys.executable).parent
PATIENCE = 60.0


@dataclass
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]


class Collector:
    """An OTLP/HTTP traces receiver: what every service sent, decoded."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415)
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        self.requests += 1
        for resource_spans in export.resource_spans:
            service = next(
                (
                    attribute.value.string_value
                    for attribute in resource_spans.resource.attributes
                    if attribute.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            service,
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            span.kind,
                            {a.key: _value(a.value) for a in span.attributes},
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def named(self, name: str) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.name == name]


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, str]]:
    received = Collector()
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/v1/traces", received.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = bound_socket()
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        yield received, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


async def until(predicate: Any, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PATIENCE
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"waited {PATIENCE:g} s for {what}")
        await asyncio.sleep(0.05)


async def test_one_trace_spans_host_dispatcher_and_a_python_plugin_process(
    collector: tuple[Collector, str], plugins: Any
) -> None:
    received, base = collector
    port = free_port()
    plugin = plugins(
        [
            str(BIN / "dispatcher-plugin"),
            "serve",
            "echo_plugin:EchoPlugin",
            "--path",
            str(EXAMPLES),
            "--port",
            str(port),
        ],
        OTEL_EXPORTER_OTLP_ENDPOINT=base,
        OTEL_SERVICE_NAME="echo-plugin",
        OTEL_BSP_SCHEDULE_DELAY="50",  # ms: send spans soon, not after the default 5 s
    )
    plugin.wait_said("listening on")
    manifest = parse_manifest(
        {
            "version": 1,
            "telemetry": {
                "tracing": {"otlp_endpoint": f"{base}/v1/traces", "service_name": "the-dispatcher"}
            },
            "plugins": [
                {
                    "id": "echo",
                    "version": "1.0.0",
                    "target": {"provider": "http", "url": f"http://127.0.0.1:{port}"},
                    "methods": {"say": {}},
                }
            ],
        },
        base_dir=ROOT,
    )
    # The host traces too, with a provider of its own (not the global one): the dispatcher
    # continues whatever span is current.
    host = TracerProvider(resource=Resource.create({"service.name": "the-host"}))
    host.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces")))
    async with Dispatcher(manifest) as dispatcher:
        with host.get_tracer("host").start_as_current_span("handle request") as host_span:
            result = await dispatcher.call("echo", "say", {"text": "traced"})
    await asyncio.to_thread(host.shutdown)
    assert result["text"] == "traced"

    await until(lambda: received.named("EchoPlugin.say"), "the plugin's span")
    (host_received,) = received.named("handle request")
    (call,) = received.named("echo.say")
    (attempt,) = received.named("echo.say attempt")
    (in_plugin,) = received.named("EchoPlugin.say")
    trace_id = f"{host_span.get_span_context().trace_id:032x}"
    assert {s.trace_id for s in (host_received, call, attempt, in_plugin)} == {trace_id}
    assert call.parent_span_id == host_received.span_id
    assert attempt.parent_span_id == call.span_id
    assert in_plugin.parent_span_id == attempt.span_id
    assert (host_received.service, call.service, in_plugin.service) == (
        "the-host",
        "the-dispatcher",
        "echo-plugin",
    )
    assert in_plugin.kind == trace.SpanKind.SERVER.value + 1  # OTLP's enum counts from UNSPECIFIED
    assert call.attributes["linchkit.plugin"] == "echo"
    assert attempt.attributes["linchkit.instance"] == f"http http://127.0.0.1:{port}/invoke"


@pytest.mark.parametrize(
    "traceparent",
    ["garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "x" * 100_000, 42],
)
async def test_the_sdk_runs_a_call_with_a_malformed_traceparent_untraced(traceparent: Any) -> None:
    from echo_plugin import EchoPlugin

    host = PluginHost(EchoPlugin())
    await host.init({})
    await host.start()
    try:
        result = await host.call("say", {"text": "hi"}, {"traceparent": traceparent})
    finally:
        await host.close()
    assert result["text"] == "hi"
